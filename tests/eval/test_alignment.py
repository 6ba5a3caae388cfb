import math

from tuneoff.eval.alignment import held_out_prompts, mean_ci, t_ci, win_rate


def test_win_rate_counts_ties_half():
    # a wins, tie, b wins, a wins -> (1 + 0.5 + 0 + 1) / 4
    assert win_rate([3, 2, 1, 5], [1, 2, 4, 0]) == 0.625


def test_t_interval_hand_computed():
    # 3 seeds 1, 2, 3: mean 2, sd 1, t(0.975, 2) = 4.302653 -> half-width 4.302653 / sqrt(3) = 2.48414
    ci = t_ci([1.0, 2.0, 3.0])
    assert abs(ci["ci_high"] - (2 + 2.48414)) < 1e-4 and abs(ci["ci_low"] - (2 - 2.48414)) < 1e-4
    assert math.isnan(t_ci([1.0])["ci_low"])
    assert abs(mean_ci([1.0, 2.0, 3.0])["ci_high"] - (2 + 1.96 / math.sqrt(3))) < 1e-9


def test_held_out_prompts_are_dev_beginnings_and_stable():
    a, b = held_out_prompts(20, 4, seed=0), held_out_prompts(20, 4, seed=0)
    assert a == b and len(a) == 20 and all(len(p.split()) == 4 for p in a)


def test_eval_verb_smoke_on_tiny(tmp_path):
    import json

    from tests.conftest import run_cli

    out = tmp_path / "eval.json"
    result = run_cli("eval", "--model", "tiny", "--reference", "tiny", "--prompts", "6", "--max-new-tokens", "5", "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(out.read_text())
    assert summary["gold_reward"]["n"] == 6 and 0 <= summary["gold_reward"]["mean"] <= 1
    # the exact KL of two next-token distributions, averaged over tokens: never negative
    assert summary["kl_per_token"] >= 0.0
    assert result.stdout.startswith("gold reward ")
