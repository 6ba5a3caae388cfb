"""Reward-model training: Bradley–Terry loss on preference pairs, one loop under accelerate.

r(x, y) is a scalar head on the decoder's last real token (``tuneoff.models.heads``); the loss of a pair is
``-log σ(r(x, y_w) − r(x, y_l) − m)`` (Bradley & Terry 1952; Ouyang et al. 2022). A micro-batch's distinct
responses go through the model in one padding-free forward, each prompt once and each response once, however
many of the batch's pairs compare it (K responses per prompt with all C(K, 2) pairs labelled cost K sequences,
not K(K − 1)); pairs of one prompt sit next to each other in the order, so they share a micro-batch unless a
batch boundary cuts them. The loss of an optimizer step is the mean over all its pairs, across micro-batches
and processes (pair-weighted, so gradient accumulation and data parallelism give what one big batch would). Conventions as ``train/sft.py``:
checkpoints and ``--resume`` by data cursor, metrics.jsonl + TensorBoard, progress bar, NaN stop, LoRA.
Held-out evaluation (``tuneoff.eval.rm``): pairwise accuracy, ECE of σ(r_w − r_l), length-bias probe.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tuneoff.config import RMConfig
from tuneoff.data.default_task import is_default, pair_files
from tuneoff.data.pairs import split_by_prompt
from tuneoff.errors import DataError, TuneoffError
from tuneoff.losses import bradley_terry_loss
from tuneoff.train import common


@dataclass
class TokenizedPair:
    chosen: list[int]
    rejected: list[int]
    chosen_length: int
    """Response tokens of ``chosen`` (EOS excluded), for the length-bias probe."""
    rejected_length: int
    margin: float
    prompt: str
    """The prompt as text (conversations as JSON): pairs sharing it stay on one side of the held-out split."""


def read_margins(path: str, field: str, count: int) -> list[float]:
    """The numeric ``field`` of every record of ``path`` (one per pair, in file order)."""
    from tuneoff.data.formats import position_label, read_rows

    margins = []
    for number, row in read_rows(path):
        value = row.get(field)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise DataError(path, position_label(path, number), field, f"expected a finite number (the pair's margin), got {value!r}")
        margins.append(float(value))
    assert len(margins) == count, "read_rows and load_preferences disagree on the number of records"
    return margins


def tokenize_pairs(path: str, tokenizer, config: RMConfig) -> tuple[list[TokenizedPair], str]:
    """Validated preference pairs of ``path`` -> token ids, applying the over-long policy; and a summary line."""
    from tuneoff.data.formats import load_preferences
    from tuneoff.models.heads import encode_response, fit_left

    pairs = load_preferences(path)
    margins = read_margins(path, config.margin_field, len(pairs)) if config.margin_field else [0.0] * len(pairs)
    out, truncated, dropped = [], 0, []
    for pair, margin in zip(pairs, margins):
        (chosen, n_chosen), (rejected, n_rejected) = (encode_response(tokenizer, pair.prompt, r) for r in (pair.chosen, pair.rejected))
        longest = max(len(chosen), len(rejected))
        if longest > config.max_length:
            if config.overlong == "error":
                file, _, line = pair.where.rpartition(":")
                raise DataError(file or pair.where, line or None, None,
                                f"pair is {longest} tokens, over max_length {config.max_length} (set --overlong truncate or drop)")
            if config.overlong == "drop":
                dropped.append(f"{pair.where} ({longest} tokens)")
                continue
            chosen, rejected, truncated = fit_left(chosen, config.max_length), fit_left(rejected, config.max_length), truncated + 1
        prompt = pair.prompt if isinstance(pair.prompt, str) else json.dumps([[m.role, m.content] for m in pair.prompt])
        out.append(TokenizedPair(chosen, rejected, n_chosen, n_rejected, config.margin + margin, prompt))
    summary = f"{len(out)} pairs" + (f", {truncated} truncated to max_length" if truncated else "")
    summary += f", {len(dropped)} dropped as over-long (first: {dropped[0]})" if dropped else ""
    if not out:
        raise TuneoffError(f"{path}: no pair left to train on ({summary})")
    return out, summary


def make_batches(pairs: list[TokenizedPair], batch_size: int, pad_id: int, seed: int, epoch: int, shuffle: bool = True) -> list[dict]:
    """Micro-batches of B pairs for one epoch in a seeded order, the pairs of one prompt next to each other.

    The order is a seeded permutation of the pairs, then stably grouped by prompt (each prompt where its first
    pair fell), so data with one pair per prompt keeps the plain permutation; a batch boundary may still cut a
    prompt's pairs (K = 4, B = 32: about one prompt in eight). A response that several pairs of a batch
    compare (K responses of a prompt, all C(K, 2) pairs labelled) is scored once: a batch holds its U distinct
    sequences and, per pair, the index of its chosen and its rejected one."""
    from tuneoff.models.heads import pad_right

    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist() if shuffle else list(range(len(pairs)))
    first: dict[str, int] = {}
    for i in order:
        first.setdefault(pairs[i].prompt, len(first))
    ordered = [pairs[i] for i in sorted(order, key=lambda i: first[pairs[i].prompt])]  # sorted is stable
    batches = []
    for start in range(0, len(ordered), batch_size):
        chunk = ordered[start : start + batch_size]
        # Distinct sequences numbered chosen sides first, then rejected sides: with one pair per prompt, the B
        # chosen then the B rejected, the layout (and float summation order) of plain pairs.
        index: dict[tuple[int, ...], int] = {}  # distinct sequence -> its number in the batch
        # prompt -> its distinct sequences (a sequence two prompts share after truncation goes to the first)
        members: dict[str, list[int]] = {p.prompt: [] for p in chunk}
        for side in ("chosen", "rejected"):
            for p in chunk:
                tokens = tuple(getattr(p, side))
                if tokens not in index:
                    index[tokens] = len(index)
                    members[p.prompt].append(index[tokens])
        sequences = [list(t) for t in index]
        input_ids, attention_mask = pad_right(sequences, pad_id)  # (U, T)
        batches.append({"input_ids": input_ids, "attention_mask": attention_mask, **pack(sequences, [m for m in members.values() if m], pad_id),
                        "chosen_index": torch.tensor([index[tuple(p.chosen)] for p in chunk]),  # (B,)
                        "rejected_index": torch.tensor([index[tuple(p.rejected)] for p in chunk]),  # (B,)
                        "margin": torch.tensor([p.margin for p in chunk]),  # (B,)
                        "length": torch.tensor([p.chosen_length for p in chunk] + [p.rejected_length for p in chunk])})  # (2B,)
    return batches


def shared_prefix(a: list[int], b: list[int]) -> int:
    """Length of the common prefix of two token lists, leaving each at least its last token of its own."""
    limit = min(len(a), len(b)) - 1
    n = 0
    while n < limit and a[n] == b[n]:
        n += 1
    return n


def pack(sequences: list[list[int]], groups: list[list[int]] | None = None, pad_id: int = 0, width: int | None = None) -> dict:
    """The sequences laid into rows of ``width`` tokens, each group's shared prefix (its prompt) once, no padding.

    ``groups`` lists sequence numbers that share a prompt (each sequence in one group; default: each alone;
    a group of more than two whose members share no first token is laid out as singletons, so a run never
    grows past two sequences without a prefix to share). A group becomes one run of tokens: the prefix x its
    members share (each keeps at least its last token), then every member's tail in turn, positions restarting
    at len(x) for each tail; a tail attends to x and to itself, never to another member's tail. So every sequence sees exactly what it sees alone (the rewards equal
    the padded forward's, tested), and a prompt is encoded once instead of once per response. Groups go into
    rows of ``width`` tokens (default :func:`tuneoff.data.tokenize.row_width`) by SFT packing's first-fit bins:
    rows of bounded width rather than one long row, since attention costs the square of a row's length.

    Returns packed_ids and packed_positions (R, W), packed_mask (R, 1, W, W) (True: query may attend to key),
    token_index (N,) (where each token of the sequences sits in the flattened rows, sequence after sequence; a
    prefix position appears once for each member) and segments (N,) (its sequence, 0..len(sequences)-1)."""
    from tuneoff.data.tokenize import Tokenized, filler_id, row_width
    from tuneoff.data.tokenize import pack as first_fit

    given = [[i] for i in range(len(sequences))] if groups is None else groups
    assert sorted(i for g in given for i in g) == list(range(len(sequences))), "every sequence in exactly one group"
    groups, shared = [], []  # the groups laid out, and the prefix length each shares
    for g in given:
        s = min((shared_prefix(sequences[g[0]], sequences[m]) for m in g[1:]), default=0)
        if len(g) > 2 and s == 0:  # nothing shared (prompts cut from the left): singletons, not one long run
            groups += [[m] for m in g]
            shared += [0] * len(g)
        else:
            groups.append(g)
            shared.append(s)
    runs = [Tokenized(sequences[g[0]][:s] + [t for m in g for t in sequences[m][s:]], []) for g, s in zip(groups, shared)]
    width = max(width or row_width([len(r.input_ids) for r in runs]), max(len(r.input_ids) for r in runs))
    bins = first_fit(runs, width)
    ids = torch.full((len(bins), width), filler_id(pad_id), dtype=torch.long)
    positions = torch.zeros((len(bins), width), dtype=torch.long)
    group = torch.full((len(bins), width), -1, dtype=torch.long)  # group number; -1 for filler
    branch = torch.zeros((len(bins), width), dtype=torch.long)  # 0 prefix, k for the k-th member's tail
    flat: dict[int, list[int]] = {}  # sequence -> flat positions of its tokens
    number = {id(r): i for i, r in enumerate(runs)}
    for row, members in enumerate(bins):
        start = 0
        for run in members:
            g = number[id(run)]
            s, base = shared[g], row * width + start
            ids[row, start : start + len(run.input_ids)] = torch.tensor(run.input_ids)
            positions[row, start : start + s] = torch.arange(s)
            group[row, start : start + len(run.input_ids)] = g
            at = start + s
            for k, m in enumerate(groups[g], start=1):
                n = len(sequences[m]) - s
                positions[row, at : at + n] = torch.arange(s, s + n)
                branch[row, at : at + n] = k
                flat[m] = list(range(base, base + s)) + list(range(row * width + at, row * width + at + n))
                at += n
            start += len(run.input_ids)
    same = (group[:, :, None] == group[:, None, :]) & (group[:, :, None] >= 0)  # (R, W, W) query, key
    causal = torch.ones((width, width), dtype=torch.bool).tril()
    visible = (branch[:, None, :] == 0) | (branch[:, :, None] == branch[:, None, :])  # the prefix, or its own tail
    mask = (same & causal & visible) | torch.eye(width, dtype=torch.bool)  # filler attends to itself only
    token_index = torch.tensor([j for i in range(len(sequences)) for j in flat[i]])
    segments = torch.tensor([k for k, seq in enumerate(sequences) for _ in seq])
    return {"packed_ids": ids, "packed_positions": positions, "packed_mask": mask[:, None], "token_index": token_index,
            "segments": segments}


def pair_pack(chosen: list[list[int]], rejected: list[list[int]], pad_id: int = 0, width: int | None = None) -> dict:
    """:func:`pack` of B pairs, each pair a group: chosen sequences 0..B-1, rejected B..2B-1."""
    B = len(chosen)
    return pack(chosen + rejected, [[i, B + i] for i in range(B)], pad_id, width)


def pair_rewards(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_chosen, r_rejected), each (B,), from one padding-free forward over the batch's U distinct sequences
    packed into rows (pad tokens cost as much as real ones on a CPU; the rewards equal the padded forward's,
    tested). Under DDP, the padded forward: DDP's gradient hooks run through ``forward``."""
    count = batch["input_ids"].shape[0]
    module = getattr(model, "module", model)  # DDP wraps the reward model; its forward is the padded one
    if module is model:
        rewards = model.forward_packed(batch["packed_ids"], batch["packed_positions"], batch["token_index"], batch["segments"], count,
                                       batch["packed_mask"])  # (U,)
    else:
        rewards = model(batch["input_ids"], batch["attention_mask"])  # (U,)
    return rewards.index_select(0, batch["chosen_index"]), rewards.index_select(0, batch["rejected_index"])


@torch.inference_mode()
def evaluate(model, batches: list[dict], accelerator, bins: int) -> dict:
    """Held-out metrics over every process's share of the batches, gathered on each process."""
    from accelerate.utils import gather_object

    from tuneoff.eval.rm import reward_model_metrics

    model.eval()
    rows = []
    for batch in batches[accelerator.process_index :: accelerator.num_processes]:
        r_chosen, r_rejected = pair_rewards(model, {k: v.to(accelerator.device) for k, v in batch.items()})
        length_chosen, length_rejected = batch["length"].chunk(2)
        rows += list(zip(r_chosen.tolist(), r_rejected.tolist(), length_chosen.tolist(), length_rejected.tolist(), batch["margin"].tolist()))
    model.train()
    rows = gather_object(rows) if accelerator.num_processes > 1 else rows
    columns = torch.tensor(rows, dtype=torch.float64).T  # (5, N)
    metrics = reward_model_metrics(columns[0], columns[1], columns[2], columns[3], columns[4], bins)
    return {f"eval/{k}": v for k, v in metrics.items()}


def train(config: RMConfig) -> Path:
    """Train a reward model as configured; returns the folder of the final model."""
    from tuneoff.models.heads import RewardModel, disable_dropout, save_reward_model
    from tuneoff.models.load import apply_lora, load_model, load_tokenizer

    out, resume_from = common.begin(config, "no training data: pass --data FILE (or --data default)")

    # Everything that can fail on the user's input happens before the first byte is written to `out`.
    tokenizer = load_tokenizer(config.model)
    data, eval_data = pair_files(config.data, config.eval_data)
    if is_default(config.data):
        print(f"rm: default task data in {Path(data).parent}")
    train_pairs, summary = tokenize_pairs(data, tokenizer, config)
    if eval_data:
        eval_pairs, _ = tokenize_pairs(eval_data, tokenizer, config)
    else:
        train_pairs, eval_pairs = split_by_prompt(train_pairs, config.eval_fraction, config.seed, key=lambda p: p.prompt)

    accelerator = common.make_accelerator()
    common.seed_everything(config.seed)
    lm = load_model(config.model, from_scratch=config.from_scratch)
    if config.disable_dropout:
        disable_dropout(lm)
    if config.lora:
        lm = apply_lora(lm, config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_target_modules)
    reward_model = RewardModel(lm, pooling=config.pooling)  # the head sits outside peft: it trains with or without LoRA
    world = accelerator.num_processes
    batches_per_epoch = math.ceil(len(train_pairs) / config.batch_size)
    steps_per_epoch = batches_per_epoch // (config.grad_accum * world)
    if steps_per_epoch < 1:
        raise TuneoffError(f"{batches_per_epoch} micro-batches are fewer than grad_accum × processes = {config.grad_accum * world}")
    total_steps = config.max_steps if config.max_steps > 0 else max(1, math.ceil(config.epochs * steps_per_epoch))
    optimizer = common.make_optimizer(reward_model, config.lr, config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, common.lr_lambda(config.schedule, int(config.warmup_ratio * total_steps), total_steps)
    )
    model, optimizer = accelerator.prepare(reward_model, optimizer)
    pad_id = tokenizer.pad_token_id
    eval_batches = make_batches(eval_pairs, config.batch_size, pad_id, 0, 0, shuffle=False) if eval_pairs else []

    step, cursor = 0, 0  # cursor = micro-batches consumed, over all epochs and processes
    if resume_from is not None:
        state = common.load_checkpoint(resume_from, reward_model.model, optimizer, scheduler)
        reward_model.load_head(resume_from)
        step, cursor = state["step"], state["cursor"]
    is_main = accelerator.is_main_process
    log = common.open_run(out, config, accelerator, step if resume_from else None)
    if is_main:
        print(f"rm: {summary}; {len(train_pairs)} train / {len(eval_pairs)} eval; "
              f"{total_steps} steps of {config.grad_accum * world} micro-batches of {config.batch_size} pairs")

    micro_batch = common.EpochBatches(lambda epoch: make_batches(train_pairs, config.batch_size, pad_id, config.seed, epoch),
                                      steps_per_epoch * config.grad_accum * world)

    metrics: dict = {}
    start, pairs_seen = time.perf_counter(), 0
    model.train()  # from_pretrained leaves it in eval mode (dropout, if not disabled, as its config says)
    bar = common.progress(total_steps, step, "rm", enabled=is_main)
    while step < total_steps:
        mine = [cursor + i * world + accelerator.process_index for i in range(config.grad_accum)]
        batches = [{k: v.to(accelerator.device) for k, v in micro_batch(i).items()} for i in mine]
        cursor += config.grad_accum * world
        step_pairs = accelerator.reduce(torch.tensor(float(sum(len(b["margin"]) for b in batches)), device=accelerator.device), "sum")
        totals = torch.zeros(2, device=accelerator.device)  # summed loss and correct pairs
        for i, batch in enumerate(batches):
            sync = contextlib.nullcontext() if i == len(batches) - 1 else accelerator.no_sync(model)
            with sync:
                r_chosen, r_rejected = pair_rewards(model, batch)  # (B,), (B,)
                loss_sum = bradley_terry_loss(r_chosen, r_rejected, batch["margin"]) * len(r_chosen)
                # DDP averages gradients over processes, so scale by world / global pair count.
                accelerator.backward(loss_sum * world / step_pairs)
            totals += torch.stack([loss_sum.detach(), (r_chosen > r_rejected).sum().float()])
        loss, accuracy = (accelerator.reduce(totals, "sum") / step_pairs).tolist()
        if not math.isfinite(loss):
            kept = common.checkpoints(out)
            where = kept[-1] if kept else "none was written yet"
            raise TuneoffError(f"loss became {loss} at step {step + 1}; stopped. Last good checkpoint: {where}")
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm) if config.max_grad_norm > 0 else torch.tensor(0.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        pairs_seen += int(step_pairs.item())
        rate = pairs_seen / max(1e-9, time.perf_counter() - start)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", acc=f"{accuracy:.2f}", pairs_s=f"{rate:,.1f}", refresh=False)
        if step % config.log_every == 0 or step == total_steps:
            log.log(step, {"train/loss": loss, "train/accuracy": accuracy, "train/lr": scheduler.get_last_lr()[0],
                           "train/grad_norm": float(grad_norm), "train/pairs_per_s": rate,
                           "train/epoch": cursor / (steps_per_epoch * config.grad_accum * world)})
        if eval_batches and (step % config.eval_every == 0 or step == total_steps):
            metrics = evaluate(model, eval_batches, accelerator, config.calibration_bins)
            log.log(step, metrics)
            if is_main:
                bar.write(f"step {step}: eval accuracy {metrics['eval/accuracy']:.4f}, ECE {metrics['eval/ece']:.4f}, "
                          f"loss {metrics['eval/loss']:.4f}, length corr {metrics['eval/length_corr']:.3f}")
        if step % config.save_every == 0 or step == total_steps:
            accelerator.wait_for_everyone()
            if is_main:
                common.save_checkpoint(out, step, reward_model, tokenizer, optimizer, scheduler, {"cursor": cursor},
                                       config.keep_checkpoints)
    bar.close()
    accelerator.wait_for_everyone()
    final = out / "model"
    if is_main:
        info = {"max_length": config.max_length, "base_model": config.model, "steps": step, "pooling": config.pooling}
        if metrics:  # the held-out rewards set the normalisation RL may use (RewardScorer.score(normalize=True))
            info.update(reward_mean=metrics["eval/reward_mean"], reward_std=metrics["eval/reward_std"], eval=metrics)
            (out / "eval.json").write_text(json.dumps({"step": step, **metrics}, indent=1))
        save_reward_model(final, reward_model, tokenizer, info)
        if config.lora:  # the adapter and head alone too, as SFT keeps its adapter
            reward_model.save_pretrained(out / "adapter")
        print(f"rm: reward model saved to {final}")
    log.close()
    accelerator.end_training()
    return final
