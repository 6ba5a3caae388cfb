"""Turn validated records into token ids and labels; pad or pack them into batches.

Conventions (all methods):
- A label of -100 means "no loss here". The first token of every example is always -100: nothing precedes it,
  and in a packed row the token before it belongs to another example.
- prompt/completion: prompt and completion are tokenized separately (the ids the policy sees at generation
  time), EOS is appended to the completion.
- messages: rendered by the tokenizer's chat template; assistant turns are found by rendering growing
  prefixes (works with any prefix-consistent template, ChatML included).
- text: the whole text is trained on, EOS appended.
- Records over ``max_length`` tokens: ``truncate`` keeps the first max_length tokens (dropped if no trainable
  token remains), ``drop`` skips them, ``error`` stops with the record's location. Counts are reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tuneoff.errors import DataError, TuneoffError

IGNORE = -100


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]


@dataclass
class TokenizeReport:
    kept: int = 0
    truncated: int = 0
    dropped: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = f"{self.kept} examples"
        if self.truncated:
            text += f", {self.truncated} truncated to max_length"
        if self.dropped:
            text += f", {len(self.dropped)} dropped as over-long (first: {self.dropped[0]})"
        return text


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _chat_ids(tokenizer, messages, add_generation_prompt: bool = False) -> list[int]:
    rendered = tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in messages],
        tokenize=False, add_generation_prompt=add_generation_prompt,
    )
    return _ids(tokenizer, rendered)


def tokenize_messages(tokenizer, messages) -> Tokenized:
    """Chat-template ids; labels on assistant turns only (each turn's end-of-turn token included)."""
    if not getattr(tokenizer, "chat_template", None):
        raise TuneoffError("this model's tokenizer has no chat template: use prompt/completion records instead")
    input_ids = _chat_ids(tokenizer, messages)
    labels = [IGNORE] * len(input_ids)
    for i, message in enumerate(messages):
        if message.role != "assistant":
            continue
        start = len(_chat_ids(tokenizer, messages[:i], add_generation_prompt=True))
        end_ids = _chat_ids(tokenizer, messages[: i + 1])
        if input_ids[: len(end_ids)] != end_ids:
            raise TuneoffError("the chat template is not prefix-consistent; cannot locate assistant turns")
        labels[start : len(end_ids)] = input_ids[start : len(end_ids)]
    return Tokenized(input_ids, labels)


def tokenize_sft(example, tokenizer, completion_only_loss: bool = True) -> Tokenized:
    """One SFTExample -> ids and labels (no length limit applied here)."""
    eos = [tokenizer.eos_token_id]
    if example.messages is not None:
        tokenized = tokenize_messages(tokenizer, example.messages)
        if not completion_only_loss:
            tokenized.labels = list(tokenized.input_ids)
    elif example.text is not None:
        ids = _ids(tokenizer, example.text) + eos
        tokenized = Tokenized(ids, list(ids))
    else:
        prompt, completion = _ids(tokenizer, example.prompt or ""), _ids(tokenizer, example.completion) + eos
        masked = [IGNORE] * len(prompt) if completion_only_loss else list(prompt)
        tokenized = Tokenized(prompt + completion, masked + completion)
    if tokenized.labels:
        tokenized.labels[0] = IGNORE
    return tokenized


def fit_length(tokenized: Tokenized, max_length: int, overlong: str, where: str, report: TokenizeReport) -> Tokenized | None:
    """Apply the over-long policy; None means the example is dropped (recorded in ``report``)."""
    n = len(tokenized.input_ids)
    if n <= max_length:
        report.kept += 1
        return tokenized
    if overlong == "error":
        file, _, line = where.rpartition(":")
        raise DataError(file or where, line or None, None, f"record is {n} tokens, over max_length {max_length} (set --overlong truncate or drop)")
    if overlong == "truncate":
        cut = Tokenized(tokenized.input_ids[:max_length], tokenized.labels[:max_length])
        if any(label != IGNORE for label in cut.labels):
            report.kept += 1
            report.truncated += 1
            return cut
    report.dropped.append(f"{where} ({n} tokens)")
    return None


def tokenize_dataset(examples, tokenizer, max_length: int, overlong: str = "truncate", completion_only_loss: bool = True):
    """All examples -> (list[Tokenized], TokenizeReport). Examples without any trainable token are dropped."""
    report, out = TokenizeReport(), []
    for example in examples:
        tokenized = tokenize_sft(example, tokenizer, completion_only_loss)
        fitted = fit_length(tokenized, max_length, overlong, getattr(example, "where", "?"), report)
        if fitted is not None:
            out.append(fitted)
    if not out:
        raise TuneoffError(f"no example left to train on after tokenization ({report.summary()})")
    return out, report


def pad_batch(examples: list[Tokenized], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, labels, all (B, T_max); num_tokens = real tokens (0-dim)."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "num_tokens": attention_mask.sum()}


def pack(examples: list[Tokenized], max_length: int) -> list[list[Tokenized]]:
    """Greedy first-fit-decreasing bins of at most ``max_length`` tokens (order-independent, deterministic)."""
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i].input_ids), i))
    bins: list[list[Tokenized]] = []
    room: list[int] = []
    for i in order:
        n = len(examples[i].input_ids)
        for b, free in enumerate(room):
            if n <= free:
                bins[b].append(examples[i])
                room[b] -= n
                break
        else:
            bins.append([examples[i]])
            room.append(max_length - n)
    return bins


ATTENTION_TOKENS = 768
"""Row width at which a token's attention costs as much as the rest of its forward and backward, as measured for
review-gpt's reward model on this CPU (rows of 96 vs 128: 7% faster for 3.5% fewer slots); it weighs filler
against width in :func:`row_width`."""


def row_width(lengths: list[int]) -> int:
    """The packing width, from the longest sequence to twice that in steps of 8, that minimises the estimated
    cost slots · (1 + W / ATTENTION_TOKENS) of first-fit-decreasing rows (filler costs as much as a token)."""
    longest = max(lengths)
    groups = [Tokenized([0] * n, []) for n in lengths]
    cost = {w: len(pack(groups, w)) * w * (1 + w / ATTENTION_TOKENS) for w in range(longest, 2 * longest + 1, 8)}
    return min(cost, key=cost.get)


def filler_id(pad_id: int) -> int:
    """The token that fills the end of a packed row: any id but the pad token, so transformers does not take a
    packed batch (no attention mask) for a padded one."""
    return 0 if pad_id != 0 else 1


def packed_batch(rows: list[list[Tokenized]], pad_id: int) -> dict[str, torch.Tensor]:
    """Padding-free batch of packed rows: input_ids, labels, position_ids, all (B, T_max); no attention_mask;
    num_tokens = real tokens (0-dim).

    position_ids restart at 0 for each example; transformers reads the restarts (with attention_mask=None)
    as sequence boundaries and builds a block-diagonal causal mask, so no token attends across examples.
    Call the model with ``use_cache=False``: with a cache, transformers skips that detection.
    Row-end padding forms its own segment with -100 labels; it is filled with a token other than the pad token
    (its value is never seen by another segment) so transformers does not mistake the batch for a padded one.
    """
    width = max(sum(len(e.input_ids) for e in row) for row in rows)
    filler = filler_id(pad_id)
    input_ids = torch.full((len(rows), width), filler, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for e in row:
            n = len(e.input_ids)
            input_ids[r, start : start + n] = torch.tensor(e.input_ids)
            labels[r, start : start + n] = torch.tensor(e.labels)
            position_ids[r, start : start + n] = torch.arange(n)
            start += n
        position_ids[r, start:] = torch.arange(width - start)
    num_tokens = torch.tensor(sum(len(e.input_ids) for row in rows for e in row))
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "num_tokens": num_tokens}
