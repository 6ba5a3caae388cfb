import math

import pytest

from tuneoff.eval.stability import divergence_events, fit_overoptimization, gold_proxy_gap, seed_spread


def test_seed_spread_hand_computed():
    # 1, 2, 4: mean 7/3, squared deviations 16/9 + 1/9 + 25/9 = 42/9, / (n − 1 = 2) -> 7/3
    assert seed_spread([1.0, 2.0, 4.0]) == pytest.approx({"sd": math.sqrt(7 / 3), "range": 3.0})
    assert seed_spread([5.0]) == {"sd": 0.0, "range": 0.0}


def test_nan_events_once_per_episode():
    curve = [
        {"step": 0, "kl": 0.1, "loss": 1.0},
        {"step": 1, "loss": float("nan")},  # episode 1 starts
        {"step": 2, "proxy": float("inf"), "loss": 1.0},  # still non-finite: same episode
        {"step": 3},  # nothing logged: neither ends nor continues it
        {"step": 4, "kl": 0.1, "proxy": 0.0, "loss": 1.0},  # all finite: episode ends
        {"step": 5, "kl": float("-inf"), "loss": float("nan")},  # episode 2; value = kl's, first in order
    ]
    events = divergence_events(curve, kl_bound=10.0)
    assert [(e["step"], e["kind"]) for e in events] == [(1, "nan"), (5, "nan")]
    assert math.isnan(events[0]["value"]) and events[1]["value"] == float("-inf")


def test_kl_blowup_events_once_per_episode():
    # bound 1: 5 starts an episode at step 1; step 2 (6) continues; step 3 has no kl; step 4 (7) continues;
    # 0.2 ends it; 9 starts a second one. The NaN at step 7 is a "nan" event, not a KL one.
    kls = [0.1, 5.0, 6.0, None, 7.0, 0.2, 9.0, float("nan")]
    events = divergence_events([{"step": i, "kl": k} for i, k in enumerate(kls)], kl_bound=1.0)
    assert events[:2] == [
        {"step": 1, "kind": "kl_blowup", "value": 5.0},
        {"step": 6, "kind": "kl_blowup", "value": 9.0},
    ]
    assert len(events) == 3 and events[2]["step"] == 7 and events[2]["kind"] == "nan" and math.isnan(events[2]["value"])


def test_reward_collapse_after_a_rise():
    # first 0; running best 0, 1, 2, 2, 2, 2, 2 -> threshold best − 0.5·(best − 0) = 0, 0.5, 1, 1, 1, 1, 1
    # 0.9 < 1 at step 3 (collapse), 0.8 at step 4 same episode, 1.5 ≥ 1 ends it, 0.5 < 1 at step 6 again
    proxies = [0.0, 1.0, 2.0, 0.9, 0.8, 1.5, 0.5]
    events = divergence_events([{"step": 10 * i, "proxy": p} for i, p in enumerate(proxies)], kl_bound=1.0)
    assert events == [
        {"step": 30, "kind": "reward_collapse", "value": 0.9},
        {"step": 60, "kind": "reward_collapse", "value": 0.5},
    ]
    # a proxy that only falls from its start never "collapses": the rise is 0
    assert divergence_events([{"step": i, "proxy": p} for i, p in enumerate([1.0, 0.5, 0.0])], kl_bound=1.0) == []
    # collapse_drop 0.9: 0.9 and 0.8 are above 2 − 0.9·2 = 0.2, so nothing
    assert divergence_events([{"step": i, "proxy": p} for i, p in enumerate(proxies)], 1.0, collapse_drop=0.9) == []
    # an early wobble: 0.5 -> 0.52 -> 0.49 (below 0.52 − 0.01) collapses unless min_rise is above the 0.02 rise
    wobble = [{"step": i, "proxy": p} for i, p in enumerate([0.5, 0.52, 0.49])]
    assert [e["step"] for e in divergence_events(wobble, 1.0)] == [2]
    assert divergence_events(wobble, 1.0, min_rise=0.1) == []


def test_gold_proxy_gap_hand_computed():
    # proxy 0, 1, 2, 3: sd √(5/3); gold 0, 1, 1, 0: mean 1/2, sd √((4 · 1/4) / 3) = √(1/3)
    # gap_t = proxy_t · √(3/5) − gold_t · √3: 0, √0.6 − √3, 2√0.6 − √3, 3√0.6
    curve = [{"step": s, "proxy": p, "gold": g} for s, p, g in zip([0, 5, 10, 15], [0, 1, 2, 3], [0, 1, 1, 0])]
    curve.insert(2, {"step": 7, "proxy": 1.5})  # no gold: left out
    gaps = gold_proxy_gap(curve)
    assert [r["step"] for r in gaps] == [0, 5, 10, 15]
    r6, r3 = math.sqrt(0.6), math.sqrt(3)
    assert [r["gap"] for r in gaps] == pytest.approx([0.0, r6 - r3, 2 * r6 - r3, 3 * r6])
    # gold rising in step with the proxy on another scale: no gap anywhere
    lockstep = [{"step": i, "proxy": 10 + 2 * i, "gold": 0.1 * i} for i in range(5)]
    assert [r["gap"] for r in gold_proxy_gap(lockstep)] == pytest.approx([0.0] * 5, abs=1e-12)
    assert gold_proxy_gap([{"step": 0, "proxy": 1.0}]) == []


def test_fit_overoptimization_recovers_gao_form():
    # R(d) = d(α − β log d) with α = 1.2, β = 0.3, KL = d²; the zero-KL point is skipped (n = 5)
    alpha, beta = 1.2, 0.3
    ds = [0.5, 1.0, 2.0, 4.0, 8.0]
    kl = [0.0] + [d * d for d in ds]
    gain = [0.0] + [d * (alpha - beta * math.log(d)) for d in ds]
    fit = fit_overoptimization(kl, gain)
    assert fit["n"] == 5
    assert fit["alpha"] == pytest.approx(alpha, abs=1e-10) and fit["beta"] == pytest.approx(beta, abs=1e-10)
    assert fit["r2"] == pytest.approx(1.0, abs=1e-12)
    assert fit_overoptimization([0.0, 1.0, 4.0], [0.0, 0.1, 0.2]) is None  # 2 usable points
    assert fit_overoptimization([4.0, 4.0, 4.0], [0.1, 0.2, 0.3]) is None  # one d: not identifiable
