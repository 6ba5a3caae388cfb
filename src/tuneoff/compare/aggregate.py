"""Job records -> ``results.json``: every metric of every arm and seed, means with 95% CIs over seeds.

Conventions:
- an arm's per-seed value is a mean over the held-out prompts; the arm's figure is the mean over seeds with a
  Student-t 95% interval (NaN bounds for a single seed);
- win rates pair the same prompt of the same seed (by judge score; ties count half);
- an arm's cost is everything needed to produce it: its own training, its `init` arm's training (sft for
  sft+ppo), and the shared stages it reads (labelled pairs; the proxy RM for RL arms), plus its evaluation.
  Phases: data (pair sampling and labelling), training (every training run in the chain, RM included),
  generation and scoring (held-out evaluation). Peak memory is the largest of those processes.
"""

from __future__ import annotations

import math
import os
import platform
from datetime import datetime, timezone

from tuneoff.compare.experiment import ExperimentConfig
from tuneoff.eval.alignment import t_ci, win_rate
from tuneoff.train.methods import ONLINE


def _mean(values) -> float:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else float("nan")


def _ci(values) -> dict | None:
    values = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return t_ci(values) if values else None


def environment() -> dict:
    import torch
    import transformers

    import tuneoff

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tuneoff": tuneoff.__version__,
        "cpu": cpu,
        "cores": os.cpu_count(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }


def _chain(config: ExperimentConfig, arm: str, seed: int, records: dict) -> list[dict]:
    """Records of every job an arm's seed needs (shared stages once), eval included."""
    names, current = [], arm
    while current:
        method = config.arms[current]["method"]
        if method != "base":
            names.append(f"train:{current}/seed-{seed}")
        if method == "dpo":
            names.append("pairs")
        if method in ONLINE:
            names += ["pairs", "rm"]
        current = config.arms[current].get("init")
    names.append(f"eval:{arm}/seed-{seed}")
    return [records[n] for n in dict.fromkeys(names) if n in records]


def seed_cost(config: ExperimentConfig, arm: str, seed: int, records: dict) -> dict:
    chain = _chain(config, arm, seed, records)
    phases = {"data": 0.0, "training": 0.0, "generation": 0.0, "scoring": 0.0}
    tokens = flops = 0.0
    labels = 0
    for r in chain:
        result = r.get("result") or {}
        if r["kind"] in ("pairs", "pair_files", "real_pairs"):
            phases["data"] += r["wall_s"]
            labels = max(labels, result.get("pairs") or 0)
        elif r["kind"] in ("train", "rm"):
            phases["training"] += r["wall_s"]
            tokens += result.get("tokens") or 0.0
            flops += result.get("flops") or 0.0
        elif r["kind"] == "eval":
            phases["generation"] += result["phases"]["generation"]["wall_s"]
            phases["scoring"] += r["wall_s"] - result["phases"]["generation"]["wall_s"]
    return {
        "wall_s": sum(r["wall_s"] for r in chain),
        "cpu_s": sum(r["cpu_s"] for r in chain),
        "tokens": tokens,
        "flops": flops,
        "peak_rss_mb": max(r["peak_rss_mb"] for r in chain),
        "labels": labels,
        "phases": phases,
    }


def _per_seed(config, arm, seed, records, base_eval) -> dict | None:
    from tuneoff.eval.alignment import length_controlled_win_rate

    record = records.get(f"eval:{arm}/seed-{seed}")
    if not record or record["status"] != "ok":
        return None
    e = record["result"]
    trained = (records.get(f"train:{arm}/seed-{seed}") or {}).get("result") or {}
    vs_base = base_eval is not None and config.arms[arm]["method"] != "base"
    return {
        "gold_reward": _mean(e["gold"]),
        "proxy_reward": _mean(e["proxy"]) if e["proxy"] else None,
        "kl_per_token": e["kl_per_token"],
        "mean_length_tokens": _mean(e["lengths"]),
        "win_rate_vs_base": win_rate(e["gold"], base_eval["gold"]) if vs_base else None,
        "length_controlled_win_rate_vs_base": length_controlled_win_rate(
            e["gold"], base_eval["gold"], e["lengths"], base_eval["lengths"]
        )
        if vs_base
        else None,
        "diversity": e["diversity"],
        "curve": trained.get("curve", []),
        "samples": e["samples"],
        "cost": seed_cost(config, arm, seed, records),
    }


def _smoothed(curve: list[dict], window: int = 5) -> list[dict]:
    """Rows for divergence checks: KL per sequence (the bound's unit) and the proxy averaged over the last ``window``
    logged points, so one unlucky rollout batch is not read as a collapse."""
    rows, recent = [], []
    for c in curve:
        if c.get("proxy") is not None:
            recent = (recent + [c["proxy"]])[-window:]
        rows.append(
            {**c, "kl": c.get("kl_seq"), "proxy": sum(recent) / len(recent) if c.get("proxy") is not None else None}
        )
    return rows


def _noise(curve: list[dict]) -> float:
    """3 × the per-point noise of the logged proxy reward (sd of successive differences / √2): a rise smaller than
    that is not a rise, and a fall after it not a collapse (each point is the mean of one small rollout batch)."""
    proxy = [c["proxy"] for c in curve if c.get("proxy") is not None]
    if len(proxy) < 3:
        return 0.0
    steps = [b - a for a, b in zip(proxy, proxy[1:])]
    mean = sum(steps) / len(steps)
    return 3.0 * math.sqrt(sum((d - mean) ** 2 for d in steps) / (len(steps) - 1) / 2.0)


def _stability(config: ExperimentConfig, arm: str, per_seed: dict, records: dict) -> dict:
    from tuneoff.eval.stability import divergence_events, gold_proxy_gap, seed_spread

    golds = [s["gold_reward"] for s in per_seed.values()]
    spread = seed_spread(golds) if golds else {"sd": None, "range": None}
    failed = sum(
        1 for seed in config.seeds if (records.get(f"train:{arm}/seed-{seed}") or {}).get("status") == "failed"
    )
    bound = float(config.arms[arm].get("kl_stop", 40.0))
    events = sum(
        len(divergence_events(_smoothed(s["curve"]), bound, min_rise=_noise(_smoothed(s["curve"]))))
        for s in per_seed.values()
    )
    gaps = [gold_proxy_gap(s["curve"]) for s in per_seed.values()]
    final = [g[-1]["gap"] for g in gaps if g]
    return {
        "seed_sd": spread["sd"],
        "seed_range": spread["range"],
        "divergence_events": events + failed,
        "failed_runs": failed,
        "final_gold_proxy_gap": _mean(final) if final else None,
    }


def _overoptimization(per_seed: dict) -> dict | None:
    """Gao et al.'s fit over every seed's training points: d = √KL per sequence, gain = gold − the seed's first gold."""
    from tuneoff.eval.stability import fit_overoptimization

    kl, gain = [], []
    for s in per_seed.values():
        points = [c for c in s["curve"] if c.get("kl_seq") is not None and c.get("gold") is not None]
        if points:
            kl += [c["kl_seq"] for c in points]
            gain += [c["gold"] - points[0]["gold"] for c in points]
    return fit_overoptimization(kl, gain) if kl else None


def _arm_summary(config: ExperimentConfig, arm: str, per_seed: dict, records: dict) -> dict:
    seeds = list(per_seed.values())

    def ci(key):
        return _ci([s[key] for s in seeds])

    def diversity(kind, metric):
        return _ci([s["diversity"][kind][metric] for s in seeds])

    def cost(key):
        return _ci([s["cost"][key] for s in seeds])

    return {
        "method": config.arms[arm]["method"],
        "init": config.arms[arm].get("init"),
        "description": config.arms[arm].get("description", ""),
        "gold_reward": ci("gold_reward"),
        "proxy_reward": ci("proxy_reward"),
        "kl_per_token": ci("kl_per_token"),
        "win_rate_vs_base": ci("win_rate_vs_base"),
        "length_controlled_win_rate_vs_base": ci("length_controlled_win_rate_vs_base"),
        "mean_length_tokens": ci("mean_length_tokens"),
        "diversity": {
            kind: {m: diversity(kind, m) for m in ("ead", "self_bleu", "embedding")}
            for kind in ("per_input", "across_input")
        }
        if seeds
        else None,
        "cost": {
            **{k: cost(k) for k in ("wall_s", "cpu_s", "tokens", "flops", "peak_rss_mb")},
            "labels": max((s["cost"]["labels"] for s in seeds), default=0),
            "phases": {
                p: _mean([s["cost"]["phases"][p] for s in seeds]) for p in ("data", "generation", "training", "scoring")
            },
        }
        if seeds
        else None,
        "stability": _stability(config, arm, per_seed, records),
        "overoptimization": _overoptimization(per_seed) if config.arms[arm]["method"] in ONLINE else None,
        "per_seed": {str(seed): s for seed, s in per_seed.items()},
    }


def _pairwise(config: ExperimentConfig, records: dict) -> dict:
    table: dict = {}
    for a in config.arms:
        for b in config.arms:
            if a == b:
                continue
            rates = []
            for seed in config.seeds:
                ea, eb = (records.get(f"eval:{x}/seed-{seed}") for x in (a, b))
                if ea and eb and ea["status"] == eb["status"] == "ok":
                    rates.append(win_rate(ea["result"]["gold"], eb["result"]["gold"]))
            table.setdefault(a, {})[b] = _ci(rates)
    return table


def _shared(config: ExperimentConfig, records: dict) -> dict:
    judge = (records.get("judge") or {}).get("result") or {}
    pairs = (records.get("pairs") or {}).get("result") or {}
    rm = records.get("rm") or {}
    task = pairs.get("task") or {}
    return {
        "gold_judge": {k: judge.get(k) for k in ("dev_accuracy", "test_accuracy", "accuracy")},
        "labels": {
            "pairs": pairs.get("pairs"),
            "agreement_with_gold": pairs.get("agreement_with_gold"),
            "annotators": task.get("annotators"),
            "temperature": task.get("temperature"),
            "length_bias": task.get("length_bias"),
            "flip_rate": task.get("flip_rate"),
            "wall_s": (records.get("pairs") or {}).get("wall_s"),
        },
        "proxy_rm": {
            "given": (rm.get("result") or {}).get("model") if isinstance(config.rm, str) else None,
            "accuracy_vs_gold": (rm.get("result") or {}).get("accuracy"),
            "ece": (rm.get("result") or {}).get("ece"),
            "wall_s": rm.get("wall_s"),
        }
        if rm
        else None,
    }


def aggregate(config: ExperimentConfig, records: dict) -> dict:
    """The results dict (see tuneoff.compare.report for how it is shown)."""
    import dataclasses

    base_arm = next((a for a, spec in config.arms.items() if spec["method"] == "base"), None)
    arms = {}
    for arm in config.arms:
        per_seed = {}
        for seed in config.seeds:
            base_record = records.get(f"eval:{base_arm}/seed-{seed}") if base_arm else None
            base_eval = base_record["result"] if base_record and base_record["status"] == "ok" else None
            value = _per_seed(config, arm, seed, records, base_eval)
            if value is not None:
                per_seed[seed] = value
        arms[arm] = _arm_summary(config, arm, per_seed, records)
    failures = [f"{name}: {r['status']}: {r.get('error', '')}" for name, r in records.items() if r["status"] != "ok"]
    chained = [arm for arm, spec in config.arms.items() if spec.get("init") and spec["method"] in ONLINE]
    if chained:
        failures.insert(
            0,
            f"Training trajectories are measured on the training rollouts with KL to each run's own "
            f"reference; {', '.join(chained)} start from another arm's model, so their trajectories begin at "
            f"KL 0 from that model. Final points are held-out evaluations with KL to the base.",
        )
    return {
        "name": config.name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": dataclasses.asdict(config),
        "environment": environment(),
        "seeds": list(config.seeds),
        "judge": {
            "gold": "gold judge (SST-2 sentiment classifier trained on human labels)",
            "rm": "held-out reward model trained on a disjoint split (no gold judge)",
        }.get(config.judge, f"the reward model in {config.judge} (given; no gold judge)"),
        "arms": arms,
        "win_rates": _pairwise(config, records),
        "shared": _shared(config, records),
        "priorities": config.priorities,
        "notes": list(config.notes) + failures,
        "jobs": {
            name: {k: r.get(k) for k in ("status", "wall_s", "cpu_s", "peak_rss_mb", "reused", "error")}
            for name, r in records.items()
        },
    }
