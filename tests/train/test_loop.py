"""The skeleton across processes: every offline method on two CPU processes (gloo, launched by torchrun as
accelerate does for GPUs) gives the loss curve of one process with grad_accum 2 (the same micro-batches, so only
the floating-point order of the reductions differs). SFT's own test is in test_sft.py."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from tests.conftest import run_cli

FAST = ["--model", "tiny", "--batch-size", "4", "--max-length", "48", "--lr", "1e-3", "--log-every", "1"]
FAST += ["--threads", "1", "--max-steps", "6", "--eval-fraction", "0", "--save-every", "100"]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    from tuneoff.data.sources import sst2_sft_records

    folder = tmp_path_factory.mktemp("processes")
    positive, negative = sst2_sft_records(label=1)[:64], sst2_sft_records(label=0)[:64]
    random.Random(0).shuffle(negative)
    pairs = [
        {"prompt": g["prompt"], "chosen": g["completion"], "rejected": b["completion"]}
        for g, b in zip(positive, negative)
    ]
    unpaired = [
        {"prompt": r["prompt"], "completion": r["completion"], "label": label}
        for pair in zip(positive, negative)
        for r, label in zip(pair, (True, False))
    ]
    out = {}
    for name, records in (("pairs", pairs), ("unpaired", unpaired)):
        out[name] = folder / f"{name}.jsonl"
        out[name].write_text("".join(json.dumps(r) + "\n" for r in records))
    return out


def losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in rows if "train/loss" in r]


@pytest.mark.parametrize("verb, data", [("rm", "pairs"), ("dpo", "pairs"), ("kto", "unpaired")])
def test_two_processes_match_one_with_double_accumulation(tmp_path, files, verb, data):
    args = [*FAST, "--data", str(files[data])]
    one = tmp_path / "one"
    result = run_cli(verb, *args, "--grad-accum", "2", "--out", str(one))
    assert result.returncode == 0, result.stderr[-3000:]
    two = tmp_path / "two"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "tuneoff.cli", verb, *args]
        + ["--grad-accum", "1", "--out", str(two)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    one_curve, two_curve = losses(one), losses(two)
    assert len(one_curve) == len(two_curve) == 6
    assert max(abs(a - b) for a, b in zip(one_curve, two_curve)) < 1e-4, (one_curve, two_curve)
    assert len(set(one_curve)) > 1  # the loss moved: the steps did train
