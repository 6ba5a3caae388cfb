"""Advantage estimators and baselines as pure functions. B sequences, T response tokens, k samples per prompt."""

from __future__ import annotations

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8, sum_across=None
) -> torch.Tensor:
    """(x − mean) / std over the masked entries (population variance); masked entries come back as 0.
    ``sum_across(t)`` sums a tensor over the processes that hold the rest of the batch (mean and variance of the
    whole batch); None: this tensor is the whole batch (the same sums as :func:`masked_mean`'s, bit for bit)."""
    total = sum_across or (lambda t: t)
    m = mask.to(x.dtype)
    count = total(m.sum()).clamp(min=1)
    mean = total((x * m).sum()) / count
    var = total(((x - mean) ** 2 * m).sum()) / count
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation (Schulman et al. 2015, arXiv:1506.02438).

    rewards, values, mask: (B, T); the value after the last unmasked token is 0 (the episode ends there).
    δ_t = r_t + γ V_{t+1} − V_t;  A_t = δ_t + γλ A_{t+1};  returns R_t = A_t + V_t. Returns (A, R), both (B, T).
    """
    mask = mask.to(values.dtype)
    values = values * mask
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])  # (B,)
    next_advantage = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = advantage * mask[:, t]
        next_value = values[:, t] * mask[:, t]
        next_advantage = advantages[:, t]
    return advantages, (advantages + values) * mask


def group_advantages(scores: torch.Tensor, k: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """GRPO (Shao et al. 2024): (r − mean of its group) / (std of its group). scores (B,) = P groups of k in order."""
    grouped = scores.view(-1, k)  # (P, k)
    centered = grouped - grouped.mean(-1, keepdim=True)
    if scale:
        centered = centered / (grouped.std(-1, keepdim=True) + eps)
    return centered.reshape(-1)


def rloo_advantages(scores: torch.Tensor, k: int) -> torch.Tensor:
    """RLOO (Ahmadian et al. 2024): r_i − mean of the other k − 1 samples of the same prompt. scores (B,)."""
    grouped = scores.view(-1, k)  # (P, k)
    baseline = (grouped.sum(-1, keepdim=True) - grouped) / (k - 1)
    return (grouped - baseline).reshape(-1)


BASELINES = {"grpo": group_advantages, "rloo": rloo_advantages}
