"""GRPO and RLOO verbs on the tiny model with the gold judge as reward."""

import json

import torch
from tests.conftest import ROOT, run_cli

from tuneoff.train.grpo import sequence_advantages

PROMPTS = str(ROOT / "examples" / "sst2_prompts.jsonl")
FAST = [
    "--model",
    "tiny",
    "--data",
    PROMPTS,
    "--reward-model",
    "gold",
    "--rollout-batch",
    "8",
    "--batch-size",
    "4",
    "--num-generations",
    "4",
    "--max-new-tokens",
    "8",
    "--log-every",
    "1",
    "--threads",
    "1",
    "--max-steps",
    "2",
]


def test_sequence_advantages_per_baseline():
    scores = torch.tensor([1.0, 3.0, 0.0, 0.0])
    assert torch.allclose(sequence_advantages(scores, 2, "rloo", True), torch.tensor([-2.0, 2.0, 0.0, 0.0]))
    # group std of (1, 3) is sqrt(2); a group of equal scores gives 0, not a division by zero
    expected = torch.tensor([-1.0, 1.0, 0.0, 0.0]) / (2**0.5 + 1e-4)
    assert torch.allclose(sequence_advantages(scores, 2, "grpo", True), expected)
    assert torch.allclose(sequence_advantages(scores, 2, "grpo", False), torch.tensor([-1.0, 1.0, 0.0, 0.0]))


def test_grpo_and_rloo_smoke(tmp_path):
    for verb, extra in (("grpo", []), ("rloo", ["--lora", "--lora-r", "4"])):
        out = tmp_path / verb
        result = run_cli(verb, *FAST, *extra, "--out", str(out))
        assert result.returncode == 0, result.stderr[-3000:]
        last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
        assert last["step"] == 2 and "objective/kl" in last and "objective/scores_std_in_group" in last
        assert (out / "model" / "config.json").exists()
        # the log says which decode path sampled: the lean one, or transformers' with the reason (GPT-2 with LoRA)
        path = "tuneoff's lean GPT-2 decode" if verb == "grpo" else "transformers' forward (PeftModelForCausalLM"
        assert f"sampling: {path}" in result.stdout, result.stdout[-2000:]


def test_rejects_k_that_does_not_divide_the_batch(tmp_path):
    result = run_cli("grpo", *FAST, "--num-generations", "3", "--out", str(tmp_path / "run"))
    assert result.returncode == 2 and "num_generations" in result.stderr


def test_a_hugging_face_reward_model_is_the_reward(tmp_path):
    """--reward-model names a sequence classifier saved as TRL saves one: GRPO runs on its logit (the gold judge,
    no longer the reward, is logged beside it, and the two differ)."""
    from tests.feedback.test_judges import hf_reward_model

    folder = tmp_path / "hf-rm"
    hf_reward_model(folder)
    out = tmp_path / "run"
    args = [a if a != "gold" else str(folder) for a in FAST]
    result = run_cli("grpo", *args, "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and rows[-1]["objective/scores"] != rows[-1]["objective/gold"]  # gold: at the end
