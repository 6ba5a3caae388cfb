"""Experiment configs, the job plan, and `tuneoff compare` / `tuneoff demo` end to end on the tiny model."""

import json

import pytest
from tests.conftest import run_cli

from tuneoff.compare.experiment import load_experiment, plan, preset_path
from tuneoff.errors import TuneoffError

TINY = """extends: demo
name: tiny-smoke
base: tiny
seeds: [0]
feedback: {pairs: 48, eval_pairs: 16, max_new_tokens: 8}
sft_records: 64
eval: {prompts: 8, diversity_prompts: 3, samples_per_prompt: 2, max_new_tokens: 8}
rm: {epochs: 1, batch_size: 8, max_length: 32}
arms:
  sft: {max_steps: 4, batch_size: 4, save_every: 2}
  sft+ppo: {max_steps: 2, rollout_batch: 8, batch_size: 4, max_new_tokens: 8, eval_every: 1, save_every: 1}
  dpo: {max_steps: 3, batch_size: 4, save_every: 2}
  grpo: {max_steps: 2, rollout_batch: 8, batch_size: 4, num_generations: 4, max_new_tokens: 8, eval_every: 1,
  save_every: 1}
"""


def write(tmp_path, text, name="x.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_demo_preset_has_the_five_arms_and_three_seeds():
    config = load_experiment(preset_path("demo"))
    assert list(config.arms) == ["base", "sft", "sft+ppo", "dpo", "grpo"] and config.seeds == [0, 1, 2]
    assert config.arms["sft+ppo"] == {**config.arms["sft+ppo"], "method": "ppo", "init": "sft"}


def test_extends_merges_mappings_and_replaces_the_rest(tmp_path):
    config = load_experiment(
        write(tmp_path, "extends: demo\nseeds: [4]\nfeedback: {length_bias: 1.0}\narms: {sft: {lr: 0.1}}\n")
    )
    assert config.seeds == [4]
    assert config.feedback["length_bias"] == 1.0 and config.feedback["pairs"] == 4000  # merged, not replaced
    assert config.arms["sft"]["lr"] == 0.1 and config.arms["sft"]["method"] == "sft" and "grpo" in config.arms


@pytest.mark.parametrize(
    "text, message",
    [
        ("extends: demo\narms: {sft: {method: sft, lr_typo: 1}}\n", "unknown field(s) lr_typo"),
        ("extends: demo\narms: {x: {method: ppo, init: nowhere}}\n", "init 'nowhere' is not an arm"),
        ("extends: demo\narms: {a: {method: sft, init: b}, b: {method: sft, init: a}}\n", "loops"),
        ("extends: demo\narms: {x: {method: magic}}\n", "needs `method`"),
        ("extends: demo\nseeds: []\n", "seeds must be"),
        ("extends: demo\nbogus: 1\n", "unknown field(s) bogus"),
        ("extends: nowhere\n", "no such preset"),
        ("extends: demo\neval: {promptz: 3}\n", "eval: unknown field(s) promptz"),
        ("extends: demo\njudge: rm\n", "judge_data"),
    ],
)
def test_bad_experiment_configs_are_clear_errors(tmp_path, text, message):
    with pytest.raises(TuneoffError, match=None) as error:
        config = load_experiment(write(tmp_path, text))
        _ = config.eval_settings  # the eval block is checked when read
    assert message in str(error.value)


def test_plan_shares_stages_and_chains_sft_into_ppo(tmp_path):
    jobs = {j.name: j for j in plan(load_experiment(preset_path("demo")), tmp_path)}
    # shared stages once; 4 trained arms x 3 seeds; 5 evaluations x 3 seeds
    assert sum(n.startswith("train:") for n in jobs) == 12 and sum(n.startswith("eval:") for n in jobs) == 15
    assert {"judge", "pairs", "rm"} <= set(jobs)
    assert set(jobs["train:sft+ppo/seed-1"].deps) == {"train:sft/seed-1", "rm"}
    assert set(jobs["train:dpo/seed-0"].deps) == {"pairs"} and jobs["train:sft/seed-0"].deps == []
    # a changed knob changes the keys of the stages it feeds and of everything downstream, nothing else
    path = write(tmp_path, "extends: demo\nfeedback: {length_bias: 1.0}\n")
    changed = {j.name: j for j in plan(load_experiment(path), tmp_path)}
    assert changed["judge"].key == jobs["judge"].key and changed["train:sft/seed-0"].key == jobs["train:sft/seed-0"].key
    for name in ("pairs", "rm", "train:dpo/seed-0", "train:sft+ppo/seed-0", "eval:sft/seed-0"):
        assert changed[name].key != jobs[name].key, name


def test_compare_smoke_on_tiny_and_rerun_reuses_every_job(tmp_path):
    config, out = write(tmp_path, TINY, "tiny.yaml"), tmp_path / "out"
    result = run_cli("compare", "--config", str(config), "--out", str(out), "--workers", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"report: {out / 'report.html'}" in result.stdout
    results = json.loads((out / "results.json").read_text())  # strict JSON: no NaN
    assert list(results["arms"]) == ["base", "sft", "sft+ppo", "dpo", "grpo"]
    for name, arm in results["arms"].items():
        assert 0.0 <= arm["gold_reward"]["mean"] <= 1.0, name
        assert set(arm["diversity"]) == {"per_input", "across_input"}
        assert arm["cost"]["wall_s"]["mean"] > 0 and arm["cost"]["peak_rss_mb"]["mean"] > 0
    assert results["arms"]["base"]["kl_per_token"]["mean"] == 0.0
    assert results["arms"]["dpo"]["cost"]["labels"] > 0 and results["arms"]["sft"]["cost"]["labels"] == 0
    # sft+ppo's cost includes its SFT initialisation: more training time than sft alone
    ppo, sft = results["arms"]["sft+ppo"]["cost"], results["arms"]["sft"]["cost"]
    assert ppo["phases"]["training"] > sft["phases"]["training"]
    assert results["recommendation"]["choice"] in results["arms"]
    assert (out / "report.html").read_text().startswith("<!doctype html>")
    again = run_cli("compare", "--config", str(config), "--out", str(out))
    assert again.returncode == 0, again.stderr[-3000:]
    assert all(job["reused"] for job in json.loads((out / "results.json").read_text())["jobs"].values())


def test_demo_verb_runs_a_given_config(tmp_path):
    # a standalone config (no extends): base and SFT only, so no pairs, no reward model
    config = write(
        tmp_path,
        "name: two-arms\nbase: tiny\nseeds: [0]\nsft_records: 32\n"
        "eval: {prompts: 6, diversity_prompts: 2, samples_per_prompt: 2, max_new_tokens: 6}\n"
        "arms: {base: {method: base}, sft: {method: sft, max_steps: 2, batch_size: 4}}\n",
    )
    result = run_cli("demo", "--config", str(config), "--out", str(tmp_path / "demo"), "--workers", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert list(results["arms"]) == ["base", "sft"] and set(results["jobs"]) == {
        "judge",
        "eval:base/seed-0",
        "train:sft/seed-0",
        "eval:sft/seed-0",
    }
    assert (
        results["arms"]["base"]["win_rate_vs_base"] is None
        and results["arms"]["sft"]["win_rate_vs_base"]["mean"] is not None
    )


def test_feedback_from_preference_files(tmp_path):
    from tuneoff.compare.jobs import run_pair_files

    train = write(
        tmp_path, '{"prompt": "the film", "chosen": " is great", "rejected": " is dull"}\n' * 3, "train.jsonl"
    )
    config = load_experiment(write(tmp_path, f"extends: demo\nfeedback: {{train: {train}, eval: {train}}}\n"))
    jobs = {j.name: j for j in plan(config, tmp_path / "out")}
    assert jobs["pairs"].kind == "pair_files" and jobs["pairs"].deps == [] and jobs["rm"].deps == ["pairs"]
    result = run_pair_files(jobs["pairs"].spec, tmp_path, {})
    assert result["pairs"] == 3 and result["train"] == str(train) and result["agreement_with_gold"] is None


GIVEN = """extends: demo
name: given-reward-models
base: tiny
seeds: [0]
judge: {folder}
rm: {folder}
eval: {{prompts: 8, diversity_prompts: 3, samples_per_prompt: 2, max_new_tokens: 8}}
arms:
  sft: null
  sft+ppo: null
  dpo: null
  grpo: {{max_steps: 2, rollout_batch: 8, batch_size: 4, num_generations: 4, max_new_tokens: 8, eval_every: 1,
          save_every: 1}}
"""


def test_a_given_reward_model_is_the_judge_and_the_proxy(tmp_path):
    """judge: FOLDER and rm: FOLDER (a Hugging Face sequence classifier): nothing is trained for them, no pairs are
    made when no arm needs any, GRPO optimises that model and every arm is judged by it."""
    from tests.feedback.test_judges import hf_reward_model

    folder = tmp_path / "hf-rm"
    hf_reward_model(folder)
    config = load_experiment(write(tmp_path, GIVEN.format(folder=folder)))
    jobs = {j.name: j for j in plan(config, tmp_path / "out")}
    assert jobs["judge"].kind == jobs["rm"].kind == "given_rm" and "pairs" not in jobs
    assert set(jobs["train:grpo/seed-0"].deps) == {"rm"}
    out = tmp_path / "out"
    result = run_cli("compare", "--config", str(tmp_path / "x.yaml"), "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["judge"] == f"the reward model in {folder.resolve()} (given; no gold judge)"
    assert results["shared"]["proxy_rm"]["given"] == str(folder.resolve())
    arm = json.loads((out / "runs" / "grpo" / "seed-0" / "eval" / "eval.json").read_text())
    from tuneoff.compare.evaluate import judge_scores

    shown = arm["samples"][0]
    rescored = judge_scores(str(folder), [shown["prompt"]], [shown["response"]])[0]
    assert rescored == pytest.approx(shown["gold"], abs=1e-5)


def test_a_judge_that_is_not_a_reward_model_is_refused(tmp_path):
    with pytest.raises(TuneoffError, match="is not gold, rm or a reward model folder"):
        load_experiment(write(tmp_path, "extends: demo\njudge: no/such/folder\n"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(TuneoffError, match="config.json is missing"):
        load_experiment(write(tmp_path, f"extends: demo\nrm: {tmp_path / 'empty'}\n"))
