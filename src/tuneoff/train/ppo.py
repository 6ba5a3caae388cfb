"""PPO with a KL penalty for language models (Ziegler et al. 2019; Stiennon et al. 2020; Ouyang et al. 2022).

Each iteration: sample responses to a batch of prompts (KV-cached, ``tuneoff.rollout``); score them once with
the reward (a ``tuneoff rm`` model or the gold judge); run the reference policy and the critic once; build the
per-token reward −β·KL_t plus the score on the last token; GAE(γ, λ) and whitened advantages; then
``update_epochs`` passes of clipped-ratio and clipped-value updates over minibatches.

The critic is a separate model: a copy of the starting policy with a zero-initialised scalar head (a shared
trunk would let value-loss gradients move the policy; a separate one costs one more forward/backward of the
backbone, the price OpenRLHF and TRL's PPO pay too). Dropout is off in every model (ratios must be 1 before
the first update). The sampling log-probs from the rollout serve as π_old.
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path

import torch

from tuneoff.advantages import gae, masked_mean, whiten
from tuneoff.config import PPOConfig
from tuneoff.errors import TuneoffError
from tuneoff.losses import kl_k1, kl_k3, ppo_policy_loss, ppo_value_loss
from tuneoff.train import common
from tuneoff.train.policy import (AdaptiveKL, FixedKL, check_finite, disable_dropout, encode_prompts, load_scorer,
                                  position_ids_from_mask, prompt_batch, response_logprobs, sample_and_score)

KL_ESTIMATORS = {"k1": kl_k1, "k3": kl_k3}


class PolicyLogprobs(torch.nn.Module):
    """The policy as the module DDP wraps: forward returns response log-probs and entropies."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, full_ids, full_mask, prompt_len: int, response_mask, temperature: float):
        return response_logprobs(self.model, full_ids, full_mask, prompt_len, response_mask, temperature, with_entropy=True)


class Critic(torch.nn.Module):
    """V(s_t) for each response token: a causal LM backbone and a scalar head, read where the policy's logits are."""

    def __init__(self, lm):
        super().__init__()
        self.backbone = lm.get_decoder()
        self.head = torch.nn.Linear(lm.config.get_text_config().hidden_size, 1)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)

    def forward(self, full_ids, full_mask, prompt_len: int):
        hidden = self.backbone(input_ids=full_ids, attention_mask=full_mask, position_ids=position_ids_from_mask(full_mask),
                               use_cache=False).last_hidden_state  # (B, P + R, H)
        return self.head(hidden[:, prompt_len - 1 : -1]).squeeze(-1).float()  # (B, R)


def per_token_rewards(scores, kl, mask, beta: float):
    """−β·KL_t on every response token plus the score on the last one. scores (B,), kl and mask (B, R) -> (B, R)."""
    rewards = -beta * kl * mask
    last = (mask.sum(-1) - 1).clamp(min=0).long()  # (B,) index of the last response token
    return rewards.scatter_add(1, last[:, None], scores[:, None].to(rewards.dtype))


def train(config: PPOConfig) -> Path:
    from tuneoff.models.load import apply_lora, load_model, load_tokenizer

    out, resume_from = common.begin(config, "no prompts: pass --data FILE ({\"prompt\"} or {\"messages\"} records)")
    tokenizer = load_tokenizer(config.model)
    prompts = encode_prompts(config.data, tokenizer, config.max_prompt_length)
    scorer = load_scorer(config.reward_model)
    gold = load_scorer("gold") if config.reward_model != "gold" else None

    accelerator = common.make_accelerator()
    common.seed_everything(config.seed)
    policy = load_model(config.model)
    critic = Critic(copy.deepcopy(policy))
    reference = None if config.lora else load_model(config.reference or config.model).eval().requires_grad_(False)
    if config.lora:
        policy = apply_lora(policy, config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_target_modules)
    for m in (policy, critic, reference):
        if m is not None:
            disable_dropout(m)
    total = config.max_steps if config.max_steps > 0 else max(1, math.ceil(config.epochs * len(prompts.ids) / config.rollout_batch))
    minibatch = config.batch_size * config.grad_accum
    updates_per_iteration = config.update_epochs * max(1, config.rollout_batch // minibatch)
    optimizer = common.make_optimizer(torch.nn.ModuleList([policy, critic]), config.lr, config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, common.lr_lambda(config.schedule, int(config.warmup_ratio * total * updates_per_iteration), total * updates_per_iteration))
    policy_module, critic, optimizer = accelerator.prepare(PolicyLogprobs(policy), critic, optimizer)
    kl_control = AdaptiveKL(config.kl_coef, config.kl_target, config.kl_horizon) if config.adaptive_kl else FixedKL(config.kl_coef)
    device = accelerator.device

    iteration = 0
    if resume_from is not None:
        state = common.load_checkpoint(resume_from, accelerator.unwrap_model(policy_module).model, optimizer, scheduler)
        from safetensors.torch import load_file

        accelerator.unwrap_model(critic).load_state_dict(load_file(resume_from / "critic.safetensors"))
        iteration, kl_control.value = state["step"], state["kl_coef"]
    is_main = accelerator.is_main_process
    log = common.open_run(out, config, accelerator, iteration if resume_from else None)
    policy_model = accelerator.unwrap_model(policy_module).model
    bar = common.progress(total, iteration, "ppo", enabled=is_main)
    started, episodes = time.perf_counter(), 0

    def reference_logprobs(full_ids, full_mask, P, mask):
        if reference is not None:
            return response_logprobs(reference, full_ids, full_mask, P, mask, config.temperature)[0]
        with policy_model.disable_adapter():
            return response_logprobs(policy_model, full_ids, full_mask, P, mask, config.temperature)[0]

    while iteration < total:
        # 1. Rollout, scoring, reference and critic: once per iteration.
        index = prompt_batch(len(prompts.ids), config.rollout_batch, iteration * accelerator.num_processes + accelerator.process_index, config.seed)
        batch = sample_and_score(policy_model, tokenizer, prompts, index, scorer, config, device)
        full_ids, full_mask, P, mask, old_logp = batch.full_ids, batch.full_mask, batch.prompt_len, batch.mask, batch.old_logp
        with torch.inference_mode():
            ref_logp = reference_logprobs(full_ids, full_mask, P, mask)  # (B, R)
            old_values = critic(full_ids, full_mask, P) * mask  # (B, R)
        kl = KL_ESTIMATORS[config.kl_estimator](old_logp, ref_logp) * mask  # (B, R)
        rewards = per_token_rewards(batch.scores, kl, mask, kl_control.value)
        advantages, returns = gae(rewards, old_values, mask, config.gamma, config.lam)
        advantages = whiten(advantages, mask)
        ref_logp, old_values, advantages, returns = (t.clone() for t in (ref_logp, old_values, advantages, returns))

        # 2. PPO epochs over minibatches.
        stats: dict[str, list[float]] = {k: [] for k in ("pg", "vf", "clipfrac", "vclipfrac", "approx_kl", "ratio", "entropy")}
        for _ in range(config.update_epochs):
            order = torch.randperm(len(index))
            for start in range(0, len(index), minibatch):
                rows = order[start : start + minibatch]
                for micro in rows.split(config.batch_size):
                    m = mask[micro]
                    logp, entropy = policy_module(full_ids[micro], full_mask[micro], P, m, config.temperature)
                    pg_loss, clipfrac, approx_kl = ppo_policy_loss(logp, old_logp[micro], advantages[micro], m, config.clip_range)
                    values = critic(full_ids[micro], full_mask[micro], P)
                    vf_loss, vclipfrac = ppo_value_loss(values, old_values[micro], returns[micro], m, config.clip_range_value)
                    entropy_mean = masked_mean(entropy, m)
                    loss = pg_loss + config.vf_coef * vf_loss - config.entropy_coef * entropy_mean
                    accelerator.backward(loss / config.grad_accum)
                    ratio = masked_mean((logp - old_logp[micro]).exp(), m)
                    for key, value in zip(stats, (pg_loss, vf_loss, clipfrac, vclipfrac, approx_kl, ratio, entropy_mean)):
                        stats[key].append(float(value.detach()))
                if config.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(list(policy_module.parameters()) + list(critic.parameters()), config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
        iteration += 1
        episodes += len(index) * accelerator.num_processes

        # 3. Metrics, KL control, checks, checkpoints.
        seq_kl = float(kl.sum(-1).mean())
        kl_control.update(seq_kl, config.rollout_batch)
        metrics = {
            "objective/kl": seq_kl, "objective/scores": float(batch.raw_scores.mean()),
            "objective/rlhf_reward": float((batch.scores - kl_control.value * kl.sum(-1)).mean()),
            "objective/kl_coef": kl_control.value, "objective/entropy": sum(stats["entropy"]) / len(stats["entropy"]),
            "policy/clipfrac": sum(stats["clipfrac"]) / len(stats["clipfrac"]), "policy/approx_kl": sum(stats["approx_kl"]) / len(stats["approx_kl"]),
            "loss/policy": sum(stats["pg"]) / len(stats["pg"]), "val/value_loss": sum(stats["vf"]) / len(stats["vf"]),
            "val/clipfrac": sum(stats["vclipfrac"]) / len(stats["vclipfrac"]), "val/ratio": sum(stats["ratio"]) / len(stats["ratio"]),
            "episode/length": float(mask.sum(-1).float().mean()), "episode/ended": float(batch.ended.float().mean()),
            "episodes_per_s": episodes / (time.perf_counter() - started), "train/lr": scheduler.get_last_lr()[0],
        }
        if gold is not None and (iteration % config.eval_every == 0 or iteration == total):
            gold_logits = gold.score(batch.prompt_texts, batch.responses)  # (B,) logit of P(positive)
            metrics["objective/gold"] = float(gold_logits.mean())
            metrics["objective/gold_p"] = float(torch.sigmoid(gold_logits).mean())  # the scale evaluation reports
        check_finite("objective/kl", seq_kl, iteration)
        check_finite("loss/policy", metrics["loss/policy"], iteration)
        if iteration % config.log_every == 0 or iteration == total:
            log.log(iteration, metrics)
        bar.update(1)
        bar.set_postfix(score=f"{metrics['objective/scores']:.2f}", kl=f"{seq_kl:.2f}", ep_s=f"{metrics['episodes_per_s']:.1f}", refresh=False)
        if seq_kl > config.kl_stop:
            kept = common.checkpoints(out)
            raise TuneoffError(f"KL(π‖π_ref) reached {seq_kl:.1f} nats at iteration {iteration}, above kl_stop {config.kl_stop}; "
                               f"stopped. Last good checkpoint: {kept[-1] if kept else 'none was written yet'}")
        if iteration % config.save_every == 0 or iteration == total:
            accelerator.wait_for_everyone()
            if is_main:
                common.save_checkpoint(out, iteration, policy_model, tokenizer, optimizer, scheduler,
                                       {"kl_coef": kl_control.value}, config.keep_checkpoints,
                                       extra={"critic": accelerator.unwrap_model(critic).state_dict()})
    bar.close()
    accelerator.wait_for_everyone()
    final = out / "model"
    if is_main:
        final = common.save_final_model(out, policy_model, tokenizer)
        print(f"ppo: model saved to {final}")
    log.close()
    accelerator.end_training()
    return final
