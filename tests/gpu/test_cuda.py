"""CUDA checks, run by `pytest -m gpu` (bench/gpu.py runs them on a GPU machine; `make test` deselects them, and
without CUDA they skip): every verb on the tiny model in bf16 on the GPU, and the lean decode paths against
transformers' forward on the GPU (fp32, TF32 off: the same tolerance as the CPU parity tests' 1e-5 scaled for
the GPU's other kernel order).

TUNEOFF_GPU_TESTS_ON=cpu runs the same checks on the CPU (a dry run of this file where there is no GPU)."""

import math
import os
from pathlib import Path

import pytest
import torch
from tests.conftest import run_cli
from tests.models.test_llama_decode import KINDS, VOCAB, make, prompts
from tests.train.test_common import metrics

from tuneoff.rollout import decode_path, generate, lean_decoder

DEVICE = os.environ.get("TUNEOFF_GPU_TESTS_ON", "cuda")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
PROMPTS = Path(__file__).parents[2] / "examples" / "sst2_prompts.jsonl"
FAST = ["--model", "tiny", "--batch-size", "4", "--log-every", "1", "--save-every", "100", "--max-steps", "3"]
CUDA_BF16 = ["--device", DEVICE, "--precision", "bf16"]


@pytest.mark.parametrize(
    "verb, data, extra",
    [
        ("sft", "sft", ["--max-length", "48"]),
        ("rm", "pairs", ["--max-length", "48"]),
        ("dpo", "pairs", ["--max-length", "48"]),
        ("kto", "pairs", ["--max-length", "48"]),
        ("ppo", "prompts", ["--reward-model", "gold", "--rollout-batch", "8", "--max-new-tokens", "8"]),
        ("grpo", "prompts", ["--reward-model", "gold", "--rollout-batch", "8", "--max-new-tokens", "8"]),
        ("rloo", "prompts", ["--reward-model", "gold", "--rollout-batch", "8", "--max-new-tokens", "8"]),
    ],
)
def test_every_training_verb_runs_on_cuda_in_bf16(tmp_path, sft_and_pair_files, verb, data, extra):
    out = tmp_path / verb
    path = PROMPTS if data == "prompts" else sft_and_pair_files[data]
    result = run_cli(verb, *FAST, *extra, "--data", str(path), *CUDA_BF16, "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"device {DEVICE}, precision bf16" in result.stdout
    from tuneoff.train import metrics as names

    key = names.POLICY_LOSS if data == "prompts" else "train/loss"  # RL logs its policy loss under TRL's name
    losses = [r[key] for r in metrics(out) if key in r]
    assert losses and all(math.isfinite(v) for v in losses), losses
    if data == "prompts":  # the RL loops say which decode path sampled: the lean GPT-2 one on CUDA too
        assert "lean GPT-2 decode" in result.stdout, result.stdout[-2000:]
    assert (out / "model" / "config.json").exists()


def test_eval_runs_on_cuda(tmp_path):
    result = run_cli("eval", "--model", "tiny", "--prompts", "4", "--device", DEVICE, "--out", str(tmp_path / "e"))
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture
def exact_fp32():
    """fp32 matmuls without TF32 for the parity checks (and back to what they were)."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def cuda_generate(model, lean: bool):
    from unittest import mock

    ids, mask = (t.to(DEVICE) for t in prompts())
    run = lambda: generate(  # noqa: E731
        model, ids, mask, 16, VOCAB - 1, 0, 1.0, generator=torch.Generator(DEVICE).manual_seed(3)
    )
    if lean:
        assert lean_decoder(model, mask, 16) is not None
        return run()
    with mock.patch("tuneoff.rollout.lean_decoder", return_value=None):
        return run()


@pytest.mark.parametrize("kind", KINDS)
def test_lean_llama_family_path_equals_transformers_on_cuda(kind, exact_fp32):
    """Sampled with the same CUDA generator: the same tokens, log-probs within 1e-4 (the CPU test's 1e-5, with
    room for the GPU's reduction order)."""
    model = make(kind).to(DEVICE)
    lean, reference = cuda_generate(model, True), cuda_generate(model, False)
    assert torch.equal(lean.response_ids, reference.response_ids)
    torch.testing.assert_close(lean.logprobs, reference.logprobs, atol=1e-4, rtol=0)


def test_lean_gpt2_path_equals_transformers_on_cuda(exact_fp32):
    from tuneoff.models.load import load_model

    torch.manual_seed(0)
    model = load_model("tiny").eval().to(DEVICE)
    assert "lean GPT-2" in decode_path(model)
    lean, reference = cuda_generate(model, True), cuda_generate(model, False)
    assert torch.equal(lean.response_ids, reference.response_ids)
    torch.testing.assert_close(lean.logprobs, reference.logprobs, atol=1e-4, rtol=0)


def test_lean_path_under_bf16_autocast_on_cuda_stays_close():
    """bf16 autocast, as the RL loops sample under --precision bf16: the lean path's log-probs stay fp32 and within
    bf16's rounding of transformers' forward under the same autocast."""
    model = make("smollm2").to(DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        lean, reference = cuda_generate(model, True), cuda_generate(model, False)
    assert lean.logprobs.dtype == torch.float32
    same = lean.response_ids == reference.response_ids
    first = same.all(0).logical_not().nonzero()  # compare up to the first step where a token differs
    upto = int(first[0]) if len(first) else same.shape[1]
    assert upto >= 4, "bf16 paths diverged at once"
    torch.testing.assert_close(lean.logprobs[:, :upto], reference.logprobs[:, :upto], atol=5e-2, rtol=0)
