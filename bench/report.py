"""Turn the children's results into the Markdown of bench/results.md: rates, ratios, FLOP/s, quality, notes."""

from __future__ import annotations

import math
import os
import platform
import statistics
import time
from importlib import metadata
from pathlib import Path

from bench.workloads import Workload

SHORT = {"tokens/s": "tok/s", "pairs/s": "pairs/s", "episodes/s": "ep/s", "new tokens/s": "new tok/s"}


def rates(workload: Workload, result: dict) -> dict[str, float]:
    """The workload's throughput metrics of one run, over its timed window."""
    t = result["time_s"]
    values = {
        "tokens/s": result["train_tokens"] / t,
        "pairs/s": result["timed_units"] * workload.batch_size / t,  # a unit = one step of batch_size pairs
        "episodes/s": result["episodes"] / t,
        "new tokens/s": result["new_tokens"] / t,
    }
    return {m: values[m] for m in workload.metrics}


def model_flops(result: dict) -> float:
    """6·N per token of a training forward + backward (4·N with LoRA: no weight gradients of the frozen base),
    plus 2·N per token of a no-grad forward (generation, reference, value passes)."""
    per_train_token = (4 if result["lora"] else 6) * result["n_params"]
    return per_train_token * result["train_tokens"] + 2 * result["n_params"] * result["infer_tokens"]


def mean_se(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan
    return statistics.fmean(values), se


def plus_minus(value: float, se: float) -> str:
    return f"{value:.3f}" + ("" if math.isnan(se) else f" ± {se:.3f}")


def quality(workload: Workload, result: dict) -> tuple[float, float, str]:
    """(value, standard error, text): the mean loss over the last half of the steps, or the mean reward."""
    if workload.kind == "sampling":
        return math.nan, math.nan, "—"
    if workload.kind in ("grpo", "ppo"):
        value, se = mean_se(result["rewards"])
        return value, se, f"reward {plus_minus(value, se)}"
    losses = result["losses"]
    value, se = mean_se(losses[len(losses) // 2 :])
    return value, se, f"loss {losses[0]:.3f} → {plus_minus(value, se)}"


def within_noise(a: tuple, b: tuple) -> str:
    """Whether two (value, se) differ by less than two combined standard errors."""
    (va, sa, _), (vb, sb, _) = a, b
    if any(math.isnan(x) for x in (va, vb, sa, sb)):
        return ""
    gap, noise = abs(va - vb), 2 * math.hypot(sa, sb)
    return f" (Δ {gap:.3f} {'≤' if gap <= noise else '>'} 2σ {noise:.3f})"


def spread(values: list[float], digits: int) -> str:
    fmt = f"{{:,.{digits}f}}"
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}–{fmt.format(max(values))})"


def digits_for(value: float) -> int:
    return 0 if value >= 100 else 1 if value >= 10 else 2


def row(workload: Workload, label: str, runs: list[dict], reference: list[dict] | None, peak_flops: float) -> str:
    """One Markdown row; `reference` (the B side's runs) adds the ratio column to the tuneoff rows."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        reason = runs[0]["error"].strip().splitlines()[-1][:160] if runs else "not run"
        return f"| {workload.name} | {label} | failed: {reason} |" + " |" * 6
    per_metric = {m: [rates(workload, r)[m] for r in ok] for m in workload.metrics}
    throughput = "; ".join(f"{spread(v, digits_for(statistics.median(v)))} {SHORT[m]}" for m, v in per_metric.items())
    ratio = ratio_cell(workload, runs, reference) if reference is not None else ""
    flops = "—" if workload.kind == "sampling" else flops_cell(ok, peak_flops)
    mine = quality(workload, ok[0])
    text = mine[2]
    if reference and any("error" not in r for r in reference):
        text += within_noise(mine, quality(workload, next(r for r in reference if "error" not in r)))
    rss = f"{statistics.median(r['peak_rss_mb'] for r in ok):,.0f}"
    if all("peak_gpu_mb" in r for r in ok):  # on a GPU: the device's peak allocation too
        rss += f" (GPU {statistics.median(r['peak_gpu_mb'] for r in ok):,.0f})"
    unit = statistics.median(r["time_s"] / r["timed_units"] for r in ok)
    wall = statistics.median(r["wall_s"] for r in ok)
    return (
        f"| {workload.name} | {label} | {throughput} | {unit:.2f} | {rss} | {ratio} | {flops} | {text} | {wall:.0f} |"
    )


def flops_cell(runs: list[dict], peak_flops: float) -> str:
    achieved = statistics.median(model_flops(r) / r["time_s"] for r in runs)  # FLOP/s
    return f"{achieved / 1e9:.1f} GFLOP/s ({achieved / peak_flops:.0%})"


def ratio_cell(workload: Workload, runs: list[dict], reference: list[dict]) -> str:
    """tuneoff / B per repeat (run i against run i of the other side): min / median / max."""
    pairs = [(a, b) for a, b in zip(runs, reference) if "error" not in a and "error" not in b]
    if not pairs:
        return "n/a"
    cells = []
    for m in workload.metrics:
        ratios = [rates(workload, a)[m] / rates(workload, b)[m] for a, b in pairs]
        cells.append(
            f"{min(ratios):.2f} / {statistics.median(ratios):.2f} / {max(ratios):.2f}×"
            + (f" ({SHORT[m]})" if len(workload.metrics) > 1 else "")
        )
    return "; ".join(cells)


HEADER = (
    "| workload | run | throughput: median (min–max) | s / unit | peak RSS MB | tuneoff / other: min / median / max "
    "| model FLOP/s (% of matmul peak) | quality: first → last-half mean loss ± s.e., or mean reward ± s.e. | wall "
    "s |\n"
    "|---|---|---|---|---|---|---|---|---|"
)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> str:
    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    trl112 = Path(__file__).resolve().parent / ".trl112" / "trl-1.12.0.dist-info"
    return (
        f"torch {version('torch')}, transformers {version('transformers')}, trl {version('trl')} "
        f"(PPO: trl {'1.12.0 from bench/.trl112' if trl112.exists() else 'missing'}), peft {version('peft')}, "
        f"accelerate {version('accelerate')}, tuneoff {version('tuneoff')}"
    )


METHOD = """\
- Each run is a fresh process (`bench/child.py`); runs alternate tuneoff, other, tuneoff, other, ... per workload.
  Peak RSS is the child's own `ru_maxrss` from `os.wait4` (imports, model, data, optimizer state included).
- Timing, inside each child: a global optimizer-step hook stamps the end of every unit (one optimizer step; one
  iteration = 4 optimizer steps for PPO; one generate call for sampling). The first unit is a warm-up; the
  window runs from its end to the end of the last unit, so model loading, tokenization and one-off reference
  passes are excluded. `s / unit` is the window over its units; `wall s` is the whole child, start to exit.
- Tokens: the decoder classes (GPT-2, Llama) are wrapped to count the real (attention-mask) tokens of every
  call, in both frameworks alike (and tuneoff's lean GPT-2 paths, which do that work without calling them: the
  packed RL passes, the prefill and each decode step): with autograd on (training forward + backward) or off
  (generation, reference,
  critic/value, reward passes); a packed row (SFT packing, reward-model pairs sharing their prompt) counts every
  slot, filler included, and a shared prompt once. SFT tokens/s = training tokens (prompt + completion, no
  padding); pairs/s = optimizer steps × batch size (8 pairs per step in both, no accumulation); episodes/s and new
  tokens/s (up to and including EOS) for RL; new tokens/s for sampling.
- Model FLOPs = 6·N·(training tokens) + 2·N·(no-grad tokens); with LoRA 4·N per training token (forward 2N +
  backward through the activations 2N; no weight gradients for the frozen base). N = every parameter of the
  base model once (the tied embedding once; for the reward model it stands in for the unused LM head). The
  same formula and counts for both frameworks, so tuneoff's skipped LM-head positions count as work it did not
  need to do; attention's T² term is ignored. Shown as GFLOP/s and as a share of the fp32 matmul peak.
- Same in both: model weights (float32), data file, batch 8, sequence length, torch.optim.AdamW (β 0.9/0.999,
  ε 1e-8, no weight decay), constant learning rate without warm-up, gradient clipping 1.0 (PPO: off), seed 0,
  torch threads, dropout as the model config says (off where the method turns it off: RM, DPO, GRPO, PPO), no
  evaluation, no checkpoints during training. Each framework shuffles the data with its own seeded sampler;
  token counts are measured, not assumed.
- Quality: the mean training loss over the last half of the steps (first-step loss before the arrow), or the
  mean reward of every episode; Δ is compared with two combined standard errors of those means.
"""


def document(
    sections: list[str],
    command: str,
    threads: int,
    peaks: tuple[float, float],
    mode: str,
    loads: tuple[float, float],
    where: tuple[str, str] = ("cpu", "fp32"),
) -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    device, precision = where
    if device == "cuda":
        import torch

        peak = f"{precision} matmul peak on {torch.cuda.get_device_name()} (torch.mm 8192² × 8192², best of 5)"
        placement = f"both sides on CUDA, {'bf16 autocast over float32 weights' if precision == 'bf16' else 'fp32'}"
    else:
        peak = f"fp32 matmul peak (torch.mm 2048² × 2048², {threads} threads, best of 5)"
        placement = "both sides on the CPU in float32"
    head = (
        f"# tuneoff vs TRL on this machine\n\n"
        f"- Date: {time.strftime('%Y-%m-%d %H:%M')}\n- Command: `{command}` ({mode})\n"
        f"- Machine: {cores} cores, {cpu_model()}; {versions()}; {threads} torch threads per run; {placement}\n"
        f"- {peak}: {peaks[0]:.1f} GFLOP/s before the runs, "
        f"{peaks[1]:.1f} after (the FLOP/s shares use the higher)\n"
        f"- 1-minute load average: {loads[0]:.2f} before the runs, {loads[1]:.2f} after (the runs add about {threads}; "
        f"more means other processes shared the cores, which slows small-kernel code most and skews the ratios)\n\n"
        f"## How it is measured\n\n{METHOD}"
    )
    return head + "\n" + "\n\n".join(sections) + "\n"


def failures(workloads: list[Workload], all_runs: dict) -> str:
    """A section with the end of each failed run's log (why a side is missing from the table)."""
    lines = []
    for w in workloads:
        for label, results in all_runs[w.name].items():
            for i, r in enumerate(results):
                if "error" in r:
                    tail = "\n".join(r["error"].strip().splitlines()[-12:])
                    lines.append(f"### {w.name} · {label} · repeat {i + 1}\n\n```\n{tail}\n```")
    return "## Failed runs\n\n" + "\n\n".join(lines) if lines else ""
