"""Adapters that turn the real preference data shipped with tuneoff into :class:`PreferencePair` records.

The files ship inside the package (``tuneoff/assets/data``, each folder with its ORIGIN and LICENSE);
:data:`HH_RLHF_HARMLESS_TEST`, :data:`PANDALM_TEST`, :data:`SST2_TRAIN`, :data:`SELF_INSTRUCT_SEED` and the
others are their absolute paths, so ``hh_rlhf_pairs(HH_RLHF_HARMLESS_TEST)`` works from any working directory.
Every adapter takes the file's path and never fetches anything; a relative path that does not exist is also
looked up among the shipped files (``"pandalm/testset-v1.json.gz"``, the names these constants once held).

Records that the data set itself gets wrong (a rejected transcript from another dialogue, a response
that is JSON ``true`` or empty) are not errors: the adapters return them as human-readable skip reasons,
``"record 17: rejected does not share the chosen prompt"``, beside the pairs they keep. A file that is not
the data set at all (missing fields, wrong types) still raises :class:`tuneoff.errors.DataError`.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from tuneoff.data.formats import PreferencePair, parse_preference, position_label, read_rows, text_field
from tuneoff.errors import DataError

DATA = Path(__file__).resolve().parent.parent / "assets" / "data"
"""The folder of the data files shipped inside the package."""
HH_RLHF_HARMLESS_TEST = DATA / "hh-rlhf-harmless" / "harmless-base-test.jsonl.gz"
PANDALM_TEST = DATA / "pandalm" / "testset-v1.json.gz"
SST2_TRAIN = DATA / "sst2" / "train.tsv.gz"
SST2_DEV = DATA / "sst2" / "dev.tsv.gz"
SST2_TEST = DATA / "sst2" / "test.tsv.gz"
SELF_INSTRUCT_SEED = DATA / "self-instruct" / "seed_tasks.jsonl"
HH_ASSISTANT = "\n\nAssistant:"
"""The turn marker of HH-RLHF transcripts (``"\\n\\nHuman: ...\\n\\nAssistant: ..."``)."""


# ---------------------------------------------------------------- Anthropic HH-RLHF


def split_hh_transcript(transcript: str) -> tuple[str, str] | None:
    """``(prompt, reply)``: the prompt runs up to and including the last ``"\\n\\nAssistant:"``.

    The reply keeps its leading space, so ``prompt + reply == transcript`` (as in TRL's HH scripts).
    ``None`` when the transcript has no assistant turn.
    """
    cut = transcript.rfind(HH_ASSISTANT)
    if cut < 0:
        return None
    cut += len(HH_ASSISTANT)
    return transcript[:cut], transcript[cut:]


def hh_pair_or_reason(chosen: str, rejected: str) -> tuple[str, str, str] | str:
    """``(prompt, chosen_reply, rejected_reply)`` of one HH-RLHF record, or why it cannot be a pair.

    The prompt comes from the chosen transcript; the rejected transcript must start with it.
    """
    split = split_hh_transcript(chosen)
    if split is None:
        return "chosen has no '\\n\\nAssistant:' turn"
    prompt, chosen_reply = split
    if not rejected.startswith(prompt):
        return "rejected does not share the chosen prompt"
    rejected_reply = rejected[len(prompt) :]
    for name, reply in (("chosen", chosen_reply), ("rejected", rejected_reply)):
        if not reply.strip():
            return f"{name} reply is empty"
    if chosen_reply.strip() == rejected_reply.strip():
        return "chosen and rejected replies are the same"
    return prompt, chosen_reply, rejected_reply


def hh_rlhf_pairs(path: str | os.PathLike) -> tuple[list[PreferencePair], list[str]]:
    """Anthropic HH-RLHF ``{"chosen": transcript, "rejected": transcript}`` JSONL (gzipped or not) as pairs.

    Returns ``(pairs, skipped)``; ``skipped`` holds one reason per record left out, e.g.
    ``"record 1255: rejected does not share the chosen prompt"``. In the shipped harmless-base test
    split 4 records have a rejected transcript from another dialogue and 4 have an empty chosen reply
    (the transcript stops at ``"Assistant:"``): 8 are skipped and 2,304 kept.
    """
    path = data_path(path)
    file, pairs, skipped = str(path), [], []
    for record, (line, row) in enumerate(read_rows(path), 1):
        where = position_label(path, line)
        for field in ("chosen", "rejected"):
            if field not in row:
                raise DataError(
                    file,
                    where,
                    field,
                    f"missing: an HH-RLHF record has keys {{chosen, rejected}}, found keys {sorted(row)}",
                )
        result = hh_pair_or_reason(text_field(row, "chosen", file, where), text_field(row, "rejected", file, where))
        if isinstance(result, str):
            skipped.append(f"record {record}: {result}")
            continue
        prompt, chosen, rejected = result
        pairs.append(parse_preference({"prompt": prompt, "chosen": chosen, "rejected": rejected}, file, where))
    return pairs, skipped


# ---------------------------------------------------------------- PandaLM human test set

PANDALM_LABELS = {0: "tie", 1: "response1 better", 2: "response2 better"}
PANDALM_ANNOTATORS = ("annotator1", "annotator2", "annotator3")


def majority_label(labels: Sequence[int]) -> int:
    """The label more than half the annotators gave (2 of 3); 0 (tie) when there is none."""
    label, votes = Counter(labels).most_common(1)[0]
    return label if 2 * votes > len(labels) else 0


@dataclass(frozen=True)
class PandaLMRecord:
    """One PandaLM comparison with every annotator's label kept."""

    idx: int
    """PandaLM's own record id (``idx``)."""
    prompt: str
    """``instruction`` and ``input`` joined by a blank line, leaving out a blank one (idx 466 has only an input)."""
    response1: str
    """The first model's response."""
    response2: str
    """The second model's response."""
    labels: tuple[int, ...]
    """``annotator1..3``: 0 tie, 1 response1 better, 2 response2 better."""
    where: str
    """``file:record N``."""

    @property
    def majority(self) -> int:
        """The 2-of-3 label; 0 (tie) when all three differ."""
        return majority_label(self.labels)


def _ordered(record: PandaLMRecord, label: int, annotator: str | None, drop_ties: bool) -> list[PreferencePair]:
    """The pairs one label gives: one for a preference; none, or one in each order, for a tie."""
    first = PreferencePair(record.prompt, record.response1, record.response2, annotator, record.where)
    second = PreferencePair(record.prompt, record.response2, record.response1, annotator, record.where)
    return {1: [first], 2: [second], 0: [] if drop_ties else [first, second]}[label]


@dataclass(frozen=True)
class PandaLMData:
    """The usable PandaLM records and the reasons the others were left out."""

    records: tuple[PandaLMRecord, ...]
    """Records with two non-empty, different string responses."""
    skipped: tuple[str, ...]
    """One reason per record left out, e.g. ``"record 158 (idx 157): response1 is not a string (JSON true)"``."""

    def to_preference_pairs(self, majority: bool = True, drop_ties: bool = True) -> list[PreferencePair]:
        """Pairs by the majority label (``annotator=None``), or one per annotator (``annotator="annotator1"`` ...).

        A tie gives no pair with ``drop_ties``; without it, two pairs, one in each order: under the
        Bradley-Terry loss that is the same as a target probability of 1/2 for either response.
        """
        pairs = []
        for record in self.records:
            if majority:
                pairs += _ordered(record, record.majority, None, drop_ties)
            else:
                for name, label in zip(PANDALM_ANNOTATORS, record.labels):
                    pairs += _ordered(record, label, name, drop_ties)
        return pairs


def _pandalm_labels(row: dict, file: str, where: str) -> tuple[int, ...]:
    labels = []
    for name in PANDALM_ANNOTATORS:
        value = row.get(name)
        if isinstance(value, bool) or value not in PANDALM_LABELS:
            raise DataError(file, where, name, f"expected 0 (tie), 1 or 2, got {value!r}")
        labels.append(value)
    return tuple(labels)


def _pandalm_skip_reason(row: dict) -> str | None:
    for name in ("response1", "response2"):
        value = row.get(name)
        if not isinstance(value, str):
            return f"{name} is not a string (JSON {'null' if value is None else str(value).lower()})"
        if not value.strip():
            return f"{name} is empty"
    if row["response1"].strip() == row["response2"].strip():
        return "response1 and response2 are the same"
    return None


def pandalm_pairs(path: str | os.PathLike) -> PandaLMData:
    """The PandaLM human test set (a JSON list, gzipped or not) with every annotator's label kept.

    In the shipped ``testset-v1.json.gz`` (999 records) 6 responses are JSON ``true`` and 54 are empty,
    so 939 records are kept; by majority 105 of all 999 records (103 of the kept) are ties.
    """
    path = data_path(path)
    file, records, skipped = str(path), [], []
    for number, row in read_rows(path):
        where = position_label(path, number)
        parts = [
            text_field(_require(row, field, file, where), field, file, where, allow_empty=True)
            for field in ("instruction", "input")
        ]
        labels = _pandalm_labels(row, file, where)
        idx = row.get("idx", number - 1)
        prompt = "\n\n".join(part for part in parts if part.strip())
        reason = _pandalm_skip_reason(row) if prompt else "instruction and input are both empty"
        if reason is not None:
            skipped.append(f"{where} (idx {idx}): {reason}")
            continue
        records.append(PandaLMRecord(idx, prompt, row["response1"], row["response2"], labels, f"{file}:{where}"))
    return PandaLMData(tuple(records), tuple(skipped))


def _require(row: dict, field: str, file: str, where: Any) -> dict:
    if field not in row:
        raise DataError(
            file,
            where,
            field,
            f"missing: a PandaLM record has instruction, input, response1, response2 and "
            f"annotator1..3, found keys {sorted(row)}",
        )
    return row


# --- SFT data from the shipped SST-2 and Self-Instruct files ------------------------------------------------


def shipped_data(relative: str | os.PathLike) -> Path:
    """A data file shipped inside the package (``tuneoff/assets/data``), with ORIGIN and LICENSE beside it:
    ``relative`` names it under that folder (``"sst2/dev.tsv.gz"``); an absolute path (the constants above)
    is returned as it is."""
    return DATA / relative  # pathlib keeps an absolute right-hand side


def data_path(path: str | os.PathLike) -> Path:
    """The file an adapter reads: ``path`` itself when it exists or is absolute, else the shipped file of that
    relative name when there is one (``"pandalm/testset-v1.json.gz"``); otherwise ``path`` (not found)."""
    path = Path(path)
    if path.is_absolute() or path.exists() or not (DATA / path).exists():
        return path
    return DATA / path


def sst2_sentences(path: str | os.PathLike | None = None, label: int | None = None, min_words: int = 8) -> list[str]:
    """Whole-sentence-like SST-2 train phrases (at least ``min_words`` words), optionally of one label (1 = positive).

    SST-2 lists every constituent of every sentence; long phrases are nearly whole sentences.
    """
    import gzip

    path = data_path(path) if path else SST2_TRAIN
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = [line.rstrip("\n").split("\t") for line in f][1:]
    seen: set[str] = set()
    out = []
    for row in rows:
        if len(row) != 2 or (label is not None and row[0] != str(label)):
            continue
        text = row[1].strip()
        if len(text.split()) >= min_words and text not in seen:
            seen.add(text)
            out.append(text)
    return out


def sst2_sft_records(
    path: str | os.PathLike | None = None, label: int = 1, prompt_words: int = 4, min_words: int = 8
) -> list[dict]:
    """``{"prompt","completion"}`` records: the first ``prompt_words`` words of a review, then its rest."""
    records = []
    for sentence in sst2_sentences(path, label, min_words):
        words = sentence.split()
        records.append({"prompt": " ".join(words[:prompt_words]), "completion": " " + " ".join(words[prompt_words:])})
    return records


def self_instruct_messages(path: str | os.PathLike | None = None) -> list[dict]:
    """``{"messages"}`` records from the Self-Instruct seed tasks: instruction (+ input) -> human-written output."""
    path = data_path(path) if path else SELF_INSTRUCT_SEED
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        task = json.loads(line)
        for instance in task["instances"]:
            user = task["instruction"] + (f"\n\n{instance['input']}" if instance["input"].strip() else "")
            if instance["output"].strip():
                records.append(
                    {
                        "messages": [
                            {"role": "user", "content": user},
                            {"role": "assistant", "content": instance["output"]},
                        ]
                    }
                )
    return records
