import json

from tests.conftest import run_cli
from tuneoff.demo import write_report
from tuneoff.eval.alignment import distinct_n, mean_ci


def test_mean_ci_hand_computed():
    # values 1, 2, 3: mean 2, sample sd 1, half-width 1.96 / sqrt(3) = 1.1316
    ci = mean_ci([1.0, 2.0, 3.0])
    assert ci["mean"] == 2.0 and abs(ci["ci_high"] - 3.13161) < 1e-4 and abs(ci["ci_low"] - 0.86839) < 1e-4


def test_distinct_n_hand_computed():
    # unigrams: a b a | a c -> 5 total, {a, b, c} distinct -> 0.6; bigrams: ab ba | ac -> 3 of 3
    assert distinct_n(["a b a", "a c"], 1) == 0.6 and distinct_n(["a b a", "a c"], 2) == 1.0


def test_report_escapes_model_text(tmp_path):
    results = {
        "config": {"prompts": 1, "prompt_words": 4, "sft_steps": 1},
        "arms": {"base": {"gold_reward": {"mean": 0.5, "ci_low": 0.4, "ci_high": 0.6}, "distinct_1": 1, "distinct_2": 1, "mean_words": 3}},
        "samples": {"base": [{"prompt": "a <b>", "continuation": "<script>alert(1)</script>\nline two", "gold": 0.5}]},
        "sft_curve": [{"step": 1, "train/loss": 2.0}, {"step": 2, "train/loss": 1.0}],
        "timings_s": {"x": 1.0}, "versions": {"torch": "t"},
    }
    write_report(results, tmp_path / "r.html")
    html = (tmp_path / "r.html").read_text()
    assert "<script>alert" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "a &lt;b&gt;" in html


def test_demo_smoke_on_tiny(tmp_path):
    out = tmp_path / "demo"
    args = ["demo", "--model", "tiny", "--sft-steps", "2", "--prompts", "4", "--max-new-tokens", "6", "--out", str(out)]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert set(results["arms"]) == {"base", "sft"}
    for arm in results["arms"].values():
        assert 0.0 <= arm["gold_reward"]["mean"] <= 1.0 and arm["gold_reward"]["n"] == 4
    assert (out / "report.html").read_text().startswith("<!doctype html>")
    again = run_cli(*args)  # idempotent: reuses the finished SFT run
    assert again.returncode == 0, again.stderr[-2000:]
