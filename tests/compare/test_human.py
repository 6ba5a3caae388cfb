"""Human evaluation of an experiment: the statistics by hand, then the whole loop on the tiny model (experiment →
label add --experiment → simulated people through the JSON API → compare --human → results and report)."""

import json
import math
import random

import pytest
from tests.conftest import run_cli

from tuneoff.compare.human import bradley_terry, human_statistics, win_rates_vs_base


def comparison(a, b, *outcomes, judge=(0.9, 0.1)):
    return {"a": a, "b": b, "judge_a": judge[0], "judge_b": judge[1],
            "labels": [(f"p{i}", o) for i, o in enumerate(outcomes)]}  # fmt: skip


def test_win_rate_against_base_by_hand():
    comparisons = [
        comparison("sft", "base", 1.0, 0.5),  # sft is a: 1 and ½
        comparison("base", "sft", 1.0),  # base is a and preferred: 0 for sft
        comparison("dpo", "sft", 1.0),  # not against base: not counted
    ]
    assert win_rates_vs_base(comparisons, ["sft", "dpo"], "base") == {"sft": (0.5, 3)}


def test_bradley_terry_by_hand():
    # Two arms: arm wins 3, base 1, plus the prior's virtual tie: W = 3.5 vs 1.5 in 5 games, and for two players
    # the MLE is P(arm ≻ base) = 3.5 / 5 = 0.7, so s = log(0.7 / 0.3).
    comparisons = [comparison("arm", "base", 1.0, 1.0, 0.0), comparison("base", "arm", 0.0)]
    strengths = bradley_terry(comparisons, ["base", "arm"], "base")
    assert strengths["base"] == 0.0 and strengths["arm"] == pytest.approx(math.log(7 / 3), abs=1e-8)
    # Symmetric results give equal strengths; a tie is half a win each way
    even = [comparison("x", "base", 1.0, 0.0), comparison("y", "base", 0.5, 0.5), comparison("x", "y", 0.5)]
    s = bradley_terry(even, ["base", "x", "y"], "base")
    assert s["x"] == pytest.approx(0.0, abs=1e-6) and s["y"] == pytest.approx(0.0, abs=1e-6)


def test_human_statistics_judge_agreement_and_intervals():
    comparisons = [comparison("sft", "base", 1.0, 1.0, 0.0, judge=(0.8, 0.2)) for _ in range(6)]
    comparisons += [comparison("base", "sft", 1.0, 0.5, judge=(0.3, 0.7)) for _ in range(4)]
    stats = human_statistics(comparisons, ["base", "sft"], "base", resamples=300)
    win = stats["win_rate_vs_base"]["sft"]  # (6·2 + 4·0.5) / (6·3 + 4·2) = 14 / 26
    assert win["mean"] == pytest.approx(14 / 26) and win["n"] == 26 and win["comparisons"] == 10
    assert win["ci_low"] <= win["mean"] <= win["ci_high"]
    # The judge prefers sft in every comparison. First kind: it picks a (sft); labels 1 and 1 agree, 0 does not:
    # 12 of 18. Second kind: it picks b (sft); label 1.0 picks a (base): 0 of 4 (the ½, a tie, is left out).
    assert stats["judge_agreement"]["n"] == 22 and stats["judge_agreement"]["rate"] == pytest.approx(12 / 22)
    assert stats["judgments"] == 26 and stats["agreement"]["fleiss_items"] == 10


TWO_SFT_ARMS = """extends: demo
name: people
base: tiny
seeds: [0]
sft_records: 64
eval: {prompts: 10, diversity_prompts: 3, samples_per_prompt: 2, max_new_tokens: 8}
arms:
  sft+ppo: null
  dpo: null
  grpo: null
  sft: {max_steps: 6, batch_size: 4, lr: 0.001, save_every: 100}
  sft-long: {method: sft, max_steps: 12, batch_size: 4, lr: 0.003, save_every: 100}
"""


def test_a_whole_human_evaluation_on_the_tiny_model(tmp_path):
    """Simulated people judge through the JSON API, each preferring the response the gold judge scores higher
    with probability 0.8; the human win rates' 95% CIs cover the win rates those choices imply."""
    from fastapi.testclient import TestClient

    from tuneoff.feedback.app import create_app
    from tuneoff.feedback.gold import load_gold_judge
    from tuneoff.feedback.store import Store

    config, out, db = tmp_path / "people.yaml", tmp_path / "out", tmp_path / "fb.sqlite"
    config.write_text(TWO_SFT_ARMS)
    assert run_cli("compare", "--config", str(config), "--out", str(out)).returncode == 0
    added = run_cli("label", "add", "--db", str(db), "--experiment", str(out), "--arm-vs-arm", "6")
    assert added.returncode == 0, added.stderr[-2000:]
    again = run_cli("label", "add", "--db", str(db), "--experiment", str(out), "--arm-vs-arm", "6")
    assert "0 comparisons queued" in again.stdout  # stable ids: nothing twice
    with Store(db) as store:
        tasks = store.tasks()
        tokens = [store.add_annotator(f"person{i}")[1] for i in range(3)]
    assert tasks and all(t.meta["experiment"] == "people" for t in tasks)
    assert all("sft" not in t.prompt and t.source_a is None for t in tasks)  # nothing on the page names an arm

    gold, rng, app = load_gold_judge(), random.Random(0), create_app(db, annotators_per_task=3)
    truth: dict[str, list[float]] = {}
    for token in tokens:
        client = TestClient(app, headers={"Authorization": f"Bearer {token}"})
        while (task := client.get("/api/next").json()["task"]) is not None:
            left, right = gold.score([task["prompt"] + task["left"], task["prompt"] + task["right"]])
            better = "left" if left > right else "right"
            choice = better if rng.random() < 0.8 else {"left": "right", "right": "left"}[better]
            assert client.post("/api/judgments", json={"task_id": task["task_id"], "choice": choice}).status_code == 201
    for t in tasks:  # what each comparison's expected outcome for the tuned arm is under this choice model
        if "base" in (t.meta["a"], t.meta["b"]):
            arm = t.meta["b"] if t.meta["a"] == "base" else t.meta["a"]
            ga, gb = gold.score([t.prompt + t.response_a, t.prompt + t.response_b])
            arm_better = (ga > gb) == (t.meta["a"] == arm)
            truth.setdefault(arm, []).append(0.8 if arm_better else 0.2)

    result = run_cli("compare", "--config", str(config), "--out", str(out), "--human", str(db))
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    human = results["human"]
    assert set(human["win_rate_vs_base"]) == {"sft", "sft-long"} and len(human["annotators"]) == 3
    for arm, values in truth.items():
        win, expected = human["win_rate_vs_base"][arm], sum(values) / len(values)
        assert win["ci_low"] <= expected <= win["ci_high"], (arm, win, expected)
        assert win["n"] == 3 * len(values)  # three people on every comparison
    assert set(human["bradley_terry"]) == {"base", "sft", "sft-long"} and human["bradley_terry"]["base"]["mean"] == 0
    assert 0 <= human["judge_agreement"]["rate"] <= 1 and human["judge_agreement"]["n"] > 0
    assert results["recommendation"]["alignment"] == "human"
    assert any("what people preferred" in s for s in results["recommendation"]["explanation"])
    report = (out / "report.html").read_text()
    assert "What people preferred" in report and "Bradley–Terry strength" in report
    stats = run_cli("label", "stats", "--db", str(db), "--experiment", str(out))
    assert stats.returncode == 0 and "human win rate vs base" in stats.stdout
