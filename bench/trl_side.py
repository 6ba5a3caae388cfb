"""TRL 1.16's side of each workload: the trainer a TRL user would pick, configured to match tuneoff's run.

The pitfalls of bench notes (../shared/BASELINES.md) are all set: float32 (bf16 and fp16 off; bf16 autocast over
float32 weights where the spec's precision says bf16, as tuneoff's --precision bf16), no gradient checkpointing, the
spec's device (CPU unless bench.run --device cuda), no reporting, no evaluation, no saving, no worker processes,
logging only past the end.
The models are the folders tuneoff resolves, loaded in float32; the tokenizer is the one tuneoff loads.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from bench.workloads import KL_COEF


def trl_args(config_class, spec: dict, **extra):
    """The TrainingArguments every TRL run shares: what tuneoff_side.training_fields sets, in TRL's names."""
    return config_class(
        output_dir=spec["out"],
        max_steps=spec["units"],
        per_device_train_batch_size=spec["batch_size"],
        gradient_accumulation_steps=1,
        learning_rate=spec["lr"],
        weight_decay=0.0,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        seed=0,
        data_seed=0,
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
        **extra,
    )


def read_jsonl(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def as_prompt_completion(record: dict) -> dict:
    """A one-turn conversation as TRL's conversational prompt/completion record (completion-only loss)."""
    if "messages" not in record:
        return record
    return {"prompt": record["messages"][:-1], "completion": record["messages"][-1:]}


def record_losses(trainer, meter) -> None:
    """Keep the loss of every training step (what TRL would log with logging_steps=1, without its logging)."""
    step = trainer.training_step

    def training_step(*args, **kwargs):
        loss = step(*args, **kwargs)
        meter.losses.append(float(loss))
        return loss

    trainer.training_step = training_step


def load(spec: dict, meter, head: str = "causal"):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from tuneoff.models.load import load_tokenizer, resolve

    folder, tokenizer = resolve(spec["model"]), load_tokenizer(spec["model"])
    if head == "reward":
        model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1, dtype=torch.float32)
        model.config.pad_token_id = tokenizer.pad_token_id  # where the classifier finds each row's last token
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    meter.describe_model(model, spec["lora"])
    return model, tokenizer


def lora_config(spec: dict, task: str = "CAUSAL_LM"):
    """tuneoff.models.load.apply_lora's adapters; SEQ_CLS (the reward model) also trains the `score` head, as
    tuneoff's LoRA reward model trains its head."""
    if not spec["lora"]:
        return None
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type=task)


def run(spec: dict, meter) -> None:
    from datasets import Dataset

    kind = spec["kind"]
    records = read_jsonl(spec["data"])
    if kind == "sft":
        from trl import SFTConfig, SFTTrainer

        model, tokenizer = load(spec, meter)
        args = trl_args(SFTConfig, spec, max_length=spec["max_length"], packing=False, completion_only_loss=True)
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_list([as_prompt_completion(r) for r in records]),
            processing_class=tokenizer,
            peft_config=lora_config(spec),
        )
    elif kind == "rm":
        from trl import RewardConfig, RewardTrainer

        model, tokenizer = load(spec, meter, head="reward")
        args = trl_args(RewardConfig, spec, max_length=spec["max_length"], disable_dropout=True)
        trainer = RewardTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(records),
            processing_class=tokenizer,
            peft_config=lora_config(spec, "SEQ_CLS"),
        )
    elif kind == "dpo":
        from trl import DPOConfig, DPOTrainer

        model, tokenizer = load(spec, meter)
        # Reference log-probs once, before training, as tuneoff computes them (see the workload's notes).
        args = trl_args(
            DPOConfig,
            spec,
            max_length=spec["max_length"],
            beta=0.1,
            loss_type=["sigmoid"],
            disable_dropout=True,
            precompute_ref_log_probs=True,
            precompute_ref_batch_size=32,
        )
        trainer = DPOTrainer(
            model=model,
            ref_model=None,
            args=args,
            train_dataset=Dataset.from_list(records),
            processing_class=tokenizer,
            peft_config=lora_config(spec),
        )
    elif kind == "grpo":
        trainer = grpo_trainer(spec, meter, Dataset.from_list(records))
    else:
        raise ValueError(f"no TRL 1.16 adapter for {kind}")
    record_losses(trainer, meter)
    trainer.train()


def grpo_trainer(spec: dict, meter, prompts):
    from trl import GRPOConfig, GRPOTrainer

    from tuneoff.feedback.judges import GoldScorer

    model, tokenizer = load(spec, meter)
    judge = GoldScorer()  # the very reward tuneoff's --reward-model gold uses

    def gold(prompts, completions, completion_ids, **kwargs):
        meter.add_episodes(len(completions), sum(len(ids) for ids in completion_ids))  # ids include the EOS
        return judge.score(prompts, completions).tolist()

    args = trl_args(
        GRPOConfig,
        spec,
        num_generations=4,
        max_completion_length=spec["new_tokens"],
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=KL_COEF,
        loss_type="bnpo",
        epsilon=0.2,
        num_iterations=1,
        scale_rewards="group",
        disable_dropout=True,
        use_bias_correction_kl=False,
        mask_truncated_completions=False,
        log_completions=False,
    )
    return GRPOTrainer(
        model=model,
        reward_funcs=gold,
        args=args,
        train_dataset=prompts,
        processing_class=tokenizer,
        peft_config=lora_config(spec),
    )
