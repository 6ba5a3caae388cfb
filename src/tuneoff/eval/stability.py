"""Stability of a training run: spread over seeds, divergence events, the gold-vs-proxy gap (reward hacking) and the
over-optimisation fit of Gao et al. 2022, "Scaling Laws for Reward Model Overoptimization" (arXiv:2210.10760).

A *curve* is a list of rows in step order, one per logged step or checkpoint: {"step": int, "kl": float | None,
"proxy": float | None, "gold": float | None, "loss": float | None}; any key but "step" may be missing.
All functions are pure.
"""

from __future__ import annotations

import math

QUANTITIES = ("kl", "proxy", "loss")  # checked for non-finite values, in this order


def seed_spread(values: list[float]) -> dict:
    """Spread of one metric over seeds: sample sd (n − 1 in the denominator; 0.0 for one seed) and max − min."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("need at least one value")
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"sd": sd, "range": max(values) - min(values)}


def _present(row: dict, key: str):
    value = row.get(key)
    return None if value is None else float(value)


def divergence_events(
    curve: list[dict], kl_bound: float, collapse_drop: float = 0.5, *, min_rise: float = 0.0
) -> list[dict]:
    """Divergence events along a training curve, each {"step", "kind", "value"}, in row order.

    kinds, each reported once per contiguous episode (at its first row) — an episode is a run of consecutive
    rows where the condition holds; rows where its quantity is missing neither start nor end it:
      "nan":             some present kl / proxy / loss is NaN or ±inf; value = the first such (kl, proxy, loss order).
      "kl_blowup":       finite kl > ``kl_bound``; value = kl.
      "reward_collapse": a collapse after a rise. With p_0 the first finite proxy and b_t the running best up to
                         row t, the rise is b_t − p_0; collapsed when rise > ``min_rise`` and
                         p_t < b_t − ``collapse_drop`` · rise, i.e. the proxy has given back more than that share of
                         its gain. A proxy that never rose above its start never collapses. value = p_t.
    ``min_rise`` (default 0: any rise) should be set to about the proxy's step-to-step noise so that an early
    wobble does not read as a collapse. Non-finite values count only as "nan".
    """
    events: list[dict] = []
    in_episode = {"nan": False, "kl_blowup": False, "reward_collapse": False}

    def observe(kind: str, step, holds: bool, value) -> None:
        if holds and not in_episode[kind]:
            events.append({"step": step, "kind": kind, "value": value})
        in_episode[kind] = holds

    first = best = None
    for row in curve:
        values = [v for v in (_present(row, k) for k in QUANTITIES) if v is not None]
        if values:
            bad = [v for v in values if not math.isfinite(v)]
            observe("nan", row["step"], bool(bad), bad[0] if bad else None)
        kl = _present(row, "kl")
        if kl is not None and math.isfinite(kl):
            observe("kl_blowup", row["step"], kl > kl_bound, kl)
        proxy = _present(row, "proxy")
        if proxy is not None and math.isfinite(proxy):
            first = proxy if first is None else first
            best = proxy if best is None else max(best, proxy)
            rise = best - first
            observe("reward_collapse", row["step"], rise > min_rise and proxy < best - collapse_drop * rise, proxy)
    return events


def gold_proxy_gap(curve: list[dict]) -> list[dict]:
    """Reward-hacking gap along a curve: rows {"step", "gap"} for the rows with finite "proxy" and "gold".

    gap_t = (proxy_t − proxy_0) / sd(proxy) − (gold_t − gold_0) / sd(gold): each reward's gain since the first
    such row, in units of its own sample sd over those rows (0 when that sd is 0), so the two scales need not
    match. It starts at 0, stays near 0 while gold rises in step with the proxy (exactly 0 for any positive
    linear relation), and grows when the proxy keeps rising while gold stalls or falls. Anchoring at the first
    row instead of z-scoring both series only shifts the curve by a constant, and keeps "gap at the end" readable
    as hacking accumulated over training.
    """
    rows = [(r["step"], _present(r, "proxy"), _present(r, "gold")) for r in curve]
    rows = [(s, p, g) for s, p, g in rows if p is not None and g is not None and math.isfinite(p) and math.isfinite(g)]
    if not rows:
        return []
    p0, g0 = rows[0][1], rows[0][2]
    sd_p = seed_spread([p for _, p, _ in rows])["sd"]
    sd_g = seed_spread([g for _, _, g in rows])["sd"]
    return [
        {"step": s, "gap": ((p - p0) / sd_p if sd_p > 0 else 0.0) - ((g - g0) / sd_g if sd_g > 0 else 0.0)}
        for s, p, g in rows
    ]


def fit_overoptimization(kl: list[float], gold_gain: list[float]) -> dict | None:
    """Least-squares fit of Gao et al.'s RL form R(d) = d(α − β log d), d = √KL(π‖π_init), to checkpoints.

    ``kl``: KL(π‖π_init) per *sequence* in nats (per-token KL times response length); ``gold_gain``: gold reward
    minus the initial policy's gold reward. R = α·d − β·d·log d is linear in (α, β): ordinary least squares on
    the columns [d, −d log d], no intercept (R(0) = 0). Points with KL ≤ 0 (d = 0 carries no information; a
    sampled KL estimate can be negative) or non-finite values are skipped. r2 = 1 − SS_res / SS_tot about the mean
    of gold_gain (NaN if gold_gain is constant); with no intercept it can be negative. The gold peak is at
    d* = exp(α/β − 1) when β > 0. Returns {"alpha", "beta", "r2", "n"}, or None with fewer than 3 usable points or
    when all usable d coincide (α and β not identifiable).
    """
    import numpy as np

    points = [(float(k), float(g)) for k, g in zip(kl, gold_gain) if k is not None and g is not None]
    points = [(k, g) for k, g in points if math.isfinite(k) and math.isfinite(g) and k > 0]
    if len(points) < 3:
        return None
    d = np.sqrt([k for k, _ in points])  # (n,)
    R = np.array([g for _, g in points])  # (n,)
    X = np.stack([d, -d * np.log(d)], axis=1)  # (n, 2): columns for α, β
    (alpha, beta), _, rank, _ = np.linalg.lstsq(X, R, rcond=None)
    if rank < 2:
        return None
    ss_res = float(((R - X @ np.array([alpha, beta])) ** 2).sum())
    ss_tot = float(((R - R.mean()) ** 2).sum())
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")
    return {"alpha": float(alpha), "beta": float(beta), "r2": r2, "n": len(points)}
