"""Run an experiment's jobs: each in its own forked process, up to ``workers`` at once, longest chains first.

Why processes: each job's cost (wall, CPU, peak memory) is measured on its own, a crash or a NaN in one arm
does not take the others down, and on a few cores two 1-thread jobs beat one 2-thread job for small models.
Why fork: the parent imports torch and transformers once, so a job starts in milliseconds. The parent never
runs tensor code, so no thread pool is copied into a child.

Each job writes ``job.json`` (key, status, result or error, costs) atomically when it ends; a job whose
``job.json`` holds the same key is done and is reused by a rerun. A job killed half-way leaves its checkpoints,
and the rerun resumes them (training runners pass ``resume`` when checkpoints exist).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import resource
import shutil
import sys
import time
import traceback
from pathlib import Path

from tuneoff.compare.experiment import Job
from tuneoff.compare.gpu import fits

RECORD = "job.json"


def _child(job: Job, inputs: dict, threads: int) -> None:
    """The job's process: quiet logs into its folder, run, write job.json with what it cost."""
    import torch

    from tuneoff.compare.jobs import RUNNERS
    from tuneoff.errors import TuneoffError

    folder = Path(job.folder)
    folder.mkdir(parents=True, exist_ok=True)
    log = open(folder / "log.txt", "a", buffering=1)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = log
    if threads > 0:
        torch.set_num_threads(threads)
    wall, cpu = time.perf_counter(), time.process_time()
    record = {"key": job.key, "name": job.name, "kind": job.kind}
    try:
        record.update(status="ok", result=RUNNERS[job.kind](job.spec, folder, inputs))
    except TuneoffError as error:
        record.update(status="failed", error=str(error))
    except Exception as error:  # a bug or an unexpected input: keep the traceback in the log, go on with other jobs
        traceback.print_exc()
        record.update(status="failed", error=f"{type(error).__name__}: {error}")
    usage = resource.getrusage(resource.RUSAGE_SELF)
    record.update(
        wall_s=time.perf_counter() - wall, cpu_s=time.process_time() - cpu, peak_rss_mb=usage.ru_maxrss / 1024
    )
    staging = folder / f".{RECORD}.tmp"
    staging.write_text(json.dumps(record, indent=1, default=float))
    staging.rename(folder / RECORD)
    log.flush()
    os._exit(0)  # skip the parent's atexit handlers, which the fork copied


def finished(job: Job) -> dict | None:
    """job.json of a finished job with the same key, else None."""
    record = _read_record(Path(job.folder) / RECORD)
    return record if record is not None and record.get("key") == job.key and record.get("status") == "ok" else None


def _read_record(path: Path) -> dict | None:
    """A job.json, or None when it is missing or unreadable (a crash mid-write leaves only the staging file)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def failures(records: dict[str, dict]) -> list[str]:
    """One line per job that did not finish: its name, failed or not run, and why."""
    return [
        f"{name}: {'not run' if r.get('status') == 'skipped' else r.get('status', 'failed')}: "
        f"{r.get('error') or 'no reason recorded'}"
        for name, r in records.items()
        if r.get("status") != "ok"
    ]


def _prepare(job: Job) -> None:
    """A folder left by another key (a changed setting) is cleared; one left by this key is resumed."""
    folder = Path(job.folder)
    key_file = folder / "key"
    if folder.exists() and (not key_file.exists() or key_file.read_text().strip() != job.key):
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key_file.write_text(job.key)
    (folder / RECORD).unlink(missing_ok=True)


def _priorities(jobs: list[Job]) -> dict[str, float]:
    """Weight of the longest chain from each job to the end: start those first."""
    children: dict[str, list[str]] = {j.name: [] for j in jobs}
    for j in jobs:
        for d in j.deps:
            children.setdefault(d, []).append(j.name)  # an input no job produces is reported by run()
    weight = {j.name: j.weight for j in jobs}
    memo: dict[str, float] = {}

    def longest(name: str) -> float:
        if name not in memo:
            memo[name] = weight[name] + max((longest(c) for c in children[name]), default=0.0)
        return memo[name]

    return {j.name: longest(j.name) for j in jobs}


def run(
    jobs: list[Job], workers: int, threads: int, show_progress: bool = True, gpu: tuple[dict, int] | None = None
) -> dict[str, dict]:
    """Run every job whose record is missing; return {name: record} (status ok, failed or skipped).

    ``gpu`` = ({job name: estimated GPU bytes}, budget): a job starts only when it fits beside the running ones
    (:func:`tuneoff.compare.gpu.fits`); ``workers`` caps the count either way.

    A job that fails (an error, a crash, a process killed) never stops the others: the jobs that read from it
    are recorded as skipped (not run) with the failed input named, everything independent of it still runs, and
    each one that did not finish is written as it happens and once more at the end (see :func:`failures`).
    """
    from tqdm.auto import tqdm

    records: dict[str, dict] = {}
    for job in jobs:
        record = finished(job)
        if record is not None:
            records[job.name] = {**record, "reused": True}
    pending = [j for j in jobs if j.name not in records]
    priority = _priorities(jobs)
    folders = {j.name: j.folder for j in jobs}
    context = multiprocessing.get_context("fork")
    running: dict[str, tuple[Job, multiprocessing.Process]] = {}
    bar = tqdm(
        total=len(jobs),
        initial=len(records),
        desc="experiment",
        unit="job",
        disable=not show_progress,
        dynamic_ncols=True,
        mininterval=1.0,
    )

    def settle(job: Job, record: dict) -> None:
        records[job.name] = record
        if record["status"] != "ok":
            bar.write(failures({job.name: record})[0], file=sys.stderr)
        bar.update(1)

    try:
        while pending or running:
            for job in sorted(pending, key=lambda j: -priority[j.name]):
                if len(running) >= workers:
                    break
                if gpu is not None and not fits([gpu[0][n] for n in running], gpu[0][job.name], gpu[1]):
                    continue  # a smaller job may fit now; this one starts when memory frees
                states = {d: records.get(d, {}).get("status") for d in job.deps}
                broken = [d for d, state in states.items() if state in ("failed", "skipped")]
                if broken:  # never wait on the rest: this job cannot run whatever they do
                    pending.remove(job)
                    settle(
                        job,
                        {
                            "key": job.key,
                            "name": job.name,
                            "kind": job.kind,
                            "status": "skipped",
                            "error": f"its input{'s' if len(broken) > 1 else ''} {', '.join(broken)} did not finish",
                        },
                    )
                elif all(state == "ok" for state in states.values()):
                    pending.remove(job)
                    try:
                        _prepare(job)
                        inputs = {d: {**(records[d].get("result") or {}), "folder": folders[d]} for d in job.deps}
                        process = context.Process(target=_child, args=(job, inputs, threads), name=job.name)
                        process.start()
                    except OSError as error:  # a folder that cannot be written, no process to be had
                        settle(
                            job,
                            {
                                "key": job.key,
                                "name": job.name,
                                "kind": job.kind,
                                "status": "failed",
                                "error": f"could not start: {type(error).__name__}: {error}",
                            },
                        )
                        continue
                    running[job.name] = (job, process)
            if pending and not running and all(_waiting(j, records) for j in pending):
                for job in list(pending):  # inputs that no job produces: nothing left can ever start
                    pending.remove(job)
                    missing = [d for d in job.deps if d not in records]
                    settle(
                        job,
                        {
                            "key": job.key,
                            "name": job.name,
                            "kind": job.kind,
                            "status": "skipped",
                            "error": f"no job produces its input(s) {', '.join(missing)}",
                        },
                    )
            bar.set_postfix_str(", ".join(running), refresh=False)
            time.sleep(0.2)
            for name, (job, process) in list(running.items()):
                if process.is_alive():
                    continue
                process.join()
                del running[name]
                record = _read_record(Path(job.folder) / RECORD)
                if record is None or record.get("key") != job.key or "status" not in record:
                    record = {
                        "key": job.key,
                        "name": name,
                        "kind": job.kind,
                        "status": "failed",
                        "error": f"the job's process died (exit code {process.exitcode}); see {job.folder}/log.txt",
                    }
                settle(job, record)
    finally:  # interrupted (Ctrl-C) or a bug here: no job process outlives the run
        for _, process in running.values():
            if process.is_alive():
                process.terminate()
            process.join()
        bar.close()
    return records


def _waiting(job: Job, records: dict[str, dict]) -> bool:
    """Whether ``job`` can neither start nor be skipped yet: some input has no record, none failed."""
    states = [records.get(d, {}).get("status") for d in job.deps]
    return None in states and not any(s in ("failed", "skipped") for s in states)
