"""SFT throughput of tuneoff on this machine, with and without packing (public tools only).

    python -m bench.sft_throughput            # all workloads
    python -m bench.sft_throughput --quick    # review-gpt only

Each workload runs `tuneoff sft` in a fresh process for a fixed number of steps and reads the run's own
metrics.jsonl: input tokens/s (every real token through the model) and trained tokens/s (tokens with a loss),
averaged over the whole loop, first step included. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORKLOADS = [
    # name, model, data, steps, extra flags
    ("review-gpt full", "review-gpt", "examples/sst2_positive_sft.jsonl", 40, []),
    ("smollm2-135m LoRA r16", "smollm2-135m", "examples/self_instruct_messages.jsonl", 6, ["--lora", "--lora-r", "16"]),
    ("smollm2-135m full", "smollm2-135m", "examples/self_instruct_messages.jsonl", 6, []),
]


def run(model: str, data: str, steps: int, extra: list[str], packing: bool, out: Path) -> dict:
    args = [
        sys.executable,
        "-m",
        "tuneoff.cli",
        "sft",
        "--model",
        model,
        "--data",
        str(ROOT / data),
        "--out",
        str(out),
        "--max-steps",
        str(steps),
        "--batch-size",
        "8",
        "--max-length",
        "128",
        "--eval-fraction",
        "0",
        "--save-every",
        "100000",
        "--log-every",
        "1",
        "--lr",
        "1e-4",
        "--packing" if packing else "--no-packing",
        *extra,
    ]
    start = time.perf_counter()
    subprocess.run(
        args, check=True, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    )
    wall = time.perf_counter() - start
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "train/tokens_per_s" in r][-1]
    return {
        "tokens_per_s": last["train/tokens_per_s"],
        "trained_tokens_per_s": last["train/trained_tokens_per_s"],
        "final_loss": last["train/loss"],
        "wall_s": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="review-gpt only")
    args = parser.parse_args()
    import torch

    print(
        f"# SFT throughput, {time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads\n"
    )
    print("| workload | packing | input tokens/s | trained tokens/s | final loss | wall s |")
    print("|---|---|---|---|---|---|")
    for name, model, data, steps, extra in WORKLOADS[:1] if args.quick else WORKLOADS:
        for packing in (False, True):
            with tempfile.TemporaryDirectory() as tmp:
                r = run(model, data, steps, extra, packing, Path(tmp) / "run")
            print(
                f"| {name}, batch 8, max_length 128, {steps} steps | {'on' if packing else 'off'} | "
                f"{r['tokens_per_s']:,.0f} | "
                f"{r['trained_tokens_per_s']:,.0f} | {r['final_loss']:.3f} | {r['wall_s']:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
