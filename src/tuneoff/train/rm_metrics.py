"""Reward-model metrics as pure functions of rewards (and response lengths). Shapes: N pairs.

- pairwise accuracy: the share of held-out pairs whose preferred response gets the higher reward;
- calibration: expected calibration error (Naeini et al. 2015) of P(w ≻ l) = σ(r_w − r_l), read
  over both orders of each pair (see :func:`pairwise_ece`);
- length bias: Pearson correlation of reward with response length, and accuracy split by whether the
  preferred response is the shorter or the longer one (a reward model that learned "longer is better"
  does well on the second and badly on the first; Singhal et al. 2023).
"""

from __future__ import annotations

import torch


def pairwise_accuracy(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> float:
    """Share of pairs with r_w > r_l; an exact tie counts one half.  (N,), (N,) -> float."""
    if r_chosen.numel() == 0:
        return float("nan")
    wins = (r_chosen > r_rejected).double() + 0.5 * (r_chosen == r_rejected).double()  # (N,)
    return float(wins.mean())


def expected_calibration_error(probs: torch.Tensor, outcomes: torch.Tensor, bins: int = 10) -> float:
    """ECE = Σ_b (n_b / N) · |mean(outcome in b) − mean(prob in b)| over ``bins`` equal-width bins of [0, 1].

    probs: (N,) predicted P(outcome = 1); outcomes: (N,) 0/1. Bin b holds b/bins <= p < (b+1)/bins; p = 1
    goes to the last bin. Empty bins add nothing.
    """
    probs, outcomes = probs.double().flatten(), outcomes.double().flatten()
    if probs.numel() == 0:
        return float("nan")
    index = (probs * bins).long().clamp(0, bins - 1)  # (N,) the bin of each prediction
    prob_sum = torch.bincount(index, weights=probs, minlength=bins)  # (bins,)
    outcome_sum = torch.bincount(index, weights=outcomes, minlength=bins)  # (bins,)
    gap = (outcome_sum - prob_sum).abs()  # (bins,) = n_b · |mean outcome − mean prob|
    return float(gap.sum() / probs.numel())


def pairwise_ece(r_chosen: torch.Tensor, r_rejected: torch.Tensor, bins: int = 10) -> float:
    """ECE of σ(r_w − r_l) as P(w ≻ l), each pair read in both orders: (p, 1) and (1 − p, 0).

    With one order only every outcome is 1 and ECE collapses to 1 − mean(p), a measure of confidence, not
    calibration; both orders are what an annotator shown the pair in a random order would give.
    """
    p = torch.sigmoid(r_chosen.double() - r_rejected.double())  # (N,)
    probs = torch.cat([p, 1 - p])  # (2N,)
    outcomes = torch.cat([torch.ones_like(p), torch.zeros_like(p)])  # (2N,)
    return expected_calibration_error(probs, outcomes, bins)


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson correlation of two (N,) tensors; nan when either is constant or N < 2."""
    x, y = x.double().flatten(), y.double().flatten()
    if x.numel() < 2:
        return float("nan")
    dx, dy = x - x.mean(), y - y.mean()
    denominator = (dx.square().sum() * dy.square().sum()).sqrt()
    return float((dx * dy).sum() / denominator) if denominator > 0 else float("nan")


def length_bias(
    r_chosen: torch.Tensor, r_rejected: torch.Tensor, length_chosen: torch.Tensor, length_rejected: torch.Tensor
) -> dict[str, float]:
    """The length-bias probe. All inputs (N,); lengths in tokens.

    length_corr: Pearson correlation of reward with length over all 2N responses;
    accuracy_shorter_preferred / accuracy_longer_preferred: pairwise accuracy on the pairs whose preferred
    response is strictly shorter / longer (pairs of equal length are in neither), with their counts.
    """
    shorter = length_chosen < length_rejected  # (N,)
    longer = length_chosen > length_rejected  # (N,)
    return {
        "length_corr": pearson(torch.cat([r_chosen, r_rejected]), torch.cat([length_chosen, length_rejected])),
        "accuracy_shorter_preferred": pairwise_accuracy(r_chosen[shorter], r_rejected[shorter]),
        "pairs_shorter_preferred": float(shorter.sum()),
        "accuracy_longer_preferred": pairwise_accuracy(r_chosen[longer], r_rejected[longer]),
        "pairs_longer_preferred": float(longer.sum()),
    }


def reward_model_metrics(
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    length_chosen: torch.Tensor,
    length_rejected: torch.Tensor,
    margin: torch.Tensor | float | None = None,
    bins: int = 10,
) -> dict[str, float]:
    """Every held-out metric of a reward model, keyed as logged (without the ``eval/`` prefix)."""
    from tuneoff.losses import bradley_terry_loss

    rewards = torch.cat([r_chosen, r_rejected]).double()  # (2N,)
    return {
        "loss": float(bradley_terry_loss(r_chosen, r_rejected, margin)),
        "accuracy": pairwise_accuracy(r_chosen, r_rejected),
        "ece": pairwise_ece(r_chosen, r_rejected, bins),
        "reward_gap": float((r_chosen - r_rejected).double().mean()),
        "reward_mean": float(rewards.mean()),
        "reward_std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
        **length_bias(r_chosen, r_rejected, length_chosen, length_rejected),
        "pairs": float(r_chosen.numel()),
    }
