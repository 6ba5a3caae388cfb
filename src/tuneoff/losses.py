"""Losses as pure tensor functions. Shapes: B batch, T time, V vocabulary, N selected tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def shift_targets(labels: torch.Tensor) -> torch.Tensor:
    """Next-token targets aligned with the logits at each position: target[t] = labels[t + 1].

    labels: (B, T) -> (B, T) with the last column IGNORE (nothing follows the last token).
    """
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE)  # (B, T)


def sft_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of next-token negative log-likelihoods over the tokens whose target is not IGNORE.

    logits: (N, V) or (B, T, V); targets: matching (N,) or (B, T), already shifted. Returns a scalar.
    Summing (not averaging) lets the caller divide by the token count of a whole accumulated step.
    """
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=IGNORE, reduction="sum")


def sft_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL over non-ignored targets (the quantity transformers reports as ``loss``)."""
    count = (targets != IGNORE).sum().clamp(min=1)
    return sft_loss_sum(logits, targets) / count
