"""Critic-free RL for language models: GRPO (Shao et al. 2024, arXiv:2402.03300) and RLOO (Ahmadian et al. 2024,
arXiv:2402.14740).

Each iteration samples k responses for each of rollout_batch / k prompts, scores them once, and turns each
response's score into one advantage from its group (``tuneoff.advantages.BASELINES``), shared by all its tokens.
The loss is the clipped surrogate (a plain policy gradient when update_epochs is 1) plus β·KL(π‖π_ref) with the
k3 estimator, averaged over all response tokens of the minibatch. Reference log-probs: once per iteration.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from tuneoff.advantages import BASELINES, group_advantages, masked_mean
from tuneoff.config import GRPOConfig
from tuneoff.errors import TuneoffError
from tuneoff.losses import kl_k1, kl_k3, ppo_policy_loss
from tuneoff.train import common
from tuneoff.train.policy import check_finite, disable_dropout, encode_prompts, load_scorer, prompt_batch, response_logprobs, sample_and_score
from tuneoff.train.ppo import PolicyLogprobs

KL_ESTIMATORS = {"k1": kl_k1, "k3": kl_k3}


def sequence_advantages(scores: torch.Tensor, k: int, baseline: str, scale_rewards: bool) -> torch.Tensor:
    """(B,) scores of P groups of k consecutive responses -> (B,) advantages."""
    if baseline == "grpo":
        return group_advantages(scores, k, scale=scale_rewards)
    return BASELINES[baseline](scores, k)


def train(config: GRPOConfig) -> Path:
    from tuneoff.models.load import apply_lora, load_model, load_tokenizer

    out, resume_from = common.begin(config, "no prompts: pass --data FILE ({\"prompt\"} or {\"messages\"} records)")
    tokenizer = load_tokenizer(config.model)
    prompts = encode_prompts(config.data, tokenizer, config.max_prompt_length)
    scorer = load_scorer(config.reward_model)
    gold = load_scorer("gold") if config.reward_model != "gold" else None

    accelerator = common.make_accelerator()
    common.seed_everything(config.seed)
    policy = load_model(config.model)
    need_reference = config.kl_coef > 0
    reference = load_model(config.reference or config.model).eval().requires_grad_(False) if need_reference and not config.lora else None
    if config.lora:
        policy = apply_lora(policy, config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_target_modules)
    for m in (policy, reference):
        if m is not None:
            disable_dropout(m)
    k = config.num_generations
    groups = config.rollout_batch // k
    total = config.max_steps if config.max_steps > 0 else max(1, math.ceil(config.epochs * len(prompts.ids) / groups))
    minibatch = config.batch_size * config.grad_accum
    updates = config.update_epochs * max(1, config.rollout_batch // minibatch)
    optimizer = common.make_optimizer(policy, config.lr, config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, common.lr_lambda(config.schedule, int(config.warmup_ratio * total * updates), total * updates))
    policy_module, optimizer = accelerator.prepare(PolicyLogprobs(policy), optimizer)
    policy_model = accelerator.unwrap_model(policy_module).model
    device = accelerator.device

    iteration = 0
    if resume_from is not None:
        iteration = common.load_checkpoint(resume_from, policy_model, optimizer, scheduler)["step"]
    is_main = accelerator.is_main_process
    log = common.open_run(out, config, accelerator, iteration if resume_from else None)
    bar = common.progress(total, iteration, config.baseline, enabled=is_main)
    started, episodes = time.perf_counter(), 0

    def reference_logprobs(full_ids, full_mask, P, mask):
        if reference is not None:
            return response_logprobs(reference, full_ids, full_mask, P, mask, config.temperature)[0]
        with policy_model.disable_adapter():
            return response_logprobs(policy_model, full_ids, full_mask, P, mask, config.temperature)[0]

    while iteration < total:
        # 1. k responses per prompt, scored once; one advantage per response; reference once.
        prompt_index = prompt_batch(len(prompts.ids), groups, iteration * accelerator.num_processes + accelerator.process_index, config.seed)
        index = [i for i in prompt_index for _ in range(k)]  # groups of k consecutive responses
        batch = sample_and_score(policy_model, tokenizer, prompts, index, scorer, config, device)
        full_ids, full_mask, P, mask, old_logp = batch.full_ids, batch.full_mask, batch.prompt_len, batch.mask, batch.old_logp
        advantages = sequence_advantages(batch.scores, k, config.baseline, config.scale_rewards)[:, None] * mask  # (B, R)
        ref_logp = None
        if need_reference:
            with torch.inference_mode():
                ref_logp = reference_logprobs(full_ids, full_mask, P, mask).clone()  # (B, R)

        # 2. Updates: clipped surrogate + β·KL, token-averaged.
        stats: dict[str, list[float]] = {k_: [] for k_ in ("pg", "kl_loss", "clipfrac", "approx_kl", "entropy")}
        for _ in range(config.update_epochs):
            order = torch.randperm(len(index))
            for start in range(0, len(index), minibatch):
                for micro in order[start : start + minibatch].split(config.batch_size):
                    m = mask[micro]
                    logp, entropy = policy_module(full_ids[micro], full_mask[micro], P, m, config.temperature)
                    pg_loss, clipfrac, approx_kl = ppo_policy_loss(logp, old_logp[micro], advantages[micro], m, config.clip_range)
                    kl_loss = masked_mean(KL_ESTIMATORS[config.kl_estimator](logp, ref_logp[micro]), m) if need_reference else torch.zeros(())
                    entropy_mean = masked_mean(entropy, m)
                    loss = pg_loss + config.kl_coef * kl_loss - config.entropy_coef * entropy_mean
                    accelerator.backward(loss / config.grad_accum)
                    for key, value in zip(stats, (pg_loss, kl_loss, clipfrac, approx_kl, entropy_mean)):
                        stats[key].append(float(value.detach()))
                if config.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(policy_module.parameters(), config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
        iteration += 1
        episodes += len(index) * accelerator.num_processes

        # 3. Metrics, checks, checkpoints.
        mean = lambda key: sum(stats[key]) / len(stats[key])  # noqa: E731
        seq_kl = float((kl_k1(old_logp, ref_logp) * mask).sum(-1).mean()) if need_reference else 0.0
        metrics = {
            "objective/kl": seq_kl, "objective/scores": float(batch.raw_scores.mean()),
            "objective/scores_std_in_group": float(batch.scores.view(-1, k).std(-1).mean()),
            "objective/entropy": mean("entropy"), "loss/policy": mean("pg"), "loss/kl": mean("kl_loss"),
            "policy/clipfrac": mean("clipfrac"), "policy/approx_kl": mean("approx_kl"),
            "episode/length": float(mask.sum(-1).float().mean()), "episode/ended": float(batch.ended.float().mean()),
            "episodes_per_s": episodes / (time.perf_counter() - started), "train/lr": scheduler.get_last_lr()[0],
        }
        if gold is not None and (iteration % config.eval_every == 0 or iteration == total):
            gold_logits = gold.score(batch.prompt_texts, batch.responses)  # (B,) logit of P(positive)
            metrics["objective/gold"] = float(gold_logits.mean())
            metrics["objective/gold_p"] = float(torch.sigmoid(gold_logits).mean())  # the scale evaluation reports
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
                common.save_checkpoint(out, iteration, policy_model, tokenizer, optimizer, scheduler, {}, config.keep_checkpoints)
    bar.close()
    accelerator.wait_for_everyone()
    final = out / "model"
    if is_main:
        final = common.save_final_model(out, policy_model, tokenizer)
        print(f"{config.baseline}: model saved to {final}")
    log.close()
    accelerator.end_training()
    return final
