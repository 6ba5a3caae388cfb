"""Critic-free RL for language models: GRPO (Shao et al. 2024, arXiv:2402.03300) and RLOO (Ahmadian et al. 2024,
arXiv:2402.14740).

Each iteration samples k responses for each of rollout_batch / k prompts, scores them once, and turns each
response's score into one advantage from its group (``tuneoff.advantages.BASELINES``), shared by all its tokens.
The loss is the clipped surrogate (a plain policy gradient when update_epochs is 1) plus β·KL(π‖π_ref) with the
k3 estimator, averaged over all response tokens of the minibatch. Reference log-probs: once per iteration.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from tuneoff.advantages import BASELINES, group_advantages, masked_mean
from tuneoff.config import GRPOConfig
from tuneoff.losses import KL_ESTIMATORS, kl_k1, ppo_policy_loss
from tuneoff.rollout import decode_path
from tuneoff.train import loop
from tuneoff.train import metrics as names
from tuneoff.train.policy import (
    PolicyLogprobs,
    episode_metrics,
    gold_metrics,
    iteration_share,
    load_actors,
    mean_over_processes,
    minibatch_updates,
    sample_and_score,
    total_iterations,
    updates_per_iteration,
)


def sequence_advantages(scores: torch.Tensor, k: int, baseline: str, scale_rewards: bool) -> torch.Tensor:
    """(B,) scores of P groups of k consecutive responses -> (B,) advantages."""
    if baseline == "grpo":
        return group_advantages(scores, k, scale=scale_rewards)
    return BASELINES[baseline](scores, k)


def setup(config: GRPOConfig, accelerator, out: Path) -> loop.Run:
    need_reference = config.kl_coef > 0
    actors = load_actors(config, accelerator.device, with_reference=need_reference)
    policy, tokenizer, k = actors.policy, actors.tokenizer, config.num_generations
    groups = config.rollout_batch // k
    total = total_iterations(config, groups * accelerator.num_processes, len(actors.prompts.ids))  # global
    started, episodes = time.perf_counter(), [0]

    def step(context: loop.Context) -> dict:
        (policy_module,) = context.modules
        # 1. k responses per prompt, scored once; one advantage per response; reference once.
        share = iteration_share(len(actors.prompts.ids), groups, k, context, config.seed)
        batch = sample_and_score(policy, tokenizer, actors.prompts, share, actors.scorer, config, context)
        full_ids, full_mask, P, mask, old_logp = (
            batch.full_ids,
            batch.full_mask,
            batch.prompt_len,
            batch.mask,
            batch.old_logp,
        )
        advantages = (
            sequence_advantages(batch.scores, k, config.baseline, config.scale_rewards)[:, None] * mask
        )  # (B, R)
        ref_logp = None
        if need_reference:
            with torch.inference_mode(), accelerator.autocast():  # as the updates
                ref_logp = actors.reference_logprobs(full_ids, full_mask, P, mask, config.temperature).clone()  # (B, R)

        # 2. Updates: clipped surrogate + β·KL, token-averaged over each minibatch (all processes).
        def micro_step(rows, weight) -> dict:
            m = mask[rows]
            logp, entropy = policy_module(full_ids[rows], full_mask[rows], P, m, config.temperature)
            pg_loss, clipfrac, approx_kl = ppo_policy_loss(logp, old_logp[rows], advantages[rows], m, config.clip_range)
            kl = KL_ESTIMATORS[config.kl_estimator]
            kl_loss = masked_mean(kl(logp, ref_logp[rows]), m) if need_reference else torch.zeros(())
            entropy_mean = masked_mean(entropy, m)
            loss = pg_loss + config.kl_coef * kl_loss - config.entropy_coef * entropy_mean
            accelerator.backward(loss * weight)
            return {
                names.POLICY_LOSS: pg_loss,
                names.KL_LOSS: kl_loss,
                names.CLIPFRAC: clipfrac,
                names.APPROX_KL: approx_kl,
                names.ENTROPY: entropy_mean.detach(),
            }

        updated = minibatch_updates(context, mask, micro_step)
        episodes[0] += len(share.index) * context.world

        # 3. Metrics.
        seq_kl = float((kl_k1(old_logp, ref_logp) * mask).sum(-1).mean()) if need_reference else 0.0
        measured = {
            names.OBJECTIVE_KL: seq_kl,
            names.SCORES_STD_IN_GROUP: float(batch.scores.view(-1, k).std(-1).mean()),
            **episode_metrics(batch, context, episodes[0] / (time.perf_counter() - started)),
            **gold_metrics(actors, batch, context.step + 1, total, config.eval_every),
        }
        return {**mean_over_processes(accelerator, measured), **updated}

    return loop.Run(
        config.baseline,
        policy,
        tokenizer,
        [PolicyLogprobs(policy)],
        total,
        step,
        updates_per_step=updates_per_iteration(config),
        finite=(names.POLICY_LOSS,),
        kl=names.OBJECTIVE_KL,
        postfix={"score": names.SCORES, "kl": names.OBJECTIVE_KL, "ep_s": names.EPISODES_PER_S},
        describe=f"{total} iterations of {config.rollout_batch} episodes per process; sampling: {decode_path(policy)}",
    )


def train(config: GRPOConfig) -> Path:
    """Run GRPO or RLOO (config.baseline) as configured; returns the folder of the final model."""
    return loop.run(config, setup, 'no prompts: pass --data FILE ({"prompt"} or {"messages"} records)')
