"""tuneoff's side of each workload: the method's config dataclass, then its loop, as `tuneoff <verb>` runs it.

Every run: AdamW at a constant learning rate (no warm-up, no weight decay), gradient clipping at 1.0, seed 0,
no evaluation, no checkpoint before the end, metrics logged every step (metrics.jsonl, for the losses).
"""

from __future__ import annotations

import json
from pathlib import Path

from bench.workloads import KL_COEF, PPO_EPOCHS


def training_fields(spec: dict) -> dict:
    return dict(
        model=spec["model"],
        data=spec["data"],
        out=spec["out"],
        max_steps=spec["units"],
        seed=0,
        batch_size=spec["batch_size"],
        lr=spec["lr"],
        weight_decay=0.0,
        warmup_ratio=0.0,
        schedule="constant",
        max_grad_norm=1.0,
        max_length=spec["max_length"],
        eval_fraction=0.0,
        save_every=10**9,
        log_every=1,
        lora=spec["lora"],
        lora_r=16,
        lora_alpha=32,
        lora_dropout=0.05,
        lora_target_modules="all-linear",
        threads=spec["threads"],
        device=spec.get("device", "cpu"),
        precision=spec.get("precision", "fp32"),
    )


def rl_fields(spec: dict) -> dict:
    """What GRPO and PPO share: gold-judge reward, 8 episodes per iteration in one minibatch, ≤ 32 new tokens."""
    fields = training_fields(spec)
    del fields["max_length"], fields["eval_fraction"]  # offline fields: the RL configs do not have them
    fields.update(
        reward_model="gold",
        rollout_batch=8,
        batch_size=8,
        max_new_tokens=spec["new_tokens"],
        temperature=1.0,
        top_p=1.0,
        kl_coef=KL_COEF,
        eval_every=10**9,
    )
    return fields


def run(spec: dict, meter) -> None:
    from tuneoff import config

    watch_loading(meter, spec["lora"])
    watch_rollouts(meter)
    kind, fields = spec["kind"], training_fields(spec)
    if kind == "sft":
        from tuneoff.train.sft import train

        train(
            config.SFTConfig(**fields, packing=bool(spec.get("variant", {}).get("packing")), completion_only_loss=True)
        )
    elif kind == "rm":
        from tuneoff.train.reward import train

        train(config.RMConfig(**fields, pooling="last", disable_dropout=True))
    elif kind == "dpo":
        from tuneoff.train.dpo import train

        train(config.DPOConfig(**fields, beta=0.1, loss_type="sigmoid", ref_batch_size=32, disable_dropout=True))
    elif kind == "grpo":
        from tuneoff.train.grpo import train

        train(
            config.GRPOConfig(
                **rl_fields(spec),
                baseline="grpo",
                num_generations=4,
                scale_rewards=True,
                kl_estimator="k3",
                update_epochs=1,
            )
        )
    elif kind == "ppo":
        from tuneoff.train.ppo import train

        # TRL's PPO never clips gradients and keeps β fixed: do the same here.
        train(
            config.PPOConfig(
                **{**rl_fields(spec), "max_grad_norm": 0.0},
                update_epochs=PPO_EPOCHS,
                adaptive_kl=False,
                kl_estimator="k1",
                gamma=1.0,
                lam=0.95,
                clip_range=0.2,
                clip_range_value=0.2,
                vf_coef=0.1,
            )
        )
    else:
        raise ValueError(f"no tuneoff adapter for {kind}")
    meter.losses = logged_losses(Path(spec["out"]) / "metrics.jsonl")


def watch_loading(meter, lora: bool) -> None:
    """Count the parameters of the first model tuneoff loads (the policy / the model being trained)."""
    from tuneoff.models import load

    original = load.load_model

    def load_model(*args, **kwargs):
        model = original(*args, **kwargs)
        if not meter.n_params:
            meter.describe_model(model, lora)
        return model

    load.load_model = load_model  # the loops import it inside train(), so they get this one


def watch_rollouts(meter) -> None:
    """Episodes and response tokens (up to and including EOS) of every tuneoff rollout."""
    from tuneoff import rollout

    original = rollout.generate

    def generate(*args, **kwargs):
        result = original(*args, **kwargs)
        meter.add_episodes(result.response_ids.shape[0], result.response_mask.sum())
        return result

    rollout.generate = generate  # sample_and_score imports it at call time


def logged_losses(path: Path) -> list[float]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line]
    return [r["train/loss"] for r in rows if "train/loss" in r]
