"""What each job of an experiment does (run in its own process by :mod:`tuneoff.compare.scheduler`).

A runner takes (spec, folder, inputs) — ``inputs`` maps each dependency's name to its result — and returns a
JSON-able result. Training runners call the library's loops with the method's config dataclass; nothing here
reimplements a loop. Costs (wall, CPU, peak memory) are measured around the runner by the scheduler; runners
add what only they know (tokens processed, labels consumed).
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

from tuneoff.data.formats import write_jsonl
from tuneoff.errors import TuneoffError
from tuneoff.train import metrics as names
from tuneoff.train.common import checkpoints

SFT_DATA = ("curated", "high-gold", "raw")
HIGH_GOLD = 0.9
"""`high-gold` SFT data: reviews the gold judge scores at least this P(positive)."""


def _metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _last(rows: list[dict], key: str):
    values = [r[key] for r in rows if key in r]
    return values[-1] if values else None


def n_params(model_folder: str) -> int:
    """Parameters of a saved model, from its safetensors headers (no weights loaded)."""
    from safetensors import safe_open

    folder = Path(model_folder)
    total = 0
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            for name in f.keys():
                total += math.prod(f.get_slice(name).get_shape())
    return total


# ---------------------------------------------------------------- shared stages


def run_gold(spec: dict, folder: Path, inputs: dict) -> dict:
    from tuneoff.feedback.gold import evaluate, load_gold_judge

    accuracy = evaluate(load_gold_judge())
    return {"dev_accuracy": accuracy["dev"], "test_accuracy": accuracy["test"]}


def run_pairs(spec: dict, folder: Path, inputs: dict) -> dict:
    """Pairs of base-model responses labelled by simulated annotators (the default task's builder, cached)."""
    import dataclasses

    from tuneoff.tasks.default_task import EVAL_FILE, INFO_FILE, TRAIN_FILE, DefaultTaskConfig, default_task_files

    known = {f.name for f in dataclasses.fields(DefaultTaskConfig)}
    unknown = set(spec["task"]) - known
    if unknown:
        raise TuneoffError(
            f"feedback: unknown field(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(known))})"
        )
    try:
        config = DefaultTaskConfig(**spec["task"])
    except (TypeError, ValueError) as error:
        raise TuneoffError(f"feedback: {error}") from None
    files = default_task_files(config)
    info = json.loads((files / INFO_FILE).read_text())
    return {
        "train": str(files / TRAIN_FILE),
        "eval": str(files / EVAL_FILE),
        "pairs": info["train_pairs"],
        "eval_pairs": info["eval_pairs"],
        "agreement_with_gold": info["train_label_agreement_with_gold"],
        "generation_s": info["generation_s"],
        "task": info["config"],
    }


def run_pair_files(spec: dict, folder: Path, inputs: dict) -> dict:
    from tuneoff.data.formats import load_preferences

    pairs = load_preferences(spec["train"])
    if spec["eval"]:
        load_preferences(spec["eval"])
    return {"train": spec["train"], "eval": spec["eval"], "pairs": len(pairs), "agreement_with_gold": None}


def run_rm(spec: dict, folder: Path, inputs: dict) -> dict:
    """The proxy reward model on the labelled pairs (or, with `data`, a held-out judge RM)."""
    from tuneoff.config import RMConfig, build_config
    from tuneoff.train.reward import train

    pairs = inputs.get("pairs", {})
    if spec.get("role") == "judge":  # a held-out judge: its own file, or the judge split of real feedback
        data, eval_data = spec.get("data") or pairs["judge"], ""
    else:
        data, eval_data = pairs["train"], pairs.get("eval", "")
    run = folder / "run"
    config = build_config(
        RMConfig,
        None,
        **{"eval_every": 100000, "save_every": 100, **spec["rm"]},
        model=spec["model"],
        data=data,
        eval_data=eval_data,
        out=str(run),
        threads=spec["threads"],
        resume=bool(checkpoints(run)),
    )
    started = time.perf_counter()
    model = train(config)
    rows = _metrics(run)
    tokens = _training_tokens(rows, time.perf_counter() - started)
    return {
        "model": str(model),
        "accuracy": _last(rows, names.EVAL_ACCURACY),
        "ece": _last(rows, names.EVAL_ECE),
        "labels": pairs.get("pairs") if spec.get("role") != "judge" else None,
        "tokens": tokens,
        "flops": 6.0 * n_params(str(model)) * tokens if tokens else None,
    }


def run_given_rm(spec: dict, folder: Path, inputs: dict) -> dict:
    """A reward model the experiment names by folder (judge or proxy): checked, never trained, no training cost."""
    from tuneoff.feedback.judges import reward_model_kind

    kind = reward_model_kind(spec["model"])
    return {"model": spec["model"], "given": kind, "accuracy": None, "ece": None, "labels": None, "flops": None}


def _training_tokens(rows: list[dict], elapsed: float) -> float | None:
    """Tokens a loop processed: its last cumulative rate (input tokens/s over the whole loop) × the loop's time
    (an estimate: the loop's rate excludes its set-up)."""
    rate = _last(rows, names.TOKENS_PER_S)
    return rate * elapsed if rate is not None else None


# ---------------------------------------------------------------- arms


def sft_file(spec: dict, folder: Path) -> str:
    """The SFT arm's demonstrations: curated (positive human reviews), raw (all reviews) or the user's file."""
    from tuneoff.data.sources import sst2_sft_records

    choice = spec["sft_data"]
    if choice not in SFT_DATA:
        if not Path(choice).exists():
            raise TuneoffError(f"sft_data: {choice}: no such file (or use {', '.join(SFT_DATA)})")
        return choice
    records = sst2_sft_records(label=1 if choice == "curated" else None, prompt_words=spec["prompt_words"])
    if choice == "high-gold":
        from tuneoff.feedback.gold import load_gold_judge

        gold = load_gold_judge().score([r["prompt"] + r["completion"] for r in records])  # (N,) P(positive)
        records = [r for r, p in zip(records, gold) if p >= HIGH_GOLD]
    random.Random(0).shuffle(records)
    return str(write_jsonl(folder / "data" / f"sft-{choice}.jsonl", records[: spec["sft_records"]]))


def run_real_pairs(spec: dict, folder: Path, inputs: dict) -> dict:
    from tuneoff.tasks.real_data import build

    return build(spec, folder)


def prompt_file(choice: str, words: int, folder: Path, inputs: dict | None = None) -> str:
    """RL prompts: the default task's (SST-2 train beginnings), the real feedback's, or the user's file."""
    if choice == "feedback":
        return inputs["pairs"]["prompts"]
    if choice != "default":
        if not Path(choice).exists():
            raise TuneoffError(f"prompts: {choice}: no such file (or use default)")
        return choice
    from tuneoff.tasks.default_task import train_prompts

    return str(write_jsonl(folder / "data" / "prompts.jsonl", [{"prompt": p} for p in train_prompts(words, 0)]))


def run_train(spec: dict, folder: Path, inputs: dict) -> dict:
    """Train one arm for one seed, starting from the base or from its `init` arm's model of the same seed."""
    from tuneoff.config import build_config
    from tuneoff.train.methods import METHODS

    arm = dict(spec["arm_spec"])
    name, init = arm.pop("method"), arm.pop("init", None)
    method = METHODS[name]
    arm.pop("description", None)
    start = inputs[f"train:{init}/seed-{spec['seed']}"]["model"] if init else spec["base"]
    common = {
        "model": start,
        "out": str(folder),
        "seed": spec["seed"],
        "threads": spec["threads"],
        "resume": bool(checkpoints(folder)),
    }
    labels = 0
    spec = {**spec, "sft_data": arm.pop("sft_data", spec["sft_data"])}
    if method.data == "sft":
        data = {"data": sft_file(spec, folder)}
    elif method.needs_pairs:  # preference pairs (KTO reads them unpaired)
        pairs = inputs["pairs"]
        data, labels = {"data": pairs["train"], "eval_data": pairs["eval"]}, pairs["pairs"]
    else:
        data = {
            "data": prompt_file(spec["prompts"], spec["prompt_words"], folder, inputs),
            "reward_model": inputs["rm"]["model"],
        }
        labels = inputs["rm"].get("labels") or 0
    fields = {**spec.get("placement", {}), **arm, **common, **data, **method.fixed}  # an arm's own device wins
    config = build_config(method.config, None, **fields)
    started = time.perf_counter()
    model = method.train(config)
    elapsed = time.perf_counter() - started
    rows = _metrics(folder)
    return {
        "model": str(model),
        "method": name,
        "init": init,
        "labels": labels,
        "curve": curve(rows),
        "training_s": elapsed,
        **_train_cost(rows, method, config, str(model), elapsed),
    }


def curve(rows: list[dict]) -> list[dict]:
    """Training trajectory rows {step, kl (per token), kl_seq, proxy, gold (P(positive)), loss} from metrics.jsonl."""
    out = []
    for r in rows:
        length = r.get(names.EPISODE_LENGTH)
        kl_seq = r.get(names.OBJECTIVE_KL)
        out.append(
            {
                "step": r["step"],
                "kl_seq": kl_seq,
                "kl": kl_seq / length if kl_seq is not None and length else None,
                "proxy": r.get(names.SCORES),
                "gold": r.get(names.GOLD_P),
                "loss": r.get(names.LOSS, r.get(names.POLICY_LOSS)),
            }
        )
    return [c for c in out if any(c[k] is not None for k in ("kl", "proxy", "gold", "loss"))]


def _train_cost(rows: list[dict], method, config, model: str, elapsed: float) -> dict:
    """Tokens and estimated FLOPs of a training run (the method table's FLOPs per token)."""
    n = n_params(model)
    if not method.online:
        tokens = _training_tokens(rows, elapsed)
        return {"tokens": tokens, "flops": method.flops_per_token(n, config) * tokens if tokens else None, "params": n}
    lengths = [r[names.EPISODE_LENGTH] for r in rows if names.EPISODE_LENGTH in r]
    iterations = _last([r for r in rows if names.EPISODE_LENGTH in r], "step") or 0
    tokens = (
        iterations * config.rollout_batch * (sum(lengths) / max(1, len(lengths)) + 8)
    )  # + a typical prompt's tokens
    return {"tokens": tokens, "flops": method.flops_per_token(n, config) * tokens, "params": n}


def run_eval(spec: dict, folder: Path, inputs: dict) -> dict:
    from tuneoff.compare.evaluate import evaluate_arm

    trained = inputs.get(f"train:{spec['arm']}/seed-{spec['seed']}")
    model = trained["model"] if trained else spec["base"]
    proxy = inputs["rm"]["model"] if "rm" in inputs else None
    judge = "gold" if spec["judge"] == "gold" else inputs["judge"]["model"]  # trained (rm) or given (a folder)
    if spec["eval_prompts"] == "feedback":
        spec = {**spec, "eval_prompts": inputs["pairs"]["eval_prompts"]}
    result = evaluate_arm(model, spec["base"], proxy, judge, spec, folder)
    return result


RUNNERS = {
    "gold": run_gold,
    "pairs": run_pairs,
    "real_pairs": run_real_pairs,
    "pair_files": run_pair_files,
    "rm": run_rm,
    "given_rm": run_given_rm,
    "train": run_train,
    "eval": run_eval,
}
