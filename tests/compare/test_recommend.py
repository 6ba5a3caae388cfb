"""The recommendation: hand-computed axis scores and weighted rankings on small results dicts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tuneoff.compare.recommend import AXES, PRESETS, axis_scores, format_ci, format_number, recommend, resolve_priorities
from tuneoff.errors import TuneoffError

FIXTURE = Path(__file__).parent / "fixtures" / "results.json"


def ci(mean, low=None, high=None, n=3):
    return {"mean": mean, "ci_low": mean if low is None else low, "ci_high": mean if high is None else high, "n": n}


def arm(gold, low, high, diversity, wall, sd, events=0, method="sft"):
    """One arm whose six diversity components all equal ``diversity`` (self-BLEU = 1 − diversity), so its
    diversity axis score is simply the min–max of ``diversity``."""
    components = {"ead": ci(diversity), "embedding": ci(diversity), "self_bleu": ci(1 - diversity)}
    return {"method": method, "gold_reward": ci(gold, low, high), "diversity": {"per_input": components, "across_input": components},
            "cost": {"wall_s": ci(wall)}, "stability": {"seed_sd": sd, "divergence_events": events}}


def three_arms(**changes) -> dict:
    """x: most aligned, least diverse, slowest, most stable; y: the opposite on alignment, diversity, stability;
    z: in the middle everywhere but the cheapest. Walls 1000/100/10 s are evenly spaced on the log scale."""
    arms = {"x": dict(gold=0.80, low=0.78, high=0.82, diversity=0.2, wall=1000, sd=0.01),
            "y": dict(gold=0.60, low=0.58, high=0.62, diversity=0.8, wall=100, sd=0.03),
            "z": dict(gold=0.70, low=0.68, high=0.72, diversity=0.5, wall=10, sd=0.02)}
    for name, fields in changes.items():
        arms[name].update(fields)
    return {"arms": {name: arm(**fields) for name, fields in arms.items()}}


AXIS_SCORES = {"x": {"alignment": 1.0, "diversity": 0.0, "cost": 0.0, "stability": 1.0},
               "y": {"alignment": 0.0, "diversity": 1.0, "cost": 0.5, "stability": 0.0},
               "z": {"alignment": 0.5, "diversity": 0.5, "cost": 1.0, "stability": 0.5}}
# Weighted sums of AXIS_SCORES under each preset, by hand:
#   balanced          x (1+0+0+1)/4 = .5      y (0+1+.5+0)/4 = .375          z (.5+.5+1+.5)/4 = .625
#   strict-alignment  x .6+.25 = .85          y .05+.05 = .1                 z .3+.025+.1+.125 = .55
#   creative          x .25+.1 = .35          y .55+.05 = .6                 z .125+.275+.1+.05 = .55
#   budget            x .25+.1 = .35          y .1+.275 = .375               z .125+.05+.55+.05 = .775
EXPECTED = {"balanced": {"z": 0.625, "x": 0.5, "y": 0.375}, "strict-alignment": {"x": 0.85, "z": 0.55, "y": 0.1},
            "creative": {"y": 0.6, "z": 0.55, "x": 0.35}, "budget": {"z": 0.775, "y": 0.375, "x": 0.35}}


def test_axis_scores_by_hand():
    scores = axis_scores(three_arms())
    assert scores.keys() == AXIS_SCORES.keys()
    for name, axes in AXIS_SCORES.items():
        assert scores[name] == pytest.approx(axes)


@pytest.mark.parametrize("preset", list(EXPECTED))
def test_each_preset_ranks_by_hand(preset):
    result = recommend(three_arms(), preset)
    ranking = [(row["arm"], row["score"]) for row in result["ranking"]]
    assert ranking == [(name, pytest.approx(score)) for name, score in EXPECTED[preset].items()]
    assert result["choice"] == ranking[0][0]
    assert result["priorities"] == pytest.approx(PRESETS[preset])


def test_presets_change_the_choice():
    assert recommend(three_arms(), "strict-alignment")["choice"] == "x"  # the most aligned
    assert recommend(three_arms(), "creative")["choice"] == "y"  # the most diverse
    assert recommend(three_arms(), "budget")["choice"] == "z"  # the cheapest


def test_explanation_quotes_the_numbers():
    explanation = recommend(three_arms(), "strict-alignment")["explanation"]
    assert "x has the highest gold reward, 0.800 [0.780, 0.820], vs z 0.700 [0.680, 0.720]." in explanation
    assert explanation[0] == "Priorities: alignment 60%, stability 25%, cost 10%, diversity 5%."
    versus = next(s for s in explanation if s.startswith("Against the runner-up z"))
    assert "more aligned (gold reward 0.800 [0.780, 0.820] vs 0.700 [0.680, 0.720])" in versus
    assert "more expensive (1,000 s vs 10.0 s of wall time)" in versus


def test_within_noise_false_when_the_cis_are_apart():
    result = recommend(three_arms(), "strict-alignment")
    assert result["within_noise"] is False
    assert any("beyond seed noise" in s for s in result["explanation"])
    assert not any("within noise" in s for s in result["explanation"])


def test_within_noise_names_the_cheaper_and_the_more_stable_arm():
    results = three_arms(x=dict(low=0.66, high=0.94), z=dict(low=0.60, high=0.80))
    result = recommend(results, "strict-alignment")
    assert (result["choice"], result["within_noise"]) == ("x", True)
    (sentence,) = [s for s in result["explanation"] if "within noise" in s]
    assert sentence.startswith("The alignment difference between x and z is within noise")
    assert "prefer z when cost matters (10.0 s vs 1,000 s of wall time)" in sentence
    assert "x when stability does (seed sd of gold reward 0.0100 vs 0.0200)" in sentence


def test_within_noise_prefers_an_arm_that_is_both_cheaper_and_more_stable():
    # z's seed sd 0.005: stability x (0.03-0.01)/0.025 = .8, y 0, z 1; strict-alignment x .6+.2 = .8, z .3+.025+.1+.25 = .675
    results = three_arms(x=dict(low=0.66, high=0.94), z=dict(low=0.60, high=0.80, sd=0.005))
    result = recommend(results, "strict-alignment")
    assert [row["arm"] for row in result["ranking"]] == ["x", "z", "y"]
    assert result["ranking"][0]["score"] == pytest.approx(0.8) and result["ranking"][1]["score"] == pytest.approx(0.675)
    assert result["within_noise"] is True
    assert any("z is then preferable: it is cheaper (10.0 s vs 1,000 s of wall time) and more stable" in s
               for s in result["explanation"])


@pytest.mark.parametrize("missing", [math.nan, None])  # NaN in memory, null in results.json
def test_one_seed_makes_noise_unknown_not_within(missing):
    results = three_arms()
    for m in results["arms"].values():
        m["gold_reward"].update(ci_low=missing, ci_high=missing, n=1)
        m["stability"]["seed_sd"] = missing
    result = recommend(results, "strict-alignment")
    assert result["within_noise"] is False
    assert any("beyond noise is unknown" in s for s in result["explanation"])
    assert all("stability" not in axes for axes in axis_scores(results).values())
    assert any("seed sd of gold reward" in note and "x, y, z" in note for note in result["notes"])


def test_missing_axis_is_skipped_and_the_weights_renormalised():
    results = three_arms()
    results["arms"]["z"]["stability"]["seed_sd"] = None
    scores = axis_scores(results)
    assert "stability" not in scores["z"] and scores["x"]["stability"] == 1.0 and scores["y"]["stability"] == 0.0
    result = recommend(results, "balanced")
    by_arm = {row["arm"]: row["score"] for row in result["ranking"]}
    assert by_arm["z"] == pytest.approx((0.5 + 0.5 + 1.0) / 3)  # the three axes it has, equal weights
    assert result["notes"] == ["No seed sd of gold reward (needs 2 or more seeds) for z: the stability axis is skipped "
                               "for it and the weighted score uses the other axes."]
    assert result["notes"][0] in result["explanation"]


def test_divergence_costs_stability():
    scores = axis_scores(three_arms(x=dict(events=2), y=dict(events=1)))
    assert scores["x"]["stability"] == pytest.approx(0.5)  # 1 − 0.5
    assert scores["y"]["stability"] == 0.0  # floored
    assert scores["z"]["stability"] == pytest.approx(0.5)


def test_all_equal_scores_one_half():
    results = {"arms": {name: arm(0.7, 0.6, 0.8, 0.5, 100, 0.02) for name in ("a", "b")}}
    assert axis_scores(results) == {name: dict.fromkeys(AXES, 0.5) for name in ("a", "b")}


def test_base_is_the_reference_not_a_candidate():
    # base would win the creative preset (more diverse, same cost and stability), but it is what the tuned
    # arms are measured against: only tuned arms are ranked, and the explanation compares the choice to base.
    results = {"arms": {"base": arm(0.5, 0.45, 0.55, 0.9, 100, 0.02, method="base"),
                        "tuned": arm(0.7, 0.65, 0.75, 0.3, 100, 0.02, method="dpo")}}
    creative = recommend(results, "creative")
    assert [row["arm"] for row in creative["ranking"]] == ["tuned"] and creative["choice"] == "tuned"
    # base's gold CI [0.45, 0.55] and tuned's [0.65, 0.75] do not overlap
    assert any("above base's beyond seed noise" in s for s in creative["explanation"])
    close = {"arms": {"base": arm(0.6, 0.5, 0.7, 0.9, 100, 0.02, method="base"),
                      "tuned": arm(0.65, 0.55, 0.75, 0.3, 100, 0.02, method="dpo")}}
    assert any("the gain over the untuned model is not established" in s for s in recommend(close, "balanced")["explanation"])
    alone = recommend({"arms": {"base": arm(0.5, 0.45, 0.55, 0.9, 100, 0.02, method="base")}}, "balanced")
    assert alone["choice"] == "base"  # ranked only when it is the only arm


def test_resolve_priorities():
    assert resolve_priorities(None) == PRESETS["balanced"] == resolve_priorities({}) == resolve_priorities("balanced")
    assert resolve_priorities({"preset": "balanced", "cost": 0.75}) == pytest.approx(
        {"alignment": 1 / 6, "diversity": 1 / 6, "cost": 0.5, "stability": 1 / 6})  # (.25, .25, .75, .25) / 1.5
    assert resolve_priorities({"alignment": 3, "cost": 1}) == {"alignment": 0.75, "diversity": 0.0, "cost": 0.25, "stability": 0.0}
    for name, weights in PRESETS.items():
        assert set(weights) == set(AXES) and sum(weights.values()) == pytest.approx(1), name
    assert max(PRESETS["strict-alignment"], key=PRESETS["strict-alignment"].get) == "alignment"
    assert max(PRESETS["creative"], key=PRESETS["creative"].get) == "diversity"
    assert max(PRESETS["budget"], key=PRESETS["budget"].get) == "cost"


@pytest.mark.parametrize("priorities, message", [
    ("cheap", "unknown preset 'cheap'; the presets are balanced, strict-alignment, creative, budget"),
    ({"preset": "nope", "cost": 1}, "unknown preset 'nope'"),
    ({"speed": 1}, "unknown axis 'speed'; the axes are alignment, diversity, cost, stability"),
    ({"cost": -1}, "the weight of 'cost' must be a number >= 0"),
    ({"cost": "high"}, "the weight of 'cost' must be a number >= 0"),
    ({"cost": math.nan}, "the weight of 'cost' must be a number >= 0"),
    ({"alignment": 0, "cost": 0}, "the weights sum to 0"),
    (3, "expected a preset name or a dict of weights, got int"),
])
def test_bad_priorities_raise(priorities, message):
    with pytest.raises(TuneoffError, match="priorities: ") as error:
        resolve_priorities(priorities)
    assert message in str(error.value)
    with pytest.raises(TuneoffError):
        recommend(three_arms(), priorities)


def test_no_arms_raise():
    with pytest.raises(TuneoffError, match="no arms"):
        recommend({"arms": {}}, None)


def test_formatting():
    assert format_ci(ci(0.7117, 0.6557, 0.7677)) == "0.712 [0.656, 0.768]"
    assert format_ci(ci(0.7117, math.nan, math.nan, n=1)) == "0.712"
    assert format_ci(None) == "n/a" and format_number(None) == "n/a" and format_number(math.nan) == "n/a"
    assert [format_number(v) for v in (2000, 742.63, 27.3, 0.0252, 1.5e6, 0.0)] == ["2,000", "743", "27.3", "0.0252", "1.5e+06", "0"]


def test_the_fixture_under_strict_alignment():
    results = json.loads(FIXTURE.read_text())
    result = recommend(results, "strict-alignment")
    # the means' CIs overlap, but the paired win rate (same prompts and seeds) 0.588 [0.568, 0.608] excludes 0.5
    assert result["choice"] == "sft+ppo" and result["within_noise"] is False
    assert [row["arm"] for row in result["ranking"]][:2] == ["sft+ppo", "dpo"]
    assert any("sft+ppo beats dpo 0.588 [0.568, 0.608] of the time (ties half); the 95% CI excludes 0.5" in s for s in result["explanation"])
    without_pairs = recommend({**results, "win_rates": {}}, "strict-alignment")  # then the CIs of the means decide
    assert without_pairs["within_noise"] is True
    assert any("dpo is then preferable: it is cheaper (289 s vs 743 s of wall time) and more stable" in s for s in without_pairs["explanation"])
    assert "sft+ppo has the highest gold reward, 0.767 [0.704, 0.829], vs grpo 0.745 [0.633, 0.857]." in result["explanation"]


def test_differences_within_noise_are_not_stretched_to_the_full_range():
    # gold 0.70 vs 0.71 with 95% CI half-widths of 0.05: range 0.01 < noise 0.05, so the scores are 0 and
    # 0.01 / 0.05 = 0.2 (plain min-max would give 0 and 1); diversity has no CI here, so it stays min-max.
    results = {"arms": {"a": arm(0.70, 0.65, 0.75, 0.5, 100, 0.02), "b": arm(0.71, 0.66, 0.76, 0.6, 100, 0.02)}}
    scores = axis_scores(results)
    assert scores["a"]["alignment"] == pytest.approx(0.0) and scores["b"]["alignment"] == pytest.approx(0.2)
    assert scores["a"]["diversity"] == pytest.approx(0.0) and scores["b"]["diversity"] == pytest.approx(1.0)


def test_paired_win_rate_is_reported_as_the_sharper_test():
    results = three_arms()
    results["win_rates"] = {"x": {"z": {"mean": 0.62, "ci_low": 0.55, "ci_high": 0.69, "n": 3}},
                            "z": {"x": {"mean": 0.38, "ci_low": 0.31, "ci_high": 0.45, "n": 3}}}
    text = " ".join(recommend(results, "strict-alignment")["explanation"])
    assert "Paired on the same prompts and seeds, x beats z 0.620 [0.550, 0.690]" in text and "excludes 0.5: x is better" in text
