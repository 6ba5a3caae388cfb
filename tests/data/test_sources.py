"""Adapters for the shipped real data: counts checked against the real files, edge cases on small ones."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import pytest

from tuneoff.data.formats import PreferencePair, load_preferences, read_rows
from tuneoff.data.sources import (
    HH_RLHF_HARMLESS_TEST,
    PANDALM_TEST,
    SELF_INSTRUCT_SEED,
    SST2_DEV,
    SST2_TEST,
    SST2_TRAIN,
    hh_rlhf_pairs,
    majority_label,
    pandalm_pairs,
    self_instruct_messages,
    shipped_data,
    split_hh_transcript,
    sst2_sentences,
)
from tuneoff.errors import DataError


def real(relative: str) -> Path:
    """A real data file shipped in the package (with its ORIGIN and LICENSE)."""
    from tuneoff.data.sources import shipped_data

    path = shipped_data(relative)
    assert path.exists() and (path.parent / "LICENSE").exists() and (path.parent / "ORIGIN.txt").exists(), path
    return path


def test_shipped_paths_are_absolute_and_read_from_any_directory(tmp_path, monkeypatch):
    """The README's recipe, hh_rlhf_pairs(HH_RLHF_HARMLESS_TEST), works wherever it runs; old relative names too."""
    constants = (HH_RLHF_HARMLESS_TEST, PANDALM_TEST, SST2_TRAIN, SST2_DEV, SST2_TEST, SELF_INSTRUCT_SEED)
    assert all(isinstance(path, Path) and path.is_absolute() and path.is_file() for path in constants)
    monkeypatch.chdir(tmp_path)
    pairs, skipped = hh_rlhf_pairs(HH_RLHF_HARMLESS_TEST)
    assert (len(pairs), len(skipped)) == (2304, 8) and pairs[0].where == f"{HH_RLHF_HARMLESS_TEST}:1"
    assert shipped_data(PANDALM_TEST) == PANDALM_TEST == shipped_data("pandalm/testset-v1.json.gz")
    # The names the constants used to hold, relative to the shipped data folder, still find the files.
    assert pandalm_pairs("pandalm/testset-v1.json.gz") == pandalm_pairs(PANDALM_TEST)
    assert self_instruct_messages("self-instruct/seed_tasks.jsonl") == self_instruct_messages(SELF_INSTRUCT_SEED)
    assert self_instruct_messages() == self_instruct_messages(SELF_INSTRUCT_SEED)
    assert sst2_sentences("sst2/dev.tsv.gz", label=1) == sst2_sentences(SST2_DEV, label=1) != []
    # A file of that relative name in the working directory comes first; a missing one is named as given.
    local = tmp_path / "pandalm" / "testset-v1.json.gz"
    local.parent.mkdir()
    local.write_bytes(gzip.compress(json.dumps([pandalm_row(7, "a", "b", (1, 1, 1))]).encode()))
    assert [r.idx for r in pandalm_pairs("pandalm/testset-v1.json.gz").records] == [7]
    with pytest.raises(DataError, match=r"^nope/hh\.jsonl\.gz: no such file$"):
        hh_rlhf_pairs("nope/hh.jsonl.gz")


def gz_jsonl(tmp_path, rows, name="hh.jsonl.gz"):
    path = tmp_path / name
    path.write_bytes(gzip.compress("".join(json.dumps(row) + "\n" for row in rows).encode()))
    return path


# ---------------------------------------------------------------- HH-RLHF


def test_split_hh_transcript_keeps_everything():
    transcript = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: and?\n\nAssistant: bye"
    prompt, reply = split_hh_transcript(transcript)
    assert prompt.endswith("and?\n\nAssistant:") and reply == " bye" and prompt + reply == transcript
    assert split_hh_transcript("\n\nHuman: no reply") is None


def test_hh_pairs_on_small_file(tmp_path):
    h = "\n\nHuman: q\n\nAssistant:"
    rows = [
        {"chosen": h + " good", "rejected": h + " bad"},
        {"chosen": h + " good", "rejected": "\n\nHuman: other\n\nAssistant: bad"},
        {"chosen": h, "rejected": h + " bad"},
        {"chosen": "no turns", "rejected": "no turns either"},
        {"chosen": h + " same", "rejected": h + " same"},
    ]
    pairs, skipped = hh_rlhf_pairs(gz_jsonl(tmp_path, rows))
    assert pairs == [PreferencePair(h, " good", " bad", None, f"{tmp_path / 'hh.jsonl.gz'}:1")]
    assert skipped == [
        "record 2: rejected does not share the chosen prompt",
        "record 3: chosen reply is empty",
        "record 4: chosen has no '\\n\\nAssistant:' turn",
        "record 5: chosen and rejected replies are the same",
    ]


def test_hh_pairs_reject_a_file_that_is_not_hh(tmp_path):
    with pytest.raises(DataError, match="field 'chosen': missing"):
        hh_rlhf_pairs(gz_jsonl(tmp_path, [{"prompt": "q", "response": "a"}]))
    with pytest.raises(DataError, match="field 'rejected': expected a string, got a number"):
        hh_rlhf_pairs(gz_jsonl(tmp_path, [{"chosen": "a", "rejected": 3}]))


def test_hh_real_file_counts():
    path = real(HH_RLHF_HARMLESS_TEST)
    pairs, skipped = hh_rlhf_pairs(path)
    reasons = Counter(reason.split(": ", 1)[1] for reason in skipped)
    # The README's 4 foreign rejected transcripts, plus 4 whose chosen transcript stops at "Assistant:"
    # (an empty chosen reply, which a PreferencePair may not hold).
    assert reasons == {"rejected does not share the chosen prompt": 4, "chosen reply is empty": 4}
    assert [r.split(":")[0] for r in skipped if "share" in r] == [
        "record 1255",
        "record 1689",
        "record 1953",
        "record 2037",
    ]
    assert len(pairs) == 2304 and len(pairs) + len(skipped) == 2312
    assert all(p.prompt.endswith("\n\nAssistant:") and p.chosen.strip() and p.rejected.strip() for p in pairs)
    rows = dict(read_rows(path))
    first = pairs[0]
    assert first.prompt + first.chosen == rows[1]["chosen"] and first.prompt + first.rejected == rows[1]["rejected"]
    single_turn = sum(p.prompt.count("\n\nHuman:") == 1 for p in pairs)
    assert single_turn < len(pairs) / 2  # mostly multi-turn (README: 662 single, 1,650 multi over all 2,312)


def test_hh_implicit_prompt_reading_agrees_with_adapter(tmp_path):
    """The generic implicit-prompt reader splits HH transcripts like the adapter does."""
    path = real(HH_RLHF_HARMLESS_TEST)
    rows = [row for _, row in read_rows(path)][:200]
    kept, _ = hh_rlhf_pairs(gz_jsonl(tmp_path, rows, "first200.jsonl.gz"))
    generic = load_preferences(
        gz_jsonl(
            tmp_path,
            [{"chosen": p.prompt + p.chosen, "rejected": p.prompt + p.rejected} for p in kept],
            "kept.jsonl.gz",
        )
    )
    assert [(p.prompt, p.chosen, p.rejected) for p in generic] == [(p.prompt, p.chosen, p.rejected) for p in kept]


# ---------------------------------------------------------------- PandaLM


def pandalm_row(idx, r1, r2, labels, instruction="Rewrite", extra=""):
    return {
        "idx": idx,
        "instruction": instruction,
        "input": extra,
        "response1": r1,
        "response2": r2,
        "annotator1": labels[0],
        "annotator2": labels[1],
        "annotator3": labels[2],
        "cmp_key": "a_b",
    }


def test_majority_label():
    assert majority_label([1, 1, 2]) == 1
    assert majority_label([2, 0, 2]) == 2
    assert majority_label([0, 0, 1]) == 0
    assert majority_label([0, 1, 2]) == 0  # no majority: a tie


def test_pandalm_small_file(tmp_path):
    rows = [
        pandalm_row(0, "short", "long answer", (2, 2, 1), extra="the input"),
        pandalm_row(1, "x", "y", (1, 0, 2)),
        pandalm_row(2, True, "True.", (1, 1, 1)),
        pandalm_row(3, "fine", "", (1, 1, 1)),
        pandalm_row(4, "a", "b", (1, 1, 0), instruction=" ", extra="Truthfulness"),
    ]
    path = tmp_path / "p.json.gz"
    path.write_bytes(gzip.compress(json.dumps(rows).encode()))
    data = pandalm_pairs(path)
    assert [r.idx for r in data.records] == [0, 1, 4]
    assert data.records[0].prompt == "Rewrite\n\nthe input" and data.records[2].prompt == "Truthfulness"
    assert data.records[0].labels == (2, 2, 1) and [r.majority for r in data.records] == [2, 0, 1]
    assert data.skipped == (
        "record 3 (idx 2): response1 is not a string (JSON true)",
        "record 4 (idx 3): response2 is empty",
    )

    majority = data.to_preference_pairs()
    assert [(p.chosen, p.rejected, p.annotator) for p in majority] == [("long answer", "short", None), ("a", "b", None)]
    with_ties = data.to_preference_pairs(drop_ties=False)
    assert [(p.chosen, p.rejected) for p in with_ties][1:3] == [("x", "y"), ("y", "x")]  # a tie: both orders

    per_annotator = data.to_preference_pairs(majority=False)
    assert [(p.chosen, p.annotator) for p in per_annotator[:3]] == [
        ("long answer", "annotator1"),
        ("long answer", "annotator2"),
        ("short", "annotator3"),
    ]
    assert len(per_annotator) == 3 + 2 + 2  # record 1 has one tie label, record 4 one
    assert len(data.to_preference_pairs(majority=False, drop_ties=False)) == 3 + 4 + 4


def test_pandalm_bad_label_is_an_error(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps([pandalm_row(0, "a", "b", (1, 3, 1))]))
    with pytest.raises(DataError, match=r"record 1: field 'annotator2': expected 0 \(tie\), 1 or 2, got 3"):
        pandalm_pairs(path)


def test_pandalm_real_file_counts():
    path = real(PANDALM_TEST)
    raw = [row for _, row in read_rows(path)]
    assert len(raw) == 999
    # README: 105 ties by majority over all records (no record has three different labels).
    assert sum(majority_label([r["annotator1"], r["annotator2"], r["annotator3"]]) == 0 for r in raw) == 105
    data = pandalm_pairs(path)
    reasons = Counter(reason.split(": ", 1)[1] for reason in data.skipped)
    assert sum(n for reason, n in reasons.items() if "JSON true" in reason) == 6
    assert sum(n for reason, n in reasons.items() if reason.endswith("is empty")) == 54
    assert len(data.skipped) == 60 and len(data.records) == 939
    assert Counter(r.majority for r in data.records) == {2: 442, 1: 394, 0: 103}
    assert len(data.to_preference_pairs()) == 836
    per_annotator = data.to_preference_pairs(majority=False)
    assert len(per_annotator) == 2501 and Counter(p.annotator for p in per_annotator).keys() == {
        "annotator1",
        "annotator2",
        "annotator3",
    }
    assert len({r.prompt for r in data.records}) == 164  # README: only 170 distinct instructions in all 999
    assert all(isinstance(p.chosen, str) and p.chosen.strip() and p.chosen != p.rejected for p in per_annotator)
