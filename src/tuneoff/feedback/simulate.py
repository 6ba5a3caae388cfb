"""Simulated annotators: label pairs of responses by a gold score with Bradley–Terry noise and biases.

An annotator shown responses y1 (first) and y2 (second) prefers y1 with probability (Bradley & Terry 1952)

    P(y1 ≻ y2) = σ((s1 − s2) / T  +  b_len · (n1 − n2) / L  +  b_pos)

s = the gold score of each response (e.g. :meth:`tuneoff.feedback.gold.GoldJudge.logit`), T the
temperature (noise: T → 0 always picks the higher score, large T approaches a coin flip), n the length in
words, L = ``length_scale`` words, b_len the length bias (per L words of difference: linear, so a much
longer response gains more), b_pos the position bias toward the first-shown response. Biases are not
divided by T: they are the annotator's habits, whatever the quality gap.

The records are the project's preference format, ``{"prompt", "chosen", "rejected", "annotator", "p_first"}``,
so real and simulated feedback flow through the same code. Each annotator draws from its own
``numpy.random.Generator`` seeded by ``Annotator.seed``: the same call gives the same labels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import numpy as np

from tuneoff.feedback.judges import judge_text


@dataclass(frozen=True)
class Annotator:
    """One simulated person: how noisy and how biased their choices are."""

    id: str
    """Written to each record's ``"annotator"`` field."""
    temperature: float = 1.0
    """T: the score gap is divided by it. 0 means deterministic (ties then go by the biases alone)."""
    length_bias: float = 0.0
    """b_len: logit added per ``length_scale`` words that the first response is longer than the second."""
    position_bias: float = 0.0
    """b_pos: logit added in favour of the response shown first."""
    seed: int = 0
    """Seeds this annotator's own random generator."""
    length_scale: float = 10.0
    """L: words of length difference that earn ``length_bias`` once."""

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"annotator {self.id!r}: temperature must be >= 0, got {self.temperature}")
        if not self.length_scale > 0:
            raise ValueError(f"annotator {self.id!r}: length_scale must be > 0, got {self.length_scale}")


class ResponsePair(NamedTuple):
    """Two responses to one prompt, in the order they are shown (``first`` on the left)."""

    prompt: str
    first: str
    second: str


# ---------------------------------------------------------------- the math (pure)


def sigmoid(z: np.ndarray) -> np.ndarray:
    """σ(z) = 1 / (1 + e^−z), without overflow for large |z| (σ(±inf) = 1, 0)."""
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def bias_logit(
    length_first, length_second, length_bias: float = 0.0, position_bias: float = 0.0, length_scale: float = 10.0
) -> np.ndarray:
    """b_len · (n1 − n2) / L + b_pos: the annotator's habits, added to the logit of preferring the first.  # (N,)"""
    length_difference = np.asarray(length_first, dtype=np.float64) - np.asarray(length_second, dtype=np.float64)
    return length_bias * length_difference / length_scale + position_bias


def bradley_terry_probability(score_first, score_second, temperature: float = 1.0, bias=0.0) -> np.ndarray:
    """P(first preferred) = σ((s1 − s2) / T + bias).  # (N,)

    With T = 0 the score gap decides alone (σ(±inf)); equal scores then fall back to σ(bias).
    """
    gap = np.asarray(score_first, dtype=np.float64) - np.asarray(score_second, dtype=np.float64)
    if temperature > 0:
        z = gap / temperature
    else:
        z = np.where(gap > 0, np.inf, np.where(gap < 0, -np.inf, 0.0))
    return sigmoid(z + np.asarray(bias, dtype=np.float64))


def response_length(text: str) -> int:
    """Length in whitespace-separated words (what a person sees as "longer")."""
    return len(text.split())


def probability_first(annotator: Annotator, score_first, score_second, length_first, length_second) -> np.ndarray:
    """P(this annotator prefers the first-shown response) for aligned arrays of scores and lengths.  # (N,)"""
    bias = bias_logit(
        length_first, length_second, annotator.length_bias, annotator.position_bias, annotator.length_scale
    )
    return bradley_terry_probability(score_first, score_second, annotator.temperature, bias)


# ---------------------------------------------------------------- labelling


def simulate_preferences(
    pairs: Sequence[ResponsePair | tuple[str, str, str]],
    annotators: Sequence[Annotator],
    scorer: Callable[[list[str]], Sequence[float]],
    *,
    every_annotator: bool = False,
    shuffle_order: bool = False,
    scored_text: Callable[[str, str], str] = judge_text,
) -> list[dict]:
    """Label ``pairs`` with simulated annotators; return preference records.

    pairs: ``(prompt, first, second)``, shown in that order unless ``shuffle_order``. Pairs whose
        responses are equal or empty are skipped: no preference record can hold them.
    scorer: texts -> scores, called once on all distinct texts (e.g. ``judge.logit``).
    every_annotator: each pair labelled by every annotator (for agreement statistics); otherwise pair i
        goes to ``annotators[i % len(annotators)]``.
    shuffle_order: each annotator sees each pair in a random order (a coin from its generator), as the
        labelling app does, so position bias becomes noise rather than a bias toward ``first``.
    scored_text: what the scorer reads for a (prompt, response); default :func:`tuneoff.feedback.judges.judge_text`.

    Records, in pair order (annotator order within a pair): ``{"prompt", "chosen", "rejected",
    "annotator", "p_first"}``, with ``p_first`` = P(the response shown first wins) for that annotator.
    """
    if not annotators:
        raise ValueError("simulate_preferences needs at least one annotator")
    pairs = [ResponsePair(*pair) for pair in pairs]
    kept = [i for i, p in enumerate(pairs) if p.first.strip() and p.second.strip() and p.first != p.second]
    texts = sorted({scored_text(pairs[i].prompt, response) for i in kept for response in pairs[i][1:]})
    scores = dict(zip(texts, np.asarray(scorer(texts), dtype=np.float64))) if texts else {}

    labels: dict[tuple[int, int], dict] = {}  # (pair index, annotator index) -> record
    for a, annotator in enumerate(annotators):
        mine = kept if every_annotator else [i for i in kept if i % len(annotators) == a]
        rng = np.random.default_rng(annotator.seed)
        swap = rng.random(len(mine)) < 0.5 if shuffle_order else np.zeros(len(mine), dtype=bool)  # (n,)
        shown = [
            (pairs[i].second, pairs[i].first) if swapped else (pairs[i].first, pairs[i].second)
            for i, swapped in zip(mine, swap)
        ]
        score_first = [scores[scored_text(pairs[i].prompt, first)] for i, (first, _) in zip(mine, shown)]
        score_second = [scores[scored_text(pairs[i].prompt, second)] for i, (_, second) in zip(mine, shown)]
        p_first = probability_first(
            annotator,
            score_first,
            score_second,  # (n,)
            [response_length(first) for first, _ in shown],
            [response_length(second) for _, second in shown],
        )
        first_wins = rng.random(len(mine)) < p_first  # (n,) one Bradley–Terry draw per pair
        for i, (first, second), p, win in zip(mine, shown, p_first, first_wins):
            chosen, rejected = (first, second) if win else (second, first)
            labels[i, a] = dict(
                prompt=pairs[i].prompt, chosen=chosen, rejected=rejected, annotator=annotator.id, p_first=float(p)
            )
    return [labels[key] for key in sorted(labels)]


def make_annotators(
    n: int,
    *,
    temperature: float = 1.0,
    length_bias: float = 0.0,
    position_bias: float = 0.0,
    seed: int = 0,
    prefix: str = "sim",
) -> list[Annotator]:
    """``n`` annotators with the same habits and independent generators (ids ``sim-0``, ``sim-1``, ...).

    Their seeds are spawned from ``seed`` (``numpy.random.SeedSequence``), so panels built from nearby
    experiment seeds do not share random streams.
    """
    children = np.random.SeedSequence(seed).spawn(n)
    return [
        Annotator(f"{prefix}-{k}", temperature, length_bias, position_bias, int(child.generate_state(1)[0]))
        for k, child in enumerate(children)
    ]


def mixed_panel(seed: int = 0) -> list[Annotator]:
    """Four annotators with different habits, on the gold judge's logit scale (|logit| ~ 2 typical).

    careful (little noise), typical, hasty (noisy, favours the first shown), verbose-lover (favours the
    longer response: +0.5 logit per 10 words).
    """
    settings = [
        ("careful", 0.5, 0.0, 0.0),
        ("typical", 1.0, 0.0, 0.0),
        ("hasty", 2.0, 0.0, 0.5),
        ("verbose-lover", 1.0, 0.5, 0.0),
    ]
    children = np.random.SeedSequence(seed).spawn(len(settings))
    return [
        Annotator(name, temperature, length_bias, position_bias, int(child.generate_state(1)[0]))
        for (name, temperature, length_bias, position_bias), child in zip(settings, children)
    ]
