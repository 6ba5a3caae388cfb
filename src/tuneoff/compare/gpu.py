"""Sharing one GPU between an experiment's jobs: by memory, not one job per CPU core.

On a CPU the scheduler runs one job per core (``workers``). On a GPU, jobs are limited by its memory instead: each
job gets an estimate of the GPU memory it needs (:func:`job_memory`: weights, gradients and AdamW state of what it
trains, the frozen models it reads, a share for activations and the CUDA context), and a job starts only when the
estimates of the running jobs plus its own fit in the free memory measured at the start (:func:`fits`). A job
larger than the whole budget still runs, alone. ``workers`` still caps the count (each job needs a CPU core for
its Python side).

The parent never initialises CUDA (the jobs are forked): :func:`probe` asks a short-lived child process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

FP32 = 4
"""Bytes per fp32 parameter: tuneoff keeps weights in fp32 (mixed precision autocasts the forward only)."""
TRAINED = 4 * FP32
"""Bytes per trained parameter: weight, gradient and AdamW's two moments."""
ACTIVATIONS = 0.5
"""Activations and allocator slack as a share of the weight memory (batch 8, ≤ 512 tokens, small models)."""
CONTEXT = 600 * 2**20
"""The CUDA context and kernels of one process (about 500-700 MB on recent GPUs)."""
LORA_SHARE = 0.02
"""Trainable share of a LoRA-adapted model's parameters (r 16 on every linear layer of a 135M model: 3.6 %,
of which only the adapters, ~2 %, carry gradients and AdamW state; a round upper figure)."""


@dataclass
class Device:
    """What :func:`probe` found: a CUDA GPU's free and total memory (bytes), or none."""

    cuda: bool
    free: int = 0
    total: int = 0
    name: str = ""


def probe() -> Device:
    """The first CUDA device as a child process sees it (the parent never touches CUDA: forked jobs could not).
    No NVIDIA device file, or torch sees no GPU: ``Device(cuda=False)`` without starting anything heavy."""
    if not any(Path("/dev").glob("nvidia[0-9]*")) and not os.environ.get("TUNEOFF_PROBE_CUDA"):
        return Device(False)
    code = (
        "import json, torch\n"
        "ok = torch.cuda.is_available()\n"
        "free, total = torch.cuda.mem_get_info() if ok else (0, 0)\n"
        "print(json.dumps([ok, free, total, torch.cuda.get_device_name() if ok else '']))\n"
    )
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
        ok, free, total, name = json.loads(out.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError, OSError):
        return Device(False)
    return Device(bool(ok), int(free), int(total), name)


def job_memory(kind: str, spec: dict, params: int) -> int:
    """Estimated GPU bytes of one job of ``kind`` (a compare.jobs runner) on a base of ``params`` parameters.

    Trained models cost TRAINED bytes per trained parameter plus FP32 per frozen one; frozen copies (π_ref, the
    reward model) FP32 per parameter; PPO's critic is a fully trained copy of the base. Jobs that run on the CPU
    (the gold judge, pair files, checking a given reward model's folder) cost nothing."""
    weights = FP32 * params

    def trained(lora: bool) -> float:
        return weights + (TRAINED - FP32) * params * (LORA_SHARE if lora else 1.0)

    if kind in ("gold", "pair_files", "real_pairs", "given_rm"):
        return 0
    if kind == "pairs":  # the base samples responses
        need = weights
    elif kind == "rm":
        need = trained(bool(spec.get("rm", {}).get("lora")))
    elif kind == "eval":  # the policy samples; the base scores KL; the proxy and judge RMs score
        need = weights * (1 + (spec.get("method") != "base") + 2)
    elif kind == "train":
        arm = spec.get("arm_spec", {})
        method, lora = arm.get("method"), bool(arm.get("lora"))
        need = trained(lora)
        if method in ("ppo", "grpo", "rloo", "dpo", "kto"):
            need += 0 if lora else weights  # π_ref: a frozen copy, or the adapters switched off
        if method in ("ppo", "grpo", "rloo"):
            need += weights  # the proxy reward model
        if method == "ppo":
            need += trained(False)  # the critic: a fully trained copy of the base
    else:
        need = weights
    return int(need * (1 + ACTIVATIONS) + CONTEXT)


def fits(running: list[int], need: int, budget: int) -> bool:
    """Whether a job of ``need`` bytes may start beside running jobs of ``running`` bytes within ``budget``; a job
    that needs more than the budget runs only alone."""
    if not running:
        return True
    return sum(running) + need <= budget


def count_parameters(model: str) -> int:
    """Parameters of a model preset or folder, counted on the meta device (no weights read or allocated)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tuneoff.models.load import load_model, resolve

    if model == "tiny":
        return sum(p.numel() for p in load_model("tiny").parameters())
    config = AutoConfig.from_pretrained(resolve(model))
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in lm.parameters())
