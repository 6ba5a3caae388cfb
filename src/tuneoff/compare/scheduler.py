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
    record.update(wall_s=time.perf_counter() - wall, cpu_s=time.process_time() - cpu, peak_rss_mb=usage.ru_maxrss / 1024)
    staging = folder / f".{RECORD}.tmp"
    staging.write_text(json.dumps(record, indent=1, default=float))
    staging.rename(folder / RECORD)
    log.flush()
    os._exit(0)  # skip the parent's atexit handlers, which the fork copied


def finished(job: Job) -> dict | None:
    """job.json of a finished job with the same key, else None."""
    path = Path(job.folder) / RECORD
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    return record if record.get("key") == job.key and record.get("status") == "ok" else None


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
            children[d].append(j.name)
    weight = {j.name: j.weight for j in jobs}
    memo: dict[str, float] = {}

    def longest(name: str) -> float:
        if name not in memo:
            memo[name] = weight[name] + max((longest(c) for c in children[name]), default=0.0)
        return memo[name]

    return {j.name: longest(j.name) for j in jobs}


def run(jobs: list[Job], workers: int, threads: int, show_progress: bool = True) -> dict[str, dict]:
    """Run every job whose record is missing; return {name: record} (status ok, failed or skipped)."""
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
    bar = tqdm(total=len(jobs), initial=len(records), desc="experiment", unit="job", disable=not show_progress,
               dynamic_ncols=True, mininterval=1.0)
    while pending or running:
        for job in sorted(pending, key=lambda j: -priority[j.name]):
            if len(running) >= workers:
                break
            states = [records.get(d, {}).get("status") for d in job.deps]
            if any(s in ("failed", "skipped") for s in states):
                records[job.name] = {"key": job.key, "name": job.name, "status": "skipped",
                                     "error": "an input failed: " + ", ".join(d for d in job.deps if records[d]["status"] != "ok")}
                pending.remove(job)
                bar.update(1)
            elif all(s == "ok" for s in states):
                _prepare(job)
                inputs = {d: {**records[d]["result"], "folder": folders[d]} for d in job.deps}
                process = context.Process(target=_child, args=(job, inputs, threads), name=job.name)
                process.start()
                running[job.name] = (job, process)
                pending.remove(job)
        bar.set_postfix_str(", ".join(running), refresh=False)
        time.sleep(0.2)
        for name, (job, process) in list(running.items()):
            if process.is_alive():
                continue
            process.join()
            del running[name]
            path = Path(job.folder) / RECORD
            records[name] = json.loads(path.read_text()) if path.exists() else {
                "key": job.key, "name": name, "status": "failed",
                "error": f"the job's process died (exit code {process.exitcode}); see {job.folder}/log.txt"}
            if records[name]["status"] != "ok":
                bar.write(f"{name}: {records[name]['status']}: {records[name].get('error', '')}")
            bar.update(1)
    bar.close()
    return records
