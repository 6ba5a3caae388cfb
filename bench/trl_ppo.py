"""TRL's PPO for the `ppo-review-gpt` workload: TRL 1.12.0's `trl.experimental.ppo` (TRL 1.13+ has none).

TRL 1.12.0 lives in bench/.trl112 (`pip install --no-deps --target bench/.trl112 trl==1.12.0`) and goes first on
sys.path in this child only, beside the venv's transformers 5.24. TRL's PPO wants the reward as a sequence
classifier; here its `get_reward` hands the reward model's call to the gold judge (tuneoff's GoldScorer, the
reward tuneoff's `--reward-model gold` uses) and every other call (the value model) to TRL's own code.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from bench.workloads import KL_COEF, PPO_EPOCHS

TRL112 = Path(__file__).resolve().parent / ".trl112"


class GoldReward(torch.nn.Module):
    """Stands where TRL expects a reward model; scores decoded prompt + response with the gold judge."""

    def __init__(self, tokenizer, prompt_texts: dict, meter):
        super().__init__()
        from tuneoff.feedback.judges import GoldScorer

        self.judge, self.tokenizer, self.prompt_texts, self.meter = GoldScorer(), tokenizer, prompt_texts, meter

    def score_rows(self, query_responses: torch.Tensor, pad_token_id: int, context_length: int) -> torch.Tensor:
        queries, responses = query_responses[:, :context_length], query_responses[:, context_length:]  # (B, P), (B, R)
        prompts = [self.prompt_texts.get(tuple(q[q != pad_token_id].tolist())) for q in queries]
        prompts = [
            p if p is not None else self.tokenizer.decode(q[q != pad_token_id], skip_special_tokens=True)
            for p, q in zip(prompts, queries)
        ]
        texts = self.tokenizer.batch_decode(responses, skip_special_tokens=True)  # TRL has padded after EOS
        self.meter.add_episodes(len(texts), (responses != pad_token_id).sum())  # tokens up to and including EOS
        return self.judge.score(prompts, texts).to(query_responses.device)


def route_rewards(ppo_module) -> None:
    original = ppo_module.get_reward

    def get_reward(model, query_responses, pad_token_id, context_length):
        if isinstance(model, GoldReward):
            scores = model.score_rows(query_responses, pad_token_id, context_length)  # (B,)
            return None, scores, None  # TRL reads only the scores of the reward model
        return original(model, query_responses, pad_token_id, context_length)

    ppo_module.get_reward = get_reward


def import_trl112():
    if not (TRL112 / "trl").exists():
        raise SystemExit(f"TRL 1.12.0 is missing: pip install --no-deps --target {TRL112} trl==1.12.0")
    sys.path.insert(0, str(TRL112))
    import trl
    from trl.experimental.ppo import ppo_trainer

    if trl.__version__ != "1.12.0":
        raise SystemExit(f"expected TRL 1.12.0 from {TRL112}, imported {trl.__version__} from {trl.__file__}")
    return ppo_trainer


def run(spec: dict, meter) -> None:
    ppo_module = import_trl112()
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from bench.trl_side import lora_config, read_jsonl
    from tuneoff.models.load import load_tokenizer, resolve

    folder, tokenizer = resolve(spec["model"]), load_tokenizer(spec["model"])
    tokenizer.padding_side = "left"  # TRL's collator pads the prompts; generation needs them on the left
    policy = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    value = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1, dtype=torch.float32)
    value.config.pad_token_id = tokenizer.pad_token_id
    meter.describe_model(policy, lora=spec["lora"])
    # tuneoff keeps each prompt's last 64 tokens (RLConfig.max_prompt_length); these prompts are ~5 tokens.
    prompts = [r["prompt"] for r in read_jsonl(spec["data"])]
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"][-64:] for p in prompts]
    dataset = Dataset.from_dict({"input_ids": ids})
    route_rewards(ppo_module)
    args = ppo_module.PPOConfig(
        output_dir=spec["out"],
        per_device_train_batch_size=8,
        gradient_accumulation_steps=1,
        num_mini_batches=1,
        num_ppo_epochs=PPO_EPOCHS,
        total_episodes=spec["units"] * 8,
        response_length=spec["new_tokens"],
        temperature=1.0,
        kl_coef=KL_COEF,
        kl_estimator="k1",
        vf_coef=0.1,
        cliprange=0.2,
        cliprange_value=0.2,
        gamma=1.0,
        lam=0.95,
        whiten_rewards=False,
        stop_token="eos",
        missing_eos_penalty=None,
        num_sample_generations=0,
        local_rollout_forward_batch_size=8,
        learning_rate=spec["lr"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        optim="adamw_torch",
        seed=0,
        bf16=spec.get("precision") == "bf16",
        fp16=False,
        gradient_checkpointing=False,
        activation_checkpointing=False,
        use_cpu=spec.get("device", "cpu") == "cpu",
        report_to=[],
        dataloader_num_workers=0,
        eval_strategy="no",
        save_strategy="no",
        logging_steps=10**6,
        disable_tqdm=True,
    )
    trainer = ppo_module.PPOTrainer(
        args=args,
        processing_class=tokenizer,
        model=policy,
        ref_model=None,
        reward_model=GoldReward(tokenizer, dict(zip(map(tuple, ids), prompts)), meter),
        train_dataset=dataset,
        value_model=value,
        eval_dataset=dataset,
        peft_config=lora_config(spec),  # the policy's adapters; π_ref: the policy with them off
    )
    trainer.train()
