"""The one training loop every method runs: a method fills in a :class:`Run`, :func:`run` does the rest.

What the skeleton owns, in order: check the output folder and the data argument, the accelerator and the seed,
the method's own set-up (data, models: everything that can fail on the user's input, before a byte is written),
AdamW and the learning-rate schedule over every trained module, ``accelerator.prepare``, resume from the last
checkpoint, then per step: the method's ``step`` (one optimizer step, or one RL iteration with its updates),
the NaN and KL stops, logging to metrics.jsonl and TensorBoard, evaluation, checkpoints; at the end the final
model. What a method owns: its batches, its loss, its metrics (torchtune's recipe skeleton without a class
hierarchy). The offline methods (SFT, RM, DPO, KTO) share :class:`MicroBatches` and :func:`optimizer_step`:
gradient accumulation and data parallelism with a loss weighted by the step's global token or pair count.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tuneoff.errors import TuneoffError
from tuneoff.train import common
from tuneoff.train.metrics import EPOCH, GRAD_NORM, LR


@dataclass
class Context:
    """What a step sees: the prepared modules (DDP-wrapped under several processes), optimizer, schedule."""

    config: object
    accelerator: object
    modules: list
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    out: Path
    step: int = 0
    """Steps completed before this one."""

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def device(self):
        return self.accelerator.device


@dataclass
class Run:
    """A method's part of a run, built by its ``setup(config, accelerator, out)``."""

    name: str
    model: torch.nn.Module
    """Saved in every checkpoint and, at the end, as ``out/model`` (unwrapped: the LM or the reward model)."""
    tokenizer: object
    modules: list
    """The modules that train, in this order: accelerate prepares each; AdamW holds all their parameters."""
    total_steps: int
    step: Callable[[Context], dict]
    """One loop step -> its metrics (logged every log_every steps)."""
    updates_per_step: int = 1
    """Optimizer steps per loop step (the length of the learning-rate schedule is total_steps × this)."""
    evaluate: Callable[[Context], dict] | None = None
    """Held-out metrics, every eval_every steps and at the end."""
    describe: str = ""
    """One line printed when the loop starts."""
    state: Callable[[], dict] = dict
    """More entries of a checkpoint's state.json (a data cursor, the KL coefficient)."""
    restore: Callable[[dict, Path], None] = lambda state, folder: None
    """Undo ``state`` and ``tensors`` from a checkpoint's state.json and folder."""
    tensors: Callable[[], dict] = dict
    """More state dicts saved beside the model in a checkpoint, each as NAME.safetensors (a critic)."""
    weights: torch.nn.Module | None = None
    """The module a checkpoint's model weights load into, when not ``model`` (the reward model's LM)."""
    finite: tuple = ()
    """Metrics that stop the run when they are not finite (offline losses are checked before their update)."""
    kl: str = ""
    """The metric held to ``config.kl_stop`` (online RL)."""
    postfix: dict = field(default_factory=dict)
    """Progress-bar label -> metric."""
    save: Callable[[Path], Path] | None = None
    """Writes the final model into the run folder and returns its folder (default: ``out/model``, LoRA merged)."""


def run(config, setup: Callable, missing_data: str) -> Path:
    """Train with the method whose ``setup(config, accelerator, out) -> Run`` is given; returns the final model."""
    out, resume_from = common.begin(config, missing_data)
    accelerator = common.make_accelerator(config)
    common.seed_everything(config.seed)
    method: Run = setup(config, accelerator, out)
    optimizer = common.make_optimizer(torch.nn.ModuleList(method.modules), config.lr, config.weight_decay)
    schedule_steps = method.total_steps * method.updates_per_step
    warmup = int(config.warmup_ratio * schedule_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, common.lr_lambda(config.schedule, warmup, schedule_steps))
    *modules, optimizer = accelerator.prepare(*method.modules, optimizer)

    step = 0
    if resume_from is not None:
        state = common.load_checkpoint(resume_from, method.weights or method.model, optimizer, scheduler)
        method.restore(state, resume_from)
        step = state["step"]
    is_main = accelerator.is_main_process
    log = common.open_run(out, config, accelerator, step if resume_from else None)
    if is_main and method.describe:
        print(f"{method.name}: {method.describe}")
    context = Context(config, accelerator, modules, optimizer, scheduler, out)
    bar = common.progress(method.total_steps, step, method.name, enabled=is_main)
    while step < method.total_steps:
        context.step = step
        metrics = method.step(context)
        step += 1
        for name in method.finite:
            check_finite(name, metrics[name], step, out)
        if step % config.log_every == 0 or step == method.total_steps:
            log.log(step, metrics)
        bar.update(1)
        bar.set_postfix({label: f"{metrics[key]:,.3g}" for label, key in method.postfix.items()}, refresh=False)
        if method.kl and metrics[method.kl] > config.kl_stop:
            raise TuneoffError(
                f"KL(π‖π_ref) reached {metrics[method.kl]:.1f} nats at iteration {step}, above kl_stop "
                f"{config.kl_stop}; stopped. Last good checkpoint: {last_checkpoint(out)}"
            )
        if method.evaluate is not None and (step % config.eval_every == 0 or step == method.total_steps):
            held_out = method.evaluate(context)
            log.log(step, held_out)
            if is_main:
                bar.write(
                    f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in held_out.items() if isinstance(v, float))
                )
        if step % config.save_every == 0 or step == method.total_steps:
            accelerator.wait_for_everyone()
            if is_main:
                common.save_checkpoint(
                    out,
                    step,
                    method.model,
                    method.tokenizer,
                    optimizer,
                    scheduler,
                    method.state(),
                    config.keep_checkpoints,
                    extra=method.tensors(),
                )
    bar.close()
    accelerator.wait_for_everyone()
    final = out / "model"
    if is_main:
        final = method.save(out) if method.save else common.save_final_model(out, method.model, method.tokenizer)
        print(f"{method.name}: model saved to {final}")
    log.close()
    accelerator.end_training()
    return final


def last_checkpoint(out: Path) -> str:
    kept = common.checkpoints(out)
    return str(kept[-1]) if kept else "none was written yet"


def check_finite(name: str, value: float, step: int, out: Path) -> None:
    if not math.isfinite(value):
        raise TuneoffError(
            f"{name} became {value} at step {step}; stopped. Last good checkpoint: {last_checkpoint(out)}"
        )


def total_steps(config, steps_per_epoch: float) -> int:
    """max_steps, or `epochs` passes of ``steps_per_epoch`` steps."""
    return config.max_steps if config.max_steps > 0 else max(1, math.ceil(config.epochs * steps_per_epoch))


# ---------------------------------------------------------------- offline methods: micro-batches and one update


class MicroBatches:
    """This process's micro-batches of each step, over epochs and processes, resumable by a cursor.

    ``make(epoch)`` builds one epoch's micro-batches in a seeded order (the same on every process and after a
    resume); a step takes grad_accum × processes of them, process k the k-th of every group of processes."""

    def __init__(self, make: Callable[[int], list], count: int, config, accelerator):
        self.config, self.accelerator, self.world = config, accelerator, accelerator.num_processes
        self.steps_per_epoch = count // (config.grad_accum * self.world)
        if self.steps_per_epoch < 1:
            raise TuneoffError(
                f"{count} micro-batches are fewer than grad_accum × processes = {config.grad_accum * self.world}"
            )
        self.per_epoch = self.steps_per_epoch * config.grad_accum * self.world
        self.batches = common.EpochBatches(make, self.per_epoch)
        self.cursor = 0
        """Micro-batches consumed, over all epochs and processes."""
        self.rates: Rates | None = None
        """Counters per second since the first step began (set-up, the reference pass, a resume excluded)."""

    def next(self) -> list[dict]:
        mine = [self.cursor + i * self.world + self.accelerator.process_index for i in range(self.config.grad_accum)]
        self.cursor += self.config.grad_accum * self.world
        return [{k: v.to(self.accelerator.device) for k, v in self.batches(i).items()} for i in mine]

    @property
    def epoch(self) -> float:
        return self.cursor / self.per_epoch

    def step(
        self, context: Context, loss: Callable, counts: Callable, names: tuple, per_second: tuple, before=None
    ) -> dict:
        """:func:`optimizer_step` over the next micro-batches (seen first by ``before(batches)``, when given: a
        statistic of the whole step); its global counters as rates named ``per_second`` (one name per entry of
        ``counts(batch)``) and the epoch reached, under the metric names."""
        self.rates = self.rates or Rates()
        micro_batches = self.next()
        if before is not None:
            before(micro_batches)
        metrics = optimizer_step(context, micro_batches, loss, counts, names)
        speed = self.rates.add(**dict(zip(per_second, metrics.pop("counts").tolist())))
        return {**metrics, **speed, EPOCH: self.epoch}

    def state(self) -> dict:
        return {"cursor": self.cursor}

    def restore(self, state: dict, folder: Path) -> None:
        self.cursor = state["cursor"]


def optimizer_step(context: Context, batches: list[dict], loss: Callable, counts: Callable, names: tuple) -> dict:
    """One optimizer step over this process's micro-batches, weighted as one big batch would be.

    ``loss(batch) -> (summed loss, (len(names),) summed statistics)``, the loss summed over the batch's units
    (trained tokens, pairs, examples); ``counts(batch) -> (K,)`` with the batch's units first and any other
    counters after. Each micro-batch's backward is scaled by world / the step's global unit count (DDP averages
    gradients over processes), so grad_accum = 2 on one process and 2 processes give the same step. Returns the
    statistics divided by the global unit count under ``names`` (the first must be the loss), the grad norm, the
    learning rate and the global counters under ``"counts"``. A non-finite loss stops before the update.
    """
    accelerator, module = context.accelerator, context.modules[0]
    global_counts = accelerator.reduce(torch.stack([counts(b) for b in batches]).sum(0).to(context.device), "sum")
    units = global_counts[0].clamp(min=1)
    totals = torch.zeros(len(names), device=context.device)
    for i, batch in enumerate(batches):
        sync = contextlib.nullcontext() if i == len(batches) - 1 else accelerator.no_sync(module)
        with sync:
            loss_sum, stats = loss(batch)
            accelerator.backward(loss_sum * context.world / units)
        totals += stats
    values = dict(zip(names, (accelerator.reduce(totals, "sum") / units).tolist()))
    check_finite(names[0], values[names[0]], context.step + 1, context.out)
    parameters = [p for m in context.modules for p in m.parameters()]
    max_norm = context.config.max_grad_norm
    grad_norm = accelerator.clip_grad_norm_(parameters, max_norm) if max_norm > 0 else torch.tensor(0.0)
    context.optimizer.step()
    context.scheduler.step()
    context.optimizer.zero_grad(set_to_none=True)
    return {**values, GRAD_NORM: float(grad_norm), LR: context.scheduler.get_last_lr()[0], "counts": global_counts}


class Rates:
    """Named counters per second since the loop started (tokens, pairs, episodes)."""

    def __init__(self):
        self.start, self.totals = time.perf_counter(), {}

    def add(self, **counts: float) -> dict:
        elapsed = max(1e-9, time.perf_counter() - self.start)
        for name, value in counts.items():
            self.totals[name] = self.totals.get(name, 0) + value
        return {name: total / elapsed for name, total in self.totals.items()}


def trainable_model(config) -> torch.nn.Module:
    """The LM an offline method trains: loaded (or initialised, ``from_scratch``), LoRA adapters on it where
    asked, and every dropout off where the config says so, the adapters' own included (as TRL's
    ``disable_dropout``: the chosen and rejected passes, or π and π_ref, must be the same function)."""
    from tuneoff.models.heads import disable_dropout
    from tuneoff.models.load import apply_lora, load_model

    model = load_model(config.model, from_scratch=config.from_scratch)
    if config.lora:
        model = apply_lora(model, config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_target_modules)
    if getattr(config, "disable_dropout", False):
        disable_dropout(model)
    return model


def held_out(config, train: list, load: Callable, split: Callable) -> tuple[list, list]:
    """(training, held-out) examples: ``load(config.eval_data)`` when it is given, else ``split(train)``."""
    return (train, load(config.eval_data)) if config.eval_data else split(train)


@torch.inference_mode()
def summed_over_processes(module, batches: list[dict], accelerator, terms: Callable, width: int) -> torch.Tensor:
    """Σ terms(batch) -> (width,) over this process's share of ``batches`` (moved to its device), summed across
    processes; ``module`` in eval mode meanwhile. ``terms`` must not communicate: the shares may be unequal."""
    module.eval()
    total = torch.zeros(width, device=accelerator.device)
    for batch in batches[accelerator.process_index :: accelerator.num_processes]:
        total += terms({k: v.to(accelerator.device) for k, v in batch.items()}).float()
    module.train()
    return accelerator.reduce(total, "sum")
