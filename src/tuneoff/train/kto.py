"""KTO (Ethayarajh et al. 2024, arXiv:2402.01306) on unpaired data, on the shared loop (``train/loop.py``).

Each example is a prompt x, a completion y and a label: desirable or undesirable. With r_θ = log π(y|x) −
log π_ref(y|x), the loss is λ_D(1 − σ(β(r_θ − z_0))) for a desirable example and λ_U(1 − σ(β(z_0 − r_θ)))
for an undesirable one (``tuneoff.losses.kto_loss``). The reference point z_0 = KL(π‖π_ref) is estimated on the
optimizer step's mismatched pairs (each prompt with the next example's completion in its micro-batch, as TRL),
without a gradient, over all the step's micro-batches and processes (held out: per micro-batch); TRL takes each
micro-batch alone, so there grad_accum changes z_0. π_ref is a frozen copy of the starting model (with LoRA: the
base with its adapters off). Preference pairs are accepted too, unpaired as TRL's ``unpair_preference_dataset``
does. A step's loss is the mean over its examples across micro-batches and processes. Metrics are named as TRL's.
"""

from __future__ import annotations

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
from tuneoff.train.reference import SequenceLogProbs, adapters_off, check_tokenizer

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


@torch.no_grad()
def reference_point(scorer, reference, batches: list[dict], reduce) -> torch.Tensor:
    """z_0 of one optimizer step: the KL estimate over the mismatched rows of all its micro-batches, summed
    across processes by ``reduce`` (so grad_accum = 2 on one process is two processes); each batch gains
    ``ref_logps`` (2B,), log π_ref of its rows."""
    total = torch.zeros(2, device=batches[0]["input_ids"].device)
    for batch in batches:
        B = len(batch["label"])
        inputs = (batch["input_ids"], batch["attention_mask"], batch["labels"])
        batch["ref_logps"], _ = reference(*inputs)  # (2B,)
        policy_kl_logps, _ = scorer(*(t[B:] for t in inputs))  # (B,) the mismatched rows
        total += kto_kl_sum(policy_kl_logps, batch["ref_logps"][B:])
    return kto_kl_from_sum(reduce(total))


def batch_terms(scorer, batch: dict, z0: torch.Tensor, config: KTOConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed loss (with its gradient) and the sums of SUMS (8,) of one micro-batch, given its step's z_0."""
    B = len(batch["label"])
    ref_logps = batch["ref_logps"]
    logps, _ = scorer(*(t[:B] for t in (batch["input_ids"], batch["attention_mask"], batch["labels"])))  # (B,)
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


def evaluate(scorer, reference, batches: list[dict], config: KTOConfig, accelerator) -> dict:
    """Held-out SUMS per example over every process's share; z_0 from each micro-batch alone."""

    def terms(batch):
        _, stats = batch_terms(scorer, batch, reference_point(scorer, reference, [batch], lambda kl: kl), config)
        return torch.cat([stats, stats.new_tensor([len(batch["label"])])])

    totals = loop.summed_over_processes(scorer, batches, accelerator, terms, len(SUMS) + 1)
    sums = dict(zip(SUMS, (totals[:-1] / totals[-1].clamp(min=1)).tolist()))
    return {f"eval/{k}": v for k, v in {"loss": sums["loss"], **named(sums)}.items()}


def setup(config: KTOConfig, accelerator, out: Path) -> loop.Run:
    from tuneoff.data.tokenize import tokenize_unpaired
    from tuneoff.models.load import load_model, load_tokenizer

    tokenizer = load_tokenizer(config.model)
    check_tokenizer(config, tokenizer)
    limits = (tokenizer, config.max_length, config.max_prompt_length, config.overlong)
    train_examples, eval_examples = loop.held_out(
        config,
        tokenize_unpaired(load_examples(config.data), *limits),
        lambda path: tokenize_unpaired(load_examples(path), *limits),
        lambda examples: split_by_prompt(examples, config.eval_fraction, config.seed, key=lambda e: tuple(e.prompt)),
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
    model = loop.trainable_model(config)
    # π_ref: ref_model, or with LoRA the base with its adapters off, or a frozen copy of the starting model
    frozen = load_model(config.ref_model) if config.ref_model else None if config.lora else copy.deepcopy(model)
    if frozen is not None:
        frozen.eval().requires_grad_(False).to(accelerator.device)
    policy_scorer = SequenceLogProbs(model)

    def reference(*inputs):  # under the policy's autocast precision, so that π = π_ref at step 0 under bf16 too
        with accelerator.autocast():
            if frozen is not None:
                return SequenceLogProbs(frozen)(*inputs)
            with adapters_off(model):
                return policy_scorer(*inputs)

    eval_batches = make_batches(eval_examples, config, pad_id, 0, shuffle=False) if eval_examples else []
    model.train()

    def step(context: loop.Context) -> dict:
        def counts(batch):
            trained = float((batch["labels"][: len(batch["label"]), 1:] != IGNORE).sum())  # the matched rows' targets
            return torch.tensor([len(batch["label"]), float(batch["num_tokens"]), trained])

        z0 = []

        def before(micro_batches):
            reduce = lambda kl: accelerator.reduce(kl, "sum")  # noqa: E731
            z0.append(reference_point(context.modules[0], reference, micro_batches, reduce))

        def loss(batch):
            return batch_terms(context.modules[0], batch, z0[0], config)

        rates = (names.EXAMPLES_PER_S, names.TOKENS_PER_S, names.TRAINED_TOKENS_PER_S)
        metrics = batches.step(context, loss, counts, (names.LOSS, *SUMS[1:]), rates, before)
        sums = {k: metrics.pop(k) for k in SUMS[1:]}
        return {**metrics, **named(sums)}

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
