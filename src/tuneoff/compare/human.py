"""People as the judge of an experiment: blind pairwise comparisons of the arms' held-out outputs, and what the
people said, folded into the results.

Queueing (:func:`comparison_tasks`, ``tuneoff label add --experiment DIR``): for every seed and held-out prompt
i, each tuned arm's response against base's (the same prompt, the same seed), and, within a budget, arm against
arm. Which arm is response a is drawn from the comparison's own id, and the page shows a and b on sides it draws
per annotator; arm names stay in the task's metadata, never on the page. A comparison's id is fixed by
(experiment, seed, prompt, the two arms), so adding the same experiment again queues nothing twice. Pairs where
both arms wrote the same text are not queued (they are counted).

Folding in (:func:`human_block`, ``tuneoff compare --human DB`` and ``tuneoff label stats --experiment DIR``),
from every judgment (skips left out) on this experiment's tasks:
- per tuned arm, its win rate against base: the mean over judgments of 1 (arm preferred), ½ (tie), 0 (base
  preferred), with a 95% bootstrap interval that resamples comparisons (a comparison's judgments stay together,
  since its annotators saw the same two texts);
- Bradley–Terry strengths of all arms, log scale with base at 0 (P(i ≻ j) = σ(s_i − s_j)), fitted by Hunter's
  (2004) MM iteration with a tie counting half a win each way and one virtual tie of every arm against base (a
  weak prior that keeps an arm nobody preferred finite), with bootstrap intervals the same way;
- agreement between people (Fleiss' kappa, Krippendorff's alpha over comparisons with two or more labels);
- how often the experiment's automatic judge agrees with the people: on judgments that picked a side, the share
  where the judge scored that side's response higher (judge ties left out), with a Wilson interval.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections import defaultdict
from pathlib import Path

from tuneoff.errors import TuneoffError

BOOTSTRAP = 2000
"""Bootstrap resamples of the comparisons for every interval."""


def load_experiment_outputs(out: str | Path) -> tuple[dict, dict[str, dict[int, dict]]]:
    """(results.json, {arm: {seed: eval.json}}) of a finished experiment folder."""
    out = Path(out)
    path = out / "results.json"
    if not path.exists():
        raise TuneoffError(f"{out} holds no results.json: run `tuneoff compare --config ... --out {out}` first")
    results = json.loads(path.read_text())
    evals: dict[str, dict[int, dict]] = defaultdict(dict)
    for arm in results["arms"]:
        for seed in results["seeds"]:
            file = out / "runs" / arm / f"seed-{seed}" / "eval" / "eval.json"
            if file.exists():
                evals[arm][seed] = json.loads(file.read_text())
    return results, dict(evals)


def base_arm(results: dict) -> str:
    arms = results.get("config", {}).get("arms", {})
    base = next((name for name, spec in arms.items() if spec.get("method") == "base"), None)
    if base is None:
        raise TuneoffError("human evaluation compares every arm with base: the experiment has no `method: base` arm")
    return base


def comparison_tasks(out: str | Path, *, prompts: int = 0, arm_vs_arm: int = 0, seeds: list[int] | None = None):
    """The NewTasks of a human evaluation of the experiment in ``out`` and what was left out.

    ``prompts``: the first N held-out prompts of each seed (0: all); ``arm_vs_arm``: at most this many comparisons
    between two tuned arms, drawn evenly at random (seeded) from all (seed, prompt, pair); ``seeds``: which seeds
    (default: all). Returns (tasks, {"vs_base", "arm_vs_arm", "identical"})."""
    from itertools import combinations

    from tuneoff.feedback.store import NewTask

    results, evals = load_experiment_outputs(out)
    name, base = results["name"], base_arm(results)
    tuned = [arm for arm in results["arms"] if arm != base]
    seeds = results["seeds"] if seeds is None else seeds
    missing = [f"{arm}/seed-{s}" for arm in [base, *tuned] for s in seeds if s not in evals.get(arm, {})]
    if missing:
        raise TuneoffError(f"{out}: no evaluation of {', '.join(missing)} (did those jobs finish?)")

    def task(seed: int, index: int, first: str, second: str) -> NewTask | None:
        key = f"experiment:{name}:seed-{seed}:prompt-{index}:{'~'.join(sorted((first, second)))}"
        flip = hashlib.sha256(key.encode()).digest()[0] % 2 == 1  # which arm is a: fixed by the comparison
        arm_a, arm_b = (second, first) if flip else (first, second)
        ea, eb = evals[arm_a][seed], evals[arm_b][seed]
        if ea["prompts"][index] != eb["prompts"][index]:
            raise TuneoffError(f"{out}: {arm_a} and {arm_b} (seed {seed}) were evaluated on different prompts")
        if ea["responses"][index] == eb["responses"][index]:
            return None
        meta = {
            "experiment": name,
            "seed": seed,
            "prompt": index,
            "a": arm_a,
            "b": arm_b,
            "judge_a": ea["gold"][index],
            "judge_b": eb["gold"][index],
        }
        return NewTask(ea["prompts"][index], ea["responses"][index], eb["responses"][index], key=key, meta=meta)

    def count(seed: int) -> int:
        held_out = len(evals[base][seed]["prompts"])
        return min(prompts, held_out) if prompts else held_out

    tasks, counts = [], {"vs_base": 0, "arm_vs_arm": 0, "identical": 0}
    for seed in seeds:
        for index in range(count(seed)):
            for arm in tuned:
                made = task(seed, index, arm, base)
                counts["vs_base" if made else "identical"] += 1
                tasks += [made] if made else []
    if arm_vs_arm and len(tuned) > 1:
        candidates = [(s, i, a, b) for s in seeds for i in range(count(s)) for a, b in combinations(tuned, 2)]
        random.Random(f"{name}:arm-vs-arm").shuffle(candidates)
        for seed, index, a, b in candidates[:arm_vs_arm]:
            made = task(seed, index, a, b)
            counts["arm_vs_arm" if made else "identical"] += 1
            tasks += [made] if made else []
    return tasks, counts


# ---------------------------------------------------------------- the statistics


def outcomes_by_comparison(tasks, judgments, experiment: str) -> dict[str, dict]:
    """{task id: {"a", "b", "judge_a", "judge_b", "labels": [(annotator, outcome for a: 1, ½, 0)]}} of this
    experiment's tasks with at least one judgment that is not a skip."""
    ours = {t.id: t.meta for t in tasks if (t.meta or {}).get("experiment") == experiment}
    table: dict[str, dict] = {}
    for j in judgments:
        meta = ours.get(j.task_id)
        if meta is None or j.preferred is None:
            continue
        entry = table.setdefault(j.task_id, {**{k: meta[k] for k in ("a", "b", "judge_a", "judge_b")}, "labels": []})
        entry["labels"].append((j.annotator, {"a": 1.0, "b": 0.0, "tie": 0.5}[j.preferred]))
    return table


def win_rates_vs_base(comparisons: list[dict], arms: list[str], base: str) -> dict[str, tuple[float, int]]:
    """{arm: (mean outcome for the arm over judgments of (arm, base) comparisons, judgments)}."""
    sums, counts = defaultdict(float), defaultdict(int)
    for c in comparisons:
        if base not in (c["a"], c["b"]):
            continue
        arm = c["b"] if c["a"] == base else c["a"]
        for _, outcome in c["labels"]:
            sums[arm] += outcome if c["a"] == arm else 1.0 - outcome
            counts[arm] += 1
    return {arm: (sums[arm] / counts[arm], counts[arm]) for arm in arms if counts[arm]}


def bradley_terry(comparisons: list[dict], arms: list[str], base: str, iterations: int = 500) -> dict[str, float]:
    """Log-strengths s (base = 0) by Hunter's MM update p_i ← W_i / Σ_j n_ij / (p_i + p_j), W_i the wins of i (a
    tie half each), n_ij the judgments between i and j, plus one virtual tie of each arm against base."""
    names = [base] + [a for a in arms if a != base]
    wins = defaultdict(float)
    games = defaultdict(float)  # (i, j) with i < j in names order -> judgments
    for arm in names[1:]:  # the prior: one tie against base
        wins[arm] += 0.5
        wins[base] += 0.5
        games[base, arm] += 1.0
    order = {n: k for k, n in enumerate(names)}
    for c in comparisons:
        if c["a"] not in order or c["b"] not in order:
            continue
        for _, outcome in c["labels"]:
            wins[c["a"]] += outcome
            wins[c["b"]] += 1.0 - outcome
            games[tuple(sorted((c["a"], c["b"]), key=order.get))] += 1.0
    p = dict.fromkeys(names, 1.0)
    for _ in range(iterations):
        new = {}
        for i in names:
            denominator = sum(n / (p[x] + p[y]) for (x, y), n in games.items() if i in (x, y))
            new[i] = wins[i] / denominator if denominator else p[i]
        scale = new[base]
        change = max(abs(math.log(new[i] / scale) - math.log(p[i] / p[base])) for i in names)
        p = {i: new[i] / scale for i in names}
        if change < 1e-10:
            break
    return {i: math.log(p[i]) for i in names}


def _bootstrap(comparisons: list[dict], statistic, resamples: int, seed: int) -> list:
    rng = random.Random(seed)
    n = len(comparisons)
    return [statistic([comparisons[rng.randrange(n)] for _ in range(n)]) for _ in range(resamples)]


def _interval(values: list[float]) -> tuple[float, float]:
    values = sorted(v for v in values if v is not None and math.isfinite(v))
    if not values:
        return float("nan"), float("nan")
    pick = lambda q: values[min(len(values) - 1, max(0, int(round(q * (len(values) - 1)))))]  # noqa: E731
    return pick(0.025), pick(0.975)


def human_statistics(comparisons: list[dict], arms: list[str], base: str, resamples: int = BOOTSTRAP) -> dict:
    """The human block's numbers from :func:`outcomes_by_comparison`'s values (see the module docstring)."""
    from tuneoff.eval.reward_models import wilson_interval
    from tuneoff.feedback.agreement import fleiss_kappa_of, krippendorff_alpha_of

    tuned = [a for a in arms if a != base]
    rates = win_rates_vs_base(comparisons, tuned, base)
    strengths = bradley_terry(comparisons, arms, base)
    rate_draws = _bootstrap(comparisons, lambda s: win_rates_vs_base(s, tuned, base), resamples, 0)
    strength_draws = _bootstrap(comparisons, lambda s: bradley_terry(s, arms, base, 200), resamples, 1)
    win_rate = {}
    for arm, (mean, n) in rates.items():
        low, high = _interval([d[arm][0] for d in rate_draws if arm in d])
        tasks = sum(1 for c in comparisons if {c["a"], c["b"]} == {arm, base})
        win_rate[arm] = {"mean": mean, "ci_low": low, "ci_high": high, "n": n, "comparisons": tasks}
    bt = {}
    for arm in arms:
        low, high = _interval([d[arm] for d in strength_draws])
        bt[arm] = {"mean": strengths[arm], "ci_low": low, "ci_high": high}
    ratings = {i: dict(c["labels"]) for i, c in enumerate(comparisons)}
    ratings = {i: {name: {1.0: "a", 0.5: "tie", 0.0: "b"}[v] for name, v in r.items()} for i, r in ratings.items()}
    fleiss, fleiss_items = fleiss_kappa_of(ratings)
    alpha, alpha_items = krippendorff_alpha_of(ratings)
    agree = total = 0
    for c in comparisons:
        if c["judge_a"] == c["judge_b"]:
            continue
        judge_picks_a = c["judge_a"] > c["judge_b"]
        for _, outcome in c["labels"]:
            if outcome != 0.5:
                total += 1
                agree += (outcome == 1.0) == judge_picks_a
    low, high = wilson_interval(agree, total)
    return {
        "judgments": sum(len(c["labels"]) for c in comparisons),
        "comparisons": len(comparisons),
        "annotators": sorted({name for c in comparisons for name, _ in c["labels"]}),
        "win_rate_vs_base": win_rate,
        "bradley_terry": bt,
        "agreement": {
            "fleiss_kappa": fleiss,
            "fleiss_items": fleiss_items,
            "krippendorff_alpha": alpha,
            "krippendorff_items": alpha_items,
        },
        "judge_agreement": {
            "rate": agree / total if total else float("nan"),
            "ci_low": low,
            "ci_high": high,
            "n": total,
        },  # fmt: skip
    }


def human_block(out: str | Path, db: str | Path, results: dict | None = None, resamples: int = BOOTSTRAP) -> dict:
    """What people said about the experiment in ``out`` (its ``results``, else its results.json), from the feedback
    database ``db``: the ``human`` block of results.json (:func:`human_statistics`, the database and the base)."""
    from tuneoff.feedback.store import Store

    if results is None:
        results, _ = load_experiment_outputs(out)
    base = base_arm(results)
    with Store(db, create=False) as store:
        table = outcomes_by_comparison(store.tasks(), store.judgments(), results["name"])
    if not table:
        raise TuneoffError(
            f"{db} holds no judgment of experiment {results['name']!r} yet: queue its comparisons with `tuneoff "
            f"label add --db {db} --experiment {out}` and have people judge them"
        )
    stats = human_statistics(list(table.values()), list(results["arms"]), base, resamples)
    return {"database": str(db), "base": base, **stats}
