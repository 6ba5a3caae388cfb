"""KTO end to end on the tiny model: TRL's unpaired format, pairs unpaired, learning, resume, bad data."""

import json
from pathlib import Path

import pytest
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


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def unpaired(tmp_path_factory) -> Path:
    """SST-2 beginnings with a human-written positive (desirable) or negative (undesirable) ending."""
    from tuneoff.data.sources import sst2_sft_records

    positive, negative = sst2_sft_records(label=1)[:120], sst2_sft_records(label=0)[:120]
    records = [
        {"prompt": r["prompt"], "completion": r["completion"], "label": label}
        for pair in zip(positive, negative)
        for r, label in zip(pair, (True, False))
    ]
    path = tmp_path_factory.mktemp("kto") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_kto_smoke_saves_loadable_model_with_trl_metrics(tmp_path, unpaired):
    out = tmp_path / "run"
    result = run_cli("kto", *FAST, "--data", str(unpaired), "--out", str(out), "--max-steps", "4", "--eval-every", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "model")
    train = [r for r in rows(out) if "train/loss" in r]
    assert len(train) == 4 and all(0 <= r["train/loss"] <= 2 and r["kl"] >= 0 for r in train)
    held_out = [r for r in rows(out) if "eval/loss" in r]
    assert [r["step"] for r in held_out] == [2, 4]
    assert {"eval/rewards/chosen", "eval/rewards/rejected", "eval/rewards/margins", "eval/kl"} <= set(held_out[-1])


def test_kto_separates_desirable_from_undesirable(tmp_path, unpaired):
    """Trained on its own examples, the implied reward of desirable completions rises above the undesirable ones."""
    out = tmp_path / "run"
    args = [
        "--data",
        str(unpaired),
        "--eval-data",
        str(unpaired),
        "--out",
        str(out),
        "--max-steps",
        "30",
        "--eval-every",
        "30",
        "--beta",
        "0.5",
        "--lr",
        "3e-3",
        "--warmup-ratio",
        "0",
    ]
    result = run_cli("kto", *FAST, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    final = [r for r in rows(out) if "eval/loss" in r][-1]
    first, last = rows(out)[0]["train/loss"], final["eval/loss"]
    assert final["eval/rewards/margins"] > 0.5 and last < first


def test_preference_pairs_are_unpaired(tmp_path):
    from tuneoff.train.kto import load_examples

    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "The film", "chosen": " is fine.", "rejected": " is bad."}\n')
    examples = load_examples(str(path))
    assert [(e.prompt, e.completion, e.label) for e in examples] == [
        ("The film", " is fine.", True),
        ("The film", " is bad.", False),
    ]


def test_resume_after_kill_gives_identical_metrics(tmp_path, unpaired):
    args = [*FAST, "--data", str(unpaired), "--max-steps", "8", "--save-every", "3", "--eval-every", "4"]
    straight = tmp_path / "straight"
    assert run_cli("kto", *args, "--out", str(straight)).returncode == 0
    killed = tmp_path / "killed"
    kill_after_checkpoint("kto", args, killed, "step-000003", "step-000008")
    resumed = run_cli("kto", *args, "--out", str(killed), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    strip = lambda rs: [{k: v for k, v in r.items() if not k.endswith("_per_s")} for r in rs]  # noqa: E731
    assert strip(rows(killed)) == strip(rows(straight))


def test_bad_label_exits_2_naming_the_field(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"prompt": "a", "completion": " b", "label": true}\n{"prompt": "c", "completion": " d", "label": 1}\n'
    )
    result = run_cli("kto", *FAST, "--data", str(bad), "--out", str(tmp_path / "run"))
    assert result.returncode == 2 and "label" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_one_sided_data_is_refused(tmp_path):
    only_good = tmp_path / "good.jsonl"
    only_good.write_text("".join(f'{{"prompt": "p{i}", "completion": " c{i}", "label": true}}\n' for i in range(20)))
    result = run_cli("kto", *FAST, "--data", str(only_good), "--out", str(tmp_path / "run"))
    assert result.returncode == 2 and "desirable and undesirable" in result.stderr
