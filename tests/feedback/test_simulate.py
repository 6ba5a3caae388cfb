"""Simulated annotators: hand-computed Bradley–Terry probabilities, sampling rates, seeds and biases."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from tuneoff.feedback.simulate import (
    Annotator,
    ResponsePair,
    bias_logit,
    bradley_terry_probability,
    make_annotators,
    mixed_panel,
    probability_first,
    sigmoid,
    simulate_preferences,
)


def by_word(scores: dict[str, float]):
    """A scorer that reads the last word of each text (the default scored text is prompt + response)."""
    return lambda texts: [scores[text.split()[-1]] for text in texts]


def first_rate(records, pairs) -> float:
    firsts = {(pair.prompt, pair.first) for pair in map(ResponsePair._make, pairs)}
    return float(np.mean([(record["prompt"], record["chosen"]) in firsts for record in records]))


# ---------------------------------------------------------------- the math


def test_bradley_terry_hand_values():
    # σ(1) = 1 / (1 + e^-1) = 0.7310585786300049
    assert bradley_terry_probability(2.0, 1.0) == pytest.approx(0.7310585786300049, abs=1e-15)
    # T = 2: σ(0.5) = 0.6224593312018546
    assert bradley_terry_probability(2.0, 1.0, temperature=2.0) == pytest.approx(0.6224593312018546, abs=1e-15)
    # T = 0.5, bias 0.5: σ(1 / 0.5 + 0.5) = σ(2.5) = 0.9241418199787566
    assert bradley_terry_probability(2.0, 1.0, 0.5, 0.5) == pytest.approx(0.9241418199787566, abs=1e-15)
    # symmetric: P(1 ≻ 2) + P(2 ≻ 1) = 1 without bias
    assert bradley_terry_probability(0.3, -1.2, 0.7) + bradley_terry_probability(-1.2, 0.3, 0.7) == pytest.approx(1.0)
    np.testing.assert_allclose(
        bradley_terry_probability([0.0, 1.0], [0.0, 3.0], 1.0, [0.0, 1.0]), [0.5, 1 / (1 + math.e)]
    )


def test_zero_temperature_is_deterministic():
    probability = bradley_terry_probability([2.0, 1.0, 1.0, 1.0], [1.0, 2.0, 1.0, 1.0], 0.0, [-5.0, 5.0, 0.0, 1.0])
    np.testing.assert_allclose(probability, [1.0, 0.0, 0.5, 1 / (1 + math.exp(-1))])


def test_bias_logit_hand_values():
    # 0.5 · (30 − 10) / 10 + 0.25 = 1.25
    assert bias_logit(30, 10, length_bias=0.5, position_bias=0.25) == pytest.approx(1.25)
    # sign follows the first response: shorter first means a negative push
    assert bias_logit(5, 25, length_bias=0.5, length_scale=20.0) == pytest.approx(-0.5)
    # an annotator combines both: σ((0 − 1)/1 + 0.5 · (25 − 5)/10) = σ(0) = 0.5
    annotator = Annotator("a", temperature=1.0, length_bias=0.5)
    assert probability_first(annotator, [0.0], [1.0], [25], [5]) == pytest.approx([0.5])


def test_sigmoid_saturates_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(sigmoid([-1000.0, 0.0, 1000.0, -np.inf, np.inf]), [0.0, 0.5, 1.0, 0.0, 1.0])


def test_annotator_rejects_bad_settings():
    with pytest.raises(ValueError, match="temperature"):
        Annotator("a", temperature=-1.0)
    with pytest.raises(ValueError, match="length_scale"):
        Annotator("a", length_scale=0.0)


# ---------------------------------------------------------------- sampling


def test_empirical_first_rate_matches_probability():
    n = 20000
    pairs = [(f"prompt {i} ", "good", "bad") for i in range(n)]
    annotator = Annotator("a", temperature=1.0, position_bias=0.3, seed=7)
    records = simulate_preferences(pairs, [annotator], by_word({"good": 1.0, "bad": 0.2}))
    expected = 1 / (1 + math.exp(-(0.8 + 0.3)))  # σ(1.1) = 0.7503
    assert all(record["p_first"] == pytest.approx(expected) for record in records)
    assert abs(first_rate(records, pairs) - expected) < 4 * math.sqrt(expected * (1 - expected) / n)


def test_zero_temperature_always_picks_the_higher_score():
    pairs = [(f"p{i} ", "good", "bad") if i % 2 else (f"p{i} ", "bad", "good") for i in range(200)]
    records = simulate_preferences(
        pairs, make_annotators(3, temperature=0.0, position_bias=2.0, seed=1), by_word({"good": 0.6, "bad": 0.5})
    )
    assert len(records) == 200 and all(record["chosen"] == "good" for record in records)


def test_same_seed_same_labels_other_seed_other_labels():
    pairs = [(f"p{i} ", "good", "bad") for i in range(500)]
    scorer = by_word({"good": 0.5, "bad": 0.0})
    one = simulate_preferences(pairs, [Annotator("a", 1.0, seed=3)], scorer)
    assert one == simulate_preferences(pairs, [Annotator("a", 1.0, seed=3)], scorer)
    assert one != simulate_preferences(pairs, [Annotator("a", 1.0, seed=4)], scorer)


def test_length_bias_shifts_choices_toward_longer():
    n = 4000
    long, short = "fine " * 19 + "fine", "fine fine fine fine fine"  # 20 and 5 words, same score
    pairs = [(f"p{i} ", long, short) if i % 2 else (f"p{i} ", short, long) for i in range(n)]
    scorer = by_word({"fine": 0.0})
    unbiased = simulate_preferences(pairs, [Annotator("u", 1.0, seed=5)], scorer)
    biased = simulate_preferences(pairs, [Annotator("b", 1.0, length_bias=1.0, seed=5)], scorer)
    longer_rate = lambda records: np.mean([record["chosen"] == long for record in records])  # noqa: E731
    expected = 1 / (1 + math.exp(-1.5))  # σ(1.0 · (20 − 5) / 10) = 0.8176
    tolerance = 4 * math.sqrt(0.25 / n)
    assert abs(longer_rate(biased) - expected) < tolerance
    assert abs(longer_rate(unbiased) - 0.5) < tolerance


def test_shuffled_order_turns_position_bias_into_noise():
    n = 4000
    pairs = [(f"p{i} ", "same", "other") for i in range(n)]
    scorer = by_word({"same": 0.0, "other": 0.0})
    annotator = Annotator("a", 1.0, position_bias=2.0, seed=9)
    assert first_rate(simulate_preferences(pairs, [annotator], scorer), pairs) > 0.85  # σ(2) = 0.88
    assert abs(first_rate(simulate_preferences(pairs, [annotator], scorer, shuffle_order=True), pairs) - 0.5) < 0.04


def test_records_assignment_and_skips():
    pairs = [
        ("p0 ", "good", "bad"),
        ("p1 ", "good", "good"),
        ("p2 ", "", "bad"),
        ResponsePair("p3 ", "bad", "good"),
        ("p4 ", "good", "bad"),
    ]
    calls = []

    def scorer(texts):
        calls.append(list(texts))
        return by_word({"good": 1.0, "bad": 0.0})(texts)

    panel = make_annotators(2, seed=0)
    records = simulate_preferences(pairs, panel, scorer)
    assert len(calls) == 1 and len(calls[0]) == len(set(calls[0])) == 6  # p0, p3, p4 x good/bad, scored once
    assert [(record["prompt"], record["annotator"]) for record in records] == [
        ("p0 ", "sim-0"),
        ("p3 ", "sim-1"),
        ("p4 ", "sim-0"),
    ]  # round-robin over pair index; p1, p2 skipped
    assert all(set(record) == {"prompt", "chosen", "rejected", "annotator", "p_first"} for record in records)
    assert all({record["chosen"], record["rejected"]} == {"good", "bad"} for record in records)
    everyone = simulate_preferences(pairs, panel, scorer, every_annotator=True)
    assert [(record["prompt"], record["annotator"]) for record in everyone] == [
        (prompt, annotator.id) for prompt in ("p0 ", "p3 ", "p4 ") for annotator in panel
    ]


def test_panels():
    panel = make_annotators(3, temperature=0.5, length_bias=0.2, seed=11)
    assert [a.id for a in panel] == ["sim-0", "sim-1", "sim-2"]
    assert len({a.seed for a in panel}) == 3 and all(a.temperature == 0.5 and a.length_bias == 0.2 for a in panel)
    assert make_annotators(3, seed=11) != make_annotators(3, seed=12)
    mixed = mixed_panel()
    assert len({a.id for a in mixed}) == len(mixed) == 4
    assert len({(a.temperature, a.length_bias, a.position_bias) for a in mixed}) == 4
    with pytest.raises(ValueError):
        simulate_preferences([("p", "a", "b")], [], by_word({}))
