"""Preference pairs as token ids for the methods that score responses with the policy (DPO, IPO).

A pair is (prompt ids, chosen ids, rejected ids); each response ends with EOS (or the chat template's end of turn)
and carries the labels, the prompt none. Over-long pairs follow ``overlong``: ``truncate`` keeps the prompt's last
``max_prompt_length`` tokens (the end is what the response follows), then cuts each response at its end to fit
``max_length``; ``drop`` skips the pair (counted); ``error`` stops at the record. A micro-batch holds the B chosen
rows and then the B rejected rows, right-padded, so one forward scores both sides.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass

import torch

from tuneoff.data.tokenize import IGNORE, Tokenized, pad_batch
from tuneoff.errors import DataError, TuneoffError


@dataclass
class TokenizedPair:
    prompt: list[int]
    chosen: list[int]  # response ids, ending with EOS (or the chat template's end of turn)
    rejected: list[int]
    group: str  # the prompt as text: pairs sharing it stay on one side of the held-out split
    ref_chosen: float = 0.0  # log π_ref(chosen | prompt) summed over the response, from the reference pass
    ref_rejected: float = 0.0


def encode(tokenizer, prompt, response: str) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids). A string prompt and the response are tokenized apart (the ids a policy sees),
    EOS appended; an empty prompt becomes BOS (or EOS), a context for the first token. A conversation goes through
    the chat template with the response as the next assistant turn."""
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


def tokenize_pairs(
    path: str, tokenizer, max_length: int, max_prompt_length: int, overlong: str
) -> tuple[list[TokenizedPair], str]:
    """Validated preference pairs of ``path`` -> token ids under the over-long policy; and a summary line."""
    from tuneoff.data.formats import load_preferences

    out, truncated, dropped = [], 0, []
    for pair in load_preferences(path):
        (prompt, chosen), (_, rejected) = (
            encode(tokenizer, pair.prompt, pair.chosen),
            encode(tokenizer, pair.prompt, pair.rejected),
        )
        longest = len(prompt) + max(len(chosen), len(rejected))
        if len(prompt) > max_prompt_length or longest > max_length:
            if overlong == "error":
                file, _, line = pair.where.rpartition(":")
                limit = (
                    f"max_prompt_length {max_prompt_length}"
                    if len(prompt) > max_prompt_length
                    else f"max_length {max_length}"
                )
                raise DataError(
                    file or pair.where,
                    line or None,
                    None,
                    f"pair is {longest} tokens, {len(prompt)} of them the "
                    f"prompt: over {limit} (set --overlong truncate or drop)",
                )
            if overlong == "drop":
                dropped.append(f"{pair.where} ({longest} tokens)")
                continue
            prompt = prompt[-max_prompt_length:]  # the prompt's end is what the response follows
            room = max_length - len(prompt)
            chosen, rejected, truncated = chosen[:room], rejected[:room], truncated + 1
        group = pair.prompt if isinstance(pair.prompt, str) else json.dumps([[m.role, m.content] for m in pair.prompt])
        out.append(TokenizedPair(prompt, chosen, rejected, group))
    summary = f"{len(out)} pairs" + (f", {truncated} truncated" if truncated else "")
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
