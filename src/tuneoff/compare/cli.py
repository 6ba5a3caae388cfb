"""``tuneoff compare --config experiment.yaml --out DIR`` and ``tuneoff demo``: plan, run, aggregate, report."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def run_experiment(
    config_path: str | Path,
    out: str | Path,
    workers: int | None = None,
    seeds: list[int] | None = None,
    show_progress: bool = True,
    human: str | Path | None = None,
) -> dict:
    """Run (or resume) an experiment into ``out``; returns the results dict also written to ``out/results.json``.
    ``human``: a feedback database with people's judgments of this experiment's arms (``tuneoff label add
    --experiment``): folded in as the ``human`` block, and the recommendation's alignment."""
    from tuneoff.compare import scheduler
    from tuneoff.compare.aggregate import aggregate
    from tuneoff.compare.experiment import load_experiment, plan
    from tuneoff.compare.inputs import check_inputs
    from tuneoff.compare.recommend import recommend
    from tuneoff.compare.report import write_report
    from tuneoff.errors import TuneoffError
    from tuneoff.feedback.agreement import finite

    started = time.perf_counter()
    config = load_experiment(config_path, seeds=seeds, workers=workers)
    check_inputs(config)  # every named file exists and parses, before any folder is made or job started
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = plan(config, out)
    _warm_imports()
    records = scheduler.run(
        jobs, config.workers or os.cpu_count() or 1, config.threads, show_progress, _gpu_sharing(config, jobs)
    )
    results = aggregate(config, records)
    if human:
        from tuneoff.compare.human import human_block

        results["human"] = human_block(out, human, results)
    try:
        results["recommendation"] = recommend(results, config.priorities)
    except TuneoffError as error:  # nothing measured (every evaluation failed): the results are still written
        results["recommendation"] = {"error": str(error)}
    results["wall_s"] = time.perf_counter() - started
    staging = out / ".results.json.tmp"
    # NaN and infinities (e.g. the CI of a single seed) become null: results.json stays strict JSON for other tools
    staging.write_text(json.dumps(finite(results), indent=1, allow_nan=False), encoding="utf-8")
    staging.rename(out / "results.json")
    write_report(results, out / "report.html")
    return results


def _gpu_sharing(config, jobs) -> tuple[dict, int] | None:
    """On a CUDA GPU: each job's estimated memory and the budget (90 % of the free memory), else None (CPU: one job
    per worker). device: cuda without a GPU is an error."""
    from tuneoff.compare import gpu
    from tuneoff.errors import TuneoffError

    device = gpu.probe() if config.device != "cpu" else gpu.Device(False)
    if config.device == "cuda" and not device.cuda:
        raise TuneoffError("device: cuda, but torch sees no CUDA GPU here; use device: auto or cpu")
    if not device.cuda:
        return None
    params = gpu.count_parameters(config.base)
    needs = {job.name: gpu.job_memory(job.kind, job.spec, params) for job in jobs}
    budget = int(0.9 * device.free)
    print(
        f"GPU {device.name}: {device.free / 2**30:.1f} of {device.total / 2**30:.1f} GiB free; jobs share it by "
        f"estimated memory (largest job {max(needs.values()) / 2**30:.1f} GiB, budget {budget / 2**30:.1f} GiB)"
    )
    return needs, budget


def _warm_imports() -> None:
    """Import what every job needs once in the parent, so forked jobs start at once (no tensor code runs here)."""
    import sklearn.linear_model  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import tuneoff.compare.jobs  # noqa: F401
    import tuneoff.rollout  # noqa: F401
    import tuneoff.train.common  # noqa: F401


def summary_lines(results: dict) -> list[str]:
    """The summary table as text lines (what the CLI prints)."""

    def fmt(ci, digits=3):
        if not ci:
            return "—"
        low, high = ci.get("ci_low"), ci.get("ci_high")
        if low is None or low != low:
            return f"{ci['mean']:.{digits}f}"
        return f"{ci['mean']:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"

    lines = [
        "| arm | gold reward | win vs base | KL/token | EAD across | emb. div. per-input | wall s |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm, a in results["arms"].items():
        d = a.get("diversity") or {}
        lines.append(
            f"| {arm} | {fmt(a['gold_reward'])} | {fmt(a['win_rate_vs_base'], 2)} | {fmt(a['kl_per_token'], 3)} | "
            f"{fmt((d.get('across_input') or {}).get('ead'), 3)} | "
            f"{fmt((d.get('per_input') or {}).get('embedding'), 3)} | "
            f"{fmt((a.get('cost') or {}).get('wall_s'), 0)} |"
        )
    return lines


def _print_results(results: dict, out: Path) -> int:
    """Print the summary; exit status 2 when any job did not finish (each named with why, on stderr)."""
    from tuneoff.compare.scheduler import failures

    for line in summary_lines(results):
        print(line)
    choice = results.get("recommendation", {})
    if choice.get("choice"):
        print(
            f"recommendation ({', '.join(f'{k} {v:.2f}' for k, v in choice['priorities'].items())}): {choice['choice']}"
        )
    elif choice.get("error"):
        print(f"no recommendation: {choice['error']}")
    print(f"report: {out / 'report.html'}\nresults: {out / 'results.json'}  ({results['wall_s']:.0f} s)")
    lines = failures(results["jobs"])
    if lines:
        print(
            f"error: {len(lines)} of {len(results['jobs'])} job(s) did not finish (see each job's log.txt; "
            f"rerun to retry them, finished jobs are reused):\n  " + "\n  ".join(lines),
            file=sys.stderr,
        )
    return 2 if lines else 0


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "compare",
        help="run an experiment (arms × seeds) and write results.json + report.html",
        description="Run SFT and RLHF arms on one base model, data and budget, measure alignment, "
        "diversity, cost and stability, and write DIR/results.json and DIR/report.html. Finished "
        "jobs are reused when the same config runs again into the same DIR.",
    )
    parser.add_argument(
        "--config", required=True, help="experiment YAML (see configs/; `extends: demo` starts from the demo)"
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--workers", type=int, default=None, help="jobs at once (default: the config's, 0 = one per core)"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="override the config's seeds")
    parser.add_argument(
        "--human",
        default=None,
        help="a feedback database with people's blind judgments of the arms (tuneoff label add --experiment): "
        "human win rates join the results and decide alignment in the recommendation",
    )

    def handler(args) -> int:
        results = run_experiment(args.config, args.out, args.workers, args.seeds, human=args.human)
        return _print_results(results, Path(args.out))

    parser.set_defaults(func=handler)
    demo = subparsers.add_parser(
        "demo",
        help="the default experiment on CPU (about 10 minutes): runs/demo/report.html",
        description="The default experiment: positive continuations of SST-2 review beginnings by "
        "review-gpt; arms base, sft, sft+ppo, dpo, grpo; 3 seeds; the gold judge; simulated annotators.",
    )
    demo.add_argument("--out", default="runs/demo", help="output folder")
    demo.add_argument(
        "--config",
        default="",
        help="run this experiment YAML instead of the shipped demo preset "
        "(e.g. one that starts with `extends: demo` and changes a knob)",
    )
    demo.add_argument("--workers", type=int, default=None, help="jobs at once (default: one per core)")
    demo.add_argument("--seeds", type=int, nargs="+", default=None, help="override the seeds (default 0 1 2)")

    def demo_handler(args) -> int:
        from tuneoff.compare.experiment import preset_path

        results = run_experiment(args.config or preset_path("demo"), args.out, args.workers, args.seeds)
        return _print_results(results, Path(args.out))

    demo.set_defaults(func=demo_handler)
