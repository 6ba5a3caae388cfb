"""Pieces the RL loops (PPO, GRPO, RLOO) share: prompts, scorers, response log-probs, KL controllers."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tuneoff.errors import TuneoffError
from tuneoff.models.heads import disable_dropout, position_ids_from_mask  # noqa: F401  (re-exported for the loops)


# ---------------------------------------------------------------- prompts


@dataclass
class EncodedPrompts:
    texts: list  # what scorers see: the prompt string, or the messages tuple
    ids: list[list[int]]


def encode_prompts(path: str, tokenizer, max_prompt_length: int) -> EncodedPrompts:
    """RL prompts from a file: plain text as is, conversations through the chat template (generation prompt on).

    Prompts longer than ``max_prompt_length`` tokens keep their last tokens (the part the policy continues).
    """
    from tuneoff.data.formats import load_prompts
    from tuneoff.data.tokenize import _chat_ids, _ids

    texts, ids = [], []
    for p in load_prompts(path):
        if p.messages is not None:
            texts.append(p.messages)
            ids.append(_chat_ids(tokenizer, p.messages, add_generation_prompt=True)[-max_prompt_length:])
        else:
            texts.append(p.prompt)
            ids.append(_ids(tokenizer, p.prompt)[-max_prompt_length:])
    return EncodedPrompts(texts, ids)


def prompt_batch(n_prompts: int, batch: int, iteration: int, seed: int) -> list[int]:
    """Indices of the prompts of one iteration: a seeded permutation per pass, so a resumed run draws the same."""
    per_pass = max(1, n_prompts // batch)
    epoch, position = divmod(iteration, per_pass)
    order = torch.randperm(n_prompts, generator=torch.Generator().manual_seed(seed * 7919 + epoch)).tolist()
    return order[position * batch : (position + 1) * batch] if n_prompts >= batch else (order * batch)[:batch]


# ---------------------------------------------------------------- scorers


class GoldScorer:
    """The gold judge as a reward (oracle runs): logit of P(positive) of prompt + response."""

    def __init__(self):
        from tuneoff.feedback.gold import load_gold_judge

        self.judge = load_gold_judge()

    def score(self, prompts, responses) -> torch.Tensor:
        texts = [(p if isinstance(p, str) else " ".join(m.content for m in p)) + " " + r for p, r in zip(prompts, responses)]
        return torch.tensor(self.judge.logit(texts), dtype=torch.float32)


def load_scorer(spec: str):
    """``gold`` (the gold judge; oracle) or the folder of a reward model trained by ``tuneoff rm``."""
    if spec == "gold":
        return GoldScorer()
    if not spec:
        raise TuneoffError("no reward given: pass --reward-model FOLDER (from `tuneoff rm`) or --reward-model gold")
    from tuneoff.models.heads import load_reward_model

    return load_reward_model(spec)


# ---------------------------------------------------------------- log-probs of responses


def pack_rows(full_ids: torch.Tensor, full_mask: torch.Tensor, pad_id: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The real tokens of each (B, T) row (one contiguous run: left padding, then prompt and response, then
    masked-out tail) laid end to end into packed rows, padding-free, by first-fit-decreasing bins.

    Returns packed ids and positions (R, W), positions restarting at 0 for each sequence (transformers reads the
    restarts as boundaries: no token attends across sequences; filler continues the row's last sequence, so no real
    token sees it), and where (B, T): each real token's flat position in the packed rows, −1 elsewhere."""
    from tuneoff.data.tokenize import Tokenized, filler_id, pack, row_width

    B, T = full_mask.shape
    real = full_mask.bool()
    lengths = real.sum(-1)  # (B,)
    first = real.int().argmax(-1)  # (B,) first real column
    column = torch.arange(T, device=full_mask.device)
    if not bool((real == ((column >= first[:, None]) & (column < (first + lengths)[:, None]))).all()):
        raise ValueError("each row's real tokens must be one contiguous run (left padding, prompt, response, masked tail)")
    if not bool((lengths > 0).all()):
        raise ValueError("a row has no real token")
    sequences = [Tokenized([0] * int(n), []) for n in lengths]
    width = row_width(lengths.tolist())
    bins = pack(sequences, width)
    number = {id(q): b for b, q in enumerate(sequences)}
    start = torch.zeros(B, dtype=torch.long)  # flat packed position of each sequence's first token
    ids = torch.full((len(bins), width), filler_id(pad_id if pad_id is not None else -1), dtype=torch.long)
    positions = torch.zeros((len(bins), width), dtype=torch.long)
    for row, members in enumerate(bins):
        offset = 0
        for q in members:
            b, n = number[id(q)], len(q.input_ids)
            start[b] = row * width + offset
            ids[row, offset : offset + n] = full_ids[b, first[b] : first[b] + n].cpu()
            positions[row, offset : offset + n] = torch.arange(n)
            offset += n
        last = len(members[-1].input_ids)
        positions[row, offset:] = torch.arange(last, last + width - offset)
    where = torch.where(real, start.to(full_mask.device)[:, None] + column - first[:, None], -1)  # (B, T)
    return ids.to(full_ids.device), positions.to(full_ids.device), where


def response_logprobs(model, full_ids: torch.Tensor, full_mask: torch.Tensor, prompt_len: int, response_mask: torch.Tensor,
                      temperature: float, with_entropy: bool = False):
    """log π(y_t | x, y_<t) of the response tokens, and optionally the entropy of π at those positions.

    full_ids, full_mask: (B, P + R) left-padded prompt then response; response_mask: (B, R).
    The decoder runs on the real tokens only, packed padding-free (:func:`pack_rows`: on a CPU a pad costs as
    much as a token, and responses that end early leave many; a plain GPT-2 takes the lean path of
    :mod:`tuneoff.models.gpt2_decode`); the LM head runs only on response positions that
    count (the largest matmul of a small model). Returns logp (B, R) and entropy (B, R) or None; 0 where
    response_mask is 0.
    """
    from tuneoff.models import gpt2_decode

    head = model.get_output_embeddings()
    packed_ids, positions, where = pack_rows(full_ids, full_mask, model.config.get_text_config().pad_token_id)
    if gpt2_decode.supports(model):  # the same math as transformers' GPT-2, without its per-call work
        hidden = gpt2_decode.packed_hidden_states(model, packed_ids, positions)  # (R, W, H)
    else:
        hidden = model.get_decoder()(input_ids=packed_ids, position_ids=positions, use_cache=False).last_hidden_state
    keep = response_mask.bool()  # (B, R)
    before = where[:, prompt_len - 1 : -1][keep]  # (N,) packed position of the state before each counted token
    predicting = hidden.reshape(-1, hidden.shape[-1]).index_select(0, before)  # (N, H); index_select: fast backward
    logits = head(predicting).float()  # (N, V)
    if temperature != 1:  # a division by 1 is a full pass over (N, V) for nothing
        logits = logits / max(temperature, 1e-6)
    log_softmax = torch.log_softmax(logits, -1)
    targets = full_ids[:, prompt_len:][keep]  # (N,)
    logp = torch.zeros(response_mask.shape, dtype=torch.float32, device=full_ids.device)
    logp[keep] = log_softmax.gather(-1, targets[:, None]).squeeze(-1)
    entropy = None
    if with_entropy:
        entropy = torch.zeros_like(logp)
        entropy[keep] = -(log_softmax.exp() * log_softmax).sum(-1)
    return logp, entropy


# ---------------------------------------------------------------- one iteration's episodes


@dataclass
class Episodes:
    """Sampled and scored responses of one iteration; everything the updates need, computed once."""

    full_ids: torch.Tensor  # (B, P + R) prompt (left-padded) then response
    full_mask: torch.Tensor  # (B, P + R) after the truncation policy
    prompt_len: int
    mask: torch.Tensor  # (B, R) response tokens that count
    old_logp: torch.Tensor  # (B, R) log π_old of the sampled tokens (the sampling distribution)
    raw_scores: torch.Tensor  # (B,) reward as scored
    scores: torch.Tensor  # (B,) after the truncation policy
    ended: torch.Tensor  # (B,) emitted EOS
    prompt_texts: list
    responses: list[str]


def apply_truncation(scores, ended, mask, config):
    """Scores and response masks after the truncation policy (see RLConfig.truncation)."""
    if config.truncation == "penalty":
        scores = scores - config.truncation_penalty * (~ended).float()
    elif config.truncation == "mask":
        mask = mask * ended[:, None].long()
    return scores, mask


def sample_and_score(model, tokenizer, prompts: EncodedPrompts, index: list[int], scorer, config, device) -> Episodes:
    """Sample one response per index (KV-cached), decode, score once, apply the truncation policy."""
    from tuneoff.rollout import generate, left_pad

    prompt_ids, prompt_mask = left_pad([prompts.ids[i] for i in index], tokenizer.pad_token_id)
    was_training = model.training
    model.eval()
    rollout = generate(model, prompt_ids.to(device), prompt_mask.to(device), config.max_new_tokens,
                       tokenizer.eos_token_id, tokenizer.pad_token_id, config.temperature, config.top_p)
    model.train(was_training)
    shown = rollout.response_ids.masked_fill(rollout.response_mask == 0, tokenizer.pad_token_id)
    responses = tokenizer.batch_decode(shown, skip_special_tokens=True)
    prompt_texts = [prompts.texts[i] for i in index]
    raw_scores = scorer.score(prompt_texts, responses).to(device).float()  # (B,)
    scores, mask = apply_truncation(raw_scores, rollout.ended, rollout.response_mask, config)
    full_ids, _ = rollout.full()
    full_mask = torch.cat([rollout.prompt_mask, mask], 1)
    return Episodes(full_ids, full_mask, prompt_ids.shape[1], mask, rollout.logprobs * mask, raw_scores, scores,
                    rollout.ended, prompt_texts, responses)


# ---------------------------------------------------------------- KL coefficient


class FixedKL:
    def __init__(self, beta: float):
        self.value = beta

    def update(self, kl: float, n_steps: int) -> None:
        pass


class AdaptiveKL:
    """Ziegler et al. 2019 (arXiv:1909.08593): β ← β·(1 + clip(KL/target − 1, ±0.2)·n/horizon)."""

    def __init__(self, beta: float, target: float, horizon: int):
        self.value, self.target, self.horizon = beta, target, horizon

    def update(self, kl: float, n_steps: int) -> None:
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


def check_finite(name: str, value: float, step: int) -> None:
    if not math.isfinite(value):
        raise TuneoffError(f"{name} became {value} at step {step}; stopped (see the last checkpoint)")
