"""The skeleton across processes: every method on two CPU processes (gloo, launched by torchrun as accelerate
does for GPUs) gives the loss curve of one process with grad_accum 2. Offline methods see the same micro-batches;
RL methods sample the same rollouts (one global batch per iteration, split by rows) and update on them alike, so
only the floating-point order of the reductions differs. SFT's own test is in test_sft.py."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from tests.conftest import run_cli

from tuneoff.train import metrics as names

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


def curve(out: Path, key: str) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if key in r]


def losses(out: Path) -> list[float]:
    return curve(out, "train/loss")


def two_processes(verb: str, args: list[str], out: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "tuneoff.cli", verb, *args]
        + ["--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("verb, data", [("rm", "pairs"), ("dpo", "pairs"), ("kto", "unpaired")])
def test_two_processes_match_one_with_double_accumulation(tmp_path, files, verb, data):
    args = [*FAST, "--data", str(files[data])]
    one = tmp_path / "one"
    result = run_cli(verb, *args, "--grad-accum", "2", "--out", str(one))
    assert result.returncode == 0, result.stderr[-3000:]
    two = tmp_path / "two"
    two_processes(verb, [*args, "--grad-accum", "1"], two)
    one_curve, two_curve = losses(one), losses(two)
    assert len(one_curve) == len(two_curve) == 6
    assert max(abs(a - b) for a, b in zip(one_curve, two_curve)) < 1e-4, (one_curve, two_curve)
    assert len(set(one_curve)) > 1  # the loss moved: the steps did train


RL = ["--model", "tiny", "--data", str(Path(__file__).parents[2] / "examples" / "sst2_prompts.jsonl")]
RL += ["--reward-model", "gold", "--batch-size", "4", "--max-new-tokens", "8", "--lr", "1e-3", "--log-every", "1"]
RL += ["--threads", "1", "--max-steps", "4", "--eval-every", "100", "--save-every", "100"]


@pytest.mark.parametrize(
    "verb, extra",
    [
        ("ppo", ["--update-epochs", "2", "--kl-target", "0.5", "--kl-horizon", "100"]),  # adaptive β
        ("grpo", ["--num-generations", "2", "--update-epochs", "2"]),
        ("rloo", ["--num-generations", "2"]),
    ],
)
def test_rl_two_processes_match_one_with_double_batch(tmp_path, verb, extra):
    """One process: rollout batch 8, grad_accum 2. Two: rollout batch 4 each, grad_accum 1. The same 8 episodes
    per iteration (scores), the same token-averaged losses, the same adaptive β."""
    one = tmp_path / "one"
    args = [*RL, *extra]
    result = run_cli(verb, *args, "--rollout-batch", "8", "--grad-accum", "2", "--out", str(one))
    assert result.returncode == 0, result.stderr[-3000:]
    two = tmp_path / "two"
    two_processes(verb, [*args, "--rollout-batch", "4", "--grad-accum", "1"], two)
    keys = [names.POLICY_LOSS, names.SCORES, names.OBJECTIVE_KL]
    keys += [names.VALUE_LOSS, names.KL_COEF] if verb == "ppo" else []
    for key in keys:
        a, b = curve(one, key), curve(two, key)
        assert len(a) == len(b) == 4, (key, a, b)
        assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4, (key, a, b)
    assert len(set(curve(one, names.OBJECTIVE_KL))) > 1  # the policy moved away from the reference: updates happened


@pytest.mark.parametrize("disable", [True, False])
def test_disable_dropout_reaches_the_lora_adapters(disable):
    """disable_dropout turns off every dropout, LoRA's own included (applied after the adapters, as TRL does);
    without it, LoRA's dropout stays as configured."""
    import torch

    from tuneoff.config import RMConfig
    from tuneoff.train.loop import trainable_model

    config = RMConfig(model="tiny", lora=True, lora_r=2, lora_dropout=0.05, disable_dropout=disable)
    model = trainable_model(config)
    lora_dropouts = [
        m for name, m in model.named_modules() if "lora_dropout" in name and isinstance(m, torch.nn.Dropout)
    ]
    assert lora_dropouts and all(m.p == (0.0 if disable else 0.05) for m in lora_dropouts)
