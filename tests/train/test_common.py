"""What every training loop shares (train/common.py): device and precision, resolved by hand-written cases, then
bf16 on the CPU end to end for SFT, the RM and DPO, and the refusal of CUDA where there is none."""

import json
import math
from pathlib import Path

import pytest
import torch
from tests.conftest import run_cli

from tuneoff.errors import TuneoffError
from tuneoff.train.common import make_accelerator, mixed_precision


@pytest.mark.parametrize(
    "device, precision, cuda, bf16, expected",
    [
        # CPU, by choice or for want of a GPU: auto is fp32; bf16 is allowed
        ("auto", "auto", False, False, "no"),
        ("cpu", "auto", False, False, "no"),
        ("cpu", "auto", True, True, "no"),  # a GPU is there, but cpu was asked for
        ("cpu", "fp32", False, False, "no"),
        ("cpu", "bf16", False, False, "bf16"),
        ("auto", "bf16", False, False, "bf16"),
        # CUDA: auto is bf16 where the GPU has it natively, else fp32
        ("auto", "auto", True, True, "bf16"),
        ("cuda", "auto", True, True, "bf16"),
        ("cuda", "auto", True, False, "no"),
        ("auto", "auto", True, False, "no"),
        ("cuda", "fp32", True, True, "no"),
        ("cuda", "fp16", True, True, "fp16"),
        ("auto", "fp16", True, False, "fp16"),
        ("cuda", "bf16", True, True, "bf16"),
    ],
)
def test_mixed_precision_resolution(device, precision, cuda, bf16, expected):
    assert mixed_precision(device, precision, cuda, bf16) == expected


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_fp16_needs_a_gpu(device):
    with pytest.raises(TuneoffError, match="fp16 needs a CUDA GPU"):
        mixed_precision(device, "fp16", False, False)
    if device == "cpu":  # a GPU there, but not used
        with pytest.raises(TuneoffError, match="fp16 needs a CUDA GPU"):
            mixed_precision(device, "fp16", True, True)


@pytest.mark.parametrize("precision", ["auto", "fp32", "bf16"])
def test_cuda_without_a_gpu_is_refused(precision):
    with pytest.raises(TuneoffError, match=r"device cuda: torch sees no CUDA GPU"):
        mixed_precision("cuda", precision, False, False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_make_accelerator_refuses_cuda_here_before_building_anything():
    from tuneoff.config import SFTConfig

    with pytest.raises(TuneoffError, match="CUDA"):
        make_accelerator(SFTConfig(device="cuda"))
    with pytest.raises(TuneoffError, match="fp16"):
        make_accelerator(SFTConfig(device="cpu", precision="fp16"))


# ---------------------------------------------------------------- end to end

FAST = ["--model", "tiny", "--batch-size", "4", "--max-length", "48", "--lr", "1e-3", "--log-every", "1"]
FAST += ["--threads", "1", "--eval-fraction", "0", "--save-every", "100"]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    "verb, data, key", [("sft", "sft", "train/loss"), ("rm", "pairs", "train/loss"), ("dpo", "pairs", "logps/chosen")]
)
def test_bf16_on_the_cpu_runs_to_the_end_with_finite_losses(tmp_path, sft_and_pair_files, verb, data, key):
    """--precision bf16 --device cpu: the run completes with finite losses, and the method's training forward did
    run under autocast (its first value, before any update, differs a little from fp32's; for the RM this checks
    the packed forward, which is not the forward accelerate wraps). DPO's π_ref runs under the same autocast as π,
    so at step 1 they agree and the loss is log 2."""
    from tuneoff.cli import main

    args = [*FAST, "--data", str(sft_and_pair_files[data])]
    bf16 = tmp_path / "bf16"
    result = run_cli(verb, *args, "--max-steps", "3", "--precision", "bf16", "--device", "cpu", "--out", str(bf16))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "device cpu, precision bf16" in result.stdout
    losses = [r["train/loss"] for r in metrics(bf16)]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses), losses
    fp32 = tmp_path / "fp32"
    assert main([verb, *args, "--max-steps", "1", "--device", "cpu", "--out", str(fp32)]) == 0  # auto: fp32 here
    low, full = metrics(bf16)[0][key], metrics(fp32)[0][key]
    assert low != full and abs(low - full) < 1e-2 * abs(full), (low, full)
    if verb == "dpo":
        assert abs(metrics(bf16)[0]["train/loss"] - math.log(2)) < 1e-5


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_a_gpu_exits_2_and_writes_nothing(tmp_path, sft_and_pair_files):
    out = tmp_path / "run"
    result = run_cli("sft", *FAST, "--data", str(sft_and_pair_files["sft"]), "--device", "cuda", "--out", str(out))
    assert result.returncode == 2
    assert "CUDA" in result.stderr and "Traceback" not in result.stderr and not out.exists()


def test_the_trained_modules_return_fp32_under_bf16_autocast():
    """What the losses read stays fp32 when the forward runs in bf16: SFT's summed NLL, DPO/KTO's sequence
    log-probs, the RM's rewards (padded and packed)."""
    from tuneoff.data.grouped import pair_batches
    from tuneoff.data.pairs import TokenizedPair
    from tuneoff.data.tokenize import IGNORE, Tokenized, pad_batch
    from tuneoff.models.heads import RewardModel
    from tuneoff.models.load import load_model
    from tuneoff.train.reference import SequenceLogProbs
    from tuneoff.train.reward import pair_rewards
    from tuneoff.train.sft import TokenLoss

    torch.manual_seed(0)
    lm = load_model("tiny")
    batch = pad_batch([Tokenized([5, 6, 7, 8], [IGNORE, IGNORE, 7, 8]), Tokenized([9, 10, 11], [IGNORE, 10, 11])], 0)
    pairs = [TokenizedPair([5, 6], [7, 8], [9], "a"), TokenizedPair([10], [11, 12], [13, 14, 15], "b")]
    (pairs_batch,) = pair_batches(pairs, batch_size=2, max_length=16, pad_id=0, seed=0, epoch=0)
    reward_model = RewardModel(lm)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert lm.get_output_embeddings()(torch.zeros(1, lm.config.n_embd)).dtype == torch.bfloat16  # autocast is on
        nll, _ = TokenLoss(lm)(batch["input_ids"], batch["labels"], batch["attention_mask"])
        logps, _ = SequenceLogProbs(lm)(batch["input_ids"], batch["attention_mask"], batch["labels"])
        padded = reward_model(batch["input_ids"], batch["attention_mask"])
        chosen, rejected = pair_rewards(reward_model, pairs_batch)
    outputs = (nll, logps, padded, chosen, rejected)
    assert {t.dtype for t in outputs} == {torch.float32}
    assert all(torch.isfinite(t).all() for t in outputs)


@pytest.mark.parametrize("verb", ["ppo", "grpo"])
def test_rl_in_bf16_on_the_cpu_samples_scores_and_updates_under_one_precision(tmp_path, verb):
    """RL under --precision bf16: rollout, reward, π_ref and the updates all run under the same autocast, and π_old
    is the updates' own forward, so the first update (one minibatch of all 8 episodes) starts at ratio exactly 1:
    its approx. KL(π_old‖π) is 0 (with the sampler's bf16 log-probs as π_old, 3e-7 on this model: they differ
    from the forward's by up to ~2e-3 per token)."""
    from tuneoff.train import metrics as names

    prompts = Path(__file__).parents[2] / "examples" / "sst2_prompts.jsonl"
    out = tmp_path / "run"
    args = ["--model", "tiny", "--data", str(prompts), "--reward-model", "gold", "--rollout-batch", "8"]
    args += ["--batch-size", "8", "--update-epochs", "1", "--max-new-tokens", "8", "--log-every", "1"]
    args += ["--threads", "1", "--max-steps", "2"]
    result = run_cli(verb, *args, "--precision", "bf16", "--device", "cpu", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "device cpu, precision bf16" in result.stdout
    rows = metrics(out)
    assert len(rows) == 2 and all(math.isfinite(r[names.POLICY_LOSS]) for r in rows)
    assert rows[0][names.APPROX_KL] == 0 and rows[0][names.CLIPFRAC] == 0, rows[0]
