"""tuneoff vs TRL 1.16 on identical workloads (CPU, float32): throughput, peak RSS, FLOP/s against the matmul peak.

    python -m bench.run --quick                      # every workload, few steps, 1 repeat (186 s measured on 2
    cores; limit 5 minutes)
    python -m bench.run --full                       # more steps, 3 repeats
    python -m bench.run --quick --workloads sampling,sft-review-gpt --repeats 2 --out bench/results.md

Per workload (bench/workloads.py) the runs alternate tuneoff, other, tuneoff, other, ..., each in a fresh process
(bench/child.py) that times its own training steps after a warm-up step; the parent reads each child's peak RSS
from os.wait4. Prints the Markdown table and writes it, with the machine and the method, to --out.
Needs TRL 1.16 (`pip install -e '.[bench]'`) and, for PPO, TRL 1.12.0 in bench/.trl112 (`make bench` installs both).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench import report
from bench.workloads import ROOT, Workload, prepare, select

LABELS = {"trl": "TRL 1.16", "trl-1.12": "TRL 1.12 (PPO)", "transformers": "transformers generate"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--quick", action="store_true", help="few steps, 1 repeat: about 3 minutes on 2 cores")
    size.add_argument("--full", action="store_true", help="more steps, 3 repeats")
    parser.add_argument("--workloads", default="", help="comma-separated names or prefixes (default: all)")
    parser.add_argument("--repeats", type=int, default=0, help="A/B pairs per workload (default: 1 quick, 3 full)")
    parser.add_argument("--units", type=int, default=0, help="override every workload's units (smoke tests; ≥ 2)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in every run and in the matmul peak")
    parser.add_argument("--out", default="bench/results.md")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds before a child is killed")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where both sides run")
    parser.add_argument(
        "--precision", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast over float32 weights, both sides"
    )
    args = parser.parse_args(argv)
    if args.precision == "bf16" and args.device != "cuda":
        parser.error("--precision bf16 is for --device cuda (on CPU the table compares float32)")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: torch sees no CUDA GPU here")
    return args


def matmul_peak(threads: int, device: str = "cpu", precision: str = "fp32", tries: int = 5) -> float:
    """GFLOP/s of the best of `tries` torch.mm of n×n by n×n (2n³ FLOPs), after one warm-up product: fp32 at
    n = 2048 on the CPU, the run's precision at n = 8192 on a GPU."""
    import torch

    torch.set_num_threads(threads)
    n = 2048 if device == "cpu" else 8192
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    torch.mm(a, b)
    best = float("inf")
    for _ in range(tries):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        torch.mm(a, b)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def child_env(threads: int) -> dict:
    env = {
        **os.environ,
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "TRL_EXPERIMENTAL_SILENCE": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
        "TRANSFORMERS_VERBOSITY": "error",
    }
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def run_child(spec: dict, folder: Path, threads: int, timeout: int) -> dict:
    """Run one child; its result plus wall time and peak RSS (MB), or {"error": the end of its log}."""
    folder.mkdir(parents=True)
    (folder / "spec.json").write_text(json.dumps(spec))
    with open(folder / "log.txt", "w") as log:
        start = time.perf_counter()
        child = subprocess.Popen(
            [sys.executable, "-m", "bench.child", str(folder / "spec.json")],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=child_env(threads),
        )
        killer = threading.Timer(timeout, child.kill)
        killer.start()
        _, status, usage = os.wait4(child.pid, 0)  # ru_maxrss of this child alone, in KiB on Linux
        killer.cancel()
        child.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    result_file = folder / "result.json"
    if child.returncode != 0 or not result_file.exists():
        tail = (folder / "log.txt").read_text(errors="replace")[-3000:]
        return {"error": f"exit {child.returncode} after {wall:.0f} s\n{tail}"}
    return {**json.loads(result_file.read_text()), "wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024}


def spec_for(workload: Workload, side: str, units: int, data: dict, args, out: Path, variant: dict) -> dict:
    return {
        "name": workload.name,
        "kind": workload.kind,
        "model": workload.model,
        "units": units,
        "batch_size": workload.batch_size,
        "max_length": workload.max_length,
        "lr": workload.lr,
        "lora": workload.lora,
        "new_tokens": workload.new_tokens,
        "steps_per_unit": workload.steps_per_unit,
        "threads": args.threads,
        "device": args.device,
        "precision": args.precision,
        "side": side,
        "variant": variant,
        "out": str(out),
        **data,
    }


def runs_of(workload: Workload, args, repeats: int, work: Path) -> dict[str, list[dict]]:
    """All runs of one workload, alternating sides: {side label: [result per repeat]}."""
    units = units_of(workload, args)
    sides = [("tuneoff", "tuneoff", {}), (workload.comparison, LABELS[workload.comparison], {})]
    if workload.tuneoff_variant:
        sides.append(("tuneoff", "tuneoff (" + ", ".join(workload.tuneoff_variant) + ")", workload.tuneoff_variant))
    runs: dict[str, list[dict]] = {label: [] for _, label, _ in sides}
    try:
        data = prepare(workload, units, work / "data")
    except Exception as error:  # one workload's missing data must not cost the others their runs
        print(f"  {workload.name}: data preparation failed: {error!r}", flush=True)
        return {label: [{"error": f"data preparation failed: {error!r}"}] for label in runs}
    for repeat in range(repeats):
        for side, label, variant in sides:
            folder = work / f"{label.replace(' ', '_')}-{repeat}"
            spec = spec_for(workload, side, units, data, args, folder / "out", variant)
            result = run_child(spec, folder, args.threads, args.timeout)
            runs[label].append(result)
            print(f"  {workload.name} · {label} · repeat {repeat + 1}: " + progress_line(workload, result), flush=True)
    return runs


def units_of(workload: Workload, args) -> int:
    return args.units or workload.units[0 if args.quick else 1]


def progress_line(workload: Workload, result: dict) -> str:
    if "error" in result:
        return "FAILED " + result["error"].strip().splitlines()[-1][:200]
    values = ", ".join(f"{v:,.1f} {m}" for m, v in report.rates(workload, result).items())
    return f"{values}, {result['peak_rss_mb']:,.0f} MB peak RSS, {result['wall_s']:.0f} s wall"


def section(workload: Workload, runs: dict[str, list[dict]], peak_flops: float) -> str:
    labels = list(runs)
    other = runs[labels[1]]
    rows = [
        report.row(workload, label, results, other if label.startswith("tuneoff") else None, peak_flops)
        for label, results in runs.items()
    ]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 3)
    workloads = select(args.workloads)
    command = "python -m bench.run " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    load_before = os.getloadavg()[0]  # other processes on these cores make every number here meaningless
    peak_before = matmul_peak(args.threads, args.device, args.precision)
    print(f"{args.precision} matmul peak: {peak_before:.1f} GFLOP/s on {args.device}", flush=True)
    all_runs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="tuneoff-bench-") as tmp:
        for workload in workloads:
            print(f"{workload.name}:", flush=True)
            all_runs[workload.name] = runs_of(workload, args, repeats, Path(tmp) / workload.name)
    peak_after = matmul_peak(args.threads, args.device, args.precision)
    peak_flops = max(peak_before, peak_after) * 1e9
    table = "\n".join([report.HEADER] + [section(w, all_runs[w.name], peak_flops) for w in workloads])
    notes = "\n".join(f"- **{w.name}**: {w.notes}" for w in workloads if w.notes)
    failures = report.failures(workloads, all_runs)
    sections = ["## Results\n\n" + table, "## What is identical, and what is not\n\n" + notes] + (
        [failures] if failures else []
    )
    mode = f"{'quick' if args.quick else 'full'}: {repeats} repeat(s); units per run: " + ", ".join(
        f"{w.name} {units_of(w, args)}" for w in workloads
    )
    text = report.document(
        sections,
        command,
        args.threads,
        (peak_before, peak_after),
        mode,
        (load_before, os.getloadavg()[0]),
        (args.device, args.precision),
    )
    Path(args.out).write_text(text)
    print("\n" + text)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
