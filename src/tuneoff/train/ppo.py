"""PPO with a KL penalty for language models (Ziegler et al. 2019; Stiennon et al. 2020; Ouyang et al. 2022).

Each iteration: sample responses to a batch of prompts (KV-cached, ``tuneoff.rollout``); score them once with
the reward (a ``tuneoff rm`` model or the gold judge); run the reference policy and the critic once; build the
per-token reward −β·KL_t plus the score on the last token; GAE(γ, λ) and whitened advantages; then
``update_epochs`` passes of clipped-ratio and clipped-value updates over minibatches. PPO-ptx (Ouyang 2022, Eq. 2)
adds γ_ptx·(−log π) of one SFT micro-batch to each minibatch's update.

The critic is a separate model: a copy of the starting policy with a zero-initialised scalar head (a shared
trunk would let value-loss gradients move the policy; a separate one costs one more forward/backward of the
backbone, the price OpenRLHF and TRL's PPO pay too). Dropout is off in every model (ratios must be 1 before
the first update). The sampling log-probs from the rollout serve as π_old.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch

from tuneoff.advantages import gae, masked_mean, whiten
from tuneoff.config import PPOConfig
from tuneoff.losses import KL_ESTIMATORS, ppo_policy_loss, ppo_value_loss
from tuneoff.models.heads import position_ids_from_mask
from tuneoff.rollout import decode_path
from tuneoff.train import loop
from tuneoff.train import metrics as names
from tuneoff.train.policy import (
    AdaptiveKL,
    FixedKL,
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


class Critic(torch.nn.Module):
    """V(s_t) for each response token: a causal LM backbone and a scalar head, read where the policy's logits are."""

    def __init__(self, lm):
        super().__init__()
        self.backbone = lm.get_decoder()
        self.head = torch.nn.Linear(lm.config.get_text_config().hidden_size, 1)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)

    def forward(self, full_ids, full_mask, prompt_len: int):
        hidden = self.backbone(
            input_ids=full_ids,
            attention_mask=full_mask,
            position_ids=position_ids_from_mask(full_mask),
            use_cache=False,
        ).last_hidden_state  # (B, P + R, H)
        return self.head(hidden[:, prompt_len - 1 : -1]).squeeze(-1).float()  # (B, R)


def per_token_rewards(scores, kl, mask, beta: float):
    """−β·KL_t on every response token plus the score on the last one. scores (B,), kl and mask (B, R) -> (B, R)."""
    rewards = -beta * kl * mask
    last = (mask.sum(-1) - 1).clamp(min=0).long()  # (B,) index of the last response token
    return rewards.scatter_add(1, last[:, None], scores[:, None].to(rewards.dtype))


def ptx_batches(config: PPOConfig, tokenizer, accelerator):
    """PPO-ptx's SFT micro-batches, a seeded order per pass; ``batch(u)`` is this process's u-th (one per update)."""
    from tuneoff.data.formats import load_sft
    from tuneoff.data.tokenize import tokenize_dataset
    from tuneoff.train.common import EpochBatches
    from tuneoff.train.sft import make_batches

    length = config.max_prompt_length + config.max_new_tokens
    examples, _ = tokenize_dataset(load_sft(config.ptx_data), tokenizer, length, "truncate", True)
    layout = (config.batch_size, length, False, tokenizer.pad_token_id, config.seed)
    batches = EpochBatches(lambda epoch: make_batches(examples, *layout, epoch), -(-len(examples) // config.batch_size))
    world, rank = accelerator.num_processes, accelerator.process_index
    return lambda update: {k: v.to(accelerator.device) for k, v in batches(update * world + rank).items()}


def setup(config: PPOConfig, accelerator, out: Path) -> loop.Run:
    critics = []
    actors = load_actors(
        config, accelerator.device, on_policy=lambda policy: critics.append(Critic(copy.deepcopy(policy)))
    )
    critic, policy, tokenizer = critics[0], actors.policy, actors.tokenizer
    ptx = ptx_batches(config, tokenizer, accelerator) if config.ptx_coef > 0 else None
    total = total_iterations(config, config.rollout_batch * accelerator.num_processes, len(actors.prompts.ids))
    updates = updates_per_iteration(config)
    kl_control = (
        AdaptiveKL(config.kl_coef, config.kl_target, config.kl_horizon)
        if config.adaptive_kl
        else FixedKL(config.kl_coef)
    )
    started, episodes = time.perf_counter(), [0]

    def step(context: loop.Context) -> dict:
        policy_module, critic_module = context.modules
        # 1. Rollout, scoring, reference and critic: once per iteration.
        share = iteration_share(len(actors.prompts.ids), config.rollout_batch, 1, context, config.seed)
        batch = sample_and_score(policy, tokenizer, actors.prompts, share, actors.scorer, config, context)
        full_ids, full_mask, P, mask, old_logp = (
            batch.full_ids,
            batch.full_mask,
            batch.prompt_len,
            batch.mask,
            batch.old_logp,
        )
        with torch.inference_mode(), accelerator.autocast():  # as the updates
            ref_logp = actors.reference_logprobs(full_ids, full_mask, P, mask, config.temperature)  # (B, R)
            old_values = critic_module(full_ids, full_mask, P) * mask  # (B, R)
        kl = KL_ESTIMATORS[config.kl_estimator](old_logp, ref_logp) * mask  # (B, R)
        rewards = per_token_rewards(batch.scores, kl, mask, kl_control.value)
        advantages, returns = gae(rewards, old_values, mask, config.gamma, config.lam)
        advantages = whiten(advantages, mask, sum_across=lambda t: accelerator.reduce(t, "sum"))  # whole batch
        old_values, advantages, returns = (t.clone() for t in (old_values, advantages, returns))

        # 2. PPO epochs over minibatches, token-averaged over each minibatch (all processes).
        def micro_step(rows, weight) -> dict:
            m = mask[rows]
            logp, entropy = policy_module(full_ids[rows], full_mask[rows], P, m, config.temperature)
            pg_loss, clipfrac, approx_kl = ppo_policy_loss(logp, old_logp[rows], advantages[rows], m, config.clip_range)
            values = critic_module(full_ids[rows], full_mask[rows], P)
            vf_loss, vclipfrac = ppo_value_loss(values, old_values[rows], returns[rows], m, config.clip_range_value)
            entropy_mean = masked_mean(entropy, m)
            loss = pg_loss + config.vf_coef * vf_loss - config.entropy_coef * entropy_mean
            accelerator.backward(loss * weight)
            ratio = masked_mean((logp - old_logp[rows]).exp(), m)
            return {
                names.POLICY_LOSS: pg_loss,
                names.VALUE_LOSS: vf_loss,
                names.CLIPFRAC: clipfrac,
                names.VALUE_CLIPFRAC: vclipfrac,
                names.APPROX_KL: approx_kl,
                names.RATIO: ratio,
                names.ENTROPY: entropy_mean.detach(),
            }

        done = [0]

        def ptx_step() -> dict:  # Ouyang 2022, Eq. 2: + γ_ptx · E_{x ~ D_pretrain}[log π(x)], as a loss
            nll_sum, count = policy_module(sft_batch=ptx(context.step * updates + done[0]))
            done[0] += 1
            nll = nll_sum / count.clamp(min=1)
            accelerator.backward(config.ptx_coef * nll)
            return {names.PTX_LOSS: nll.detach()}

        updated = minibatch_updates(context, mask, micro_step, ptx_step if ptx else None)
        episodes[0] += len(share.index) * context.world

        # 3. Metrics (the whole batch's) and KL control, the same β on every process.
        rlhf_reward = float((batch.scores - kl_control.value * kl.sum(-1)).mean())
        measured = mean_over_processes(
            accelerator,
            {
                names.OBJECTIVE_KL: float(kl.sum(-1).mean()),
                names.RLHF_REWARD: rlhf_reward,
                **episode_metrics(batch, context, episodes[0] / (time.perf_counter() - started)),
                **gold_metrics(actors, batch, context.step + 1, total, config.eval_every),
            },
        )
        kl_control.update(measured[names.OBJECTIVE_KL], config.rollout_batch * context.world)
        return {**measured, names.KL_COEF: kl_control.value, **updated}

    def restore(state: dict, folder: Path) -> None:
        from safetensors.torch import load_file

        critic.load_state_dict(load_file(folder / "critic.safetensors"))
        kl_control.value = state["kl_coef"]

    return loop.Run(
        "ppo",
        policy,
        tokenizer,
        [PolicyLogprobs(policy), critic],
        total,
        step,
        updates_per_step=updates,
        state=lambda: {"kl_coef": kl_control.value},
        restore=restore,
        tensors=lambda: {"critic": critic.state_dict()},
        finite=(names.OBJECTIVE_KL, names.POLICY_LOSS),
        kl=names.OBJECTIVE_KL,
        postfix={"score": names.SCORES, "kl": names.OBJECTIVE_KL, "ep_s": names.EPISODES_PER_S},
        describe=f"{total} iterations of {config.rollout_batch} episodes per process; sampling: {decode_path(policy)}",
    )


def train(config: PPOConfig) -> Path:
    """Run PPO as configured; returns the folder of the final model."""
    return loop.run(config, setup, 'no prompts: pass --data FILE ({"prompt"} or {"messages"} records)')
