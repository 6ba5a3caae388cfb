"""Pieces the RL loops (PPO, GRPO, RLOO) share: prompts, response log-probs, KL controllers.

The scorers they reward with live in :mod:`tuneoff.feedback.judges`.
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tuneoff.models.heads import disable_dropout
from tuneoff.train import metrics as names

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
    from tuneoff.data.tokenize import chat_ids, text_ids

    texts, ids = [], []
    for p in load_prompts(path):
        if p.messages is not None:
            texts.append(p.messages)
            ids.append(chat_ids(tokenizer, p.messages, add_generation_prompt=True)[-max_prompt_length:])
        else:
            texts.append(p.prompt)
            ids.append(text_ids(tokenizer, p.prompt)[-max_prompt_length:])
    return EncodedPrompts(texts, ids)


def prompt_batch(n_prompts: int, batch: int, iteration: int, seed: int) -> list[int]:
    """Indices of the prompts of one iteration: a seeded permutation per pass, so a resumed run draws the same."""
    per_pass = max(1, n_prompts // batch)
    epoch, position = divmod(iteration, per_pass)
    order = torch.randperm(n_prompts, generator=torch.Generator().manual_seed(seed * 7919 + epoch)).tolist()
    return order[position * batch : (position + 1) * batch] if n_prompts >= batch else (order * batch)[:batch]


@dataclass
class Share:
    """This process's part of one iteration's global batch: its prompts (each repeated ``repeat`` times), its rows
    of the batch and the generator every process samples from, in the same state on all of them (so the tokens of
    a row do not depend on the number of processes, and a resumed run samples what it would have sampled)."""

    index: list[int]
    rows: tuple[int, int]
    """(offset, total): this process's episodes are rows offset … offset + len(index) of ``total``."""
    generator: torch.Generator


def iteration_share(n_prompts: int, per_process: int, repeat: int, context, seed: int) -> Share:
    """The global batch of iteration ``context.step`` is ``per_process × processes`` prompts
    (:func:`prompt_batch`); process r takes the r-th slice, so one process with twice the prompts runs the same
    iteration as two."""
    world, rank = context.world, context.accelerator.process_index
    prompts = prompt_batch(n_prompts, per_process * world, context.step, seed)[rank * per_process :][:per_process]
    index = [i for i in prompts for _ in range(repeat)]
    generator = torch.Generator(device=context.device).manual_seed(rollout_seed(seed, context.step))
    return Share(index, (rank * len(index), world * len(index)), generator)


def rollout_seed(seed: int, step: int) -> int:
    """The sampler's seed at an iteration: a hash of (seed, step), 63 bits of which every bit depends on both (torch's
    CPU generator keeps only the low 32 bits of a seed, so seed · 2³² + step would ignore the seed)."""
    digest = hashlib.sha256(f"tuneoff rollout {seed} {step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# ---------------------------------------------------------------- log-probs of responses


def pack_rows(
    full_ids: torch.Tensor, full_mask: torch.Tensor, pad_id: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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
        raise ValueError(
            "each row's real tokens must be one contiguous run (left padding, prompt, response, masked tail)"
        )
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


def response_logprobs(
    model,
    full_ids: torch.Tensor,
    full_mask: torch.Tensor,
    prompt_len: int,
    response_mask: torch.Tensor,
    temperature: float,
    with_entropy: bool = False,
):
    """log π(y_t | x, y_<t) of the response tokens, and optionally the entropy of π at those positions.

    full_ids, full_mask: (B, P + R) left-padded prompt then response; response_mask: (B, R).
    The decoder runs on the real tokens only, packed padding-free (:func:`pack_rows`: on a CPU a pad costs as
    much as a token, and responses that end early leave many; a plain GPT-2 or Llama-family model takes the lean
    path of :mod:`tuneoff.models.gpt2_decode` or :mod:`tuneoff.models.llama_decode`); the LM head runs only on
    response positions that count (the largest matmul of a small model). Returns logp (B, R) and entropy (B, R) or
    None; 0 where response_mask is 0.
    """
    from tuneoff.rollout import lean_path

    head = model.get_output_embeddings()
    packed_ids, positions, where = pack_rows(full_ids, full_mask, model.config.get_text_config().pad_token_id)
    lean = lean_path(model)
    if lean is not None:  # the same math as transformers' forward (GPT-2; Llama, Qwen2, Mistral), less per-call work
        hidden = lean.module.packed_hidden_states(model, packed_ids, positions)  # (R, W, H)
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


def sample_and_score(model, tokenizer, prompts: EncodedPrompts, share: Share, scorer, config, context) -> Episodes:
    """Sample one response per index of the share (KV-cached), decode, score once, apply the truncation policy.
    Sampling and scoring run under the run's autocast precision, as the updates do; under bf16/fp16 π_old is
    recomputed by the updates' forward."""
    from tuneoff.rollout import generate, left_pad

    index = share.index
    prompt_ids, prompt_mask = left_pad([prompts.ids[i] for i in index], tokenizer.pad_token_id)
    device = context.device
    was_training = model.training
    model.eval()
    with context.accelerator.autocast():
        rollout = generate(
            model,
            prompt_ids.to(device),
            prompt_mask.to(device),
            config.max_new_tokens,
            tokenizer.eos_token_id,
            tokenizer.pad_token_id,
            config.temperature,
            config.top_p,
            share.generator,
            share.rows,
        )
    model.train(was_training)
    shown = rollout.response_ids.masked_fill(rollout.response_mask == 0, tokenizer.pad_token_id)
    responses = tokenizer.batch_decode(shown, skip_special_tokens=True)
    prompt_texts = [prompts.texts[i] for i in index]
    with context.accelerator.autocast():
        raw_scores = scorer.score(prompt_texts, responses).to(device).float()  # (B,)
    scores, mask = apply_truncation(raw_scores, rollout.ended, rollout.response_mask, config)
    full_ids, _ = rollout.full()
    full_mask = torch.cat([rollout.prompt_mask, mask], 1)
    old_logp = rollout.logprobs * mask
    if context.accelerator.mixed_precision != "no":
        # In fp32 the decode path's log-probs equal the update forward's to ~1e-6; in bf16 the two orders of
        # roundings differ by up to ~2e-3 per token on tiny models (more on deep ones), so ratios would not start
        # at 1. So π_old comes from the update's own forward (one more no-grad pass, as TRL computes it).
        with torch.inference_mode(), context.accelerator.autocast():
            old_logp = response_logprobs(model, full_ids, full_mask, prompt_ids.shape[1], mask, config.temperature)[0]
        old_logp = old_logp * mask  # out of inference mode: a tensor autograd may read
    return Episodes(
        full_ids,
        full_mask,
        prompt_ids.shape[1],
        mask,
        old_logp,
        raw_scores,
        scores,
        rollout.ended,
        prompt_texts,
        responses,
    )


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


# ---------------------------------------------------------------- what every RL run sets up


class PolicyLogprobs(torch.nn.Module):
    """The policy as the module DDP wraps: forward returns response log-probs and entropies; with ``sft_batch``
    (PPO-ptx) the summed NLL of its trainable tokens and their count instead, through the same wrapper."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(
        self,
        full_ids=None,
        full_mask=None,
        prompt_len: int = 0,
        response_mask=None,
        temperature: float = 1.0,
        sft_batch: dict | None = None,
    ):
        if sft_batch is not None:
            from tuneoff.train.sft import TokenLoss

            return TokenLoss(self.model)(**sft_batch)
        return response_logprobs(
            self.model, full_ids, full_mask, prompt_len, response_mask, temperature, with_entropy=True
        )


@dataclass
class Actors:
    """An RL run's models and signals."""

    tokenizer: object
    prompts: EncodedPrompts
    scorer: object
    """The reward: a ``tuneoff rm`` model or the gold judge (:mod:`tuneoff.feedback.judges`)."""
    gold: object | None
    """The gold judge, logged beside a reward that is not the gold judge itself."""
    policy: torch.nn.Module
    reference: torch.nn.Module | None
    """The frozen π_ref; None with LoRA (the policy with its adapters off) or without a KL term."""

    def reference_logprobs(self, full_ids, full_mask, prompt_len: int, mask, temperature: float) -> torch.Tensor:
        """log π_ref of the response tokens (B, R); the caller sets inference mode and the run's autocast."""
        if self.reference is not None:
            return response_logprobs(self.reference, full_ids, full_mask, prompt_len, mask, temperature)[0]
        with self.policy.disable_adapter():
            return response_logprobs(self.policy, full_ids, full_mask, prompt_len, mask, temperature)[0]


def load_actors(config, device, with_reference: bool = True, on_policy: Callable | None = None) -> Actors:
    """Tokenizer, prompts, reward and gold judge, the policy (LoRA-wrapped if configured) and the reference, dropout
    off in both (ratios must be 1 before the first update). ``on_policy(policy)`` runs on the loaded policy before
    the reference loads (PPO copies its critic from it). The reward model and the reference go to ``device`` (the
    policy and the critic move there when the skeleton prepares them)."""
    from tuneoff.feedback.judges import load_scorer
    from tuneoff.models.load import apply_lora, load_model, load_tokenizer

    tokenizer = load_tokenizer(config.model)
    prompts = encode_prompts(config.data, tokenizer, config.max_prompt_length)
    scorer = load_scorer(config.reward_model, device)
    gold = load_scorer("gold") if config.reward_model != "gold" else None
    policy = load_model(config.model)
    if on_policy is not None:
        on_policy(policy)
    reference = None
    if with_reference and not config.lora:
        # π_ref is the starting policy unless another model is named: a copy, not a second load (a random-init
        # model such as `tiny` would otherwise get other weights, and a converted model would load twice)
        same = config.reference in ("", config.model)
        reference = copy.deepcopy(policy) if same else load_model(config.reference)
        reference = reference.eval().requires_grad_(False).to(device)
    if config.lora:
        policy = apply_lora(policy, config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_target_modules)
    for model in (policy, reference):
        if model is not None:
            disable_dropout(model)
    return Actors(tokenizer, prompts, scorer, gold, policy, reference)


def total_iterations(config, prompts_per_iteration: int, n_prompts: int) -> int:
    return (
        config.max_steps
        if config.max_steps > 0
        else max(1, math.ceil(config.epochs * n_prompts / prompts_per_iteration))
    )


def updates_per_iteration(config) -> int:
    """Optimizer steps per iteration: update_epochs passes of minibatches of batch_size × grad_accum episodes."""
    return config.update_epochs * max(1, config.rollout_batch // (config.batch_size * config.grad_accum))


# ---------------------------------------------------------------- one iteration's updates and metrics


def minibatch_updates(
    context, mask: torch.Tensor, micro_step: Callable, after_minibatch: Callable | None = None
) -> dict:
    """``update_epochs`` passes over the iteration's episodes in a fresh random order, one optimizer step per
    minibatch of batch_size × grad_accum episodes per process.

    A minibatch's loss is a mean over all its response tokens, on every process together (mask (B, R) says which
    count): ``micro_step(rows, share)`` runs the forward and backward of one micro-batch whose token means it
    weighs by ``share`` = its tokens / the minibatch's global tokens, times the number of processes (DDP averages
    gradients), and returns its metrics so weighted. So grad_accum 2 on one process is two processes, and a
    micro-batch of short responses weighs less than one of long ones (as TRL's and DAPO's token-level mean).
    ``after_minibatch()`` may add more gradients before the step (PPO-ptx); its metrics are per process.
    Returns each metric's mean over the minibatches, summed (weighted ones) or averaged over the processes."""
    config, accelerator = context.config, context.accelerator
    minibatch = config.batch_size * config.grad_accum
    parameters = [p for module in context.modules for p in module.parameters()]
    sums: dict[str, list] = defaultdict(list)  # metric -> one weighted sum per minibatch (this process's part)
    for _ in range(config.update_epochs):
        order = torch.randperm(len(mask))
        for start in range(0, len(mask), minibatch):
            rows = order[start : start + minibatch]
            tokens = accelerator.reduce(mask[rows].sum().float(), "sum").clamp(min=1)  # the minibatch's, globally
            totals: dict[str, torch.Tensor] = defaultdict(float)
            for micro in rows.split(config.batch_size):
                share = mask[micro].sum() / tokens
                for key, value in micro_step(micro, share * context.world).items():
                    totals[key] = totals[key] + value.detach() * share
            for key, value in (after_minibatch() if after_minibatch else {}).items():
                totals[key] = totals[key] + value.detach() / context.world
            for key, value in totals.items():
                sums[key].append(value)
            if config.max_grad_norm > 0:
                accelerator.clip_grad_norm_(parameters, config.max_grad_norm)
            context.optimizer.step()
            context.scheduler.step()
            context.optimizer.zero_grad(set_to_none=True)
    keys = list(sums)
    local = torch.tensor([[float(v) for v in sums[k]] for k in keys], dtype=torch.float64, device=context.device)
    summed = accelerator.reduce(local, "sum").tolist() if keys else []  # (metrics, minibatches)
    return {key: sum(values) / len(values) for key, values in zip(keys, summed)}


def mean_over_processes(accelerator, metrics: dict) -> dict:
    """Each metric's mean over the processes (one collective): what the whole batch measured, logged by the main
    process. Equal shares, so a mean of per-process means is the global mean."""
    keys = list(metrics)
    values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=accelerator.device)
    return dict(zip(keys, accelerator.reduce(values, "mean").tolist()))


def episode_metrics(batch: Episodes, context, episodes_per_s: float) -> dict:
    return {
        names.SCORES: float(batch.raw_scores.mean()),
        names.EPISODE_LENGTH: float(batch.mask.sum(-1).float().mean()),
        names.EPISODE_ENDED: float(batch.ended.float().mean()),
        names.EPISODES_PER_S: episodes_per_s,
        names.LR: context.scheduler.get_last_lr()[0],
    }


def gold_metrics(actors: Actors, batch: Episodes, iteration: int, total: int, every: int) -> dict:
    """The gold judge on the iteration's rollouts, every ``every`` iterations and at the end (when the reward is not
    the gold judge itself)."""
    if actors.gold is None or not (iteration % every == 0 or iteration == total):
        return {}
    gold_logits = actors.gold.score(batch.prompt_texts, batch.responses)  # (B,) logit of P(positive)
    return {names.GOLD: float(gold_logits.mean()), names.GOLD_P: float(torch.sigmoid(gold_logits).mean())}
