"""KTO (Ethayarajh et al. 2024, arXiv:2402.01306) on unpaired data, on the shared loop (``train/loop.py``).

Each example is a prompt x, a completion y and a label: desirable or undesirable. With r_θ = log π(y|x) −
log π_ref(y|x), the loss is λ_D(1 − σ(β(r_θ − z_0))) for a desirable example and λ_U(1 − σ(β(z_0 − r_θ)))
for an undesirable one (``tuneoff.losses.kto_loss``). The reference point z_0 = KL(π‖π_ref) is estimated on the
micro-batch's mismatched pairs (each prompt with the next example's completion, as TRL), without a gradient and
all-reduced across processes. π_ref is a frozen copy of the starting model (with LoRA: the base with its
adapters off). Preference pairs are accepted too, unpaired as TRL's ``unpair_preference_dataset`` does. A
step's loss is the mean over its examples across micro-batches and processes. Metrics are named as TRL's.
"""

from __future__ import annotations

import contextlib
import copy
import math
from pathlib import Path

import torch

from tuneoff.config import KTOConfig
from tuneoff.data.pairs import split_by_prompt
from tuneoff.data.tokenize import IGNORE, Tokenized, pad_batch
from tuneoff.errors import DataError, TuneoffError
from tuneoff.losses import kto_kl_from_sum, kto_kl_sum, kto_loss
from tuneoff.train import loop
from tuneoff.train import metrics as names
from tuneoff.train.dpo import SequenceLogProbs

SUMS = (
    "loss",
    "desirable",
    "undesirable",
    "rewards_desirable",
    "rewards_undesirable",
    "logps_desirable",
    "logps_undesirable",
    "kl",
)
"""What a micro-batch sums (the kl: z_0 times the micro-batch's examples)."""


def load_examples(path: str):
    """Unpaired records, or preference pairs unpaired (chosen desirable, rejected undesirable)."""
    from tuneoff.data.formats import UnpairedExample, load_preferences, load_unpaired

    try:
        return load_unpaired(path)
    except DataError as unpaired_error:
        try:
            pairs = load_preferences(path)
        except DataError:
            raise unpaired_error from None
    return [
        UnpairedExample(p.prompt, response, label, p.where)
        for p in pairs
        for response, label in ((p.chosen, True), (p.rejected, False))
    ]


def make_batches(examples: list, config: KTOConfig, pad_id: int, epoch: int, shuffle: bool = True) -> list[dict]:
    """Micro-batches of B examples in a seeded order: the B rows (prompt + completion), then the B mismatched rows
    (prompt i + completion i + 1, cut to max_length), right-padded into one (2B, T) forward."""
    generator = torch.Generator().manual_seed(config.seed * 1000 + epoch)
    order = torch.randperm(len(examples), generator=generator).tolist() if shuffle else list(range(len(examples)))
    batches = []
    for start in range(0, len(order), config.batch_size):
        chunk = [examples[i] for i in order[start : start + config.batch_size]]
        mismatched = [(e.prompt, chunk[(i + 1) % len(chunk)].completion) for i, e in enumerate(chunk)]
        rows = [
            Tokenized(p + c[: config.max_length - len(p)], [IGNORE] * len(p) + c[: config.max_length - len(p)])
            for p, c in [(e.prompt, e.completion) for e in chunk] + mismatched
        ]
        batch = pad_batch(rows, pad_id)  # (2B, T)
        batch["label"] = torch.tensor([e.label for e in chunk])  # (B,)
        batches.append(batch)
    return batches


def batch_terms(scorer, reference, batch: dict, config: KTOConfig, accelerator) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed loss (with its gradient) and the sums of SUMS (8,) of one micro-batch."""
    B = len(batch["label"])
    inputs = (batch["input_ids"], batch["attention_mask"], batch["labels"])
    with torch.no_grad():
        ref_logps, _ = reference(*inputs)  # (2B,)
        policy_kl_logps, _ = scorer(*(t[B:] for t in inputs))  # (B,) the mismatched rows, no gradient
    z0 = kto_kl_from_sum(accelerator.reduce(kto_kl_sum(policy_kl_logps, ref_logps[B:]), "sum"))
    logps, _ = scorer(*(t[:B] for t in inputs))  # (B,)
    losses, rewards = kto_loss(
        logps, ref_logps[:B], batch["label"], z0, config.beta, config.desirable_weight, config.undesirable_weight
    )
    good, bad = batch["label"].float(), (~batch["label"]).float()
    logps = logps.detach()
    stats = torch.stack(
        [
            losses.detach().sum(),
            good.sum(),
            bad.sum(),
            (rewards * good).sum(),
            (rewards * bad).sum(),
            (logps * good).sum(),
            (logps * bad).sum(),
            z0 * B,
        ]
    )
    return losses.sum(), stats


def named(sums: dict) -> dict:
    """Means per example (SUMS divided by the example count) -> TRL's metric names; a side the step did not see
    is left out rather than logged as 0."""
    out = {names.KL: sums["kl"]}
    for side, count, reward, logp in (
        ("desirable", sums["desirable"], names.REWARDS_CHOSEN, names.LOGPS_CHOSEN),
        ("undesirable", sums["undesirable"], names.REWARDS_REJECTED, names.LOGPS_REJECTED),
    ):
        if count > 0:
            out[reward], out[logp] = sums[f"rewards_{side}"] / count, sums[f"logps_{side}"] / count
    if names.REWARDS_CHOSEN in out and names.REWARDS_REJECTED in out:
        out[names.REWARDS_MARGINS] = out[names.REWARDS_CHOSEN] - out[names.REWARDS_REJECTED]
    return out


@torch.no_grad()
def evaluate(scorer, reference, batches: list[dict], config: KTOConfig, accelerator) -> dict:
    scorer.eval()
    totals = torch.zeros(len(SUMS) + 1, device=accelerator.device)
    for batch in batches[accelerator.process_index :: accelerator.num_processes]:
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        _, stats = batch_terms(scorer, reference, batch, config, accelerator)
        totals += torch.cat([stats, stats.new_tensor([len(batch["label"])])])
    scorer.train()
    totals = accelerator.reduce(totals, "sum")
    sums = dict(zip(SUMS, (totals[:-1] / totals[-1].clamp(min=1)).tolist()))
    return {f"eval/{k}": v for k, v in {"loss": sums["loss"], **named(sums)}.items()}


def setup(config: KTOConfig, accelerator, out: Path) -> loop.Run:
    from tuneoff.data.tokenize import tokenize_unpaired
    from tuneoff.models.heads import disable_dropout
    from tuneoff.models.load import apply_lora, load_model, load_tokenizer

    tokenizer = load_tokenizer(config.model)
    if config.ref_model and load_tokenizer(config.ref_model).get_vocab() != tokenizer.get_vocab():
        raise TuneoffError(f"ref_model {config.ref_model} has another tokenizer than model {config.model}")
    limits = (tokenizer, config.max_length, config.max_prompt_length, config.overlong)
    train_examples = tokenize_unpaired(load_examples(config.data), *limits)
    if config.eval_data:
        eval_examples = tokenize_unpaired(load_examples(config.eval_data), *limits)
    else:
        train_examples, eval_examples = split_by_prompt(
            train_examples, config.eval_fraction, config.seed, key=lambda e: tuple(e.prompt)
        )
    if len({e.label for e in train_examples}) < 2:
        raise TuneoffError(
            f"{config.data}: KTO needs desirable and undesirable examples; all are "
            f"{'desirable' if train_examples[0].label else 'undesirable'}"
        )
    pad_id = tokenizer.pad_token_id
    batches = loop.MicroBatches(
        lambda epoch: make_batches(train_examples, config, pad_id, epoch),
        math.ceil(len(train_examples) / config.batch_size),
        config,
        accelerator,
    )
    total = loop.total_steps(config, batches.steps_per_epoch)
    model = load_model(config.model, from_scratch=config.from_scratch)
    if config.disable_dropout:
        disable_dropout(model)
    frozen = load_model(config.ref_model) if config.ref_model else None if config.lora else copy.deepcopy(model)
    if config.lora:
        model = apply_lora(model, config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_target_modules)
    if frozen is not None:
        frozen.eval().requires_grad_(False).to(accelerator.device)
    policy_scorer = SequenceLogProbs(model)

    def reference(*inputs):
        if frozen is not None:
            return SequenceLogProbs(frozen)(*inputs)
        adapters_off = model.disable_adapter() if hasattr(model, "peft_config") else contextlib.nullcontext()
        with adapters_off:
            return policy_scorer(*inputs)

    eval_batches = make_batches(eval_examples, config, pad_id, 0, shuffle=False) if eval_examples else []
    model.train()
    rates = loop.Rates()

    def step(context: loop.Context) -> dict:
        def counts(batch):
            trained = float((batch["labels"][: len(batch["label"]), 1:] != IGNORE).sum())  # the matched rows' targets
            return torch.tensor([len(batch["label"]), float(batch["num_tokens"]), trained])

        def loss(batch):
            return batch_terms(context.modules[0], reference, batch, config, accelerator)

        metrics = loop.optimizer_step(context, batches.next(), loss, counts, (names.LOSS, *SUMS[1:]))
        examples, tokens, trained = metrics.pop("counts").tolist()
        speed = rates.add(examples=int(examples), tokens=int(tokens), trained=int(trained))
        sums = {k: metrics.pop(k) for k in SUMS[1:]}
        return {
            **metrics,
            **named(sums),
            names.EXAMPLES_PER_S: speed["examples"],
            names.TOKENS_PER_S: speed["tokens"],
            names.TRAINED_TOKENS_PER_S: speed["trained"],
            names.EPOCH: batches.epoch,
        }

    n_good = sum(e.label for e in train_examples)
    return loop.Run(
        "kto",
        model,
        tokenizer,
        [policy_scorer],
        total,
        step,
        evaluate=(lambda context: evaluate(context.modules[0], reference, eval_batches, config, accelerator))
        if eval_batches
        else None,
        describe=f"{len(train_examples)} train ({n_good} desirable) / {len(eval_examples)} eval; beta {config.beta}; "
        f"{total} steps of {config.grad_accum * accelerator.num_processes} micro-batches of "
        f"{config.batch_size} examples",
        state=batches.state,
        restore=batches.restore,
        postfix={"loss": names.LOSS, "kl": names.KL, "ex_s": names.EXAMPLES_PER_S},
    )


def train(config: KTOConfig) -> Path:
    """Run KTO as configured; returns the folder of the final model."""
    return loop.run(config, setup, "no training data: pass --data FILE")
