"""Reward-model training: Bradley–Terry loss on preference pairs, one loop under accelerate.

r(x, y) is a scalar head on the decoder's last real token (``tuneoff.models.heads``); the loss of a pair is
``-log σ(r(x, y_w) − r(x, y_l) − m)`` (Bradley & Terry 1952; Ouyang et al. 2022). A micro-batch's distinct
responses go through the model in one padding-free forward, each prompt once and each response once, however
many of the batch's pairs compare it (K responses per prompt with all C(K, 2) pairs labelled cost K sequences,
not K(K − 1)); pairs of one prompt sit next to each other in the order, so they share a micro-batch unless a
batch boundary cuts them. The loss of an optimizer step is the mean over all its pairs, across micro-batches
and processes (pair-weighted, so gradient accumulation and data parallelism give what one big batch would).
Pairs are DPO's (:mod:`tuneoff.data.pairs`) under the reward model's over-long policy: a sequence, prompt +
response, keeps its last max_length tokens. Conventions as ``train/sft.py``: checkpoints and ``--resume`` by
data cursor, metrics.jsonl + TensorBoard, progress bar, NaN stop, LoRA.
Held-out evaluation (``tuneoff.train.rm_metrics``): pairwise accuracy, ECE of σ(r_w − r_l), length-bias probe.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from tuneoff.config import RMConfig
from tuneoff.data.grouped import pair_batches
from tuneoff.data.pairs import split_by_prompt, tokenize_pairs
from tuneoff.losses import bradley_terry_loss
from tuneoff.train import loop
from tuneoff.train.metrics import ACCURACY, EVAL_REWARD_MEAN, EVAL_REWARD_STD, LOSS, PAIRS_PER_S


def pair_rewards(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_chosen, r_rejected), each (B,), from one padding-free forward over the batch's U distinct sequences
    packed into rows (pad tokens cost as much as real ones on a CPU; the rewards equal the padded forward's,
    tested). Under DDP, the padded forward: DDP's gradient hooks run through ``forward``."""
    count = batch["input_ids"].shape[0]
    module = getattr(model, "module", model)  # DDP wraps the reward model; its forward is the padded one
    if module is model:
        rewards = model.forward_packed(
            batch["packed_ids"],
            batch["packed_positions"],
            batch["token_index"],
            batch["segments"],
            count,
            batch["packed_mask"],
        )  # (U,)
    else:
        rewards = model(batch["input_ids"], batch["attention_mask"])  # (U,)
    return rewards.index_select(0, batch["chosen_index"]), rewards.index_select(0, batch["rejected_index"])


@torch.inference_mode()
def evaluate(model, batches: list[dict], accelerator, bins: int) -> dict:
    """Held-out metrics over every process's share of the batches, gathered on each process."""
    from accelerate.utils import gather_object

    from tuneoff.train.rm_metrics import reward_model_metrics

    model.eval()
    rows = []
    for batch in batches[accelerator.process_index :: accelerator.num_processes]:
        with accelerator.autocast():  # forward_packed is not the forward accelerate wraps in autocast
            r_chosen, r_rejected = pair_rewards(model, {k: v.to(accelerator.device) for k, v in batch.items()})
        length_chosen, length_rejected = batch["length"].chunk(2)
        rows += list(
            zip(
                r_chosen.tolist(),
                r_rejected.tolist(),
                length_chosen.tolist(),
                length_rejected.tolist(),
                batch["margin"].tolist(),
            )
        )
    model.train()
    rows = gather_object(rows) if accelerator.num_processes > 1 else rows
    columns = torch.tensor(rows, dtype=torch.float64).T  # (5, N)
    metrics = reward_model_metrics(columns[0], columns[1], columns[2], columns[3], columns[4], bins)
    return {f"eval/{k}": v for k, v in metrics.items()}


def setup(config: RMConfig, accelerator, out: Path) -> loop.Run:
    from tuneoff.models.heads import RewardModel, save_reward_model
    from tuneoff.models.load import load_tokenizer

    tokenizer = load_tokenizer(config.model)
    limits = dict(max_length=config.max_length, overlong=config.overlong)  # no max_prompt_length: the RM's policy
    margins = dict(margin=config.margin, margin_field=config.margin_field)
    train_pairs, summary = tokenize_pairs(config.data, tokenizer, **limits, **margins)
    train_pairs, eval_pairs = loop.held_out(
        config,
        train_pairs,
        lambda path: tokenize_pairs(path, tokenizer, **limits, **margins)[0],
        lambda pairs: split_by_prompt(pairs, config.eval_fraction, config.seed),
    )
    lm = loop.trainable_model(config)
    reward_model = RewardModel(lm, pooling=config.pooling)  # the head sits outside peft: it trains with or without LoRA
    pad_id = tokenizer.pad_token_id
    batches = loop.MicroBatches(
        lambda epoch: pair_batches(train_pairs, config.batch_size, config.max_length, pad_id, config.seed, epoch),
        math.ceil(len(train_pairs) / config.batch_size),
        config,
        accelerator,
    )
    eval_batches = (
        pair_batches(eval_pairs, config.batch_size, config.max_length, pad_id, 0, 0, shuffle=False)
        if eval_pairs
        else []
    )
    total = loop.total_steps(config, batches.steps_per_epoch)
    reward_model.train()  # from_pretrained leaves it in eval mode (dropout, if not disabled, as its config says)
    held_out = {}

    def step(context: loop.Context) -> dict:
        def loss(batch):
            with context.accelerator.autocast():  # forward_packed is not the forward accelerate autocasts
                r_chosen, r_rejected = pair_rewards(context.modules[0], batch)  # (B,), (B,) fp32
            loss_sum = bradley_terry_loss(r_chosen, r_rejected, batch["margin"]) * len(r_chosen)
            return loss_sum, torch.stack([loss_sum.detach(), (r_chosen > r_rejected).sum().float()])

        pairs = lambda batch: batch["margin"].new_tensor([len(batch["margin"])])  # noqa: E731
        return batches.step(context, loss, pairs, (LOSS, ACCURACY), (PAIRS_PER_S,))

    def evaluate_now(context: loop.Context) -> dict:
        held_out.update(evaluate(context.modules[0], eval_batches, accelerator, config.calibration_bins))
        return dict(held_out)

    def save(out: Path) -> Path:
        info = {"max_length": config.max_length, "base_model": config.model, "steps": total, "pooling": config.pooling}
        if held_out:  # the held-out rewards set the normalisation RL may use (RewardScorer.score(normalize=True))
            info.update(reward_mean=held_out[EVAL_REWARD_MEAN], reward_std=held_out[EVAL_REWARD_STD], eval=held_out)
            (out / "eval.json").write_text(json.dumps({"step": total, **held_out}, indent=1))
        final = save_reward_model(out / "model", reward_model, tokenizer, info)
        if config.lora:  # the adapter and head alone too, as SFT keeps its adapter
            reward_model.save_pretrained(out / "adapter")
        return final

    def restore(state: dict, folder: Path) -> None:
        reward_model.load_head(folder)
        batches.restore(state, folder)

    micro = config.grad_accum * accelerator.num_processes
    return loop.Run(
        "rm",
        reward_model,
        tokenizer,
        [reward_model],
        total,
        step,
        evaluate=evaluate_now if eval_batches else None,
        weights=reward_model.model,
        describe=f"{summary}; {len(train_pairs)} train / {len(eval_pairs)} eval; "
        f"{total} steps of {micro} micro-batches of {config.batch_size} pairs",
        state=batches.state,
        restore=restore,
        save=save,
        postfix={"loss": LOSS, "acc": ACCURACY, "pairs_s": PAIRS_PER_S},
    )


def train(config: RMConfig) -> Path:
    """Train a reward model as configured; returns the folder of the final model."""
    return loop.run(config, setup, "no training data: pass --data FILE")
