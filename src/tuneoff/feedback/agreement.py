"""How much annotators agree, and how biased they are: pure functions on plain data.

Labels are any hashable values (the store uses "a", "b", "tie"; skips are not labels and never reach
these functions). ``ratings`` maps item -> {annotator: label}. Every statistic that is undefined on its
input (no pairs, or no variation at all) is ``nan``, never a division error.

References: Cohen (1960) kappa; Fleiss (1971) kappa; Krippendorff, *Content Analysis* (2004), alpha for
nominal data via the coincidence matrix.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass
from itertools import combinations
from typing import Hashable, Iterable, Mapping, Sequence

NAN = float("nan")
Ratings = Mapping[Hashable, Mapping[str, Hashable]]


@dataclass(frozen=True)
class Rate:
    """``hits`` out of ``n``, with a two-sided exact binomial test against 1/2 (no bias)."""

    hits: int
    n: int

    @property
    def rate(self) -> float:
        return self.hits / self.n if self.n else NAN

    @property
    def p_value(self) -> float:
        return binomial_two_sided_p(self.hits, self.n)

    def as_dict(self) -> dict:
        return {"rate": self.rate, "hits": self.hits, "n": self.n, "p_value": self.p_value}


def binomial_two_sided_p(hits: int, n: int) -> float:
    """P(a result at least as far from n/2 as ``hits``) for a fair coin; exact (big integers)."""
    if n == 0:
        return NAN
    tail = min(hits, n - hits)
    if 2 * tail == n:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(tail + 1)) / 2**n)


def cohen_kappa(pairs: Sequence[tuple[Hashable, Hashable]]) -> float:
    """Cohen's kappa of two raters over items both labelled: (p_o - p_e) / (1 - p_e).

    p_o is the share of items with equal labels; p_e = sum_c p1(c) * p2(c), each rater's own marginals.
    """
    n = len(pairs)
    if n == 0:
        return NAN
    p_o = sum(x == y for x, y in pairs) / n
    first, second = Counter(x for x, _ in pairs), Counter(y for _, y in pairs)
    p_e = sum(first[c] * second[c] for c in first) / n**2
    return (p_o - p_e) / (1 - p_e) if p_e < 1 else NAN


def fleiss_kappa(counts: Sequence[Sequence[int]]) -> float:
    """Fleiss' kappa from an items x categories table of label counts (n_ij raters put item i in c_j).

    P_i = sum_j n_ij (n_ij - 1) / (n_i (n_i - 1)), P_bar their mean, p_j = sum_i n_ij / sum_i n_i,
    P_e = sum_j p_j^2, kappa = (P_bar - P_e) / (1 - P_e). With the same n_i everywhere this is Fleiss
    (1971); items may have different n_i here (items with fewer than two labels are left out).
    """
    rows = [row for row in counts if sum(row) >= 2]
    if not rows:
        return NAN
    agreement = [sum(c * (c - 1) for c in row) / (sum(row) * (sum(row) - 1)) for row in rows]
    p_bar = sum(agreement) / len(rows)
    total = sum(sum(row) for row in rows)
    p_e = sum((sum(row[j] for row in rows) / total) ** 2 for j in range(len(rows[0])))
    return (p_bar - p_e) / (1 - p_e) if p_e < 1 else NAN


def krippendorff_alpha_nominal(units: Iterable[Sequence[Hashable]]) -> float:
    """Krippendorff's alpha for nominal labels: 1 - (n - 1) * sum_{c!=k} o_ck / sum_{c!=k} n_c n_k.

    Each unit holds the labels its raters gave (any number; missing ones simply absent). o_ck, the
    coincidence matrix, counts ordered pairs of labels within a unit, each weighted 1 / (m_u - 1);
    n_c = sum_k o_ck and n = sum_c n_c count the pairable labels. Units with one label are left out.
    """
    o: dict[tuple, float] = defaultdict(float)
    for values in units:
        m = len(values)
        if m < 2:
            continue
        present = Counter(values)
        for c in present:
            for k in present:
                o[c, k] += present[c] * (present[k] - (c == k)) / (m - 1)
    n_c: dict = defaultdict(float)
    for (c, _), value in o.items():
        n_c[c] += value
    n = sum(n_c.values())
    observed = sum(value for (c, k), value in o.items() if c != k)
    expected = n * n - sum(v * v for v in n_c.values())  # sum over c != k of n_c n_k
    return 1 - (n - 1) * observed / expected if expected > 0 else NAN


def majority(labels: Iterable[Hashable]) -> Hashable | None:
    """The label given strictly more often than any other, else None (e.g. one vote each for a and b)."""
    ranked = Counter(labels).most_common(2)
    if not ranked or (len(ranked) == 2 and ranked[0][1] == ranked[1][1]):
        return None
    return ranked[0][0]


def pairwise_cohen_kappa(ratings: Ratings) -> dict[tuple[str, str], tuple[float, int]]:
    """(kappa, items both labelled) for every pair of annotators that share at least one item."""
    shared: dict[tuple[str, str], list] = defaultdict(list)
    for labels in ratings.values():
        for first, second in combinations(sorted(labels), 2):
            shared[first, second].append((labels[first], labels[second]))
    return {pair: (cohen_kappa(pairs), len(pairs)) for pair, pairs in sorted(shared.items())}


def fleiss_kappa_of(ratings: Ratings) -> tuple[float, int]:
    """Fleiss' kappa over items with at least two labels, and how many such items there are."""
    categories = sorted({label for labels in ratings.values() for label in labels.values()}, key=str)
    table = [[list(labels.values()).count(c) for c in categories] for labels in ratings.values() if len(labels) >= 2]
    return fleiss_kappa(table), len(table)


def krippendorff_alpha_of(ratings: Ratings) -> tuple[float, int]:
    units = [list(labels.values()) for labels in ratings.values() if len(labels) >= 2]
    return krippendorff_alpha_nominal(units), len(units)


def agreement_with_majority(ratings: Ratings) -> dict[str, Rate]:
    """Per annotator: how often their label equals the majority of the *other* annotators of the item.

    Leaving the annotator out keeps them from agreeing with themselves; items where the others have no
    strict majority (or where the annotator is alone) are not counted.
    """
    hits: Counter = Counter()
    counted: Counter = Counter()
    for labels in ratings.values():
        for annotator, label in labels.items():
            others = majority(v for name, v in labels.items() if name != annotator)
            if others is not None:
                counted[annotator] += 1
                hits[annotator] += label == others
    return {name: Rate(hits[name], counted[name]) for name in sorted(counted)}


def position_bias(judgments: Iterable[tuple[bool, str]]) -> Rate:
    """Rate of choosing the left side among (a_on_left, preferred) judgments that chose a or b."""
    decided = [(a_on_left, preferred) for a_on_left, preferred in judgments if preferred in ("a", "b")]
    return Rate(sum((preferred == "a") == a_on_left for a_on_left, preferred in decided), len(decided))


def length_bias(judgments: Iterable[tuple[int, int, str]]) -> Rate:
    """Rate of choosing the longer response among (len_a, len_b, preferred) with a winner and unequal lengths."""
    decided = [(len_a, len_b, p) for len_a, len_b, p in judgments if p in ("a", "b") and len_a != len_b]
    return Rate(sum((p == "a") == (len_a > len_b) for len_a, len_b, p in decided), len(decided))


def median_seconds(seconds: Iterable[float | None]) -> float:
    values = [s for s in seconds if s is not None]
    return statistics.median(values) if values else NAN


def summarize(judgments: Sequence) -> dict:
    """All the statistics of ``tuneoff label stats`` from store judgments (``tuneoff.feedback.store.Judgment``)."""
    labelled = [j for j in judgments if j.preferred is not None]
    ratings: dict[str, dict[str, str]] = defaultdict(dict)
    for j in labelled:
        ratings[j.task_id][j.annotator] = j.preferred
    names = sorted({j.annotator for j in judgments})
    fleiss, fleiss_items = fleiss_kappa_of(ratings)
    alpha, alpha_items = krippendorff_alpha_of(ratings)
    shown = [j for j in labelled if j.a_on_left is not None]
    return {
        "judgments": len(judgments),
        "labels": dict(Counter(j.preferred for j in labelled)),
        "skips": sum(j.choice == "skip" for j in judgments),
        "tasks_labelled": len(ratings),
        "annotators": names,
        "cohen_kappa": [
            {"annotators": list(pair), "kappa": kappa, "n": n}
            for pair, (kappa, n) in pairwise_cohen_kappa(ratings).items()
        ],
        "fleiss_kappa": {"value": fleiss, "items": fleiss_items},
        "krippendorff_alpha": {"value": alpha, "items": alpha_items},
        "agreement_with_majority": {name: rate.as_dict() for name, rate in agreement_with_majority(ratings).items()},
        "position_bias": _by_annotator(position_bias, shown, lambda j: (j.a_on_left, j.preferred)),
        "length_bias": _by_annotator(length_bias, labelled, lambda j: (j.len_a, j.len_b, j.preferred)),
        # Without a recorded order (imported labels) this is the only trace of position bias left:
        # PandaLM, for one, listed response a first.
        "a_chosen": Rate(
            sum(j.preferred == "a" for j in labelled), sum(j.preferred != "tie" for j in labelled)
        ).as_dict(),
        "median_seconds": median_seconds(j.seconds for j in judgments),
        "timed_judgments": sum(j.seconds is not None for j in judgments),
    }


def _by_annotator(metric, judgments: Sequence, fields) -> dict:
    """A bias ``metric`` over all ``judgments`` and over each annotator's own."""
    names = sorted({j.annotator for j in judgments})
    return {
        "overall": metric(map(fields, judgments)).as_dict(),
        "per_annotator": {
            name: metric(fields(j) for j in judgments if j.annotator == name).as_dict() for name in names
        },
    }


def format_summary(summary: dict) -> str:
    """The summary as the few lines a person reads."""

    def value(x: float) -> str:  # an undefined statistic (one shared task, no variation) reads n/a, not nan
        return "n/a" if x != x else f"{x:.3f}"

    def pct(rate: dict, test: bool = True) -> str:
        if not rate["n"]:
            return "n/a (no judgments to count)"
        # The binomial test asks "different from 1/2?": right for biases, meaningless for agreement.
        return f"{rate['rate']:.1%} of {rate['n']}" + (f" (binomial p = {rate['p_value']:.3g})" if test else "")

    lines = [
        f"judgments: {summary['judgments']} ({summary['skips']} skips) on {summary['tasks_labelled']} tasks by "
        f"{len(summary['annotators'])} annotators; labels {summary['labels']}",
        f"Fleiss' kappa: {value(summary['fleiss_kappa']['value'])} over {summary['fleiss_kappa']['items']} tasks with "
        f">= 2 labels",
        f"Krippendorff's alpha (nominal): {value(summary['krippendorff_alpha']['value'])} "
        f"over {summary['krippendorff_alpha']['items']} tasks",
        "Cohen's kappa per pair:",
        *[
            f"  {row['annotators'][0]} ~ {row['annotators'][1]}: {value(row['kappa'])} (n = {row['n']})"
            for row in summary["cohen_kappa"]
        ],
        "agreement with the majority of the other annotators:",
        *[f"  {name}: {pct(rate, test=False)}" for name, rate in summary["agreement_with_majority"].items()],
        f"position bias (chose the left side; only judgments with a recorded order): "
        f"{pct(summary['position_bias']['overall'])}",
        *[f"  {name}: {pct(rate)}" for name, rate in summary["position_bias"]["per_annotator"].items()],
        f"response a chosen (a = first listed in imported files): {pct(summary['a_chosen'])}",
        f"length bias (chose the longer response): {pct(summary['length_bias']['overall'])}",
        *[f"  {name}: {pct(rate)}" for name, rate in summary["length_bias"]["per_annotator"].items()],
        "median time per judgment: "
        + (
            f"{summary['median_seconds']:.1f} s over {summary['timed_judgments']} timed judgments"
            if summary["timed_judgments"]
            else "n/a (no timed judgments)"
        ),
    ]
    return "\n".join(lines)


def finite(value):
    """NaN and infinities (undefined statistics) become JSON null instead of non-standard tokens, all the way down
    (`label stats --json`, the admin API, results.json)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(item) for item in value]
    return value
