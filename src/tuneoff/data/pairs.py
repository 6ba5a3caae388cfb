"""Preference pairs as token ids, one form for every method that trains on them (DPO/IPO, the reward model).

A pair is (prompt ids, chosen ids, rejected ids) (:func:`encode`); each response ends with EOS (or the chat
template's end of turn) and carries the labels, the prompt none. Over-long pairs follow ``overlong``, under one of
two limits (:func:`tokenize_pairs`):

- with ``max_prompt_length`` (DPO): a pair is over-long when its prompt exceeds ``max_prompt_length`` or prompt +
  its longer response exceed ``max_length``; ``truncate`` keeps the prompt's last ``max_prompt_length`` tokens
  (the end is what the response follows), then cuts each response at its end to fit ``max_length``;
- without (the reward model, which reads a sequence at its end): over-long when prompt + its longer response
  exceed ``max_length``; ``truncate`` keeps each sequence's last ``max_length`` tokens, done where the sequences
  are built (:func:`tuneoff.data.grouped.fit_left`), so the pair keeps its whole prompt.

``drop`` skips the pair (counted); ``error`` stops at the record. A DPO micro-batch (:func:`make_batches`) holds
the B chosen rows and then the B rejected rows, right-padded, so one forward scores both sides.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass

import torch

from tuneoff.data.tokenize import IGNORE, Tokenized, pad_batch
from tuneoff.errors import DataError, TuneoffError


@dataclass
class TokenizedPair:
    prompt: list[int]  # BOS (or EOS) for an empty string prompt: a context for the first response token
    chosen: list[int]  # response ids, ending with EOS (or the chat template's end of turn)
    rejected: list[int]
    group: str  # the prompt as text (conversations as JSON): pairs sharing it stay on one side of the held-out split
    where: str = ""  # file:line of the record
    margin: float = 0.0  # the reward model's Bradley–Terry margin m of this pair
    ref_chosen: float = 0.0  # DPO: log π_ref(chosen | prompt) summed over the response, from the reference pass
    ref_rejected: float = 0.0


def response_length(response: list[int]) -> int:
    """A response's length in tokens for the reward model's length-bias probe: its ids less the closing token."""
    return len(response) - 1


def encode(tokenizer, prompt, response: str) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids): what DPO scores and, joined, what the reward model trains on and scores
    (:func:`tuneoff.models.heads.encode_response`). A string prompt and the response are tokenized apart (the ids
    a policy sees), EOS appended; an empty prompt becomes BOS (or EOS), a context for the first token. A
    conversation goes through the chat template with the response as the next assistant turn."""
    from tuneoff.data.formats import Message
    from tuneoff.data.tokenize import chat_ids, text_ids

    if isinstance(prompt, str):
        start = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id]
        return text_ids(tokenizer, prompt) or start, text_ids(tokenizer, response) + [tokenizer.eos_token_id]
    if not getattr(tokenizer, "chat_template", None):
        raise TuneoffError("this model's tokenizer has no chat template: use string prompts instead of conversations")
    prompt_ids = chat_ids(tokenizer, prompt, add_generation_prompt=True)
    full = chat_ids(tokenizer, tuple(prompt) + (Message("assistant", response),))
    if full[: len(prompt_ids)] != prompt_ids:
        raise TuneoffError("the chat template is not prefix-consistent; cannot place the response after the prompt")
    return prompt_ids, full[len(prompt_ids) :]


def read_margins(path: str, field: str, count: int) -> list[float]:
    """The numeric ``field`` of every record of ``path`` (one per pair, in file order)."""
    from tuneoff.data.formats import position_label, read_rows

    margins = []
    for number, row in read_rows(path):
        value = row.get(field)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise DataError(
                path,
                position_label(path, number),
                field,
                f"expected a finite number (the pair's margin), got {value!r}",
            )
        margins.append(float(value))
    assert len(margins) == count, "read_rows and load_preferences disagree on the number of records"
    return margins


def tokenize_pairs(
    path: str,
    tokenizer,
    max_length: int,
    overlong: str,
    max_prompt_length: int | None = None,
    margin: float = 0.0,
    margin_field: str = "",
) -> tuple[list[TokenizedPair], str]:
    """Validated preference pairs of ``path`` -> token ids under the over-long policy (see the module's
    docstring: ``max_prompt_length`` None is the reward model's); and a summary line. A pair's margin is
    ``margin`` plus, with ``margin_field``, that numeric field of its record."""
    from tuneoff.data.formats import load_preferences

    pairs = load_preferences(path)
    margins = read_margins(path, margin_field, len(pairs)) if margin_field else [0.0] * len(pairs)
    out, truncated, dropped = [], 0, []
    for pair, extra in zip(pairs, margins):
        (prompt, chosen), (_, rejected) = (
            encode(tokenizer, pair.prompt, pair.chosen),
            encode(tokenizer, pair.prompt, pair.rejected),
        )
        longest = len(prompt) + max(len(chosen), len(rejected))
        long_prompt = max_prompt_length is not None and len(prompt) > max_prompt_length
        if long_prompt or longest > max_length:
            if overlong == "error":
                file, _, line = pair.where.rpartition(":")
                if max_prompt_length is None:
                    detail = f"pair is {longest} tokens, over max_length {max_length}"
                else:
                    limit = f"max_prompt_length {max_prompt_length}" if long_prompt else f"max_length {max_length}"
                    detail = f"pair is {longest} tokens, {len(prompt)} of them the prompt: over {limit}"
                raise DataError(file or pair.where, line or None, None, f"{detail} (set --overlong truncate or drop)")
            if overlong == "drop":
                dropped.append(f"{pair.where} ({longest} tokens)")
                continue
            truncated += 1
            if max_prompt_length is not None:  # else each sequence keeps its last max_length tokens, when built
                prompt = prompt[-max_prompt_length:]  # the prompt's end is what the response follows
                room = max_length - len(prompt)
                chosen, rejected = chosen[:room], rejected[:room]
        group = pair.prompt if isinstance(pair.prompt, str) else json.dumps([[m.role, m.content] for m in pair.prompt])
        out.append(TokenizedPair(prompt, chosen, rejected, group, pair.where, margin + extra))
    cut = "truncated" if max_prompt_length is not None else "truncated to max_length"
    summary = f"{len(out)} pairs" + (f", {truncated} {cut}" if truncated else "")
    summary += f", {len(dropped)} dropped as over-long (first: {dropped[0]})" if dropped else ""
    if not out:
        raise TuneoffError(f"{path}: no pair left to train on ({summary})")
    return out, summary


def split_by_prompt(pairs: list, fraction: float, seed: int, key=lambda p: p.group) -> tuple[list, list]:
    """Hold out about ``fraction`` of the pairs, whole prompts at a time (``key`` names a pair's prompt), in a
    seeded order. Shared by DPO and the reward model."""
    if fraction <= 0:
        return pairs, []
    groups = sorted({key(p) for p in pairs})
    order = torch.randperm(len(groups), generator=torch.Generator().manual_seed(seed)).tolist()
    size = Counter(key(p) for p in pairs)
    held, count, target = set(), 0, max(1, round(len(pairs) * fraction))
    for i in order:
        if count >= target:
            break
        held.add(groups[i])
        count += size[groups[i]]
    train = [p for p in pairs if key(p) not in held]
    if not train:
        raise TuneoffError(f"eval_fraction {fraction} leaves no training pair out of {len(pairs)}")
    return train, [p for p in pairs if key(p) in held]


def make_batches(
    pairs: list[TokenizedPair], batch_size: int, pad_id: int, seed: int, epoch: int, shuffle: bool = True
) -> list[dict]:
    """Micro-batches of one epoch in a seeded order; each holds the B chosen rows, then the B rejected rows."""
    order = (
        torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
        if shuffle
        else range(len(pairs))
    )
    ordered = [pairs[i] for i in order]
    batches = []
    for start in range(0, len(ordered), batch_size):
        chunk = ordered[start : start + batch_size]
        responses = [(p.prompt, p.chosen) for p in chunk] + [(p.prompt, p.rejected) for p in chunk]
        rows = [Tokenized(prompt + response, [IGNORE] * len(prompt) + response) for prompt, response in responses]
        batch = pad_batch(rows, pad_id)  # (2B, T)
        batch["ref_logps"] = torch.tensor([p.ref_chosen for p in chunk] + [p.ref_rejected for p in chunk])  # (2B,)
        batches.append(batch)
    return batches
