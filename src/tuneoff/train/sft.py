"""Supervised fine-tuning (and pretraining on ``{"text"}`` records) on the shared loop (``train/loop.py``).

The loss of an optimizer step is the mean NLL over *all* trainable tokens of the step, across micro-batches and
processes (token-weighted, so gradient accumulation and data parallelism give the loss one big batch would give).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from tuneoff.config import SFTConfig
from tuneoff.data.tokenize import pack, packed_batch, pad_batch, tokenize_dataset
from tuneoff.errors import TuneoffError
from tuneoff.losses import IGNORE, sft_loss_sum, shift_targets
from tuneoff.train import loop
from tuneoff.train.metrics import EVAL_LOSS, EVAL_PERPLEXITY, LOSS, TOKENS_PER_S, TRAINED_TOKENS_PER_S


class TokenLoss(torch.nn.Module):
    """Wraps a causal LM so that forward returns the summed NLL of the trainable tokens and their count.

    The LM head (B·T·V multiply-adds, the largest matmul of a small model) runs only on positions with a
    target. Being the module that DDP wraps, its forward keeps gradient synchronisation intact.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, labels, attention_mask=None, position_ids=None, num_tokens=None):
        decoder, head = self.model.get_decoder(), self.model.get_output_embeddings()
        hidden = decoder(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state  # (B, T, H)
        targets = shift_targets(labels)  # (B, T)
        keep = (targets != IGNORE).view(-1).nonzero().squeeze(-1)  # (N,) flat positions with a target
        # index_select, not a boolean mask: its backward (index_add) is many times faster on a CPU than index_put
        logits = head(hidden.reshape(-1, hidden.shape[-1]).index_select(0, keep))  # (N, V)
        return sft_loss_sum(logits, targets.view(-1)[keep]), keep.new_tensor(len(keep))


def load_examples(path: str, tokenizer, config: SFTConfig):
    from tuneoff.data.formats import load_sft

    return tokenize_dataset(load_sft(path), tokenizer, config.max_length, config.overlong, config.completion_only_loss)


def split(examples: list, fraction: float, seed: int):
    """Hold out about ``fraction`` of the examples in a seeded order."""
    if fraction <= 0:
        return examples, []
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    n_eval = max(1, int(round(len(examples) * fraction)))
    if n_eval >= len(examples):
        raise TuneoffError(f"eval_fraction {fraction} leaves no training example out of {len(examples)}")
    return [examples[i] for i in order[n_eval:]], [examples[i] for i in order[:n_eval]]


def make_batches(
    examples: list,
    batch_size: int,
    max_length: int,
    packing: bool,
    pad_id: int,
    seed: int,
    epoch: int,
    shuffle: bool = True,
) -> list[dict]:
    """Micro-batches of one epoch, in a seeded order (the same on every process and after a resume)."""
    units = pack(examples, max_length) if packing else [[e] for e in examples]
    if shuffle:
        order = torch.randperm(len(units), generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
        units = [units[i] for i in order]
    chunks = [units[i : i + batch_size] for i in range(0, len(units), batch_size)]
    if packing:
        return [packed_batch(chunk, pad_id) for chunk in chunks]
    return [pad_batch([row[0] for row in chunk], pad_id) for chunk in chunks]


def trained_tokens(batch: dict) -> torch.Tensor:
    return (shift_targets(batch["labels"]) != IGNORE).sum().float()


def evaluate(loss_model, batches: list[dict], accelerator) -> dict:
    """Token-weighted eval loss and perplexity over every process's share of the batches."""

    def terms(batch):
        loss_sum, count = loss_model(**batch)
        return torch.stack([loss_sum.float(), count.float()])

    total = loop.summed_over_processes(loss_model, batches, accelerator, terms, 2)
    loss = (total[0] / total[1].clamp(min=1)).item()
    return {EVAL_LOSS: loss, EVAL_PERPLEXITY: math.exp(min(loss, 50.0))}


def setup(config: SFTConfig, accelerator, out: Path) -> loop.Run:
    from tuneoff.models.load import load_tokenizer

    tokenizer = load_tokenizer(config.model)
    train_examples, report = load_examples(config.data, tokenizer, config)
    train_examples, eval_examples = loop.held_out(
        config,
        train_examples,
        lambda path: load_examples(path, tokenizer, config)[0],
        lambda examples: split(examples, config.eval_fraction, config.seed),
    )
    model = loop.trainable_model(config)
    layout = (config.batch_size, config.max_length, config.packing, tokenizer.pad_token_id, config.seed)
    batches = loop.MicroBatches(
        lambda epoch: make_batches(train_examples, *layout, epoch),
        len(make_batches(train_examples, *layout, 0, shuffle=False)),
        config,
        accelerator,
    )
    eval_batches = make_batches(eval_examples, *layout, 0, shuffle=False) if eval_examples else []
    total = loop.total_steps(config, batches.steps_per_epoch)
    model.train()  # from_pretrained leaves it in eval mode: dropout as its config says, as in TRL

    def step(context: loop.Context) -> dict:
        def loss(batch):
            loss_sum, _ = context.modules[0](**batch)
            return loss_sum, loss_sum.detach()[None]

        counts = lambda batch: torch.stack([trained_tokens(batch), batch["num_tokens"].float()])  # noqa: E731
        return batches.step(context, loss, counts, (LOSS,), (TRAINED_TOKENS_PER_S, TOKENS_PER_S))

    micro = config.grad_accum * accelerator.num_processes
    return loop.Run(
        "sft",
        model,
        tokenizer,
        [TokenLoss(model)],
        total,
        step,
        evaluate=(lambda context: evaluate(context.modules[0], eval_batches, accelerator)) if eval_batches else None,
        describe=f"{report.summary()}; {len(train_examples)} train / {len(eval_examples)} eval; "
        f"{total} steps of {micro} micro-batches of {config.batch_size}",
        state=batches.state,
        restore=batches.restore,
        postfix={"loss": LOSS, "tok_s": TOKENS_PER_S},
    )


def train(config: SFTConfig) -> Path:
    """Run SFT as configured; returns the folder of the final model."""
    return loop.run(config, setup, "no training data: pass --data FILE")
