"""Agreement and bias statistics against tables computed by hand (and one published value)."""

from __future__ import annotations

import gzip
import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest

from tuneoff.feedback.agreement import (
    Rate,
    agreement_with_majority,
    binomial_two_sided_p,
    cohen_kappa,
    fleiss_kappa,
    fleiss_kappa_of,
    format_summary,
    krippendorff_alpha_nominal,
    krippendorff_alpha_of,
    length_bias,
    majority,
    median_seconds,
    pairwise_cohen_kappa,
    position_bias,
    summarize,
)

PANDALM = Path("/work/shared/data/pandalm/testset-v1.json.gz")


def test_cohen_kappa_two_categories_by_hand():
    #            rater 2: a   b
    # rater 1: a          4   1      p_o = (4 + 3) / 10 = 0.7
    #          b          2   3      marginals: r1 a 5, b 5; r2 a 6, b 4
    # p_e = (5*6 + 5*4) / 100 = 0.5 ; kappa = (0.7 - 0.5) / (1 - 0.5) = 0.4
    pairs = [("a", "a")] * 4 + [("a", "b")] + [("b", "a")] * 2 + [("b", "b")] * 3
    assert cohen_kappa(pairs) == pytest.approx(0.4)


def test_cohen_kappa_three_categories_by_hand():
    # 6 items, 4 equal -> p_o = 2/3. r1: a 3, b 2, tie 1 ; r2: a 2, b 2, tie 2
    # p_e = (3*2 + 2*2 + 1*2) / 36 = 1/3 ; kappa = (2/3 - 1/3) / (2/3) = 0.5
    pairs = [("a", "a"), ("a", "a"), ("b", "b"), ("b", "tie"), ("tie", "tie"), ("a", "b")]
    assert cohen_kappa(pairs) == pytest.approx(0.5)


def test_cohen_kappa_edges():
    assert cohen_kappa([("a", "a"), ("b", "b")]) == pytest.approx(1.0)  # p_o 1, p_e 1/2
    assert cohen_kappa([("a", "b"), ("b", "a")]) == pytest.approx(-1.0)  # p_o 0, p_e 1/2
    assert math.isnan(cohen_kappa([("a", "a"), ("a", "a")]))  # p_e = 1: undefined
    assert math.isnan(cohen_kappa([]))


# Four items, three raters each, categories (a, b, tie); used by both Fleiss and Krippendorff below.
UNITS = [["a", "a", "a"], ["a", "a", "b"], ["b", "b", "b"], ["a", "b", "tie"]]
COUNTS = [[3, 0, 0], [2, 1, 0], [0, 3, 0], [1, 1, 1]]


def test_fleiss_kappa_by_hand():
    # P_i = sum n_ij (n_ij - 1) / (3 * 2): 6/6 = 1, 2/6 = 1/3, 1, 0  -> P_bar = (7/3) / 4 = 7/12
    # column totals a 6, b 5, tie 1 of 12 -> P_e = (36 + 25 + 1) / 144 = 31/72
    # kappa = (7/12 - 31/72) / (1 - 31/72) = (11/72) / (41/72) = 11/41
    assert fleiss_kappa(COUNTS) == pytest.approx(11 / 41)


def test_fleiss_kappa_unequal_raters_by_hand():
    # rows [2,0], [1,1], [0,3]: P_i = 1, 0, 1 -> P_bar = 2/3 ; totals a 3, b 4 of 7 -> P_e = 25/49
    # kappa = (2/3 - 25/49) / (24/49) = (23/147) * (49/24) = 23/72 ; the 1-rater row [1, 0] is left out
    assert fleiss_kappa([[2, 0], [1, 1], [0, 3], [1, 0]]) == pytest.approx(23 / 72)
    assert math.isnan(fleiss_kappa([[1, 0]]))


def test_krippendorff_alpha_by_hand():
    # Coincidences (each ordered pair within a unit weighted 1 / (m - 1) = 1/2):
    #   unit 1: 6 (a,a) -> o_aa += 3 ; unit 2: 2 (a,a), 2 (a,b), 2 (b,a) -> +1 each ; unit 3: o_bb += 3
    #   unit 4: one each of (a,b) (a,tie) (b,a) (b,tie) (tie,a) (tie,b) -> +1/2 each
    # o_aa 4, o_ab 1.5, o_a,tie .5 | o_ba 1.5, o_bb 3, o_b,tie .5 | o_tie,a .5, o_tie,b .5
    # n_a 6, n_b 5, n_tie 1, n 12 ; disagreements sum_{c!=k} o_ck = 5 ; sum_{c!=k} n_c n_k = 144 - 62 = 82
    # alpha = 1 - (n - 1) * 5 / 82 = 1 - 55/82 = 27/82
    assert krippendorff_alpha_nominal(UNITS) == pytest.approx(27 / 82)


def test_krippendorff_alpha_published_example():
    # Krippendorff (2011), "Computing Krippendorff's alpha-reliability": 4 coders, 12 units with
    # missing values; nominal alpha = 0.743. Unit 12 holds one value and is not pairable.
    units = [
        [1, 1, 1],
        [2, 2, 3, 2],
        [3, 3, 3, 3],
        [3, 3, 3, 3],
        [2, 2, 2, 2],
        [1, 2, 3, 4],
        [4, 4, 4, 4],
        [1, 1, 2, 1],
        [2, 2, 2, 2],
        [5, 5, 5],
        [1, 1],
        [3],
    ]
    assert krippendorff_alpha_nominal(units) == pytest.approx(0.743, abs=5e-4)


def test_krippendorff_alpha_edges():
    assert krippendorff_alpha_nominal([["a", "a"], ["b", "b"]]) == pytest.approx(1.0)
    assert math.isnan(krippendorff_alpha_nominal([["a", "a"], ["a", "a"]]))  # no variation
    assert math.isnan(krippendorff_alpha_nominal([["a"], []]))


def test_majority_is_strict_plurality():
    assert majority(["a", "a", "b"]) == "a"
    assert majority(["a", "b", "tie"]) is None
    assert majority(["a", "b"]) is None
    assert majority(["tie"]) == "tie"
    assert majority([]) is None


def test_agreement_with_majority_of_the_others_by_hand():
    ratings = {
        "t1": {"x": "a", "y": "a", "z": "b"},  # x: others {a, b} no majority ; y: same ; z: others a,a -> miss
        "t2": {"x": "b", "y": "b", "z": "b"},  # everyone: others b,b -> hit
        "t3": {"x": "a", "y": "b", "z": "tie"},  # no majority among any two different others
        "t4": {"x": "a", "y": "a"},  # x: others {a} -> hit ; y: others {a} -> hit
    }
    result = agreement_with_majority(ratings)
    assert result == {"x": Rate(2, 2), "y": Rate(2, 2), "z": Rate(1, 2)}


def test_pairwise_and_overall_from_ratings():
    ratings = {f"t{i}": {"r1": x, "r2": y, "r3": z} for i, (x, y, z) in enumerate(UNITS)}
    kappas = pairwise_cohen_kappa(ratings)
    assert set(kappas) == {("r1", "r2"), ("r1", "r3"), ("r2", "r3")}
    # r1 vs r2: (a,a) (a,a) (b,b) (a,b): p_o 3/4 ; r1 a 3 b 1, r2 a 2 b 2 -> p_e (6 + 2) / 16 = 1/2 -> kappa 1/2
    assert kappas["r1", "r2"] == (pytest.approx(0.5), 4)
    assert fleiss_kappa_of(ratings) == (pytest.approx(11 / 41), 4)
    assert krippendorff_alpha_of(ratings) == (pytest.approx(27 / 82), 4)


def test_position_bias_by_hand():
    # (a_on_left, preferred): left, right, left, right, left ; the tie is not counted -> 3 of 5 left
    judgments = [(True, "a"), (True, "b"), (False, "b"), (False, "a"), (True, "a"), (False, "tie")]
    assert position_bias(judgments) == Rate(3, 5)
    assert position_bias(judgments).rate == pytest.approx(0.6)


def test_length_bias_by_hand():
    # (len_a, len_b, preferred): longer, shorter, longer, (equal: out), (tie: out), longer -> 3 of 4
    judgments = [(10, 5, "a"), (10, 5, "b"), (3, 8, "b"), (4, 4, "a"), (7, 2, "tie"), (1, 9, "b")]
    assert length_bias(judgments) == Rate(3, 4)


def test_binomial_p_value_by_hand():
    # 9 of 10: P(X <= 1) = (1 + 10) / 1024 ; two-sided doubles it
    assert binomial_two_sided_p(9, 10) == pytest.approx(22 / 1024)
    assert binomial_two_sided_p(1, 10) == pytest.approx(22 / 1024)
    assert binomial_two_sided_p(5, 10) == 1.0
    assert binomial_two_sided_p(3, 5) == 1.0  # P(X <= 2) = 16/32, doubled
    assert math.isnan(binomial_two_sided_p(0, 0))


def test_median_seconds_ignores_missing_times():
    assert median_seconds([3.0, 1.0, None, 2.0, 10.0]) == pytest.approx(2.5)
    assert math.isnan(median_seconds([None]))


@dataclass
class J:
    task_id: str
    annotator: str
    preferred: str | None
    a_on_left: bool | None = True
    choice: str | None = None
    len_a: int = 1
    len_b: int = 2
    seconds: float | None = None


def test_summarize_counts_and_formats():
    judgments = [
        J("t1", "x", "a", seconds=4.0),
        J("t1", "y", "a", a_on_left=False, seconds=2.0),
        J("t2", "x", "b", seconds=1.0),
        J("t2", "y", None, choice="skip", seconds=9.0),
    ]
    summary = summarize(judgments)
    assert summary["judgments"] == 4 and summary["skips"] == 1 and summary["tasks_labelled"] == 2
    assert summary["labels"] == {"a": 2, "b": 1}
    assert summary["cohen_kappa"] == [
        {"annotators": ["x", "y"], "kappa": pytest.approx(float("nan"), nan_ok=True), "n": 1}
    ]
    # left chosen: x t1 (a on left, a) yes ; y t1 (a on right, a) no ; x t2 (b on right) no -> 1 of 3
    assert summary["position_bias"]["overall"]["hits"] == 1 and summary["position_bias"]["overall"]["n"] == 3
    assert summary["length_bias"]["overall"]["hits"] == 1  # b (longer) chosen once of 3
    assert summary["median_seconds"] == pytest.approx(3.0)  # 1, 2, 4, 9
    text = format_summary(summary)
    assert "Fleiss' kappa" in text and "median time per judgment: 3.0 s" in text


@pytest.mark.skipif(not PANDALM.exists(), reason="PandaLM test set not in ../shared/data")
def test_cohen_kappa_matches_scikit_learn_on_pandalm():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    with gzip.open(PANDALM, "rt", encoding="utf-8") as handle:
        records = json.load(handle)
    first = [r["annotator1"] for r in records]
    second = [r["annotator2"] for r in records]
    ours = cohen_kappa(list(zip(first, second)))
    assert ours == pytest.approx(sklearn_metrics.cohen_kappa_score(first, second), abs=1e-12)
