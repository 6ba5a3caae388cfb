"""Where the time of a benchmark run goes: each side of a workload under torch.profiler, by kind of work.

    python -m bench.profile --workloads dpo-smollm2-lora,ppo-smollm2-lora [--units 4] [--out bench/profile.md]

Each side runs in a fresh child as in `bench.run` (same specs, same data); the profiler records the timed window
only (from the end of the warm-up unit). Self CPU time of every op is summed by kind: matrix products (mm, addmm,
bmm, baddbmm, linear's products), attention (scaled dot-product kernels), the optimizer (AdamW's foreach ops),
and every other op; "outside ops" is the rest of the window (Python, the framework's own bookkeeping, waiting).
The profiler adds its own overhead to every op, so the window is longer than an unprofiled run's; the shares are
what to read. The last columns bound what a framework can gain: the other side's window over this side's
matrix-product time is the speed-up left if everything but this side's matrix products took no time at all.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

KINDS = {
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_addmm_activation"),
    "attention": ("scaled_dot_product", "flash_attention", "efficient_attention"),
    "optimizer": ("_foreach_", "aten::addcdiv_", "aten::lerp_"),
}


def kind_of(name: str) -> str:
    for kind, patterns in KINDS.items():
        if any(name == p or (not p.startswith("aten::") and p in name) or name.startswith(p) for p in patterns):
            return kind
    return "other ops"


def by_kind(events) -> dict[str, float]:
    """Seconds of self CPU time per kind, from ``profiler.key_averages()``."""
    totals = dict.fromkeys([*KINDS, "other ops"], 0.0)
    for event in events:
        totals[kind_of(event.key)] += event.self_cpu_time_total / 1e6
    return totals


def main(argv=None) -> None:
    from bench import run as bench_run
    from bench.workloads import prepare, select

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", required=True)
    parser.add_argument("--units", type=int, default=4, help="units per run, the first one the warm-up")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    run_args = bench_run.parse_args(["--quick", "--threads", str(args.threads)])
    rows = []
    with tempfile.TemporaryDirectory(prefix="tuneoff-profile-") as tmp:
        for workload in select(args.workloads):
            data = prepare(workload, args.units, Path(tmp) / workload.name / "data")
            for side, label in (("tuneoff", "tuneoff"), (workload.comparison, bench_run.LABELS[workload.comparison])):
                folder = Path(tmp) / workload.name / side
                spec = bench_run.spec_for(workload, side, args.units, data, run_args, folder / "out", {})
                spec["profile"] = True
                result = bench_run.run_child(spec, folder, args.threads, 3600)
                if "error" in result:
                    raise SystemExit(f"{workload.name} · {label}: {result['error']}")
                rows.append((workload.name, label, result["time_s"], result["profile"]))
                print(f"{workload.name} · {label}: {result['time_s']:.1f} s profiled", flush=True)
    lines = [
        "| workload | run | window s | matmul | attention | optimizer | other ops | outside ops | other side's "
        "window / this side's matmul |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for i, (name, label, window, kinds) in enumerate(rows):
        other_window = rows[i + 1 if i % 2 == 0 else i - 1][2]
        outside = max(0.0, window - sum(kinds.values()))
        cells = [f"{kinds[k]:.1f} s ({kinds[k] / window:.0%})" for k in (*KINDS, "other ops")]
        bound = other_window / kinds["matmul"] if kinds["matmul"] else float("nan")
        lines.append(
            f"| {name} | {label} | {window:.1f} | {' | '.join(cells)} | {outside:.1f} s ({outside / window:.0%}) "
            f"| {bound:.2f}× |"
        )
    text = "\n".join(lines)
    print("\n" + text)
    if args.out:
        Path(args.out).write_text(f"# Where the time goes (`python -m bench.profile --workloads {args.workloads}`)\n\n"
                                  f"{__doc__.split(chr(10) + chr(10), 1)[1]}\n{text}\n")  # fmt: skip


if __name__ == "__main__":
    main()
