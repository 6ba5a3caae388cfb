"""`tuneoff rm-eval`: the Wilson interval and every metric by hand, then the verb on any reward model."""

import json
import math

import pytest
import torch
from tests.conftest import run_cli

from tuneoff.eval.reward_models import accuracy_with_ci, evaluate_rewards, wilson_interval


def test_wilson_interval_by_hand():
    # p̂ = 0.8, n = 10, z = 1.96: p̂ + z²/2n = 0.99208, z·sqrt(p̂(1 − p̂)/n + z²/4n²) = 1.96·sqrt(0.025604)
    # = 0.313624, 1 + z²/n = 1.38416 → [0.678456, 1.305704] / 1.38416 = [0.490157, 0.943319]
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.490157, abs=1e-6) and high == pytest.approx(0.943319, abs=1e-6)
    low, high = wilson_interval(10, 10)  # all right: (1.19208 ± 0.19208) / 1.38416, inside [0, 1]
    assert high == pytest.approx(1.0) and low == pytest.approx(0.722460, abs=1e-6)
    assert all(math.isnan(v) for v in wilson_interval(0, 0))


def test_accuracy_counts_a_tie_one_half():
    r_w, r_l = torch.tensor([2.0, 1.0, 0.0, 3.0]), torch.tensor([1.0, 1.0, 1.0, 0.0])
    result = accuracy_with_ci(r_w, r_l)  # win, tie, loss, win: (2 + 0.5) / 4
    assert result["accuracy"] == 0.625 and result["pairs"] == 4
    assert (result["ci_low"], result["ci_high"]) == pytest.approx(wilson_interval(2.5, 4))


def test_metrics_and_subsets_by_hand():
    r_w = torch.tensor([1.0, 2.0, 0.0, 5.0])
    r_l = torch.tensor([0.0, 3.0, -1.0, 1.0])  # right, wrong, right, right
    words_w, words_l = torch.tensor([3, 1, 2, 9]), torch.tensor([1, 4, 2, 2])
    result = evaluate_rewards(r_w, r_l, words_w, words_l, ["chat", "chat", None, "safety"])
    assert result["accuracy"] == 0.75 and result["pairs"] == 4
    # preferred shorter: pair 2 only (1 < 4), wrong; preferred longer: pairs 1 and 4, both right
    assert result["accuracy_shorter_preferred"] == 0.0 and result["pairs_shorter_preferred"] == 1
    assert result["accuracy_longer_preferred"] == 1.0 and result["pairs_longer_preferred"] == 2
    assert result["subsets"]["chat"]["accuracy"] == 0.5 and result["subsets"]["chat"]["pairs"] == 2
    assert result["subsets"]["safety"]["accuracy"] == 1.0 and set(result["subsets"]) == {"chat", "safety"}
    rewards, lengths = [1.0, 2.0, 0.0, 5.0, 0.0, 3.0, -1.0, 1.0], [3, 1, 2, 9, 1, 4, 2, 2]
    assert result["length_corr"] == pytest.approx(float(torch.corrcoef(torch.tensor([rewards, lengths]))[0, 1]))
    assert 0.0 <= result["ece"] <= 1.0
    assert "subsets" not in evaluate_rewards(r_w, r_l, words_w, words_l, [None] * 4)


@pytest.fixture(scope="module")
def rewardbench_file(tmp_path_factory):
    """RewardBench's record format: prompt, chosen, rejected, subset; SST-2-like so the gold judge has a view."""
    rows = [
        {"prompt": "the film is", "chosen": " a delight", "rejected": " a mess", "subset": "sentiment"},
        {"prompt": "the plot", "chosen": " is clever and warm", "rejected": " is dull", "subset": "sentiment"},
        {"prompt": "i thought it", "chosen": " was wonderful", "rejected": " was awful", "subset": "sentiment"},
        {"prompt": "the acting", "chosen": " is superb", "rejected": " is wooden and flat", "subset": "other"},
    ]
    path = tmp_path_factory.mktemp("rm-eval") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_rm_eval_verb_with_the_gold_judge(tmp_path, rewardbench_file):
    out = tmp_path / "result.json"
    result = run_cli("rm-eval", "--reward-model", "gold", "--data", str(rewardbench_file), "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads(out.read_text())
    assert saved["pairs"] == 4 and saved["accuracy"] == 1.0  # the sentiment judge prefers every positive side
    assert "accuracy 1.000 [" in result.stdout and "| sentiment | 3 | 1.000" in result.stdout
    assert set(saved["subsets"]) == {"sentiment", "other"}


def test_rm_eval_verb_with_a_hugging_face_reward_model(tmp_path, rewardbench_file):
    """A sequence classifier saved as TRL saves one: rm-eval's rewards are that model's scores of the pairs."""
    from tests.feedback.test_judges import hf_reward_model

    from tuneoff.feedback.judges import load_scorer

    folder = tmp_path / "rm"
    hf_reward_model(folder)
    out = tmp_path / "result.json"
    result = run_cli("rm-eval", "--reward-model", str(folder), "--data", str(rewardbench_file), "--out", str(out),
                     "--batch-size", "3")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in rewardbench_file.read_text().splitlines()]
    scorer = load_scorer(str(folder))
    r_w = scorer.score([r["prompt"] for r in rows], [r["chosen"] for r in rows])
    r_l = scorer.score([r["prompt"] for r in rows], [r["rejected"] for r in rows])
    assert json.loads(out.read_text())["accuracy"] == accuracy_with_ci(r_w, r_l)["accuracy"]


def test_rm_eval_names_what_is_wrong(tmp_path, rewardbench_file):
    result = run_cli("rm-eval", "--reward-model", str(tmp_path), "--data", str(rewardbench_file))
    assert result.returncode == 2 and "config.json is missing" in result.stderr
