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
from tuneoff.data.pairs import TokenizedPair, make_batches, split_by_prompt, tokenize_pairs
from tuneoff.errors import TuneoffError
from tuneoff.losses import (
    DPO_LOSSES,
    IGNORE,
    MEAN_LOGPS,
    implicit_rewards,
    selected_logprobs,
    shift_targets,
    sum_by_row,
)
from tuneoff.train import loop
from tuneoff.train import metrics as names

METRICS = (
    "loss",
    names.REWARDS_CHOSEN,
    names.REWARDS_REJECTED,
    names.REWARDS_ACCURACIES,
    names.REWARDS_MARGINS,
    names.LOGPS_CHOSEN,
    names.LOGPS_REJECTED,
)
"""What pair_terms sums; logged as TRL names them (the loss as train/loss; held out with an eval/ prefix)."""


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
        hidden = decoder(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        ).last_hidden_state  # (2B, T, H)
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
    losses = DPO_LOSSES[config.loss_type](
        pi_chosen, pi_rejected, ref_chosen, ref_rejected, config.beta, config.label_smoothing
    )
    reward_chosen = implicit_rewards(pi_chosen.detach(), ref_chosen, config.beta)  # (B,)
    reward_rejected = implicit_rewards(pi_rejected.detach(), ref_rejected, config.beta)
    stats = torch.stack(
        [
            losses.detach().sum(),
            reward_chosen.sum(),
            reward_rejected.sum(),
            (reward_chosen > reward_rejected).float().sum(),
            (reward_chosen - reward_rejected).sum(),
            pi_chosen.detach().sum(),
            pi_rejected.detach().sum(),
        ]
    )
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
    order = sorted(
        range(len(pairs)), key=lambda i: len(pairs[i].prompt) + max(len(pairs[i].chosen), len(pairs[i].rejected))
    )
    batches = make_batches([pairs[i] for i in order], config.ref_batch_size, pad_id, 0, 0, shuffle=False)
    rows = []
    for index in range(accelerator.process_index, len(batches), accelerator.num_processes):
        logps, _ = scorer(
            *(batches[index][k].to(accelerator.device) for k in ("input_ids", "attention_mask", "labels"))
        )
        chosen, rejected = logps.cpu().chunk(2)
        rows += [
            (order[index * config.ref_batch_size + i], c, r)
            for i, (c, r) in enumerate(zip(chosen.tolist(), rejected.tolist()))
        ]
    rows = gather_object(rows) if accelerator.num_processes > 1 else rows
    return torch.tensor([[c, r] for _, c, r in sorted(rows)], dtype=torch.float32)  # (N, 2)


def attach_reference(model, pairs: list[TokenizedPair], config: DPOConfig, pad_id: int, accelerator, out: Path) -> str:
    """Fill ``ref_chosen``/``ref_rejected`` of every pair from the run folder's cache, or compute and cache them."""
    from safetensors.torch import load_file, save_file

    from tuneoff.models.load import load_model

    ref_name = config.ref_model or config.model
    identity = weights_identity(
        ref_name, not config.ref_model and (config.from_scratch or ref_name == "tiny"), config.seed
    )
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode())
    for p in pairs:
        digest.update(json.dumps([p.prompt, p.chosen, p.rejected]).encode())
    path = out / f"reference-logps-{digest.hexdigest()[:16]}.safetensors"
    if path.exists():
        values, how = (
            torch.stack([load_file(path)[k] for k in ("chosen", "rejected")], 1),
            f"reused from {path.name}",
        )  # (N, 2)
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
            save_file(
                {"chosen": values[:, 0].contiguous(), "rejected": values[:, 1].contiguous()},
                staging,
                metadata={"reference": ref_name},
            )
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


def setup(config: DPOConfig, accelerator, out: Path) -> loop.Run:
    from tuneoff.models.heads import disable_dropout
    from tuneoff.models.load import apply_lora, load_model, load_tokenizer

    tokenizer = load_tokenizer(config.model)
    if config.ref_model and load_tokenizer(config.ref_model).get_vocab() != tokenizer.get_vocab():
        raise TuneoffError(
            f"ref_model {config.ref_model} has another tokenizer than model {config.model}: DPO compares "
            "their log-probs token by token"
        )
    limits = dict(max_length=config.max_length, overlong=config.overlong, max_prompt_length=config.max_prompt_length)
    train_pairs, summary = tokenize_pairs(config.data, tokenizer, **limits)
    if config.eval_data:
        eval_pairs, _ = tokenize_pairs(config.eval_data, tokenizer, **limits)
    else:
        train_pairs, eval_pairs = split_by_prompt(train_pairs, config.eval_fraction, config.seed)
    pad_id = tokenizer.pad_token_id
    batches = loop.MicroBatches(
        lambda epoch: make_batches(train_pairs, config.batch_size, pad_id, config.seed, epoch),
        math.ceil(len(train_pairs) / config.batch_size),
        config,
        accelerator,
    )
    total = loop.total_steps(config, batches.steps_per_epoch)
    model = load_model(config.model, from_scratch=config.from_scratch)
    if config.disable_dropout:
        disable_dropout(model)
    if config.lora:
        model = apply_lora(model, config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_target_modules)
    reference = attach_reference(model, train_pairs + eval_pairs, config, pad_id, accelerator, out)
    model.train()  # from_pretrained and the reference pass leave it in eval mode
    eval_batches = make_batches(eval_pairs, config.batch_size, pad_id, 0, 0, shuffle=False) if eval_pairs else []
    rates = loop.Rates()

    def step(context: loop.Context) -> dict:
        def loss(batch):
            logps, counts = context.modules[0](batch["input_ids"], batch["attention_mask"], batch["labels"])  # (2B,)
            losses, stats = pair_terms(logps, counts, batch["ref_logps"], config)
            return losses.sum(), stats

        def counts(batch):
            trained = (shift_targets(batch["labels"]) != IGNORE).sum()
            return torch.tensor([len(batch["ref_logps"]) / 2, float(batch["num_tokens"]), float(trained)])

        metrics = loop.optimizer_step(context, batches.next(), loss, counts, (names.LOSS, *METRICS[1:]))
        pairs, tokens, trained = metrics.pop("counts").tolist()
        speed = rates.add(pairs=int(pairs), tokens=int(tokens), trained=int(trained))
        return {
            **metrics,
            names.PAIRS_PER_S: speed["pairs"],
            names.TOKENS_PER_S: speed["tokens"],
            names.TRAINED_TOKENS_PER_S: speed["trained"],
            names.EPOCH: batches.epoch,
        }

    micro = config.grad_accum * accelerator.num_processes
    return loop.Run(
        "dpo",
        model,
        tokenizer,
        [SequenceLogProbs(model)],
        total,
        step,
        evaluate=(lambda context: evaluate(context.modules[0], eval_batches, accelerator, config))
        if eval_batches
        else None,
        describe=f"{summary}; {len(train_pairs)} train / {len(eval_pairs)} eval; {config.loss_type} loss, beta "
        f"{config.beta}; reference log-probs {reference}; {total} steps of {micro} micro-batches of "
        f"{config.batch_size} pairs",
        state=batches.state,
        restore=batches.restore,
        postfix={"loss": names.LOSS, "acc": names.REWARDS_ACCURACIES, "pairs_s": names.PAIRS_PER_S},
    )


def train(config: DPOConfig) -> Path:
    """Run DPO (or IPO) as configured; returns the folder of the final model."""
    return loop.run(config, setup, "no training data: pass --data FILE")
