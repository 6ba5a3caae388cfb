"""Reward-model metrics against values computed by hand."""

import math

import pytest
import torch

from tuneoff.train.rm_metrics import (
    expected_calibration_error,
    length_bias,
    pairwise_accuracy,
    pairwise_ece,
    pearson,
    reward_model_metrics,
)


def test_pairwise_accuracy_counts_ties_as_half():
    assert pairwise_accuracy(torch.tensor([1.0, 2.0, 0.0, 3.0]), torch.tensor([0.0, 3.0, 0.0, 1.0])) == pytest.approx(
        2.5 / 4
    )
    assert math.isnan(pairwise_accuracy(torch.zeros(0), torch.zeros(0)))


def test_expected_calibration_error_hand_computed():
    probs = torch.tensor([0.12, 0.15, 0.83, 0.91, 0.95], dtype=torch.float64)  # away from bin edges
    outcomes = torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0])
    # Bins of width 0.1: bin 1 holds 0.12, 0.15 (mean p 0.135, outcomes 0.5: gap 0.365, weight 2/5);
    # bin 8 holds 0.83 (gap 0.17, weight 1/5); bin 9 holds 0.91, 0.95 (mean p 0.93, outcomes 0.5: gap 0.43, 2/5).
    expected = 2 / 5 * 0.365 + 1 / 5 * 0.17 + 2 / 5 * 0.43  # = 0.352
    assert expected_calibration_error(probs, outcomes, bins=10) == pytest.approx(expected, abs=1e-12)
    # With two bins, [0, .5) holds 0.12, 0.15 (gap 0.365) and [.5, 1] the rest (mean p 0.8967, outcomes 2/3).
    expected_two = 2 / 5 * 0.365 + 3 / 5 * abs(2 / 3 - (0.83 + 0.91 + 0.95) / 3)
    assert expected_calibration_error(probs, outcomes, bins=2) == pytest.approx(expected_two, abs=1e-12)


def test_expected_calibration_error_edges():
    # p = 1 falls in the last bin; a perfectly calibrated set scores 0.
    assert expected_calibration_error(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 1.0])) == 0.0
    probs = torch.tensor([0.25] * 4 + [0.75] * 4, dtype=torch.float64)
    outcomes = torch.tensor([1.0, 0, 0, 0, 1, 1, 1, 0])
    assert expected_calibration_error(probs, outcomes, bins=10) == pytest.approx(0.0, abs=1e-12)


def test_pairwise_ece_reads_both_orders():
    # Equal rewards say 50/50; read in both orders that is calibrated (ECE 0), where one order alone would give 0.5.
    assert pairwise_ece(torch.zeros(3), torch.zeros(3)) == pytest.approx(0.0, abs=1e-12)
    # One pair with gap ln 3: p = 0.75. Both orders: (0.75, 1) in bin 7, (0.25, 0) in bin 2 -> (0.25 + 0.25) / 2.
    gap = torch.tensor([math.log(3.0)], dtype=torch.float64)
    assert pairwise_ece(gap, torch.zeros(1, dtype=torch.float64)) == pytest.approx(0.25, abs=1e-12)


def test_pearson_hand_computed():
    # dx = (-1, 0, 1), dy = (-7/3, -1/3, 8/3): Σdxdy = 5, Σdx² = 2, Σdy² = 114/9.
    assert pearson(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 4.0, 7.0])) == pytest.approx(
        5 / math.sqrt(2 * 114 / 9)
    )
    assert math.isnan(pearson(torch.tensor([1.0, 1.0]), torch.tensor([0.0, 2.0])))


def test_length_bias_probe_hand_computed():
    # Pair 0: preferred shorter (3 < 5), ranked right. Pair 1: preferred shorter (2 < 9), ranked wrong.
    # Pair 2: preferred longer (8 > 4), ranked right. Pair 3: equal lengths, in neither group.
    r_chosen, r_rejected = torch.tensor([1.0, 0.0, 2.0, 0.0]), torch.tensor([0.0, 1.0, 1.0, 0.5])
    length_chosen, length_rejected = torch.tensor([3.0, 2.0, 8.0, 6.0]), torch.tensor([5.0, 9.0, 4.0, 6.0])
    probe = length_bias(r_chosen, r_rejected, length_chosen, length_rejected)
    assert probe["accuracy_shorter_preferred"] == 0.5 and probe["pairs_shorter_preferred"] == 2
    assert probe["accuracy_longer_preferred"] == 1.0 and probe["pairs_longer_preferred"] == 1
    rewards = torch.cat([r_chosen, r_rejected])
    lengths = torch.cat([length_chosen, length_rejected])
    assert probe["length_corr"] == pytest.approx(float(torch.corrcoef(torch.stack([rewards, lengths]))[0, 1]), abs=1e-6)


def test_reward_model_metrics_keys_and_loss():
    metrics = reward_model_metrics(
        torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.0]), torch.tensor([1.0, 2.0]), torch.tensor([2.0, 1.0])
    )
    assert metrics["loss"] == pytest.approx((math.log1p(math.exp(-2.0)) + math.log(2.0)) / 2, abs=1e-6)
    assert metrics["accuracy"] == 0.75 and metrics["reward_gap"] == 1.0 and metrics["pairs"] == 2
    assert {"ece", "reward_mean", "reward_std", "length_corr", "accuracy_shorter_preferred"} <= set(metrics)
