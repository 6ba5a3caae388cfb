"""The recommendation: hand-computed axis scores and weighted rankings on small results dicts."""

from __future__ import annotations

import functools
import json
import math
import re
from pathlib import Path

import pytest

from tuneoff.compare.recommend import (
    AXES,
    PRESETS,
    axis_scores,
    format_ci,
    format_number,
    get_path,
    recommend,
    resolve_priorities,
)
from tuneoff.errors import TuneoffError

FIXTURE = Path(__file__).parent / "fixtures" / "results.json"


def ci(mean, low=None, high=None, n=3):
    return {"mean": mean, "ci_low": mean if low is None else low, "ci_high": mean if high is None else high, "n": n}


def arm(gold, low, high, diversity, wall, sd, events=0, method="sft"):
    """One arm whose six diversity components all equal ``diversity`` (self-BLEU = 1 − diversity), so its
    diversity axis score is simply the min–max of ``diversity``."""
    components = {"ead": ci(diversity), "embedding": ci(diversity), "self_bleu": ci(1 - diversity)}
    return {
        "method": method,
        "gold_reward": ci(gold, low, high),
        "diversity": {"per_input": components, "across_input": components},
        "cost": {"wall_s": ci(wall)},
        "stability": {"seed_sd": sd, "divergence_events": events},
    }


def three_arms(**changes) -> dict:
    """x: most aligned, least diverse, slowest, most stable; y: the opposite on alignment, diversity, stability;
    z: in the middle everywhere but the cheapest. Walls 1000/100/10 s are evenly spaced on the log scale."""
    arms = {
        "x": dict(gold=0.80, low=0.78, high=0.82, diversity=0.2, wall=1000, sd=0.01),
        "y": dict(gold=0.60, low=0.58, high=0.62, diversity=0.8, wall=100, sd=0.03),
        "z": dict(gold=0.70, low=0.68, high=0.72, diversity=0.5, wall=10, sd=0.02),
    }
    for name, fields in changes.items():
        arms[name].update(fields)
    return {"arms": {name: arm(**fields) for name, fields in arms.items()}}


AXIS_SCORES = {
    "x": {"alignment": 1.0, "diversity": 0.0, "cost": 0.0, "stability": 1.0},
    "y": {"alignment": 0.0, "diversity": 1.0, "cost": 0.5, "stability": 0.0},
    "z": {"alignment": 0.5, "diversity": 0.5, "cost": 1.0, "stability": 0.5},
}
# Weighted sums of AXIS_SCORES under each preset, by hand:
#   balanced          x (1+0+0+1)/4 = .5      y (0+1+.5+0)/4 = .375          z (.5+.5+1+.5)/4 = .625
#   strict-alignment  x .6+.25 = .85          y .05+.05 = .1                 z .3+.025+.1+.125 = .55
#   creative          x .25+.1 = .35          y .55+.05 = .6                 z .125+.275+.1+.05 = .55
#   budget            x .25+.1 = .35          y .1+.275 = .375               z .125+.05+.55+.05 = .775
EXPECTED = {
    "balanced": {"z": 0.625, "x": 0.5, "y": 0.375},
    "strict-alignment": {"x": 0.85, "z": 0.55, "y": 0.1},
    "creative": {"y": 0.6, "z": 0.55, "x": 0.35},
    "budget": {"z": 0.775, "y": 0.375, "x": 0.35},
}


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
    # z's seed sd 0.005: stability x (0.03-0.01)/0.025 = .8, y 0, z 1; strict-alignment x .6+.2 = .8, z
    # .3+.025+.1+.25 = .675
    results = three_arms(x=dict(low=0.66, high=0.94), z=dict(low=0.60, high=0.80, sd=0.005))
    result = recommend(results, "strict-alignment")
    assert [row["arm"] for row in result["ranking"]] == ["x", "z", "y"]
    assert result["ranking"][0]["score"] == pytest.approx(0.8) and result["ranking"][1]["score"] == pytest.approx(0.675)
    assert result["within_noise"] is True
    assert any(
        "z is then preferable: it is cheaper (10.0 s vs 1,000 s of wall time) and more stable" in s
        for s in result["explanation"]
    )


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
    assert result["notes"] == [
        "No seed sd of gold reward (needs 2 or more seeds) for z: the stability axis is skipped "
        "for it and the weighted score uses the other axes."
    ]
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
    results = {
        "arms": {
            "base": arm(0.5, 0.45, 0.55, 0.9, 100, 0.02, method="base"),
            "tuned": arm(0.7, 0.65, 0.75, 0.3, 100, 0.02, method="dpo"),
        }
    }
    creative = recommend(results, "creative")
    assert [row["arm"] for row in creative["ranking"]] == ["tuned"] and creative["choice"] == "tuned"
    # base's gold CI [0.45, 0.55] and tuned's [0.65, 0.75] do not overlap
    assert any("above base's beyond seed noise" in s for s in creative["explanation"])
    close = {
        "arms": {
            "base": arm(0.6, 0.5, 0.7, 0.9, 100, 0.02, method="base"),
            "tuned": arm(0.65, 0.55, 0.75, 0.3, 100, 0.02, method="dpo"),
        }
    }
    assert any(
        "the gain over the untuned model is not established" in s for s in recommend(close, "balanced")["explanation"]
    )
    alone = recommend({"arms": {"base": arm(0.5, 0.45, 0.55, 0.9, 100, 0.02, method="base")}}, "balanced")
    assert alone["choice"] == "base"  # ranked only when it is the only arm


def test_resolve_priorities():
    assert resolve_priorities(None) == PRESETS["balanced"] == resolve_priorities({}) == resolve_priorities("balanced")
    assert resolve_priorities({"preset": "balanced", "cost": 0.75}) == pytest.approx(
        {"alignment": 1 / 6, "diversity": 1 / 6, "cost": 0.5, "stability": 1 / 6}
    )  # (.25, .25, .75, .25) / 1.5
    assert resolve_priorities({"alignment": 3, "cost": 1}) == {
        "alignment": 0.75,
        "diversity": 0.0,
        "cost": 0.25,
        "stability": 0.0,
    }
    for name, weights in PRESETS.items():
        assert set(weights) == set(AXES) and sum(weights.values()) == pytest.approx(1), name
    assert max(PRESETS["strict-alignment"], key=PRESETS["strict-alignment"].get) == "alignment"
    assert max(PRESETS["creative"], key=PRESETS["creative"].get) == "diversity"
    assert max(PRESETS["budget"], key=PRESETS["budget"].get) == "cost"


@pytest.mark.parametrize(
    "priorities, message",
    [
        ("cheap", "unknown preset 'cheap'; the presets are balanced, strict-alignment, creative, budget"),
        ({"preset": "nope", "cost": 1}, "unknown preset 'nope'"),
        ({"speed": 1}, "unknown axis 'speed'; the axes are alignment, diversity, cost, stability"),
        ({"cost": -1}, "the weight of 'cost' must be a number >= 0"),
        ({"cost": "high"}, "the weight of 'cost' must be a number >= 0"),
        ({"cost": math.nan}, "the weight of 'cost' must be a number >= 0"),
        ({"alignment": 0, "cost": 0}, "the weights sum to 0"),
        (3, "expected a preset name or a dict of weights, got int"),
    ],
)
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
    assert [format_number(v) for v in (2000, 742.63, 27.3, 0.0252, 1.5e6, 0.0)] == [
        "2,000",
        "743",
        "27.3",
        "0.0252",
        "1.5e+06",
        "0",
    ]


def test_the_fixture_under_strict_alignment():
    results = json.loads(FIXTURE.read_text())
    result = recommend(results, "strict-alignment")
    # the means' CIs overlap, but the paired win rate (same prompts and seeds) 0.588 [0.568, 0.608] excludes 0.5
    assert result["choice"] == "sft+ppo" and result["within_noise"] is False
    assert [row["arm"] for row in result["ranking"]][:2] == ["sft+ppo", "dpo"]
    assert any(
        "sft+ppo beats dpo 0.588 [0.568, 0.608] of the time (ties half); the 95% CI excludes 0.5" in s
        for s in result["explanation"]
    )
    without_pairs = recommend({**results, "win_rates": {}}, "strict-alignment")  # then the CIs of the means decide
    assert without_pairs["within_noise"] is True
    assert any(
        "dpo is then preferable: it is cheaper (289 s vs 743 s of wall time) and more stable" in s
        for s in without_pairs["explanation"]
    )
    assert (
        "sft+ppo has the highest gold reward, 0.767 [0.704, 0.829], vs grpo 0.745 [0.633, 0.857]."
        in result["explanation"]
    )


def test_differences_within_noise_are_not_stretched_to_the_full_range():
    # gold 0.70 vs 0.71 with 95% CI half-widths of 0.05: range 0.01 < noise 0.05, so the scores are 0 and
    # 0.01 / 0.05 = 0.2 (plain min-max would give 0 and 1); diversity has no CI here, so it stays min-max.
    results = {"arms": {"a": arm(0.70, 0.65, 0.75, 0.5, 100, 0.02), "b": arm(0.71, 0.66, 0.76, 0.6, 100, 0.02)}}
    scores = axis_scores(results)
    assert scores["a"]["alignment"] == pytest.approx(0.0) and scores["b"]["alignment"] == pytest.approx(0.2)
    assert scores["a"]["diversity"] == pytest.approx(0.0) and scores["b"]["diversity"] == pytest.approx(1.0)


def test_paired_win_rate_is_reported_as_the_sharper_test():
    results = three_arms()
    results["win_rates"] = {
        "x": {"z": {"mean": 0.62, "ci_low": 0.55, "ci_high": 0.69, "n": 3}},
        "z": {"x": {"mean": 0.38, "ci_low": 0.31, "ci_high": 0.45, "n": 3}},
    }
    text = " ".join(recommend(results, "strict-alignment")["explanation"])
    assert (
        "Paired on the same prompts and seeds, x beats z 0.620 [0.550, 0.690]" in text
        and "excludes 0.5: x is better" in text
    )


# --- every comparison sentence agrees with the numbers it quotes ----------------------------------------------

NUMBER = r"-?\d[\d,]*(?:\.\d+)?(?:e[+-]\d+)?"
VERDICTS = {
    "more aligned": ("alignment", 1),
    "less aligned": ("alignment", -1),
    "more diverse": ("diversity", 1),
    "less diverse": ("diversity", -1),
    "cheaper": ("cost", 1),
    "more expensive": ("cost", -1),
    "more stable": ("stability", 1),
    "less stable": ("stability", -1),
    "when cost matters": ("cost", 1),
    "when stability does": ("stability", 1),
}
VERDICT = re.compile(
    r"(?P<word>" + "|".join(map(re.escape, VERDICTS)) + r")"
    r"(?: on (?:all (?P<all>\d+)|(?P<some>\d+) of (?P<of>\d+)) measures)? \("
)
INTERVAL = r"(?: \[[^\]]*\])?"
FACT = re.compile(
    rf"^(?P<label>.*?)\s*(?P<a>{NUMBER}){INTERVAL}(?: s)? vs (?P<b>{NUMBER}){INTERVAL}(?: s)?"
    rf"(?P<tail>.*)$"
)
DIVERSITY_LABEL = re.compile(r"^(per|across)-input (EAD|self-BLEU \(lower = more diverse\)|embedding diversity)$")


def number(text: str) -> float:
    return float(text.replace(",", ""))


def enclosed(text: str, start: int) -> str:
    """The text from ``start`` up to the parenthesis that closes the one just before it."""
    depth = 1
    for i in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return text[start:i]
    raise AssertionError(f"unclosed parenthesis in {text!r}")


def top_level_split(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for i, char in enumerate(text):
        depth += {"(": 1, "[": 1, ")": -1, "]": -1}.get(char, 0)
        if depth == 0 and text.startswith(", ", i):
            parts.append(current)
            current = ""
            continue
        current += char if not (current == "" and char == " " and parts) else ""
    return parts + [current]


def measured(arm: dict, label: str):
    """(axis, value, lower is better) of the metric a fact's label names, read from the results by the test."""
    if label == "gold reward":
        return "alignment", arm["gold_reward"]["mean"], False
    if label == "of wall time":
        return "cost", arm["cost"]["wall_s"]["mean"], True
    if label == "seed sd of gold reward":
        return "stability", arm["stability"]["seed_sd"], True
    if label == "divergence events":
        return "stability", arm["stability"].get("divergence_events", 0), True
    match = DIVERSITY_LABEL.match(label)
    assert match, f"a quoted number with an unknown label: {label!r}"
    metric = {"EAD": "ead", "embedding diversity": "embedding"}.get(match[2], "self_bleu")
    scope = f"{match[1]}_input"
    return "diversity", arm["diversity"][scope][metric]["mean"], metric == "self_bleu"


def diversity_sides(mine: dict, other: dict) -> list[int]:
    """Per diversity component both arms have: +1 where ``mine`` is more diverse, −1 less, 0 level."""
    sides = []
    for scope in ("per_input", "across_input"):
        for metric in ("ead", "self_bleu", "embedding"):
            a, b = (get_path(m, "diversity", scope, metric, "mean") for m in (mine, other))
            if a is not None and b is not None:
                sides.append(0 if a == b else (1 if (a > b) != (metric == "self_bleu") else -1))
    return sides


def check_verdicts(sentence: str, subjects, arms: dict) -> int:
    """Check every verdict clause ("more diverse (…)", "cheaper (…)", …) of ``sentence``: each quoted number is
    the subject's (then the other arm's) measurement of the metric its label names, and the word says what those
    numbers say, lower-is-better metrics included. ``subjects(position)`` names the arms the clause at that
    position compares. Returns the number of quoted "A vs B" pairs checked."""
    checked = 0
    for match in VERDICT.finditer(sentence):
        axis, direction = VERDICTS[match["word"]]
        subject, other = subjects(match.start())
        facts = top_level_split(enclosed(sentence, match.end()))
        for fact in facts:
            parsed = FACT.match(fact)
            assert parsed, f"unparsed quoted numbers {fact!r} in: {sentence}"
            label = (parsed["label"] + parsed["tail"]).strip()
            fact_axis, mine, lower_better = measured(arms[subject], label)
            _, theirs, _ = measured(arms[other], label)
            a, b = number(parsed["a"]), number(parsed["b"])
            assert fact_axis == axis, f"{match['word']!r} quotes {label!r}: {sentence}"
            assert a == pytest.approx(mine, rel=5e-3) and b == pytest.approx(theirs, rel=5e-3), (
                f"{fact!r} is not {subject} vs {other}: {sentence}"
            )
            assert a != b, f"{match['word']!r} before numbers that print the same ({fact}): {sentence}"
            favours_subject = (a < b) if lower_better else (a > b)
            assert favours_subject == (direction > 0), f"{match['word']!r} contradicts {fact!r}: {sentence}"
            checked += 1
        if axis == "diversity" and (match["all"] or match["of"]):
            sides = [s * direction for s in diversity_sides(arms[subject], arms[other])]
            if match["all"]:
                assert int(match["all"]) == len(sides) and all(s > 0 for s in sides), sentence
            else:
                assert (int(match["some"]), int(match["of"])) == (sum(s > 0 for s in sides), len(sides)), sentence
                assert len(facts) == int(match["some"]), sentence  # a split verdict quotes every measure it counts
    return checked


def preferred(sentence: str, choice: str, runner: str, position: int) -> tuple[str, str]:
    """(subject, other) of a preference clause: "Z is then preferable: …", "Then prefer Z when …, W when …"."""
    named = re.findall(r"(?:^| )(\S+) is then preferable|Then prefer (\S+) $|\), (\S+) $", sentence[:position])
    subject = next(name for name in named[-1] if name)
    return subject, runner if subject == choice else choice


def check_explanation(result: dict, arms: dict) -> None:
    """Every sentence that compares numbers says what they say; no quoted "A vs B" goes unchecked."""
    choice = result["choice"]
    runner = result["ranking"][1]["arm"] if len(result["ranking"]) > 1 else None
    for sentence in result["explanation"]:
        checked = 0
        plain = sentence.replace("(lower = more diverse)", "")
        words = re.findall("|".join(map(re.escape, VERDICTS)), plain)
        if sentence.startswith("Against the runner-up "):
            head = re.match(r"Against the runner-up (?P<other>.+?), (?P<subject>.+?) is ", sentence)
            checked += check_verdicts(sentence, lambda _, head=head: (head["subject"], head["other"]), arms)
        elif words:  # the preference that follows a within-noise verdict: between the choice and the runner-up
            checked += check_verdicts(sentence, functools.partial(preferred, sentence, choice, runner), arms)
        assert len(VERDICT.findall(plain)) == len(words), f"a verdict without its numbers: {sentence}"
        gold = re.search(rf"(\S+) has the highest gold reward, ({NUMBER}){INTERVAL}, vs (\S+) ({NUMBER})", sentence)
        if gold:
            assert number(gold[2]) > number(gold[4]), sentence
            assert arms[gold[1]]["gold_reward"]["mean"] >= arms[gold[3]]["gold_reward"]["mean"], sentence
            checked += 1
        tie = re.search(rf"(\S+) and (\S+) share the highest gold reward to the digits shown, ({NUMBER})", sentence)
        if tie:
            means = [format_ci(arms[tie[i]]["gold_reward"]).split(" [")[0] for i in (1, 2)]
            assert means[0] == means[1], sentence
        for claim in re.finditer(
            rf"(do not overlap|overlap|is above|is below|is not above)[^(]*\(gold reward "
            rf"(?P<a>{NUMBER}) \[(?P<la>{NUMBER}), (?P<ha>{NUMBER})\] vs "
            rf"(?P<b>{NUMBER}) \[(?P<lb>{NUMBER}), (?P<hb>{NUMBER})\]\)",
            sentence,
        ):
            a, la, ha, b, lb, hb = (number(claim[k]) for k in ("a", "la", "ha", "b", "lb", "hb"))
            apart = ha < lb or hb < la
            assert apart == (claim[1] in ("do not overlap", "is above", "is below")), sentence
            if claim[1] in ("is above", "is below"):
                assert (a > b) == (claim[1] == "is above"), sentence
            checked += 1
        paired = re.search(
            rf"beats \S+ {NUMBER} \[(?P<low>{NUMBER}), (?P<high>{NUMBER})\].*the 95% CI "
            rf"(?P<verdict>includes|excludes 0.5: (?P<better>\S+) is better)",
            sentence,
        )
        if paired:
            low, high = number(paired["low"]), number(paired["high"])
            assert (low <= 0.5 <= high) == (paired["verdict"] == "includes"), sentence
            if paired["better"]:
                assert (paired["better"] == choice) == (low > 0.5), sentence
        assert checked == sentence.count(" vs "), f"quoted numbers that no check reads: {sentence}"


def mixed_arm(gold, half, wall, sd, events=0, method="dpo", **diversity):
    """An arm with its own value for each diversity component (``per_ead``, ``across_self_bleu``, …; 0.5 unless
    given) and a symmetric gold CI of half-width ``half``."""
    metrics = ("ead", "self_bleu", "embedding")
    components = {
        scope: {metric: ci(diversity.get(f"{scope.split('_')[0]}_{metric}", 0.5)) for metric in metrics}
        for scope in ("per_input", "across_input")
    }
    return {
        "method": method,
        "gold_reward": ci(gold, gold - half, gold + half),
        "diversity": components,
        "cost": {"wall_s": ci(wall)},
        "stability": {"seed_sd": sd, "divergence_events": events},
    }


def hand_made() -> dict[str, dict]:
    """Results where every arm wins on some axes and loses on others, diversity components and stability
    measures that disagree within one arm, ties to the digits shown, and an arm below base."""
    base = mixed_arm(0.55, 0.02, 60, 0.0, method="base")
    reported = {  # the reported contradiction: sft's diversity axis wins while its across-input embedding loses
        "base": base,
        "sft": mixed_arm(
            0.64,
            0.03,
            180,
            0.03,
            method="sft",
            per_ead=0.80,
            per_self_bleu=0.20,
            per_embedding=0.40,
            across_ead=0.90,
            across_self_bleu=0.10,
            across_embedding=0.733,
        ),
        "dpo": mixed_arm(
            0.70,
            0.03,
            290,
            0.02,
            per_ead=0.70,
            per_self_bleu=0.30,
            per_embedding=0.30,
            across_ead=0.80,
            across_self_bleu=0.15,
            across_embedding=0.802,
        ),
    }
    unstable = {  # grpo: lowest seed sd but two divergence events; ppo: cheapest, worst diversity, below base
        "base": base,
        "grpo": mixed_arm(0.75, 0.10, 700, 0.005, events=2, method="grpo", per_ead=0.6, across_embedding=0.4),
        "sft": mixed_arm(0.72, 0.10, 150, 0.04, method="sft", per_ead=0.7, across_embedding=0.6),
        "ppo": mixed_arm(0.45, 0.02, 40, 0.02, method="ppo", per_ead=0.3, across_embedding=0.3, per_self_bleu=0.9),
    }
    level = {  # gold and wall that print the same, diversity and stability that do not
        "base": base,
        "a": mixed_arm(0.70001, 0.05, 100.01, 0.02, method="sft", per_ead=0.6),
        "b": mixed_arm(0.70002, 0.05, 100.02, 0.03, method="sft", per_ead=0.4),
    }
    within = {  # overlapping CIs: one arm cheaper, the other more stable (by seed sd), then by divergence events
        "base": base,
        "x": mixed_arm(0.80, 0.10, 1000, 0.01, method="ppo", across_embedding=0.2),
        "z": mixed_arm(0.75, 0.10, 10, 0.02, method="sft", across_embedding=0.7),
    }
    events = {
        "base": base,
        "x": mixed_arm(0.80, 0.10, 1000, 0.03, method="ppo"),
        "z": mixed_arm(0.75, 0.10, 10, 0.01, events=1, method="grpo"),
    }
    return {
        "reported": reported,
        "unstable": unstable,
        "level": level,
        "within": within,
        "events": events,
        "three": three_arms()["arms"],
        "fixture": json.loads(FIXTURE.read_text())["arms"],
    }


PRIORITIES = [
    *PRESETS,
    {"diversity": 1},
    {"stability": 1},
    {"cost": 1, "stability": 1},
    {"alignment": 1, "diversity": 1, "stability": 1},
]


@pytest.mark.parametrize("name", list(hand_made()))
def test_every_comparison_sentence_agrees_with_its_numbers(name):
    arms = hand_made()[name]
    variants = [{"arms": arms}] + ([json.loads(FIXTURE.read_text())] if name == "fixture" else [])  # + paired win rates
    for priorities in PRIORITIES:
        for results in variants:
            check_explanation(recommend(results, priorities), arms)


def test_the_reported_contradiction_is_split_by_what_the_numbers_say():
    result = recommend({"arms": hand_made()["reported"]}, {"diversity": 1})
    (versus,) = [s for s in result["explanation"] if s.startswith("Against the runner-up")]
    assert result["choice"] == "sft" and "more diverse (across-input embedding diversity 0.733" not in versus
    assert "more diverse on 5 of 6 measures (per-input EAD 0.800 vs 0.700," in versus
    assert versus.endswith("but less diverse on 1 of 6 measures (across-input embedding diversity 0.733 vs 0.802).")


def test_stability_words_follow_divergence_events_and_seed_sd():
    arms = hand_made()["unstable"]
    result = recommend({"arms": arms}, {"stability": 1, "alignment": 1})
    text = " ".join(result["explanation"])
    # grpo's seed sd is the lowest but it diverged twice: each measure gets its own word
    versus = next(s for s in result["explanation"] if s.startswith("Against the runner-up"))
    assert "more stable on 1 of 2 measures (seed sd of gold reward 0.00500 vs 0.0400)" in versus
    assert "less stable on 1 of 2 measures (divergence events 2 vs 0)" in versus
    check_explanation(result, arms)
    assert "below base's beyond seed noise" not in text  # ppo is below base, but it is not the choice
    below = recommend({"arms": {"base": arms["base"], "ppo": arms["ppo"]}}, "balanced")
    assert (
        "ppo's gold reward is below base's beyond seed noise (gold reward 0.450 [0.430, 0.470] vs 0.550 [0.530, "
        "0.570])." in below["explanation"]
    )
    check_explanation(below, arms)


def test_ties_to_the_digits_shown_get_no_comparative():
    arms = hand_made()["level"]
    result = recommend({"arms": arms}, {"alignment": 1, "cost": 1, "diversity": 1})
    text = " ".join(result["explanation"])
    assert "b and a share the highest gold reward to the digits shown, 0.700 [0.650, 0.750] and 0.700" in text
    assert not re.search(r"more aligned|less aligned|cheaper|more expensive", text)
    assert (
        "more diverse on 1 of 6 measures (per-input EAD 0.600 vs 0.400)" in text
        or "less diverse on 1 of 6 measures (per-input EAD 0.400 vs 0.600)" in text
    )


def test_within_noise_stability_is_decided_by_divergence_events_first():
    arms = hand_made()["events"]
    result = recommend({"arms": arms}, "strict-alignment")
    assert result["within_noise"] is True
    (sentence,) = [s for s in result["explanation"] if "within noise" in s]
    assert "x when stability does (divergence events 0 vs 1)" in sentence  # z's lower seed sd is not quoted for x
    check_explanation(result, arms)


def test_the_report_shows_only_sentences_that_agree_with_their_numbers(tmp_path):
    from html import unescape

    from tuneoff.compare.report import write_report

    for name, arms in hand_made().items():
        path = write_report({"arms": arms, "priorities": {"preset": "creative"}}, tmp_path / f"{name}.html")
        html = path.read_text(encoding="utf-8")
        block = html[html.index('<div class="recommendation">') :]
        block = block[: block.index("</div>")]
        shown = [unescape(re.sub(r"<[^>]+>", "", item)) for item in re.findall(r"<li[^>]*>(.*?)</li>", block, re.S)]
        result = recommend({"arms": arms}, "creative")
        assert shown == result["explanation"]
        check_explanation(result, arms)


def test_an_arm_with_nothing_measured_is_not_ranked():
    # sft's jobs all failed: it has no value on any axis, so it is left out instead of winning on no evidence
    arms = {
        "base": arm(0.5, 0.45, 0.55, 0.9, 100, 0.02, method="base"),
        "sft": {"method": "sft"},
        "dpo": arm(0.7, 0.65, 0.75, 0.3, 100, 0.02, method="dpo"),
    }
    result = recommend({"arms": arms}, "balanced")
    assert [row["arm"] for row in result["ranking"]] == ["dpo"] and result["choice"] == "dpo"
    assert result["notes"][0].startswith("Not ranked, nothing measured: sft")
    only_base = recommend({"arms": {"base": arms["base"], "sft": {"method": "sft"}}}, "balanced")
    assert only_base["choice"] == "base" and "Not ranked, nothing measured: sft" in only_base["notes"][0]
    with pytest.raises(TuneoffError, match="no arm has any measurement"):
        recommend({"arms": {"sft": {"method": "sft"}, "dpo": {"method": "dpo", "gold_reward": None}}}, "balanced")
