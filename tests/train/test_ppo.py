"""PPO: reward shaping, masks, KL control, CLI smoke, KL bound, resume after a kill (tiny model, gold reward)."""

import json
from pathlib import Path

import pytest
import torch
from tests.conftest import ROOT, kill_after_checkpoint, run_cli

from tuneoff.config import PPOConfig
from tuneoff.train.policy import AdaptiveKL, apply_truncation, response_logprobs
from tuneoff.train.ppo import per_token_rewards

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
    "--max-new-tokens",
    "8",
    "--update-epochs",
    "2",
    "--log-every",
    "1",
    "--eval-every",
    "1",
    "--threads",
    "1",
    "--lr",
    "1e-4",
]


def test_per_token_rewards_hand_computed():
    scores = torch.tensor([1.0, 2.0])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 7.0, 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    rewards = per_token_rewards(scores, kl, mask, beta=0.5)
    assert torch.allclose(rewards, torch.tensor([[-0.05, -0.1, -0.15 + 1.0], [-0.25 + 2.0, 0.0, 0.0]]))


def test_truncation_policies():
    scores, ended, mask = torch.tensor([1.0, 1.0]), torch.tensor([True, False]), torch.ones(2, 3, dtype=torch.long)
    s, m = apply_truncation(scores, ended, mask, PPOConfig(truncation="penalty", truncation_penalty=0.5))
    assert s.tolist() == [1.0, 0.5] and m.sum() == 6
    s, m = apply_truncation(scores, ended, mask, PPOConfig(truncation="mask"))
    assert s.tolist() == [1.0, 1.0] and m.tolist() == [[1, 1, 1], [0, 0, 0]]


def test_adaptive_kl_controller():
    # KL 9 vs target 6: error clipped to +0.2; β ← 0.1·(1 + 0.2·32/10000)
    control = AdaptiveKL(0.1, target=6.0, horizon=10000)
    control.update(9.0, 32)
    assert abs(control.value - 0.1 * (1 + 0.2 * 32 / 10000)) < 1e-12
    control.update(3.0, 32)  # error −0.5 clipped to −0.2
    assert abs(control.value - 0.1 * (1 + 0.2 * 32 / 10000) * (1 - 0.2 * 32 / 10000)) < 1e-12


def test_padding_and_post_eos_tokens_contribute_nothing():
    from tuneoff.models.load import load_model

    torch.manual_seed(0)
    model = load_model("tiny").eval()
    prompt = torch.tensor([[0, 0, 11, 12], [21, 22, 23, 24]])  # row 0 left-padded with 0
    prompt_mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    response = torch.tensor([[31, 32, 33], [41, 42, 43]])
    response_mask = torch.tensor([[1, 1, 1], [1, 0, 0]])  # row 1 ended after one token
    ids, mask = torch.cat([prompt, response], 1), torch.cat([prompt_mask, response_mask], 1)
    logp, entropy = response_logprobs(model, ids, mask, 4, response_mask, 1.0, with_entropy=True)
    garbage = ids.clone()
    garbage[0, :2] = 999  # other pad ids
    garbage[1, 5:] = 777  # other post-EOS tokens
    logp2, entropy2 = response_logprobs(model, garbage, mask, 4, response_mask, 1.0, with_entropy=True)
    assert torch.equal(logp[1, 1:], torch.zeros(2)) and torch.equal(entropy[1, 1:], torch.zeros(2))
    assert torch.allclose(logp, logp2, atol=1e-6) and torch.allclose(entropy, entropy2, atol=1e-6)
    # and row 0 equals the same sequence without padding
    alone, _ = response_logprobs(model, ids[:1, 2:], mask[:1, 2:], 2, response_mask[:1], 1.0)
    assert torch.allclose(logp[:1], alone, atol=1e-5)


@pytest.mark.parametrize("name", ["tiny", "smollm2-135m"])
def test_packed_logprobs_equal_transformers_padded_forward(name):
    """The padding-free packed forward gives the log-probs and entropies of transformers' own padded forward."""
    from tuneoff.models.heads import position_ids_from_mask
    from tuneoff.models.load import load_model
    from tuneoff.train.policy import pack_rows

    torch.manual_seed(0)
    model = load_model(name).eval()
    if name == "smollm2-135m":
        model.requires_grad_(False).model.layers[-1].requires_grad_(True)  # gradients of one layer suffice here
    B, P, R = 6, 5, 7
    ids = torch.randint(3, 400, (B, P + R))
    prompt_mask = torch.ones((B, P), dtype=torch.long)
    prompt_mask[0, :2] = prompt_mask[3, :4] = 0  # left padding
    lengths = torch.tensor([7, 3, 1, 7, 5, 2])
    response_mask = (torch.arange(R) < lengths[:, None]).long()
    mask = torch.cat([prompt_mask, response_mask], 1)
    packed_ids, positions, where = pack_rows(ids, mask, model.config.pad_token_id)
    assert packed_ids.numel() < ids.numel() and int((where >= 0).sum()) == int(mask.sum())
    logp, entropy = response_logprobs(model, ids, mask, P, response_mask, 0.7, with_entropy=True)
    with torch.no_grad():
        logits = (
            model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask))
            .logits[:, P - 1 : -1]
            .float()
            / 0.7
        )
    reference = torch.log_softmax(logits, -1)
    expected = reference.gather(-1, ids[:, P:, None]).squeeze(-1) * response_mask
    expected_entropy = -(reference.exp() * reference).sum(-1) * response_mask
    assert torch.allclose(logp, expected, atol=1e-4) and torch.allclose(entropy, expected_entropy, atol=1e-4)
    # and the gradients through it (the policy's update) equal those through transformers' forward
    weights = torch.randn(B, R) * response_mask
    (logp * weights).sum().backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    logits = (
        model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask))
        .logits[:, P - 1 : -1]
        .float()
        / 0.7
    )
    (torch.log_softmax(logits, -1).gather(-1, ids[:, P:, None]).squeeze(-1) * weights).sum().backward()
    assert ours and all(
        torch.allclose(ours[n], p.grad, atol=1e-4, rtol=1e-3) for n, p in model.named_parameters() if n in ours
    )


def test_pack_rows_rejects_holes():
    from tuneoff.train.policy import pack_rows

    with pytest.raises(ValueError, match="contiguous"):
        pack_rows(torch.ones((1, 4), dtype=torch.long), torch.tensor([[1, 0, 1, 1]]), 0)


def test_ppo_smoke_and_metrics(tmp_path):
    out = tmp_path / "run"
    result = run_cli("ppo", *FAST, "--out", str(out), "--max-steps", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    for key in (
        "objective/kl",
        "objective/scores",
        "objective/rlhf_reward",
        "policy/clipfrac",
        "policy/approx_kl",
        "val/ratio",
        "val/value_loss",
        "episodes_per_s",
    ):
        assert key in rows[-1], key
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "model")
    assert (out / "checkpoints" / "step-000002" / "critic.safetensors").exists()


def test_kl_bound_stops_the_run(tmp_path):
    result = run_cli("ppo", *FAST, "--out", str(tmp_path / "run"), "--max-steps", "3", "--kl-stop", "-100")
    assert result.returncode == 2 and "above kl_stop -100.0" in result.stderr and "Traceback" not in result.stderr


def test_resume_after_kill_gives_identical_metrics(tmp_path):
    args = [*FAST, "--max-steps", "12", "--save-every", "4"]
    straight = tmp_path / "straight"
    assert run_cli("ppo", *args, "--out", str(straight)).returncode == 0
    killed = tmp_path / "killed"
    kill_after_checkpoint("ppo", args, killed, "step-000004", "step-000012")
    resumed = run_cli("ppo", *args, "--out", str(killed), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    def metrics(out: Path):
        rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k != "episodes_per_s"} for r in rows]

    assert metrics(killed) == metrics(straight)


def test_ppo_ptx(tmp_path):
    """PPO-ptx (Ouyang 2022, Eq. 2): ptx_coef 0 is plain PPO bit for bit (ptx_data unused); ptx_coef > 0 changes the
    update, logs loss/ptx, and leaves a policy with a lower NLL on the ptx data than plain PPO's."""
    from tuneoff.data.formats import load_sft
    from tuneoff.data.tokenize import pad_batch, tokenize_dataset
    from tuneoff.models.load import load_model, load_tokenizer
    from tuneoff.train.sft import TokenLoss

    sft = str(ROOT / "examples" / "sst2_positive_sft.jsonl")
    args = [*FAST, "--max-steps", "4", "--lr", "3e-3", "--update-epochs", "1"]
    plain, zero, ptx = tmp_path / "plain", tmp_path / "zero", tmp_path / "ptx"
    assert run_cli("ppo", *args, "--out", str(plain)).returncode == 0
    assert run_cli("ppo", *args, "--out", str(zero), "--ptx-data", sft, "--ptx-coef", "0").returncode == 0
    result = run_cli("ppo", *args, "--out", str(ptx), "--ptx-data", sft, "--ptx-coef", "1.0")
    assert result.returncode == 0, result.stderr[-3000:]

    def metrics(out: Path):
        rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k != "episodes_per_s"} for r in rows]

    assert metrics(zero) == metrics(plain)
    assert metrics(ptx) != metrics(plain) and all("loss/ptx" in r for r in metrics(ptx))
    tokenizer = load_tokenizer("tiny")
    examples, _ = tokenize_dataset(load_sft(sft)[:64], tokenizer, 40, "truncate", True)
    batch = pad_batch(examples, tokenizer.pad_token_id)

    def nll(out: Path) -> float:
        loss_sum, count = TokenLoss(load_model(str(out / "model")).eval())(**batch)
        return float(loss_sum / count)

    assert nll(ptx) < nll(plain) - 0.05


def test_ptx_coef_needs_ptx_data():
    from tuneoff.errors import TuneoffError

    with pytest.raises(TuneoffError, match="ptx_data"):
        PPOConfig(ptx_coef=0.5)


def test_reference_is_the_starting_policy_even_for_a_random_init_model(tmp_path):
    """π_ref is a copy of the loaded policy (not a second load: `tiny` is random-init, a second load drew other
    weights and KL started at ~0.2): before any update the sampled responses have KL(π‖π_ref) ≈ 0."""
    out = tmp_path / "run"
    result = run_cli("ppo", *FAST, "--max-steps", "1", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert abs(first["objective/kl"]) < 1e-4, first
