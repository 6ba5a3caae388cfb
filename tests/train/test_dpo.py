"""DPO end to end on the tiny model: smoke, reference log-probs computed once, resume after a kill, bad data,
a real learning signal, IPO with LoRA. Pairs come from the shipped SST-2: the prompt is the first 4 words of a
positive review; chosen continues that review, rejected is the middle of a negative one."""

import json
import math
import random
from pathlib import Path

import pytest
import torch
from tests.conftest import kill_after_checkpoint, run_cli

FAST = [
    "--model",
    "tiny",
    "--batch-size",
    "8",
    "--max-length",
    "64",
    "--max-prompt-length",
    "16",
    "--lr",
    "1e-3",
    "--log-every",
    "1",
    "--threads",
    "1",
]
KEYS = (
    "train/loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "train/grad_norm",
    "eval/loss",
    "eval/rewards/accuracies",
)


def run(*args: str) -> int:
    """``tuneoff dpo ARGS`` in this process (the smoke test runs a fresh one): CLI start-up costs ~5 s a run."""
    from tuneoff.cli import main

    return main(["dpo", *args])


def metrics(out: Path, keys=KEYS) -> list[tuple]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], k, r[k]) for r in rows for k in keys if k in r]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    from tuneoff.data.sources import sst2_sentences

    positive, negative = sst2_sentences(label=1, min_words=12), sst2_sentences(label=0, min_words=12)
    random.Random(0).shuffle(positive)
    random.Random(1).shuffle(negative)
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    with path.open("w") as f:
        for good, bad in zip(positive[:200], negative[:200]):
            good, bad = good.split(), bad.split()
            f.write(
                json.dumps(
                    {
                        "prompt": " ".join(good[:4]),
                        "chosen": " " + " ".join(good[4:12]),
                        "rejected": " " + " ".join(bad[4:12]),
                    }
                )
                + "\n"
            )
    return path


def test_dpo_smoke_saves_loadable_model(tmp_path, pairs):
    out = tmp_path / "run"
    result = run_cli("dpo", *FAST, "--data", str(pairs), "--out", str(out), "--max-steps", "6", "--eval-every", "3")
    assert result.returncode == 0, result.stderr
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out / "model").config.n_layer == 2
    assert (out / "config.yaml").exists() and any((out / "tb").iterdir())
    assert len(list(out.glob("reference-logps-*.safetensors"))) == 1
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    # Before the first update π = π_ref: every implicit reward is 0 and the loss is -log σ(0) = log 2.
    assert abs(first["train/loss"] - math.log(2)) < 1e-5 and abs(first["rewards/margins"]) < 1e-5
    assert first["logps/chosen"] < 0 and first["logps/rejected"] < 0
    assert [k for _, k, _ in metrics(out)].count("train/loss") == 6
    assert [k for _, k, _ in metrics(out)].count("eval/rewards/accuracies") == 2


def test_reference_logps_are_computed_once_and_reused(tmp_path, pairs, monkeypatch):
    """One inference-mode forward per reference batch before training, none per step; a resume reads the cache."""
    from tuneoff.config import DPOConfig
    from tuneoff.train import dpo

    forwards = {"reference": 0, "train": 0}
    original = dpo.SequenceLogProbs.forward

    def counting(self, *args, **kwargs):
        forwards["reference" if torch.is_inference_mode_enabled() else "train"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(dpo.SequenceLogProbs, "forward", counting)
    config = dict(
        model="tiny",
        data=str(pairs),
        out=str(tmp_path / "run"),
        batch_size=8,
        max_length=64,
        max_prompt_length=16,
        eval_fraction=0.0,
        ref_batch_size=64,
        save_every=3,
        log_every=1,
        threads=1,
    )
    dpo.train(DPOConfig(**config, max_steps=3))
    assert forwards == {"reference": math.ceil(200 / 64), "train": 3}
    cache = list((tmp_path / "run").glob("reference-logps-*.safetensors"))
    assert len(cache) == 1
    dpo.train(DPOConfig(**config, max_steps=5, resume=True))
    assert forwards == {"reference": math.ceil(200 / 64), "train": 5}
    assert list((tmp_path / "run").glob("reference-logps-*.safetensors")) == cache


def test_resume_after_kill_gives_identical_metrics(tmp_path, pairs, capsys):
    args = [*FAST, "--data", str(pairs), "--max-steps", "60", "--save-every", "30", "--eval-every", "20"]
    straight = tmp_path / "straight"
    assert run(*args, "--out", str(straight)) == 0

    killed = tmp_path / "killed"
    kill_after_checkpoint("dpo", args, killed, "step-000030", "step-000060")
    capsys.readouterr()
    assert run(*args, "--out", str(killed), "--resume") == 0
    assert "reused from reference-logps-" in capsys.readouterr().out
    assert metrics(killed) == metrics(straight)


def test_bad_preference_data_exits_2_and_writes_nothing(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "d", "chosen": "same", "rejected": "same"}\n'
    )
    out = tmp_path / "run"
    assert run(*FAST, "--data", str(bad), "--out", str(out)) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {bad}:2: field 'rejected': chosen and rejected are the same text: a preference needs two different "
        f"responses"
    ]
    assert not out.exists()


def test_dpo_raises_reward_accuracy_on_its_training_pairs(tmp_path, pairs):
    """30 steps on tiny: the implicit reward ranks chosen above rejected on most of the pairs it trained on."""
    out = tmp_path / "run"
    assert (
        run(
            *FAST,
            "--data",
            str(pairs),
            "--eval-data",
            str(pairs),
            "--out",
            str(out),
            "--max-steps",
            "30",
            "--eval-every",
            "30",
            "--save-every",
            "30",
        )
        == 0
    )
    final = [v for _, k, v in metrics(out) if k == "eval/rewards/accuracies"]
    margin = [v for _, k, v in metrics(out, ("eval/rewards/margins",))]
    assert final[-1] > 0.7 and margin[-1] > 0, (final, margin)


def test_ipo_with_lora_uses_the_base_as_reference(tmp_path, pairs):
    out = tmp_path / "run"
    assert (
        run(
            *FAST,
            "--data",
            str(pairs),
            "--out",
            str(out),
            "--max-steps",
            "3",
            "--loss-type",
            "ipo",
            "--beta",
            "0.5",
            "--lora",
            "--lora-r",
            "4",
        )
        == 0
    )
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    # π = base at step 0 (LoRA's B starts at 0), so h = 0 and the IPO loss is (0 - 1/(2β))² = 1.
    assert abs(first["train/loss"] - 1.0) < 1e-5 and abs(first["rewards/margins"]) < 1e-6
    assert first["logps/chosen"] > -15  # per-token means for IPO, not sums over ~12 tokens
    assert (out / "adapter" / "adapter_config.json").exists()
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out / "model")
    assert not any("lora" in name for name, _ in merged.named_parameters())


def test_padding_does_not_change_sequence_logprobs():
    """A response scored alone and beside a longer row (right padding, masked) gets the same log-prob."""
    from tuneoff.data.tokenize import IGNORE, Tokenized, pad_batch
    from tuneoff.models.load import load_model
    from tuneoff.train.dpo import SequenceLogProbs

    torch.manual_seed(0)
    scorer = SequenceLogProbs(load_model("tiny")).eval()
    short = Tokenized([50, 60, 70, 80], [IGNORE, IGNORE, 70, 80])
    long = Tokenized(list(range(100, 112)), [IGNORE] * 3 + list(range(103, 112)))

    def score(rows):
        batch = pad_batch(rows, pad_id=0)
        return scorer(batch["input_ids"], batch["attention_mask"], batch["labels"])

    with torch.inference_mode():
        alone, alone_count = score([short])
        beside, counts = score([short, long])
    assert abs(alone.item() - beside[0].item()) < 1e-4 and alone_count.tolist() == [2] and counts.tolist() == [2, 9]


def test_overlong_pairs_keep_the_prompt_end_and_cut_responses(tmp_path, tiny_tokenizer):
    from tuneoff.data.pairs import tokenize_pairs
    from tuneoff.errors import DataError, TuneoffError

    path = tmp_path / "long.jsonl"
    path.write_text(
        json.dumps({"prompt": "one two three four five six", "chosen": " a b c d e f g", "rejected": " yes"}) + "\n"
    )
    ids = lambda text: tiny_tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    (pair,), summary = tokenize_pairs(str(path), tiny_tokenizer, max_length=8, max_prompt_length=3, overlong="truncate")
    assert pair.prompt == ids("one two three four five six")[-3:]
    assert pair.chosen == ids(" a b c d e f g")[:5] and pair.rejected == ids(" yes") + [tiny_tokenizer.eos_token_id]
    assert summary == "1 pairs, 1 truncated"
    assert pair.group == "one two three four five six" and pair.where.endswith("long.jsonl:1") and pair.margin == 0
    with pytest.raises(TuneoffError, match="no pair left"):
        tokenize_pairs(str(path), tiny_tokenizer, max_length=8, max_prompt_length=3, overlong="drop")
    with pytest.raises(DataError, match=r"long.jsonl:1: .*over max_prompt_length 3"):
        tokenize_pairs(str(path), tiny_tokenizer, max_length=8, max_prompt_length=3, overlong="error")


def test_a_separate_reference_model(tmp_path, pairs, tiny_tokenizer):
    from tuneoff.models.load import load_model

    torch.manual_seed(123)
    reference = tmp_path / "reference"
    load_model("tiny").save_pretrained(reference)  # another random init than the policy's (seed 0)
    tiny_tokenizer.save_pretrained(reference)
    out = tmp_path / "run"
    assert run(*FAST, "--data", str(pairs), "--out", str(out), "--max-steps", "1", "--ref-model", str(reference)) == 0
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    # π (seed 0) is not π_ref at step 0, so the gaps are not 0 and the loss is not log 2.
    assert abs(first["train/loss"] - math.log(2)) > 1e-3 and first["rewards/margins"] != 0


def test_reference_logps_run_under_the_accelerators_autocast():
    """π_ref is scored at the policy's precision (accelerator.autocast), so that π = π_ref at step 0 under bf16
    too; the values stay fp32. Without mixed precision the autocast is a no-op: fp32 values as before."""
    import contextlib
    import types

    from tuneoff.data.pairs import TokenizedPair
    from tuneoff.models.load import load_model
    from tuneoff.train.reference import reference_logps

    torch.manual_seed(0)
    model = load_model("tiny").eval()
    pairs = [TokenizedPair([5, 6], [7, 8, 9], [10], "a"), TokenizedPair([11], [12, 13], [14, 15, 16, 17], "b")]
    config = types.SimpleNamespace(ref_batch_size=8)

    def accelerator(autocast):
        return types.SimpleNamespace(device=torch.device("cpu"), process_index=0, num_processes=1, autocast=autocast)

    full = reference_logps(model, pairs, config, 0, accelerator(contextlib.nullcontext))
    low = reference_logps(model, pairs, config, 0, accelerator(lambda: torch.autocast("cpu", dtype=torch.bfloat16)))
    assert full.shape == low.shape == (2, 2) and full.dtype == low.dtype == torch.float32
    assert not torch.equal(full, low) and (full - low).abs().max() < 0.5
