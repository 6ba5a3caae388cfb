"""SFT end to end on the tiny model: smoke, resume after a kill, NaN stop, LoRA, packing, 2-process DDP."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tests.conftest import ROOT, kill_after_checkpoint, run_cli

EXAMPLES = ROOT / "examples"
FAST = [
    "--model",
    "tiny",
    "--batch-size",
    "8",
    "--max-length",
    "64",
    "--lr",
    "1e-3",
    "--log-every",
    "1",
    "--threads",
    "1",
]


def metrics(out: Path, keys=("train/loss", "train/lr", "train/grad_norm", "eval/loss")) -> list[tuple]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], k, r[k]) for r in rows for k in keys if k in r]


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    lines = (EXAMPLES / "sst2_positive_sft.jsonl").read_text().splitlines()[:400]
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_sft_smoke_saves_loadable_model(tmp_path, small_data):
    out = tmp_path / "run"
    result = run_cli(
        "sft", *FAST, "--data", str(small_data), "--out", str(out), "--max-steps", "6", "--eval-every", "3"
    )
    assert result.returncode == 0, result.stderr
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out / "model")
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    assert model.config.n_layer == 2 and tokenizer.eos_token == "<|endoftext|>"
    assert (out / "config.yaml").exists() and any((out / "tb").iterdir())
    losses = [v for _, k, v in metrics(out) if k == "train/loss"]
    assert len(losses) == 6 and all(l == l for l in losses)
    assert [k for _, k, _ in metrics(out)].count("eval/loss") == 2
    state = json.loads((out / "checkpoints" / "step-000006" / "state.json").read_text())
    assert state["step"] == 6


def test_refuses_to_overwrite_a_run(tmp_path, small_data):
    out = tmp_path / "run"
    assert run_cli("sft", *FAST, "--data", str(small_data), "--out", str(out), "--max-steps", "1").returncode == 0
    again = run_cli("sft", *FAST, "--data", str(small_data), "--out", str(out), "--max-steps", "1")
    assert again.returncode == 2 and "already holds a run" in again.stderr


def test_bad_data_exits_2_and_writes_nothing(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": 3}\n')
    out = tmp_path / "run"
    result = run_cli("sft", *FAST, "--data", str(bad), "--out", str(out))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {bad}:2: field 'completion': expected a string, got a number (3)"
    ]
    assert "Traceback" not in result.stderr and not out.exists()


def test_resume_after_kill_gives_identical_losses(tmp_path, small_data):
    args = [*FAST, "--data", str(small_data), "--max-steps", "60", "--save-every", "30", "--eval-every", "20"]
    straight = tmp_path / "straight"
    assert run_cli("sft", *args, "--out", str(straight)).returncode == 0

    killed = tmp_path / "killed"
    kill_after_checkpoint("sft", args, killed, "step-000030", "step-000060")
    resumed = run_cli("sft", *args, "--out", str(killed), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert metrics(killed) == metrics(straight)
    a = torch.load(straight / "checkpoints" / "step-000060" / "optimizer.pt", weights_only=True)
    b = torch.load(killed / "checkpoints" / "step-000060" / "optimizer.pt", weights_only=True)
    assert all(torch.equal(a["state"][i]["exp_avg"], b["state"][i]["exp_avg"]) for i in a["state"])


def test_nan_loss_stops_with_message(tmp_path, small_data):
    out = tmp_path / "run"
    result = run_cli(
        "sft",
        *FAST,
        "--data",
        str(small_data),
        "--out",
        str(out),
        "--max-steps",
        "20",
        "--save-every",
        "1",
        "--lr",
        "1e30",
        "--max-grad-norm",
        "0",
        "--schedule",
        "constant",
        "--warmup-ratio",
        "0",
    )
    assert result.returncode == 2, result.stderr
    assert "loss became nan" in result.stderr or "loss became inf" in result.stderr
    assert "Last good checkpoint" in result.stderr and "Traceback" not in result.stderr
    assert not (out / "model").exists()


def test_lora_packing_and_messages(tmp_path):
    out = tmp_path / "run"
    result = run_cli(
        "sft",
        *FAST,
        "--data",
        str(EXAMPLES / "self_instruct_messages.jsonl"),
        "--out",
        str(out),
        "--max-steps",
        "3",
        "--lora",
        "--lora-r",
        "4",
        "--packing",
        "--max-length",
        "256",
    )
    assert result.returncode == 0, result.stderr
    assert (out / "adapter" / "adapter_config.json").exists()
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out / "model")
    assert not any("lora" in name for name, _ in merged.named_parameters())


def test_two_processes_match_one_with_double_accumulation(tmp_path, small_data):
    """Two CPU processes (gloo, launched by torchrun as accelerate does for GPUs) vs one process with
    grad_accum 2: the same micro-batches, so the same loss curve."""
    args = [*FAST, "--data", str(small_data), "--max-steps", "8", "--eval-fraction", "0", "--save-every", "100"]
    one = tmp_path / "one"
    assert run_cli("sft", *args, "--grad-accum", "2", "--out", str(one)).returncode == 0
    two = tmp_path / "two"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "-m",
            "tuneoff.cli",
            "sft",
            *args,
            "--grad-accum",
            "1",
            "--out",
            str(two),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    losses_one = [v for _, k, v in metrics(one) if k == "train/loss"]
    losses_two = [v for _, k, v in metrics(two) if k == "train/loss"]
    assert len(losses_one) == len(losses_two) == 8
    # Same micro-batches, token-weighted: only floating-point reduction order differs.
    assert max(abs(a - b) for a, b in zip(losses_one, losses_two)) < 1e-4


def test_training_runs_in_train_mode_without_evaluation(tmp_path, monkeypatch):
    """from_pretrained returns a model in eval mode: training must switch it (dropout as configured, as TRL)
    even when no evaluation ever runs (which used to be the only place that called .train())."""
    import tuneoff.models.load as load
    from tuneoff.config import SFTConfig
    from tuneoff.train import sft

    modes = []
    original = load.load_model

    def recording(*args, **kwargs):
        model = original(*args, **kwargs)
        model.get_decoder().register_forward_pre_hook(lambda module, _: modes.append(module.training))
        return model

    monkeypatch.setattr(load, "load_model", recording)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(f'{{"prompt": "p{i}", "completion": " c{i} ok"}}\n' for i in range(8)))
    sft.train(
        SFTConfig(
            model="tiny",
            data=str(data),
            out=str(tmp_path / "run"),
            max_steps=2,
            batch_size=4,
            eval_fraction=0.0,
            save_every=100,
        )
    )
    assert modes and all(modes)
