"""Which arm to use: scores on four axes across the arms of one comparison, weighted by the user's priorities.

Each axis is scored in [0, 1] *across the arms of this comparison* by min–max (1 = the best arm on that
axis, 0 = the worst; 0.5 each when all arms measure the same or only one has the value). Alignment and the
diversity components divide by max(range, mean 95% CI half-width): when the arms differ by less than the seed
noise, their scores stay close instead of being stretched to 0 and 1. A score
therefore says where an arm stands among these arms, not how good it is in absolute terms. Scores from
two different runs cannot be compared.

- alignment: the mean gold reward (``arms[a]["gold_reward"]["mean"]``). This is the independent judge. The
  proxy reward is never used, because the RL arms were trained on it and can hack it.
- diversity: six components, per-input and across-input for each of EAD, embedding diversity and
  1 − self-BLEU (lower self-BLEU is more diverse). Each component is min–max normalised across arms
  first, so no metric dominates because of its range. The axis score is the mean over the components the
  arm has. It is not stretched again, so an arm that is best on some components and worst on others
  stays in the middle.
- cost: total wall seconds (``cost.wall_s.mean``), lower is better, on a log scale. 100 s against 1,000 s
  counts as much as 10 s against 100 s, so one very slow arm does not squash the rest together. Runs under
  ``MIN_WALL_S`` count as ``MIN_WALL_S``; otherwise the log would reward the last milliseconds without bound.
- stability: the seed standard deviation of the gold reward (``stability.seed_sd``), lower is better,
  min–max normalised. An arm with any divergence event (``stability.divergence_events`` > 0: KL blow-up,
  NaN, reward collapse) then loses ``DIVERGENCE_PENALTY``, floored at 0. A diverging run counts as unstable
  even if its surviving seeds happen to agree.

The candidates are the tuned arms: ``base`` is the reference they are measured against (win rates, KL), not a
candidate, since by construction it is the cheapest, most stable arm with the base's own diversity (it is
ranked only when it is the only arm, or the only one measured). The explanation says whether the choice beats
base beyond noise. An arm with no measurement on any axis (its jobs failed) is left out of the ranking, with a note.

Every comparison in the explanation takes its words from the numbers it quotes: "more diverse", "cheaper", "more
stable" (and their opposites) stand only before numbers that say so, reading lower as better for self-BLEU, wall
time, seed sd and divergence events. Where an axis's measures disagree (more diverse by EAD, less by embedding
diversity), each side is named with its own numbers.

When the results carry people's verdict (``results["human"]``, from ``tuneoff compare --human DB``) with a win
rate against base for every tuned arm, alignment is that win rate instead of the gold reward (base counts 0.5),
the automatic judge's paired win rates step aside, and the explanation says so and names the human numbers.

A missing value (None, NaN, e.g. the seed sd of a one-seed run) skips that axis for that arm, with a
note. The arm's weighted score is then the weighted mean over the axes it has. Ties go to the tuned arm
over ``base``, then to the higher gold reward: the untuned model is only recommended when it wins outright.
"""

from __future__ import annotations

import math

from tuneoff.errors import TuneoffError

AXES = ("alignment", "diversity", "cost", "stability")
PRESETS: dict[str, dict[str, float]] = {
    "balanced": {"alignment": 0.25, "diversity": 0.25, "cost": 0.25, "stability": 0.25},
    "strict-alignment": {"alignment": 0.6, "diversity": 0.05, "cost": 0.1, "stability": 0.25},
    "creative": {"alignment": 0.25, "diversity": 0.55, "cost": 0.1, "stability": 0.1},
    "budget": {"alignment": 0.25, "diversity": 0.1, "cost": 0.55, "stability": 0.1},
}
DIVERGENCE_PENALTY = 0.5
MIN_WALL_S = 1.0
DIVERSITY_COMPONENTS = [
    (scope, metric) for scope in ("per_input", "across_input") for metric in ("ead", "self_bleu", "embedding")
]
MEASURED_AS = {
    "alignment": "gold reward",
    "diversity": "diversity metrics",
    "cost": "wall time",
    "stability": "seed sd of gold reward (needs 2 or more seeds)",
}


def resolve_priorities(priorities: dict | str | None = None) -> dict[str, float]:
    """Weights over ``AXES`` that sum to 1.

    ``priorities`` is a preset name (``PRESETS``) or a dict with an optional ``"preset"`` plus per-axis
    weights that replace the preset's. A dict without ``"preset"`` is taken literally: the axes it leaves
    out weigh 0. None or an empty dict means ``balanced``.
    """
    if priorities is None or priorities == {}:
        priorities = "balanced"
    if isinstance(priorities, str):
        priorities = {"preset": priorities}
    if not isinstance(priorities, dict):
        raise TuneoffError(f"priorities: expected a preset name or a dict of weights, got {type(priorities).__name__}")
    explicit = {axis: weight for axis, weight in priorities.items() if axis != "preset"}
    unknown = sorted(map(str, set(explicit) - set(AXES)))
    if unknown:
        raise TuneoffError(f"priorities: unknown axis {', '.join(map(repr, unknown))}; the axes are {', '.join(AXES)}")
    weights = dict.fromkeys(AXES, 0.0)
    if "preset" in priorities:
        preset = priorities["preset"]
        if not isinstance(preset, str) or preset not in PRESETS:
            raise TuneoffError(f"priorities: unknown preset {preset!r}; the presets are {', '.join(PRESETS)}")
        weights.update(PRESETS[preset])
    for axis, weight in explicit.items():
        if finite(weight) is None or weight < 0:
            raise TuneoffError(f"priorities: the weight of {axis!r} must be a number >= 0, got {weight!r}")
        weights[axis] = float(weight)
    total = sum(weights.values())
    if total <= 0:
        raise TuneoffError("priorities: the weights sum to 0; give at least one axis a positive weight")
    return {axis: weight / total for axis, weight in weights.items()}


def axis_scores(results: dict) -> dict[str, dict[str, float]]:
    """Per arm, per axis, a score in [0, 1] across the arms (see the module docstring); missing axes are absent."""
    return _scores_and_notes(results)[0]


def recommend(results: dict, priorities: dict | str | None = None) -> dict:
    """The arm to use under ``priorities``, with the ranking and an explanation that quotes the measured numbers.

    Returns ``{"priorities", "ranking": [{"arm", "score", "axes"}] best first, "choice", "explanation",
    "within_noise", "notes"}``. ``within_noise`` is True when the paired win rate of the top two arms (same
    prompts, same seeds; ``results["win_rates"]``) has a 95% CI that includes 0.5, or, without it, when their
    95% CIs of gold reward overlap. It is False when they do not overlap and also when that is unknown (fewer than
    2 seeds); the explanation says which.
    """
    weights = resolve_priorities(priorities)
    arms = results.get("arms") if isinstance(results, dict) else None
    if not arms:
        raise TuneoffError("results: there are no arms to compare")
    people = _human_view(results)
    if people is not None:
        chosen = recommend(people, priorities)
        return {**chosen, "alignment": "human", "explanation": _in_human_words(chosen["explanation"], results)}
    # The untuned base is the reference, not a candidate: it is cheapest, keeps the base's diversity and never
    # varies, so it would win every axis but alignment by construction. Candidates are the tuned arms.
    tuned = {arm: m for arm, m in arms.items() if not _is_base(arm, m)}
    # An arm with nothing measured (every job of it failed) is not ranked: a score of 0 on no axis means nothing.
    candidates = _measured(tuned) or _measured(arms)
    if not candidates:
        raise TuneoffError("results: no arm has any measurement to rank (did every evaluation fail?)")
    scores, notes = _scores_and_notes({"arms": candidates})
    unmeasured = [arm for arm in (tuned or arms) if arm not in candidates]
    if unmeasured:
        notes.insert(
            0,
            f"Not ranked, nothing measured: {', '.join(unmeasured)} (the jobs that measure "
            f"{'it' if len(unmeasured) == 1 else 'them'} did not finish).",
        )
    ranking = [{"arm": arm, "score": _weighted(axes, weights), "axes": axes} for arm, axes in scores.items()]

    def order(row):  # ties (to rounding) go to a tuned arm, then to the higher gold reward
        gold = ci_mean(arms[row["arm"]].get("gold_reward"))
        return (
            -round(row["score"], 9),
            _is_base(row["arm"], arms[row["arm"]]),
            -gold if gold is not None else math.inf,
            row["arm"],
        )

    ranking.sort(key=order)
    choice = ranking[0]["arm"]
    runner = ranking[1]["arm"] if len(ranking) > 1 else None
    overlap = _overlap(arms[choice].get("gold_reward"), arms[runner].get("gold_reward")) if runner else None
    paired = _paired_ci(results, choice, runner) if runner else None
    if paired is not None:  # the paired test, when the results have it, decides what is within noise
        overlap = paired[0] <= 0.5 <= paired[1]
    explanation = [_weights_sentence(weights), _ranking_sentence(ranking), _gold_sentence(arms, choice)]
    if runner:
        noise = (
            _paired_sentence(results, choice, runner)
            if paired is not None
            else _noise_sentence(arms, choice, runner, overlap)
        )
        explanation += [
            _versus_sentence(arms, ranking[0], ranking[1], weights),
            noise + _prefer_sentence(arms, choice, runner, overlap),
        ]
    explanation += [_base_sentence(arms, ranking), _divergence_sentence(arms, choice)] + notes
    return {
        "priorities": weights,
        "ranking": ranking,
        "choice": choice,
        "explanation": [s for s in explanation if s],
        "within_noise": overlap is True,
        "notes": notes,
    }


def _human_view(results: dict) -> dict | None:
    """The results with each arm's gold reward replaced by its human win rate against base (base: 0.5) and the
    automatic judge's win rates removed, when people judged every tuned arm; else None."""
    human = get_path(results, "human", "win_rate_vs_base")
    base = get_path(results, "human", "base")
    arms = results["arms"]
    tuned = [arm for arm, m in arms.items() if not _is_base(arm, m)]
    if not isinstance(human, dict) or not tuned or any(ci_mean(human.get(arm)) is None for arm in tuned):
        return None
    even = {"mean": 0.5, "ci_low": 0.5, "ci_high": 0.5}
    view = {
        arm: {**m, "gold_reward": human[arm] if arm in tuned else even, "win_rate_vs_base": None}
        for arm, m in arms.items()
        if arm in tuned or arm == base or _is_base(arm, m)
    }
    return {**{k: v for k, v in results.items() if k not in ("win_rates", "human")}, "arms": view}


HUMAN_WORDS = (  # the automatic judge's words in the explanation, and what they are when people judged
    ("seed sd of gold reward", "seed sd of the automatic judge's gold reward"),
    ("gold-reward difference", "difference in human win rate"),
    ("highest gold reward", "highest human win rate against base"),
    ("has a gold reward", "has a human win rate"),
    ("gold reward measurement", "human win rate"),
    ("95% CIs of gold reward", "95% CIs of human win rate"),
    ("differ in gold reward", "differ in human win rate"),
    ("gold reward", "human win rate vs base"),
    ("beyond seed noise", "beyond noise"),
    ("with these seeds and prompts", "with these judgments"),
)


def _in_human_words(sentences: list[str], results: dict) -> list[str]:
    human = results["human"]
    intro = (
        f"Alignment here is what people preferred: each arm's win rate against {human.get('base', 'base')} in "
        f"{human.get('judgments', 0)} blind human judgments of {human.get('comparisons', 0)} comparisons (ties "
        f"count half; 95% bootstrap CIs over comparisons), not the automatic judge."
    )
    rewritten = []
    for sentence in sentences:
        for old, new in HUMAN_WORDS:
            sentence = sentence.replace(old, "\0".join(new)) if old in sentence else sentence
        rewritten.append(sentence.replace("\0", ""))
    return [rewritten[0], intro, *rewritten[1:]]


# --- numbers -------------------------------------------------------------------------------------------------


def finite(x) -> float | None:
    """``x`` as a float, or None when it is not a finite number (None, NaN, infinities, bools, text)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        return None
    return float(x)


def get_path(tree, *keys):
    """``tree[k1][k2]...``, or None where a level is missing or not a dict."""
    for key in keys:
        tree = tree.get(key) if isinstance(tree, dict) else None
    return tree


def ci_mean(ci) -> float | None:
    """The finite mean of a CI dict (``{"mean", "ci_low", "ci_high"}``), else None."""
    return finite(ci.get("mean")) if isinstance(ci, dict) else None


def _decimals(x: float, digits: int) -> int:
    return digits - 1 if x == 0 else max(0, digits - 1 - math.floor(math.log10(abs(x))))


def format_number(x, digits: int = 3) -> str:
    """``digits`` significant digits (0.712, 27.3, 743, 1.5e+06), integers whole (2,000); "n/a" for None or NaN."""
    whole = isinstance(x, int) and not isinstance(x, bool)
    x = finite(x)
    if x is None:
        return "n/a"
    if x == 0 or whole and abs(x) < 1e5:  # counts (labels, events) and empty phases read as whole numbers
        return f"{int(x):,}"
    if abs(x) >= 1e5:  # tokens, FLOPs
        return f"{x:.{digits}g}"
    return f"{x:,.{_decimals(x, digits)}f}"


def format_ci(ci, digits: int = 3) -> str:
    """``mean [low, high]`` with the decimals of the mean; just the mean when the CI is NaN (one seed)."""
    mean = ci_mean(ci)
    if mean is None:
        return "n/a"
    low, high = finite(ci.get("ci_low")), finite(ci.get("ci_high"))
    if abs(mean) >= 1e5:
        parts = [format_number(v, digits) for v in (mean, low, high)]
    else:
        parts = [f"{v:,.{_decimals(mean, digits)}f}" if v is not None else "" for v in (mean, low, high)]
    return parts[0] if low is None or high is None else f"{parts[0]} [{parts[1]}, {parts[2]}]"


def format_seconds(seconds) -> str:
    return "n/a" if finite(seconds) is None else f"{format_number(seconds)} s"


# --- axes ----------------------------------------------------------------------------------------------------


def _minmax(values: dict[str, float | None], noise: float = 0.0) -> dict[str, float]:
    """(v − min) / max(max − min, noise): with ``noise`` (a typical 95% CI half-width), arms that differ by less
    than the noise are not spread over the whole [0, 1] range — a difference within noise stays a small one."""
    present = {arm: v for arm, v in values.items() if v is not None}
    if not present:
        return {}
    low, high = min(present.values()), max(present.values())
    if high - low <= 1e-12 * max(1.0, abs(high)):
        return dict.fromkeys(present, 0.5)
    scale = max(high - low, noise)
    return {arm: (v - low) / scale for arm, v in present.items()}


def _noise(cis: list) -> float:
    """Mean 95% CI half-width over the arms that have one (0 when none has)."""
    halves = [
        (finite(ci.get("ci_high")) - finite(ci.get("ci_low"))) / 2
        for ci in cis
        if isinstance(ci, dict) and finite(ci.get("ci_high")) is not None and finite(ci.get("ci_low")) is not None
    ]
    return sum(halves) / len(halves) if halves else 0.0


def _alignment(arms: dict) -> dict[str, float]:
    return _minmax(
        {arm: ci_mean(m.get("gold_reward")) for arm, m in arms.items()},
        _noise([m.get("gold_reward") for m in arms.values()]),
    )


def _diversity(arms: dict) -> dict[str, float]:
    components = []
    for scope, metric in DIVERSITY_COMPONENTS:
        sign = -1.0 if metric == "self_bleu" else 1.0  # min–max of −self-BLEU equals that of 1 − self-BLEU
        raw = {arm: ci_mean(get_path(m, "diversity", scope, metric)) for arm, m in arms.items()}
        noise = _noise([get_path(m, "diversity", scope, metric) for m in arms.values()])
        components.append(_minmax({arm: None if v is None else sign * v for arm, v in raw.items()}, noise))
    scores = {}
    for arm in arms:
        mine = [component[arm] for component in components if arm in component]
        if mine:
            scores[arm] = sum(mine) / len(mine)
    return scores


def _cost(arms: dict) -> dict[str, float]:
    walls = {arm: ci_mean(get_path(m, "cost", "wall_s")) for arm, m in arms.items()}
    return _minmax({arm: None if w is None or w < 0 else -math.log(max(w, MIN_WALL_S)) for arm, w in walls.items()})


def _stability(arms: dict) -> dict[str, float]:
    sds = {arm: finite(get_path(m, "stability", "seed_sd")) for arm, m in arms.items()}
    scores = _minmax({arm: None if sd is None else -sd for arm, sd in sds.items()})
    for arm in scores:
        if _divergences(arms[arm]) > 0:
            scores[arm] = max(0.0, scores[arm] - DIVERGENCE_PENALTY)
    return scores


AXIS_SCORES = {"alignment": _alignment, "diversity": _diversity, "cost": _cost, "stability": _stability}


def _scores_and_notes(results: dict) -> tuple[dict[str, dict[str, float]], list[str]]:
    arms = results.get("arms") if isinstance(results, dict) else None
    if not arms:
        raise TuneoffError("results: there are no arms to compare")
    scores: dict[str, dict[str, float]] = {arm: {} for arm in arms}
    notes = []
    for axis, score in AXIS_SCORES.items():
        for arm, value in score(arms).items():
            scores[arm][axis] = value
        missing = [arm for arm in arms if axis not in scores[arm]]
        if missing:
            notes.append(
                f"No {MEASURED_AS[axis]} for {', '.join(missing)}: the {axis} axis is skipped for "
                f"{'it' if len(missing) == 1 else 'them'} and the weighted score uses the other axes."
            )
    return scores, notes


def _measured(arms: dict) -> dict:
    """The arms that have a value on at least one axis."""
    if not arms:
        return {}
    scores, _ = _scores_and_notes({"arms": arms})
    return {arm: m for arm, m in arms.items() if scores[arm]}


def _weighted(axes: dict[str, float], weights: dict[str, float]) -> float:
    total = sum(weights[axis] for axis in axes)
    return sum(weights[axis] * score for axis, score in axes.items()) / total if total > 0 else 0.0


def _is_base(name: str, arm: dict) -> bool:
    return arm.get("method", name) == "base"


def _divergences(arm: dict) -> int:
    return int(finite(get_path(arm, "stability", "divergence_events")) or 0)


def _overlap(a, b) -> bool | None:
    """Whether two 95% CIs overlap; None when either is missing or NaN (one seed)."""
    bounds = [(finite(get_path(ci, "ci_low")), finite(get_path(ci, "ci_high"))) for ci in (a, b)]
    if any(v is None for pair in bounds for v in pair):
        return None
    (low_a, high_a), (low_b, high_b) = bounds
    return low_a <= high_b and low_b <= high_a


# --- explanation ---------------------------------------------------------------------------------------------


def _weights_sentence(weights: dict[str, float]) -> str:
    used = sorted((axis for axis in AXES if weights[axis] > 0), key=lambda axis: -weights[axis])
    return "Priorities: " + ", ".join(f"{axis} {weights[axis]:.0%}" for axis in used) + "."


def _ranking_sentence(ranking: list[dict]) -> str:
    order = ", ".join(f"{row['arm']} {row['score']:.2f}" for row in ranking)
    return f"Recommended: {ranking[0]['arm']}. Weighted scores (0 to 1, across these arms): {order}."


def _gold_sentence(arms: dict, choice: str) -> str:
    by_gold = sorted(
        ((ci_mean(m.get("gold_reward")), arm) for arm, m in arms.items() if ci_mean(m.get("gold_reward")) is not None),
        key=lambda pair: -pair[0],
    )
    if not by_gold:
        return "No arm has a gold reward measurement."
    gold = {arm: format_ci(arms[arm]["gold_reward"]) for _, arm in by_gold}
    first = by_gold[0][1]
    if len(by_gold) == 1:
        return f"Only {first} has a gold reward: {gold[first]}."
    second = by_gold[1][1]
    if _printed_mean(gold[first]) == _printed_mean(gold[second]):  # level to the digits shown: no "highest" to name
        sentence = (
            f"{first} and {second} share the highest gold reward to the digits shown, {gold[first]} and {gold[second]}"
        )
    else:
        sentence = f"{first} has the highest gold reward, {gold[first]}, vs {second} {gold[second]}"
    if choice in gold and choice not in (first, second):
        sentence += f"; the recommended {choice} has {gold[choice]}"
    return sentence + "."


def _printed_mean(text: str) -> str:
    """The mean of a ``format_ci`` text (what precedes its interval)."""
    return text.partition(" [")[0]


def _alignment_numbers(a: dict, b: dict) -> str:
    return f"gold reward {format_ci(a.get('gold_reward'))} vs {format_ci(b.get('gold_reward'))}"


# Every number an explanation quotes comes as a fact: its text ("LABEL A vs B") and which arm it favours, read
# from the printed numbers and the metric's direction (+1 the first arm, -1 the second, 0 when they print the
# same). Words are then chosen from the facts, so "more diverse" only ever stands before numbers that say so.


def _side(a, b, a_text: str, b_text: str, higher_is_better: bool) -> int:
    if a is None or b is None or a_text == b_text:
        return 0
    return 1 if (a > b) == higher_is_better else -1


def _fact(label: str, a, b, format_value, higher_is_better: bool, template: str = "{label} {a} vs {b}"):
    """(text, side) of one measured number of two arms, or None when either arm lacks it."""
    if finite(a) is None or finite(b) is None:
        return None
    a_text, b_text = format_value(a), format_value(b)
    side = _side(finite(a), finite(b), a_text, b_text, higher_is_better)
    return template.format(label=label, a=a_text, b=b_text), side


DIVERSITY_LABELS = {"ead": "EAD", "self_bleu": "self-BLEU (lower = more diverse)", "embedding": "embedding diversity"}


def _alignment_facts(a: dict, b: dict) -> list[tuple[str, int]]:
    mean_a, mean_b = ci_mean(a.get("gold_reward")), ci_mean(b.get("gold_reward"))
    if mean_a is None or mean_b is None:
        return []
    text_a, text_b = format_ci(a.get("gold_reward")), format_ci(b.get("gold_reward"))
    side = _side(mean_a, mean_b, _printed_mean(text_a), _printed_mean(text_b), higher_is_better=True)
    return [(f"gold reward {text_a} vs {text_b}", side)]


def _diversity_facts(a: dict, b: dict) -> list[tuple[str, int]]:
    """The six components, the two the summary table shows first (across-input embedding, per-input EAD)."""
    facts = []
    shown_first = [("across_input", "embedding"), ("per_input", "ead")]
    for scope, metric in shown_first + [c for c in DIVERSITY_COMPONENTS if c not in shown_first]:
        label = f"{scope.replace('_', '-')} {DIVERSITY_LABELS[metric]}"
        facts.append(
            _fact(
                label,
                ci_mean(get_path(a, "diversity", scope, metric)),
                ci_mean(get_path(b, "diversity", scope, metric)),
                format_number,
                metric != "self_bleu",
            )
        )
    return [f for f in facts if f is not None]


def _cost_facts(a: dict, b: dict) -> list[tuple[str, int]]:
    fact = _fact(
        "",
        ci_mean(get_path(a, "cost", "wall_s")),
        ci_mean(get_path(b, "cost", "wall_s")),
        format_seconds,
        False,
        "{a} vs {b} of wall time",
    )
    return [fact] if fact else []


def _stability_facts(a: dict, b: dict) -> list[tuple[str, int]]:
    """Divergence events first (when either arm had one: they decide), then the seed sd; lower is better for both."""
    facts = []
    if _divergences(a) or _divergences(b):
        facts.append(_fact("divergence events", _divergences(a), _divergences(b), format_number, False))
    facts.append(
        _fact(
            "seed sd of gold reward",
            get_path(a, "stability", "seed_sd"),
            get_path(b, "stability", "seed_sd"),
            format_number,
            False,
        )
    )
    return [f for f in facts if f is not None]


AXIS_WORDS = {
    "alignment": ("more aligned", "less aligned", _alignment_facts),
    "diversity": ("more diverse", "less diverse", _diversity_facts),
    "cost": ("cheaper", "more expensive", _cost_facts),
    "stability": ("more stable", "less stable", _stability_facts),
}
"""axis -> (word when the facts favour the first arm, word when they favour the second, the facts)."""


def _phrases(axis: str, a: dict, b: dict) -> tuple[str | None, str | None]:
    """What ``a`` is against ``b`` on ``axis``: (the phrase of the facts in its favour, of those against it), each
    quoting its own numbers; both when the measures disagree, neither when every one prints the same. An axis of
    many measures that all agree quotes its first two, with how many there are."""
    up, down, measure = AXIS_WORDS[axis]
    facts = measure(a, b)
    pro = [text for text, side in facts if side > 0]
    con = [text for text, side in facts if side < 0]

    def phrase(word: str, texts: list[str]) -> str | None:
        if not texts:
            return None
        if len(texts) == len(facts) and len(facts) > 2:
            return f"{word} on all {len(facts)} measures ({', '.join(texts[:2])})"
        count = f" on {len(texts)} of {len(facts)} measures" if len(facts) > 1 and len(texts) < len(facts) else ""
        return f"{word}{count} ({', '.join(texts)})"

    return phrase(up, pro), phrase(down, con)


def _versus_sentence(arms: dict, first: dict, second: dict, weights: dict[str, float]) -> str:
    better, worse, compared = [], [], False
    for axis in sorted((axis for axis in AXES if weights[axis] > 0), key=lambda axis: -weights[axis]):
        if axis not in first["axes"] or axis not in second["axes"]:
            continue
        compared = True
        up, down = _phrases(axis, arms[first["arm"]], arms[second["arm"]])
        better += [up] if up else []
        worse += [down] if down else []
    if not better and not worse:
        if not compared:
            return f"{first['arm']} and {second['arm']} have no weighted axis measured for both."
        return f"{first['arm']} and {second['arm']} measure the same on every weighted axis, to the digits shown."
    sentence = f"Against the runner-up {second['arm']}, {first['arm']} is " + (
        _join(better) if better else "no better on any axis"
    )
    return sentence + (", but " + _join(worse) if worse else "") + "."


def _join(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _paired_ci(results: dict, choice: str, runner: str) -> tuple[float, float] | None:
    win = get_path(results, "win_rates", choice, runner)
    low, high = finite(get_path(win, "ci_low")), finite(get_path(win, "ci_high"))
    return None if low is None or high is None else (low, high)


def _paired_sentence(results: dict, choice: str, runner: str) -> str:
    """The sharper test: both arms' responses to the same prompts with the same seed, compared by gold score
    (two means' CIs overlap more easily than a paired win rate's CI reaches 0.5)."""
    win = get_path(results, "win_rates", choice, runner)
    low, high = _paired_ci(results, choice, runner)
    verdict = (
        "includes 0.5: the difference is within noise"
        if low <= 0.5 <= high
        else f"excludes 0.5: {choice if low > 0.5 else runner} is better on paired prompts beyond seed noise"
    )
    return (
        f"Paired on the same prompts and seeds, {choice} beats {runner} {format_ci(win)} of the time (ties half); "
        f"the 95% CI {verdict}."
    )


def _noise_sentence(arms: dict, choice: str, runner: str, overlap: bool | None) -> str:
    a, b = arms[choice], arms[runner]
    if overlap is None:
        return (
            f"Whether {choice} and {runner} differ in gold reward beyond noise is unknown: at least one has no "
            f"95% confidence interval (fewer than 2 seeds)."
        )
    if not overlap:
        return (
            f"The gold-reward difference between {choice} and {runner} is beyond seed noise: their 95% CIs do not "
            f"overlap ({_alignment_numbers(a, b)})."
        )
    return (
        f"The alignment difference between {choice} and {runner} is within noise: their 95% CIs of gold reward "
        f"overlap ({_alignment_numbers(a, b)})."
    )


def _winner(axis: str, a_name: str, b_name: str, arms: dict) -> tuple[str, str] | None:
    """(the arm the decisive fact of ``axis`` favours, the quoted facts that agree with it): the first fact that
    differs decides (for stability: divergence events, then seed sd); None when every fact prints the same."""
    side = next((side for _, side in AXIS_WORDS[axis][2](arms[a_name], arms[b_name]) if side), 0)
    if not side:
        return None
    winner, other = (a_name, b_name) if side > 0 else (b_name, a_name)
    return winner, _agreeing(axis, winner, other, arms)


def _agreeing(axis: str, winner: str, other: str, arms: dict) -> str:
    """The facts of ``axis`` that favour ``winner`` over ``other``, as quoted numbers."""
    return ", ".join(text for text, side in AXIS_WORDS[axis][2](arms[winner], arms[other]) if side > 0)


def _prefer_sentence(arms: dict, choice: str, runner: str, within_noise: bool | None) -> str:
    """When alignment cannot separate the two, which is cheaper or more stable (with a leading space)."""
    if not within_noise:
        return ""
    cheap, stable = _winner("cost", choice, runner, arms), _winner("stability", choice, runner, arms)
    cheaper, stabler = (cheap or (None, ""))[0], (stable or (None, ""))[0]
    if cheaper and cheaper == stabler:
        return f" {cheaper} is then preferable: it is cheaper ({cheap[1]}) and more stable ({stable[1]})."
    if cheaper and stabler:
        return f" Then prefer {cheaper} when cost matters ({cheap[1]}), {stabler} when stability does ({stable[1]})."
    if cheaper or stabler:
        arm, words, numbers = (cheaper, "cheaper", cheap[1]) if cheaper else (stabler, "more stable", stable[1])
        return f" {arm} is then preferable: it is {words} ({numbers})."
    return ""


def _base_sentence(arms: dict, ranking: list[dict]) -> str:
    choice = ranking[0]["arm"]
    if _is_base(choice, arms[choice]):
        tuned = [row for row in ranking if not _is_base(row["arm"], arms[row["arm"]])]
        if not tuned:
            return ""
        best = tuned[0]
        return (
            f"No tuned arm beats the untuned {choice} under these priorities; the best tuned arm is {best['arm']} "
            f"(weighted score {best['score']:.2f}), {_alignment_numbers(arms[best['arm']], arms[choice])} for {choice}."
        )
    win, controlled = arms[choice].get("win_rate_vs_base"), arms[choice].get("length_controlled_win_rate_vs_base")
    base = next((arm for arm, m in arms.items() if _is_base(arm, m)), None)
    if base is None:
        return ""
    sentence = (
        f"{choice}'s win rate against {base} by gold score is {format_ci(win)} (ties count half)"
        if ci_mean(win) is not None
        else ""
    )
    if ci_mean(controlled) is not None:
        sentence += f"; length-controlled {format_ci(controlled)}"
    overlap = _overlap(arms[choice].get("gold_reward"), arms[base].get("gold_reward"))
    numbers = _alignment_numbers(arms[choice], arms[base])
    side = next((side for _, side in _alignment_facts(arms[choice], arms[base])), 0)
    if overlap is True:
        claim = (
            f"gold reward is not above {base}'s beyond seed noise ({numbers}): with these seeds and prompts "
            f"the gain over the untuned model is not established"
        )
    elif overlap is False and side:
        claim = f"gold reward is {'above' if side > 0 else 'below'} {base}'s beyond seed noise ({numbers})"
    else:
        claim = ""
    if not sentence:
        return f"{choice}'s {claim}." if claim else ""
    if claim:
        sentence += (". Its " if overlap is True else ", and its ") + claim
    return sentence + "."


def _divergence_sentence(arms: dict, choice: str) -> str:
    events = _divergences(arms[choice])
    if not events:
        return ""
    return (
        f"Caution: {choice} had {events} divergence event{'s' if events > 1 else ''} over its seeds "
        f"(KL blow-up, NaN or reward collapse)."
    )
