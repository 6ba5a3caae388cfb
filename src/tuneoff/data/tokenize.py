"""Turn validated records into token ids and labels; pad or pack them into batches.

Conventions (all methods):
- A label of -100 means "no loss here". The first token of every example is always -100: nothing precedes it,
  and in a packed row the token before it belongs to another example.
- prompt/completion: prompt and completion are tokenized separately (the ids the policy sees at generation
  time), EOS is appended to the completion.
- messages: rendered by the tokenizer's chat template (with the messages' tool_calls, name and tool_call_id and
  the record's tools); assistant turns are found by rendering growing prefixes (works with any prefix-consistent
  template, ChatML included); only assistant turns are trained on. A conversational prompt/completion is the
  same with the prompt's turns never trained on. A template that cannot render a role fails with the record's
  location; one that silently leaves out a tool or developer message, or an assistant's tool calls, too.
- text: the whole text is trained on, EOS appended.
- Records over ``max_length`` tokens: ``truncate`` keeps the first max_length tokens (dropped if no trainable
  token remains), ``drop`` skips them, ``error`` stops with the record's location. Counts are reported.
- Unpaired examples (KTO): encoded as DPO encodes a pair's side (:func:`tuneoff.data.pairs.encode`), with its
  over-long policy (:func:`tokenize_unpaired`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import NamedTuple

import torch

from tuneoff.errors import DataError, TuneoffError

IGNORE = -100
PLAIN_ROLES = ("system", "user", "assistant")
"""Roles every chat template renders; others (and tool calls) are checked to appear in the rendering."""
OVERLONG = ("truncate", "drop", "error")


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


def text_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _as_dict(message) -> dict:
    if isinstance(message, dict):
        return dict(message)
    return message.as_dict() if hasattr(message, "as_dict") else {"role": message.role, "content": message.content}


def _render(tokenizer, messages, add_generation_prompt: bool = False, tools=None) -> str:
    """The chat template's text of ``messages``; TuneoffError naming the roles when the template cannot render them."""
    try:
        return tokenizer.apply_chat_template(
            [_as_dict(m) for m in messages],
            tools=list(tools) if tools else None,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )
    except Exception as error:  # a template's raise_exception, or a role or field it does not handle
        roles = ", ".join(_as_dict(m)["role"] for m in messages)
        raise TuneoffError(
            f"the chat template cannot render this conversation (roles [{roles}]): {type(error).__name__}: {error}"
        ) from None


def chat_ids(tokenizer, messages, add_generation_prompt: bool = False, tools=None) -> list[int]:
    return text_ids(tokenizer, _render(tokenizer, messages, add_generation_prompt, tools))


def _require_template(tokenizer, instead: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise TuneoffError(f"this model's tokenizer has no chat template: {instead}")


def check_rendered(tokenizer, messages, tools=None) -> None:
    """Raise TuneoffError when the chat template silently leaves out a message of a role outside
    :data:`PLAIN_ROLES` (``tool``, ``developer``) or an assistant's tool calls, as templates without tool support
    do: training would teach empty turns. Each such message's content (and each call's function name) is
    replaced by a marker, and every marker must appear in the rendering."""
    checked = [i for i, m in enumerate(messages) if m.role not in PLAIN_ROLES or getattr(m, "tool_calls", None)]
    if not checked:
        return
    marked = list(messages)
    for i in checked:
        message = messages[i]
        calls = (
            tuple(
                {**call, "function": {**call["function"], "name": f"@@{i}.{k}@@"}}
                for k, call in enumerate(message.tool_calls or ())
            )
            or None
        )
        content = f"@@{i}@@" if message.role != "assistant" or message.content.strip() else message.content
        marked[i] = replace(message, content=content, tool_calls=calls)
    text = _render(tokenizer, marked, tools=tools)
    for i in checked:
        message = messages[i]
        if (message.role != "assistant" or message.content.strip()) and f"@@{i}@@" not in text:
            raise TuneoffError(
                f"the chat template leaves out message {i} (role {message.role!r}): use a model "
                "whose chat template renders that role, or records without it"
            )
        if any(f"@@{i}.{k}@@" not in text for k in range(len(message.tool_calls or ()))):
            raise TuneoffError(
                f"the chat template leaves out the tool_calls of message {i}: use a model whose chat "
                "template renders tool calls"
            )


def tokenize_messages(tokenizer, messages, tools=None, first_target: int = 0) -> Tokenized:
    """Chat-template ids; labels on assistant turns only (each turn's end-of-turn token included), from message
    ``first_target`` on (the turns before are a prompt)."""
    _require_template(tokenizer, "use prompt/completion records of text instead")
    check_rendered(tokenizer, messages, tools)
    input_ids = chat_ids(tokenizer, messages, tools=tools)
    labels = [IGNORE] * len(input_ids)
    for i, message in enumerate(messages):
        if message.role != "assistant" or i < first_target:
            continue
        # An opening assistant turn has nothing before it (templates cannot render an empty conversation).
        start = len(chat_ids(tokenizer, messages[:i], add_generation_prompt=True, tools=tools)) if i else 0
        end_ids = chat_ids(tokenizer, messages[: i + 1], tools=tools)
        if input_ids[: len(end_ids)] != end_ids:
            raise TuneoffError("the chat template is not prefix-consistent; cannot locate assistant turns")
        labels[start : len(end_ids)] = input_ids[start : len(end_ids)]
    return Tokenized(input_ids, labels)


def _data_error(where: str, problem: str) -> DataError:
    """A DataError at an example's ``where`` (``file:position``)."""
    file, _, line = where.rpartition(":")
    return DataError(file or where, line or None, None, problem)


def tokenize_sft(example, tokenizer, completion_only_loss: bool = True) -> Tokenized:
    """One SFTExample -> ids and labels (no length limit applied here)."""
    eos = [tokenizer.eos_token_id]
    tools = getattr(example, "tools", None)
    if example.messages is not None or isinstance(example.prompt, tuple):
        if example.messages is not None:
            tokenized = tokenize_messages(tokenizer, example.messages, tools)
        else:
            conversation = tuple(example.prompt) + tuple(example.completion)
            tokenized = tokenize_messages(tokenizer, conversation, tools, first_target=len(example.prompt))
        if not completion_only_loss:
            tokenized.labels = list(tokenized.input_ids)
    elif example.text is not None:
        ids = text_ids(tokenizer, example.text) + eos
        tokenized = Tokenized(ids, list(ids))
    else:
        prompt, completion = text_ids(tokenizer, example.prompt or ""), text_ids(tokenizer, example.completion) + eos
        masked = [IGNORE] * len(prompt) if completion_only_loss else list(prompt)
        tokenized = Tokenized(prompt + completion, masked + completion)
    if tokenized.labels:
        tokenized.labels[0] = IGNORE
    return tokenized


def fit_length(
    tokenized: Tokenized, max_length: int, overlong: str, where: str, report: TokenizeReport
) -> Tokenized | None:
    """Apply the over-long policy; None means the example is dropped (recorded in ``report``)."""
    n = len(tokenized.input_ids)
    if n <= max_length:
        report.kept += 1
        return tokenized
    if overlong == "error":
        raise _data_error(
            where, f"record is {n} tokens, over max_length {max_length} (set --overlong truncate or drop)"
        )
    if overlong == "truncate":
        cut = Tokenized(tokenized.input_ids[:max_length], tokenized.labels[:max_length])
        if any(label != IGNORE for label in cut.labels):
            report.kept += 1
            report.truncated += 1
            return cut
    report.dropped.append(f"{where} ({n} tokens)")
    return None


def tokenize_dataset(
    examples, tokenizer, max_length: int, overlong: str = "truncate", completion_only_loss: bool = True
):
    """All examples -> (list[Tokenized], TokenizeReport). Examples without any trainable token are dropped."""
    report, out = TokenizeReport(), []
    for example in examples:
        where = getattr(example, "where", "?")
        try:
            tokenized = tokenize_sft(example, tokenizer, completion_only_loss)
        except DataError:
            raise
        except TuneoffError as error:  # the chat template cannot render this record: say which record
            raise _data_error(where, str(error)) from None
        fitted = fit_length(tokenized, max_length, overlong, where, report)
        if fitted is not None:
            out.append(fitted)
    if not out:
        raise TuneoffError(f"no example left to train on after tokenization ({report.summary()})")
    return out, report


class UnpairedIds(NamedTuple):
    """An unpaired example (KTO) as token ids: the prompt, the completion it is scored on, and its label."""

    prompt: list[int]
    completion: list[int]  # ends with EOS (or the chat template's end of turn) unless truncated
    label: bool  # True: desirable


def encode_unpaired(tokenizer, example) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) of an UnpairedExample, as DPO encodes each side of a pair: a string prompt
    and completion are tokenized apart, EOS appended (an empty prompt becomes BOS, or EOS); a conversation goes
    through the chat template, its generation prompt ending the prompt ids and the completion (a string as one
    assistant turn, or the assistant messages) making the rest."""
    from tuneoff.data.formats import Message

    prompt, completion, tools = example.prompt, example.completion, getattr(example, "tools", None)
    if isinstance(prompt, str):
        if not isinstance(completion, str):
            raise TuneoffError("a conversational completion needs a conversational prompt")
        start = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id]
        return text_ids(tokenizer, prompt) or start, text_ids(tokenizer, completion) + [tokenizer.eos_token_id]
    _require_template(tokenizer, "use string prompts instead of conversations")
    turns = (Message("assistant", completion),) if isinstance(completion, str) else tuple(completion)
    conversation = tuple(prompt) + turns
    check_rendered(tokenizer, conversation, tools)
    prompt_ids = chat_ids(tokenizer, prompt, add_generation_prompt=True, tools=tools)
    full = chat_ids(tokenizer, conversation, tools=tools)
    if full[: len(prompt_ids)] != prompt_ids:
        raise TuneoffError("the chat template is not prefix-consistent; cannot place the completion after the prompt")
    return prompt_ids, full[len(prompt_ids) :]


def tokenize_unpaired(
    examples,
    tokenizer,
    max_length: int,
    max_prompt_length: int,
    overlong: str = "truncate",
    report: TokenizeReport | None = None,
) -> list[UnpairedIds]:
    """UnpairedExamples -> token ids under DPO's over-long policy (:func:`tuneoff.data.pairs.tokenize_pairs`).

    An example is over-long when its prompt exceeds ``max_prompt_length`` or prompt + completion exceed
    ``max_length``: ``truncate`` keeps the prompt's last ``max_prompt_length`` tokens (the end is what the
    completion follows), then cuts the completion at its end to fit ``max_length`` (dropped if nothing of it is
    left); ``drop`` skips it; ``error`` raises DataError at the record. Counts go to ``report`` when given.
    TuneoffError when no example is left.
    """
    if overlong not in OVERLONG:
        raise TuneoffError(f"unknown overlong policy {overlong!r}: expected one of {', '.join(OVERLONG)}")
    report = TokenizeReport() if report is None else report
    out = []
    for example in examples:
        where = getattr(example, "where", "?")
        try:
            prompt, completion = encode_unpaired(tokenizer, example)
        except DataError:
            raise
        except TuneoffError as error:
            raise _data_error(where, str(error)) from None
        total = len(prompt) + len(completion)
        if len(prompt) > max_prompt_length or total > max_length:
            if overlong == "error":
                limit = (
                    f"max_prompt_length {max_prompt_length}"
                    if len(prompt) > max_prompt_length
                    else f"max_length {max_length}"
                )
                raise _data_error(
                    where,
                    f"record is {total} tokens, {len(prompt)} of them the prompt: over {limit} "
                    "(set --overlong truncate or drop)",
                )
            if overlong == "truncate":
                prompt = prompt[-max_prompt_length:]
                completion = completion[: max(0, max_length - len(prompt))]
            if overlong == "drop" or not completion:
                report.dropped.append(f"{where} ({total} tokens)")
                continue
            report.truncated += 1
        report.kept += 1
        out.append(UnpairedIds(prompt, completion, bool(example.label)))
    if not out:
        raise TuneoffError(f"no example left to train on after tokenization ({report.summary()})")
    return out


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
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "num_tokens": attention_mask.sum(),
    }


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
