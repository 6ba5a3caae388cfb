"""The default task's label-noise knob (flip_rate)."""

import pytest

from tuneoff.data.default_task import DefaultTaskConfig, cache_key, flip_labels


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

    from tuneoff.data import default_task
    from tuneoff.errors import TuneoffError

    asked = []
    monkeypatch.setattr(default_task, "default_task_files", lambda config=DefaultTaskConfig(): asked.append(config.pairs) or tmp_path)
    assert default_task.pair_files("default", "") == (str(tmp_path / "train.jsonl"), str(tmp_path / "eval_gold.jsonl"))
    assert default_task.pair_files("default:22000", "mine.jsonl") == (str(tmp_path / "train.jsonl"), "mine.jsonl")
    assert asked == [4000, 22000]
    assert default_task.pair_files("pairs.jsonl", "") == ("pairs.jsonl", "")
    for bad in ("default:", "default:0", "default:2k"):
        with pytest.raises(TuneoffError, match="default:PAIRS"):
            default_task.pair_files(bad, "")
