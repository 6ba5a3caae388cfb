"""The default task's label-noise knob (flip_rate)."""

import json

import pytest

from tuneoff.tasks.default_task import DefaultTaskConfig, cache_key, flip_labels


def test_flip_labels_swaps_exactly_the_stated_share():
    records = [{"prompt": f"p{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(10)]
    flipped = flip_labels(records, 0.3, seed=0)
    swapped = [r for r in flipped if r.get("flipped")]
    assert len(swapped) == 3  # round(0.3 * 10)
    for r in swapped:
        i = r["prompt"][1:]
        assert r["chosen"] == f"bad {i}" and r["rejected"] == f"good {i}"
    assert all(r == records[i] for i, r in enumerate(flipped) if not r.get("flipped"))
    assert flip_labels(records, 0.3, seed=0) == flipped  # seeded
    assert flip_labels(records, 0.0, seed=0) == records
    with pytest.raises(ValueError, match="flip_rate"):
        flip_labels(records, 1.5, seed=0)


def test_the_knob_is_part_of_the_cache_key():
    assert cache_key(DefaultTaskConfig(flip_rate=0.3)) != cache_key(DefaultTaskConfig())


def test_pair_files_reads_the_pair_count_from_default_colon(monkeypatch, tmp_path):
    import pytest

    from tuneoff.errors import TuneoffError
    from tuneoff.tasks import default_task

    asked = []
    default = DefaultTaskConfig()
    monkeypatch.setattr(
        default_task, "default_task_files", lambda config=default: asked.append(config.pairs) or tmp_path
    )
    assert default_task.pair_files("default", "") == (str(tmp_path / "train.jsonl"), str(tmp_path / "eval_gold.jsonl"))
    assert default_task.pair_files("default:22000", "mine.jsonl") == (str(tmp_path / "train.jsonl"), "mine.jsonl")
    assert asked == [4000, 22000]
    assert default_task.pair_files("pairs.jsonl", "") == ("pairs.jsonl", "")
    for bad in ("default:", "default:0", "default:2k"):
        with pytest.raises(TuneoffError, match="default:PAIRS"):
            default_task.pair_files(bad, "")


def test_task_config_reads_key_value_settings():
    from tuneoff.errors import TuneoffError
    from tuneoff.tasks.default_task import task_config

    assert task_config("default") == DefaultTaskConfig()
    assert task_config("default:123") == DefaultTaskConfig(pairs=123)
    assert task_config("default:pairs=60000,responses=4") == DefaultTaskConfig(pairs=60000, responses=4)
    assert task_config("default:temperature=0.5, flip_rate=0.1") == DefaultTaskConfig(temperature=0.5, flip_rate=0.1)
    for bad, message in [
        ("default:colour=red", "unknown setting 'colour'"),
        ("default:pairs=many", "not a whole number"),
        ("default:responses=1", "responses must be at least 2"),
        ("default:eval_pairs=-3", "eval_pairs must be"),
        ("default:flip_rate=1.5", r"flip_rate must be in \[0, 1\]"),
        ("default:temperature=nan", "temperature must be"),
        ("default:pairs=5,pairs=6", "set twice"),
        ("default:temperature=hot", "not a number"),
    ]:
        with pytest.raises(TuneoffError, match=message):
            task_config(bad)


def test_responses_two_keeps_the_cache_key_the_recipe_had_before_the_knob():
    import dataclasses
    import hashlib
    import json

    from tuneoff.models.load import resolve
    from tuneoff.tasks.default_task import FORMAT_VERSION

    config = DefaultTaskConfig(pairs=32000)
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k != "responses"}
    digest = hashlib.sha256(json.dumps({"config": settings, "format": FORMAT_VERSION}, sort_keys=True).encode())
    for weights in sorted(resolve(config.model).glob("*.safetensors")):
        digest.update(weights.read_bytes())
    assert cache_key(config) == digest.hexdigest()[:16]
    assert cache_key(DefaultTaskConfig(pairs=32000, responses=4)) != cache_key(config)


def test_all_pairs_takes_every_pair_of_a_prompts_responses():
    from tuneoff.tasks.default_task import all_pairs

    groups = [("p", ["a", "b", "c", "d"]), ("q", ["x", "x", " ", "y"])]
    assert all_pairs(groups) == [
        ("p", "a", "b"),
        ("p", "a", "c"),
        ("p", "a", "d"),
        ("p", "b", "c"),
        ("p", "b", "d"),
        ("p", "c", "d"),
        ("q", "x", "y"),
        ("q", "x", "y"),
    ]  # equal and empty pairs skipped


def _fake_build(monkeypatch, tmp_path, config, prompts):
    """build() with review-gpt's sampling replaced by one whose draws, like generate's, depend on the seed, the
    batch a prompt is drawn in and its place there; the gold judge counts "good"."""
    import hashlib

    import numpy as np

    from tuneoff.tasks import default_task

    calls = []

    def fake_sample(model, chosen_prompts, count, max_new_tokens, seed, batch_size=default_task.GENERATE_BATCH):
        calls.append((len(chosen_prompts), count))
        out = []
        for start in range(0, len(chosen_prompts), batch_size):
            chunk = chosen_prompts[start : start + batch_size]
            for i, p in enumerate(chunk):
                draw = [
                    int(hashlib.sha256(f"{seed}|{chunk}|{i}|{k}".encode()).hexdigest(), 16) % 1000 for k in range(count)
                ]
                out.append((p, [f"{p} reply {d} " + "good " * (d % 5) for d in draw]))
        return out

    class Judge:
        info = {"key": "fake"}

        def logit(self, texts):
            return np.array([float(t.count("good")) for t in texts])

    monkeypatch.setattr(default_task, "train_prompts", lambda words, seed: prompts)
    monkeypatch.setattr(default_task, "sample_responses", fake_sample)
    monkeypatch.setattr("tuneoff.feedback.gold.load_gold_judge", lambda: Judge())
    folder = default_task.build(config, tmp_path)
    read = lambda name: [json.loads(line) for line in (folder / name).read_text().splitlines()]
    return calls, read("train.jsonl"), read("eval_gold.jsonl"), json.loads((folder / "info.json").read_text())


def test_build_with_k_responses_holds_out_the_k2_samples(monkeypatch, tmp_path):
    """K = 4: the held-out pairs are those the K = 2 build draws (a K = 2 call over the first generate batches,
    here 2 × 256 prompts); training pairs are all six pairs of each later prompt, up to ``pairs``."""
    prompts = [f"prompt {i}" for i in range(1200)]
    calls, train, held, info = _fake_build(
        monkeypatch, tmp_path / "k4", DefaultTaskConfig(pairs=600, responses=4, eval_pairs=300), prompts
    )
    assert calls == [(512, 2), (100, 4)]  # held-out span capped at two generate batches; ⌈600 / 6⌉ = 100 prompts
    assert len(train) <= 600 and {r["prompt"] for r in train} <= set(prompts[300:400])
    assert all(r["chosen"] != r["rejected"] for r in train) and len(train) >= 590  # few equal draws skipped
    assert len({r["annotator"] for r in train}) == 4 and info["train_pairs"] == len(train)
    _, _, held_k2, _ = _fake_build(monkeypatch, tmp_path / "k2", DefaultTaskConfig(pairs=600, eval_pairs=300), prompts)
    assert held == held_k2 and [r["prompt"] for r in held] == [
        p for p in prompts[:300] if p in {r["prompt"] for r in held}
    ]


def test_the_default_tasks_responses_come_from_the_rollout_sampler(monkeypatch):
    """One sampler: the recipe draws through tuneoff.rollout.sample_responses (K rows per prompt, one call per
    batch of prompts), reproducibly from its seed."""
    import tuneoff.rollout
    from tuneoff.tasks import default_task

    calls = []
    original = tuneoff.rollout.sample_responses

    def recording(model, tokenizer, ids, *args, **kwargs):
        calls.append(len(ids))
        return original(model, tokenizer, ids, *args, **kwargs)

    monkeypatch.setattr(tuneoff.rollout, "sample_responses", recording)
    prompts = ["The movie is", "A", "the plot"]
    groups = [default_task.sample_responses("review-gpt", prompts, 3, 4, seed=0, batch_size=2) for _ in range(2)]
    assert calls == [9, 9]  # 3 prompts x 3 responses per call; batch_size counts prompts (2 x 3 rows per batch)
    assert [p for p, _ in groups[0]] == prompts and all(len(r) == 3 for _, r in groups[0])
    assert groups[0] == groups[1]
