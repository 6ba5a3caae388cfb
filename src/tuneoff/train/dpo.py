"""Direct preference optimisation (DPO; Rafailov et al. 2023) and IPO (Azar et al. 2023): one loop under accelerate.

π starts from ``model``; π_ref is the starting model (with LoRA: the base, adapters disabled) or ``ref_model``.
π_ref never changes, so its log-probs are computed once, before the first step, under ``inference_mode``, and
cached in the run folder as ``reference-logps-<key>.safetensors`` (the key hashes the reference weights and every
token id: a resume or rerun reuses it; new data, tokenizer or lengths recompute it). No reference model stays in
memory. Chosen and rejected run in one forward (2B rows); the LM head runs on response tokens only. A step's
loss is the mean over all its pairs, across micro-batches and processes. Metrics are named as TRL's. Otherwise
as ``train/sft.py``: checkpoints, ``--resume`` by data cursor, metrics.jsonl + TensorBoard, NaN stop, LoRA.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from pathlib import Path

import torch

from tuneoff.config import DPOConfig
from tuneoff.data.default_task import pair_files
from tuneoff.data.pairs import TokenizedPair, make_batches, split_by_prompt, tokenize_pairs
from tuneoff.errors import TuneoffError
from tuneoff.losses import DPO_LOSSES, IGNORE, MEAN_LOGPS, implicit_rewards, selected_logprobs, shift_targets, sum_by_row
from tuneoff.train import common

METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected")


class SequenceLogProbs(torch.nn.Module):
    """Wraps a causal LM: forward returns log π(y|x) summed over each row's labelled tokens and their count.

    The LM head runs only at labelled positions (as ``TokenLoss`` in sft.py): with a 49k vocabulary it is
    most of a small model's cost. Being the module DDP wraps, its forward keeps gradient sync intact.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, labels) -> tuple[torch.Tensor, torch.Tensor]:
        decoder, head = self.model.get_decoder(), self.model.get_output_embeddings()
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state  # (2B, T, H)
        targets = shift_targets(labels)  # (2B, T)
        keep = targets != IGNORE
        per_token = selected_logprobs(head(hidden[keep]), targets[keep])  # (N,)
        return sum_by_row(per_token, keep), keep.sum(-1)  # (2B,), (2B,)


def pair_terms(logps, counts, ref_logps, config: DPOConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair losses (B,) and the sums over the pairs of each of METRICS (7,), from (2B,) inputs."""
    if config.loss_type in MEAN_LOGPS:
        logps, ref_logps = logps / counts.clamp(min=1), ref_logps / counts.clamp(min=1)
    pi_chosen, pi_rejected = logps.chunk(2)  # (B,), (B,)
    ref_chosen, ref_rejected = ref_logps.to(logps).chunk(2)
    losses = DPO_LOSSES[config.loss_type](pi_chosen, pi_rejected, ref_chosen, ref_rejected, config.beta, config.label_smoothing)
    reward_chosen = implicit_rewards(pi_chosen.detach(), ref_chosen, config.beta)  # (B,)
    reward_rejected = implicit_rewards(pi_rejected.detach(), ref_rejected, config.beta)
    stats = torch.stack([losses.detach().sum(), reward_chosen.sum(), reward_rejected.sum(), (reward_chosen > reward_rejected).float().sum(),
                         (reward_chosen - reward_rejected).sum(), pi_chosen.detach().sum(), pi_rejected.detach().sum()])
    return losses, stats


def weights_identity(name: str, random_init: bool, seed: int) -> dict:
    """What the reference weights depend on: the seed for random init, else the weight files' names, sizes, times."""
    from tuneoff.models.load import resolve

    if random_init:
        return {"model": name, "seed": seed}
    folder = resolve(name).resolve()
    files = sorted([*folder.glob("*.safetensors"), *folder.glob("*.bin")])
    return {"model": str(folder), "files": [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]}


@torch.inference_mode()
def reference_logps(model, pairs: list[TokenizedPair], config: DPOConfig, pad_id: int, accelerator) -> torch.Tensor:
    """log π_ref of every pair's chosen and rejected response, summed: (N, 2). Pairs are batched by length (less
    padding); process k scores batches k, k + world, ... and the rows are gathered."""
    from accelerate.utils import gather_object

    scorer = SequenceLogProbs(model).to(accelerator.device).eval()
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i].prompt) + max(len(pairs[i].chosen), len(pairs[i].rejected)))
    batches = make_batches([pairs[i] for i in order], config.ref_batch_size, pad_id, 0, 0, shuffle=False)
    rows = []
    for index in range(accelerator.process_index, len(batches), accelerator.num_processes):
        logps, _ = scorer(*(batches[index][k].to(accelerator.device) for k in ("input_ids", "attention_mask", "labels")))
        chosen, rejected = logps.cpu().chunk(2)
        rows += [(order[index * config.ref_batch_size + i], c, r) for i, (c, r) in enumerate(zip(chosen.tolist(), rejected.tolist()))]
    rows = gather_object(rows) if accelerator.num_processes > 1 else rows
    return torch.tensor([[c, r] for _, c, r in sorted(rows)], dtype=torch.float32)  # (N, 2)


def attach_reference(model, pairs: list[TokenizedPair], config: DPOConfig, pad_id: int, accelerator, out: Path) -> str:
    """Fill ``ref_chosen``/``ref_rejected`` of every pair from the run folder's cache, or compute and cache them."""
    from safetensors.torch import load_file, save_file

    from tuneoff.models.load import load_model

    ref_name = config.ref_model or config.model
    identity = weights_identity(ref_name, not config.ref_model and (config.from_scratch or ref_name == "tiny"), config.seed)
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode())
    for p in pairs:
        digest.update(json.dumps([p.prompt, p.chosen, p.rejected]).encode())
    path = out / f"reference-logps-{digest.hexdigest()[:16]}.safetensors"
    if path.exists():
        values, how = torch.stack([load_file(path)[k] for k in ("chosen", "rejected")], 1), f"reused from {path.name}"  # (N, 2)
    else:
        start = time.perf_counter()
        if config.ref_model:
            values = reference_logps(load_model(config.ref_model), pairs, config, pad_id, accelerator)
        else:
            adapters_off = model.disable_adapter() if hasattr(model, "peft_config") else contextlib.nullcontext()
            with adapters_off:
                values = reference_logps(model, pairs, config, pad_id, accelerator)
        if accelerator.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
            staging = path.with_suffix(".tmp")
            save_file({"chosen": values[:, 0].contiguous(), "rejected": values[:, 1].contiguous()}, staging, metadata={"reference": ref_name})
            staging.rename(path)  # atomic: a kill never leaves a half-written cache
        how = f"computed once for {len(pairs)} pairs in {time.perf_counter() - start:.1f} s, cached in {path.name}"
    for p, (chosen, rejected) in zip(pairs, values.tolist()):
        p.ref_chosen, p.ref_rejected = chosen, rejected
    return how


@torch.inference_mode()
def evaluate(scorer, batches: list[dict], accelerator, config: DPOConfig) -> dict:
    """Held-out METRICS, pair-weighted over every process's share of the batches."""
    scorer.eval()
    totals = torch.zeros(len(METRICS) + 1, device=accelerator.device)
    for batch in batches[accelerator.process_index :: accelerator.num_processes]:
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        logps, counts = scorer(batch["input_ids"], batch["attention_mask"], batch["labels"])
        _, stats = pair_terms(logps, counts, batch["ref_logps"], config)
        totals += torch.cat([stats, torch.tensor([len(logps) / 2], device=accelerator.device)])
    scorer.train()
    totals = accelerator.reduce(totals, "sum")
    return {f"eval/{name}": (value / totals[-1].clamp(min=1)).item() for name, value in zip(METRICS, totals)}


def train(config: DPOConfig) -> Path:
    """Run DPO (or IPO) as configured; returns the folder of the final model."""
    from tuneoff.models.load import apply_lora, load_model, load_tokenizer

    out, resume_from = common.begin(config, "no training data: pass --data FILE (or --data default)")

    # Everything that can fail on the user's input happens before the first byte is written to `out`.
    tokenizer = load_tokenizer(config.model)
    if config.ref_model and load_tokenizer(config.ref_model).get_vocab() != tokenizer.get_vocab():
        raise TuneoffError(f"ref_model {config.ref_model} has another tokenizer than model {config.model}: DPO compares their log-probs token by token")
    data, eval_data = pair_files(config.data, config.eval_data)
    train_pairs, summary = tokenize_pairs(data, tokenizer, config.max_length, config.max_prompt_length, config.overlong)
    if eval_data:
        eval_pairs, _ = tokenize_pairs(eval_data, tokenizer, config.max_length, config.max_prompt_length, config.overlong)
    else:
        train_pairs, eval_pairs = split_by_prompt(train_pairs, config.eval_fraction, config.seed)

    accelerator = common.make_accelerator()
    pad_id, world = tokenizer.pad_token_id, accelerator.num_processes
    batches_per_epoch = math.ceil(len(train_pairs) / config.batch_size)
    steps_per_epoch = batches_per_epoch // (config.grad_accum * world)
    if steps_per_epoch < 1:
        raise TuneoffError(f"{batches_per_epoch} micro-batches are fewer than grad_accum × processes = {config.grad_accum * world}")
    total_steps = config.max_steps if config.max_steps > 0 else max(1, math.ceil(config.epochs * steps_per_epoch))
    common.seed_everything(config.seed)
    model = load_model(config.model, from_scratch=config.from_scratch)
    if config.disable_dropout:
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    if config.lora:
        model = apply_lora(model, config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_target_modules)
    reference = attach_reference(model, train_pairs + eval_pairs, config, pad_id, accelerator, out)
    model.train()  # from_pretrained and the reference pass leave it in eval mode
    optimizer = common.make_optimizer(model, config.lr, config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, common.lr_lambda(config.schedule, int(config.warmup_ratio * total_steps), total_steps)
    )
    scorer, optimizer = accelerator.prepare(SequenceLogProbs(model), optimizer)
    eval_batches = make_batches(eval_pairs, config.batch_size, pad_id, 0, 0, shuffle=False) if eval_pairs else []

    step, cursor = 0, 0  # cursor = micro-batches consumed, over all epochs and processes
    if resume_from is not None:
        state = common.load_checkpoint(resume_from, model, optimizer, scheduler)
        step, cursor = state["step"], state["cursor"]
    is_main = accelerator.is_main_process
    log = common.open_run(out, config, accelerator, step if resume_from else None)
    if is_main:
        print(f"dpo: {summary}; {len(train_pairs)} train / {len(eval_pairs)} eval; {config.loss_type} loss, beta {config.beta}; "
              f"reference log-probs {reference}; {total_steps} steps of {config.grad_accum * world} micro-batches of {config.batch_size} pairs")

    micro_batch = common.EpochBatches(lambda epoch: make_batches(train_pairs, config.batch_size, pad_id, config.seed, epoch),
                                      steps_per_epoch * config.grad_accum * world)

    speed, pairs_seen, start = common.Throughput(), 0, time.perf_counter()
    bar = common.progress(total_steps, step, "dpo", enabled=is_main)
    while step < total_steps:
        mine = [cursor + i * world + accelerator.process_index for i in range(config.grad_accum)]
        batches = [{k: v.to(accelerator.device) for k, v in micro_batch(i).items()} for i in mine]
        cursor += config.grad_accum * world
        local = torch.tensor([sum(len(b["ref_logps"]) / 2 for b in batches), sum(float(b["num_tokens"]) for b in batches),
                              sum(float((shift_targets(b["labels"]) != IGNORE).sum()) for b in batches)])
        step_pairs, input_tokens, trained_tokens = accelerator.reduce(local.to(accelerator.device), "sum").unbind()
        totals = torch.zeros(len(METRICS), device=accelerator.device)
        for i, batch in enumerate(batches):
            sync = contextlib.nullcontext() if i == len(batches) - 1 else accelerator.no_sync(scorer)
            with sync:
                logps, counts = scorer(batch["input_ids"], batch["attention_mask"], batch["labels"])  # (2B,), (2B,)
                losses, stats = pair_terms(logps, counts, batch["ref_logps"], config)
                # DDP averages gradients over processes, so scale by world / global pair count.
                accelerator.backward(losses.sum() * world / step_pairs)
            totals += stats
        values = dict(zip(METRICS, (accelerator.reduce(totals, "sum") / step_pairs).tolist()))
        if not math.isfinite(values["loss"]):
            kept = common.checkpoints(out)
            where = kept[-1] if kept else "none was written yet"
            raise TuneoffError(f"loss became {values['loss']} at step {step + 1}; stopped. Last good checkpoint: {where}")
        grad_norm = accelerator.clip_grad_norm_(scorer.parameters(), config.max_grad_norm) if config.max_grad_norm > 0 else torch.tensor(0.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        pairs_seen += int(step_pairs.item())
        rate, trained_rate = speed.add(int(input_tokens.item()), int(trained_tokens.item()))
        pair_rate = pairs_seen / max(1e-9, time.perf_counter() - start)
        bar.update(1)
        bar.set_postfix(loss=f"{values['loss']:.3f}", acc=f"{values['rewards/accuracies']:.2f}", pairs_s=f"{pair_rate:,.1f}", refresh=False)
        if step % config.log_every == 0 or step == total_steps:
            log.log(step, {"train/loss": values.pop("loss"), **values, "train/lr": scheduler.get_last_lr()[0],
                           "train/grad_norm": float(grad_norm), "train/pairs_per_s": pair_rate, "train/tokens_per_s": rate,
                           "train/trained_tokens_per_s": trained_rate,
                           "train/epoch": cursor / (steps_per_epoch * config.grad_accum * world)})
        if eval_batches and (step % config.eval_every == 0 or step == total_steps):
            metrics = evaluate(scorer, eval_batches, accelerator, config)
            log.log(step, metrics)
            if is_main:
                bar.write(f"step {step}: eval loss {metrics['eval/loss']:.4f}, reward accuracy {metrics['eval/rewards/accuracies']:.3f}, "
                          f"margin {metrics['eval/rewards/margins']:.4f}")
        if step % config.save_every == 0 or step == total_steps:
            accelerator.wait_for_everyone()
            if is_main:
                common.save_checkpoint(out, step, model, tokenizer, optimizer, scheduler, {"cursor": cursor}, config.keep_checkpoints)
    bar.close()
    accelerator.wait_for_everyone()
    final = out / "model"
    if is_main:
        final = common.save_final_model(out, model, tokenizer)
        print(f"dpo: model saved to {final}")
    log.close()
    accelerator.end_training()
    return final
