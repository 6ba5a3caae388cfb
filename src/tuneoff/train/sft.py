"""Supervised fine-tuning (and pretraining on ``{"text"}`` records): one loop under accelerate.

The same code runs on CPU, one GPU, or ``accelerate launch`` with several processes (DDP). The loss of an
optimizer step is the mean NLL over *all* trainable tokens of the step, across micro-batches and processes
(token-weighted, so gradient accumulation and data parallelism give the loss one big batch would give).
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch

from tuneoff.config import SFTConfig
from tuneoff.data.tokenize import pack, packed_batch, pad_batch, tokenize_dataset
from tuneoff.errors import TuneoffError
from tuneoff.losses import IGNORE, sft_loss_sum, shift_targets
from tuneoff.train import common


class TokenLoss(torch.nn.Module):
    """Wraps a causal LM so that forward returns the summed NLL of the trainable tokens.

    The LM head (B·T·V multiply-adds, the largest matmul of a small model) runs only on positions with a
    target. Being the module that DDP wraps, its forward keeps gradient synchronisation intact.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, labels, attention_mask=None, position_ids=None, num_tokens=None):
        decoder, head = self.model.get_decoder(), self.model.get_output_embeddings()
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False).last_hidden_state  # (B, T, H)
        targets = shift_targets(labels)  # (B, T)
        keep = (targets != IGNORE).view(-1).nonzero().squeeze(-1)  # (N,) flat positions with a target
        # index_select, not a boolean mask: its backward (index_add) is many times faster on a CPU than index_put
        logits = head(hidden.reshape(-1, hidden.shape[-1]).index_select(0, keep))  # (N, V)
        return sft_loss_sum(logits, targets.view(-1)[keep]), keep.new_tensor(len(keep))


def _examples(path: str, tokenizer, config: SFTConfig):
    from tuneoff.data.formats import load_sft

    tokenized, report = tokenize_dataset(load_sft(path), tokenizer, config.max_length, config.overlong, config.completion_only_loss)
    return tokenized, report


def _split(examples: list, fraction: float, seed: int):
    if fraction <= 0:
        return examples, []
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    n_eval = max(1, int(round(len(examples) * fraction)))
    if n_eval >= len(examples):
        raise TuneoffError(f"eval_fraction {fraction} leaves no training example out of {len(examples)}")
    return [examples[i] for i in order[n_eval:]], [examples[i] for i in order[:n_eval]]


def make_batches(examples: list, config: SFTConfig, pad_id: int, epoch: int, shuffle: bool = True) -> list[dict]:
    """Micro-batches of one epoch, in a seeded order (the same on every process and after a resume)."""
    units = pack(examples, config.max_length) if config.packing else [[e] for e in examples]
    if shuffle:
        order = torch.randperm(len(units), generator=torch.Generator().manual_seed(config.seed * 1000 + epoch)).tolist()
        units = [units[i] for i in order]
    chunks = [units[i : i + config.batch_size] for i in range(0, len(units), config.batch_size)]
    if config.packing:
        return [packed_batch(chunk, pad_id) for chunk in chunks]
    return [pad_batch([row[0] for row in chunk], pad_id) for chunk in chunks]


@torch.inference_mode()
def evaluate(loss_model, batches: list[dict], accelerator) -> dict:
    """Token-weighted eval loss and perplexity over this process's share, summed across processes."""
    loss_model.eval()
    total = torch.zeros(2, device=accelerator.device)
    for batch in batches[accelerator.process_index :: accelerator.num_processes]:
        loss_sum, count = loss_model(**{k: v.to(accelerator.device) for k, v in batch.items()})
        total += torch.stack([loss_sum.float(), count.float()])
    loss_model.train()
    total = accelerator.reduce(total, "sum")
    loss = (total[0] / total[1].clamp(min=1)).item()
    return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0))}


def train(config: SFTConfig) -> Path:
    """Run SFT as configured; returns the folder of the final model."""

    from tuneoff.models.load import apply_lora, load_model, load_tokenizer

    out, resume_from = common.begin(config, "no training data: pass --data FILE")

    # Everything that can fail on the user's input happens before the first byte is written to `out`.
    tokenizer = load_tokenizer(config.model)
    train_examples, report = _examples(config.data, tokenizer, config)
    if config.eval_data:
        eval_examples, _ = _examples(config.eval_data, tokenizer, config)
    else:
        train_examples, eval_examples = _split(train_examples, config.eval_fraction, config.seed)

    accelerator = common.make_accelerator()
    common.seed_everything(config.seed)
    model = load_model(config.model, from_scratch=config.from_scratch)
    if config.lora:
        model = apply_lora(model, config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_target_modules)
    world = accelerator.num_processes
    batches_per_epoch = len(make_batches(train_examples, config, tokenizer.pad_token_id, 0, shuffle=False))
    steps_per_epoch = batches_per_epoch // (config.grad_accum * world)
    if steps_per_epoch < 1:
        raise TuneoffError(f"{batches_per_epoch} micro-batches are fewer than grad_accum × processes = {config.grad_accum * world}")
    total_steps = config.max_steps if config.max_steps > 0 else max(1, math.ceil(config.epochs * steps_per_epoch))
    optimizer = common.make_optimizer(model, config.lr, config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, common.lr_lambda(config.schedule, int(config.warmup_ratio * total_steps), total_steps)
    )
    loss_model, optimizer = accelerator.prepare(TokenLoss(model), optimizer)
    eval_batches = make_batches(eval_examples, config, tokenizer.pad_token_id, 0, shuffle=False) if eval_examples else []

    step, cursor = 0, 0  # cursor = micro-batches consumed, over all epochs and processes
    if resume_from is not None:
        state = common.load_checkpoint(resume_from, accelerator.unwrap_model(loss_model).model, optimizer, scheduler)
        step, cursor = state["step"], state["cursor"]
    is_main = accelerator.is_main_process
    log = common.open_run(out, config, accelerator, step if resume_from else None)
    if is_main:
        print(f"sft: {report.summary()}; {len(train_examples)} train / {len(eval_examples)} eval; "
              f"{total_steps} steps of {config.grad_accum * world} micro-batches of {config.batch_size}")

    micro_batch = common.EpochBatches(lambda epoch: make_batches(train_examples, config, tokenizer.pad_token_id, epoch),
                                      steps_per_epoch * config.grad_accum * world)

    model_for_saving = accelerator.unwrap_model(loss_model).model
    speed = common.Throughput()
    loss_model.train()  # from_pretrained leaves it in eval mode: dropout as its config says, as in TRL
    bar = common.progress(total_steps, step, "sft", enabled=is_main)
    while step < total_steps:
        mine = [cursor + i * world + accelerator.process_index for i in range(config.grad_accum)]
        batches = [{k: v.to(accelerator.device) for k, v in micro_batch(i).items()} for i in mine]
        cursor += config.grad_accum * world
        trained = sum(float((shift_targets(b["labels"]) != IGNORE).sum()) for b in batches)
        local = torch.tensor([trained, sum(float(b["num_tokens"]) for b in batches)])
        step_tokens, input_tokens = accelerator.reduce(local.to(accelerator.device), "sum").unbind()
        loss_total = torch.zeros((), device=accelerator.device)
        for i, batch in enumerate(batches):
            sync = contextlib.nullcontext() if i == len(batches) - 1 else accelerator.no_sync(loss_model)
            with sync:
                loss_sum, _ = loss_model(**batch)
                # DDP averages gradients over processes, so scale by world / global token count.
                accelerator.backward(loss_sum * world / step_tokens.clamp(min=1))
            loss_total += loss_sum.detach()
        loss = (accelerator.reduce(loss_total, "sum") / step_tokens.clamp(min=1)).item()
        if not math.isfinite(loss):
            kept = common.checkpoints(out)
            where = kept[-1] if kept else "none was written yet"
            raise TuneoffError(f"loss became {loss} at step {step + 1}; stopped. Last good checkpoint: {where}")
        grad_norm = accelerator.clip_grad_norm_(loss_model.parameters(), config.max_grad_norm) if config.max_grad_norm > 0 else torch.tensor(0.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        rate, trained_rate = speed.add(int(input_tokens.item()), int(step_tokens.item()))
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rate:,.0f}", refresh=False)
        if step % config.log_every == 0 or step == total_steps:
            log.log(step, {"train/loss": loss, "train/lr": scheduler.get_last_lr()[0], "train/grad_norm": float(grad_norm),
                           "train/tokens_per_s": rate, "train/trained_tokens_per_s": trained_rate,
                           "train/epoch": cursor / (steps_per_epoch * config.grad_accum * world)})
        if eval_batches and (step % config.eval_every == 0 or step == total_steps):
            metrics = evaluate(loss_model, eval_batches, accelerator)
            log.log(step, metrics)
            if is_main:
                bar.write(f"step {step}: eval loss {metrics['eval/loss']:.4f}, perplexity {metrics['eval/perplexity']:.2f}")
        if step % config.save_every == 0 or step == total_steps:
            accelerator.wait_for_everyone()
            if is_main:
                common.save_checkpoint(out, step, model_for_saving, tokenizer, optimizer, scheduler,
                                                   {"cursor": cursor}, config.keep_checkpoints)
    bar.close()
    accelerator.wait_for_everyone()
    final = out / "model"
    if is_main:
        final = common.save_final_model(out, model_for_saving, tokenizer)
        print(f"sft: model saved to {final}")
    log.close()
    accelerator.end_training()
    return final
