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


def test_mean_ci_hand_computed():
    from tuneoff.eval.alignment import mean_ci

    # values 1, 2, 3: mean 2, sample sd 1, half-width 1.96 / sqrt(3) = 1.1316
    ci = mean_ci([1.0, 2.0, 3.0])
    assert ci["mean"] == 2.0 and abs(ci["ci_high"] - 3.13161) < 1e-4 and abs(ci["ci_low"] - 0.86839) < 1e-4


def test_distinct_n_hand_computed():
    from tuneoff.eval.alignment import distinct_n

    # unigrams: a b a | a c -> 5 total, {a, b, c} distinct -> 0.6; bigrams: ab ba | ac -> 3 of 3
    assert distinct_n(["a b a", "a c"], 1) == 0.6 and distinct_n(["a b a", "a c"], 2) == 1.0


def test_held_out_prompts_are_dev_beginnings_and_stable():
    a, b = held_out_prompts(20, 4, seed=0), held_out_prompts(20, 4, seed=0)
    assert a == b and len(a) == 20 and all(len(p.split()) == 4 for p in a)


def test_eval_verb_smoke_on_tiny(tmp_path):
    import json

    from tests.conftest import run_cli

    out = tmp_path / "eval.json"
    result = run_cli(
        "eval", "--model", "tiny", "--reference", "tiny", "--prompts", "6", "--max-new-tokens", "5", "--out", str(out)
    )
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(out.read_text())
    assert summary["gold_reward"]["n"] == 6 and 0 <= summary["gold_reward"]["mean"] <= 1
    # the exact KL of two next-token distributions, averaged over tokens: never negative
    assert summary["kl_per_token"] >= 0.0
    assert result.stdout.startswith("gold reward ")


def test_length_controlled_win_rate_equals_raw_when_length_does_not_matter():
    import random

    from tuneoff.eval.alignment import length_controlled_win_rate

    # balanced design: a is longer on 4 items and shorter on 4, and wins 3 of 4 either way. The saturated fit has
    # σ(θ + φ) = σ(θ − φ) = 3/4, so φ = 0 (the L2 term is 0 there too) and σ(θ) = 0.75 = the raw win rate
    a = [1, 1, 1, 0, 1, 1, 1, 0]
    b = [0.5] * 8
    la = [10, 10, 10, 10, 5, 5, 5, 5]
    lb = [5, 5, 5, 5, 10, 10, 10, 10]
    assert abs(length_controlled_win_rate(a, b, la, lb) - 0.75) < 1e-6
    # equal lengths: sd 0 -> z = 0 -> the fit is θ = logit(raw win rate) exactly
    assert abs(length_controlled_win_rate([3, 2, 1, 5], [1, 2, 4, 0], [7] * 4, [7] * 4) - 0.625) < 1e-9
    # lengths drawn independently of who wins: close to the raw win rate (sampling noise only)
    rng = random.Random(0)
    a = [rng.random() for _ in range(400)]
    b = [rng.random() - 0.1 for _ in range(400)]
    la, lb = [rng.randint(5, 50) for _ in a], [rng.randint(5, 50) for _ in a]
    assert abs(length_controlled_win_rate(a, b, la, lb) - win_rate(a, b)) < 0.02


def test_length_controlled_win_rate_saturated_fit_hand_computed():
    from tuneoff.eval.alignment import length_controlled_win_rate

    # z = ±1 (Δlen = ±2, sd 2): two groups of 5, so the fit is saturated: σ(θ ± φ) = each group's mean target.
    # longer: targets 1, 1, 1, 1, 0 -> 0.8; shorter: 1, 0.5 (tie), 0.5 (tie), 0, 0 -> 0.4
    # θ = (logit 0.8 + logit 0.4) / 2 = (log 4 + log(2/3)) / 2 = log(8/3) / 2 -> σ(θ) = √(8/3) / (1 + √(8/3))
    a = [1, 1, 1, 1, 0, 1, 2, 2, 0, 0]
    b = [0, 0, 0, 0, 1, 0, 2, 2, 1, 1]
    la, lb = [4] * 5 + [2] * 5, [2] * 5 + [4] * 5
    r = math.sqrt(8 / 3)
    assert abs(length_controlled_win_rate(a, b, la, lb) - r / (1 + r)) < 1e-4  # the L2 term moves it by ~1e-5


def test_length_controlled_win_rate_when_length_decides():
    from tuneoff.eval.alignment import length_controlled_win_rate

    # a wins exactly when it is longer, half the time: separable, φ grows until the L2 term stops it; the θ score
    # equation Σ (y − σ(θ + φz)) = 0 with z = ±1 half each holds at θ = 0 for any φ -> exactly 0.5 (raw is 0.5 too)
    a, b = [1, 1, 0, 0], [0, 0, 1, 1]
    la, lb = [9, 9, 3, 3], [3, 3, 9, 9]
    assert abs(length_controlled_win_rate(a, b, la, lb) - 0.5) < 1e-9
    # a wins exactly when longer, and is longer 3 times of 4 (raw 0.75). Δlen = 2, 2, 2, −2 -> z = ±c.
    # θ equation: 3(1 − σ(θ + φc)) = σ(θ − φc); with A = e^{φc}, x = e^θ: A x² − 2x − 3A = 0,
    # x = (1 + √(1 + 3A²)) / A -> √3 as the (lightly penalised) φ grows -> σ(θ) -> √3 / (1 + √3) ≈ 0.634
    a, b = [1, 1, 1, 0], [0, 0, 0, 1]
    la, lb = [4, 4, 4, 2], [2, 2, 2, 4]
    assert abs(length_controlled_win_rate(a, b, la, lb) - math.sqrt(3) / (1 + math.sqrt(3))) < 5e-3


def test_length_controlled_win_rate_is_antisymmetric_and_matches_scipy():
    import random

    import numpy as np
    from scipy.optimize import minimize

    from tuneoff.eval.alignment import length_controlled_win_rate

    # a's wins lean on length (not separable): swapping a and b maps (y, z) -> (1 − y, −z) and θ -> −θ
    rng = random.Random(1)
    la, lb = [rng.randint(5, 50) for _ in range(300)], [rng.randint(5, 50) for _ in range(300)]
    a = [0.02 * x + rng.gauss(0, 0.5) for x in la]
    b = [0.02 * x + rng.gauss(0, 0.5) for x in lb]
    ab, ba = length_controlled_win_rate(a, b, la, lb), length_controlled_win_rate(b, a, lb, la)
    assert abs(ab + ba - 1) < 1e-9
    assert abs(length_controlled_win_rate(a, a, la, la) - 0.5) < 1e-12  # all ties
    # independent fit: unpenalised maximum likelihood by scipy's BFGS
    y = np.array([1.0 if x > w else 0.5 if x == w else 0.0 for x, w in zip(a, b)])
    delta = np.array(la, float) - np.array(lb, float)
    z = delta / delta.std()
    nll = lambda w: float((y * np.logaddexp(0, -(w[0] + w[1] * z)) + (1 - y) * np.logaddexp(0, w[0] + w[1] * z)).sum())
    theta = minimize(nll, np.zeros(2), method="BFGS", options={"gtol": 1e-8}).x[0]
    assert abs(ab - 1 / (1 + math.exp(-theta))) < 1e-4
    # the length effect is real here, so the adjustment moves the raw win rate toward 0.5 — but not past it
    assert abs(ab - 0.5) < abs(win_rate(a, b) - 0.5) + 0.02


def test_paired_win_rates_every_ordered_pair():
    from tuneoff.eval.alignment import paired_win_rates

    # sft vs rlhf: 1, 0.5, 0 -> 0.5; sft vs base: 1, 1, 0 -> 2/3; rlhf vs base: 1, 1, 1 -> 1
    rates = paired_win_rates({"sft": [2, 1, 0], "rlhf": [1, 1, 3], "base": [0, 0, 1]})
    assert rates == {
        "sft": {"rlhf": 0.5, "base": 2 / 3},
        "rlhf": {"sft": 0.5, "base": 1.0},
        "base": {"sft": 1 / 3, "rlhf": 0.0},
    }


def test_exact_kl_is_zero_against_itself_and_positive_against_another_model():
    import torch

    from tuneoff.eval.alignment import exact_kl_per_token
    from tuneoff.models.load import load_model, load_tokenizer
    from tuneoff.rollout import sample_responses

    tokenizer = load_tokenizer("review-gpt")
    model = load_model("review-gpt").eval()
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in ["the film is", "a dull , lifeless"]]
    tokens, texts, batches = sample_responses(model, tokenizer, ids, 8, 1.0, torch.Generator().manual_seed(0))
    assert len(tokens) == len(texts) == 2 and all(tokenizer.eos_token_id not in t for t in tokens)
    assert abs(exact_kl_per_token(model, model, batches)) < 1e-6
    torch.manual_seed(0)
    other = load_model("tiny").eval()  # same tokenizer, random weights
    assert exact_kl_per_token(model, other, batches) > 0.1


def test_eval_on_cuda_without_a_gpu_is_one_line_and_exit_2():
    import pytest
    import torch
    from tests.conftest import run_cli

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    result = run_cli("eval", "--model", "tiny", "--prompts", "2", "--device", "cuda")
    assert result.returncode == 2 and "device cuda" in result.stderr and "Traceback" not in result.stderr
