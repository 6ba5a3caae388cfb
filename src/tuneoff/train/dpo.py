"""Direct preference optimisation (DPO; Rafailov et al. 2023) and IPO (Azar et al. 2023) on the shared loop.

π starts from ``model``; π_ref's log-probs are computed once and cached (:mod:`tuneoff.train.reference`), so no
reference model stays in memory. Chosen and rejected run in one forward (2B rows); the LM head runs on response
tokens only. A step's loss is the mean over all its pairs, across micro-batches and processes. Metrics are
named as TRL's.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from tuneoff.config import DPOConfig
from tuneoff.data.pairs import make_batches, split_by_prompt, tokenize_pairs
from tuneoff.losses import DPO_LOSSES, IGNORE, MEAN_LOGPS, implicit_rewards, shift_targets
from tuneoff.train import loop
from tuneoff.train import metrics as names
from tuneoff.train.reference import SequenceLogProbs, attach_reference, check_tokenizer

METRICS = (
    "loss",
    names.REWARDS_CHOSEN,
    names.REWARDS_REJECTED,
    names.REWARDS_ACCURACIES,
    names.REWARDS_MARGINS,
    names.LOGPS_CHOSEN,
    names.LOGPS_REJECTED,
)
"""What pair_terms sums; logged as TRL names them (the loss as train/loss; held out with an eval/ prefix)."""


def pair_terms(logps, counts, ref_logps, config: DPOConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair losses (B,) and the sums over the pairs of each of METRICS (7,), from (2B,) inputs."""
    if config.loss_type in MEAN_LOGPS:
        logps, ref_logps = logps / counts.clamp(min=1), ref_logps / counts.clamp(min=1)
    pi_chosen, pi_rejected = logps.chunk(2)  # (B,), (B,)
    ref_chosen, ref_rejected = ref_logps.to(logps).chunk(2)
    losses = DPO_LOSSES[config.loss_type](
        pi_chosen, pi_rejected, ref_chosen, ref_rejected, config.beta, config.label_smoothing
    )
    reward_chosen = implicit_rewards(pi_chosen.detach(), ref_chosen, config.beta)  # (B,)
    reward_rejected = implicit_rewards(pi_rejected.detach(), ref_rejected, config.beta)
    stats = torch.stack(
        [
            losses.detach().sum(),
            reward_chosen.sum(),
            reward_rejected.sum(),
            (reward_chosen > reward_rejected).float().sum(),
            (reward_chosen - reward_rejected).sum(),
            pi_chosen.detach().sum(),
            pi_rejected.detach().sum(),
        ]
    )
    return losses, stats


def evaluate(scorer, batches: list[dict], accelerator, config: DPOConfig) -> dict:
    """Held-out METRICS, pair-weighted over every process's share of the batches."""

    def terms(batch):
        logps, counts = scorer(batch["input_ids"], batch["attention_mask"], batch["labels"])
        _, stats = pair_terms(logps, counts, batch["ref_logps"], config)
        return torch.cat([stats, stats.new_tensor([len(logps) / 2])])

    totals = loop.summed_over_processes(scorer, batches, accelerator, terms, len(METRICS) + 1)
    return {f"eval/{name}": (value / totals[-1].clamp(min=1)).item() for name, value in zip(METRICS, totals)}


def setup(config: DPOConfig, accelerator, out: Path) -> loop.Run:
    from tuneoff.models.load import load_tokenizer

    tokenizer = load_tokenizer(config.model)
    check_tokenizer(config, tokenizer)
    limits = dict(max_length=config.max_length, overlong=config.overlong, max_prompt_length=config.max_prompt_length)
    train_pairs, summary = tokenize_pairs(config.data, tokenizer, **limits)
    train_pairs, eval_pairs = loop.held_out(
        config,
        train_pairs,
        lambda path: tokenize_pairs(path, tokenizer, **limits)[0],
        lambda pairs: split_by_prompt(pairs, config.eval_fraction, config.seed),
    )
    pad_id = tokenizer.pad_token_id
    batches = loop.MicroBatches(
        lambda epoch: make_batches(train_pairs, config.batch_size, pad_id, config.seed, epoch),
        math.ceil(len(train_pairs) / config.batch_size),
        config,
        accelerator,
    )
    total = loop.total_steps(config, batches.steps_per_epoch)
    model = loop.trainable_model(config)
    reference = attach_reference(model, train_pairs + eval_pairs, config, pad_id, accelerator, out)
    model.train()  # from_pretrained and the reference pass leave it in eval mode
    eval_batches = make_batches(eval_pairs, config.batch_size, pad_id, 0, 0, shuffle=False) if eval_pairs else []

    def step(context: loop.Context) -> dict:
        def loss(batch):
            logps, counts = context.modules[0](batch["input_ids"], batch["attention_mask"], batch["labels"])  # (2B,)
            losses, stats = pair_terms(logps, counts, batch["ref_logps"], config)
            return losses.sum(), stats

        def counts(batch):
            trained = (shift_targets(batch["labels"]) != IGNORE).sum()
            return torch.tensor([len(batch["ref_logps"]) / 2, float(batch["num_tokens"]), float(trained)])

        rates = (names.PAIRS_PER_S, names.TOKENS_PER_S, names.TRAINED_TOKENS_PER_S)
        return batches.step(context, loss, counts, (names.LOSS, *METRICS[1:]), rates)

    micro = config.grad_accum * accelerator.num_processes
    return loop.Run(
        "dpo",
        model,
        tokenizer,
        [SequenceLogProbs(model)],
        total,
        step,
        evaluate=(lambda context: evaluate(context.modules[0], eval_batches, accelerator, config))
        if eval_batches
        else None,
        describe=f"{summary}; {len(train_pairs)} train / {len(eval_pairs)} eval; {config.loss_type} loss, "
        f"beta {config.beta}; reference log-probs {reference}; {total} steps of {micro} micro-batches of "
        f"{config.batch_size} pairs",
        state=batches.state,
        restore=batches.restore,
        postfix={"loss": names.LOSS, "acc": names.REWARDS_ACCURACIES, "pairs_s": names.PAIRS_PER_S},
    )


def train(config: DPOConfig) -> Path:
    """Run DPO (or IPO) as configured; returns the folder of the final model."""
    return loop.run(config, setup, "no training data: pass --data FILE")
