"""Sharing a GPU between an experiment's jobs: memory estimates by hand, admission, the scheduler keeping the sum
of running estimates within the budget, and the planner passing device and precision to every job."""

from __future__ import annotations

import json
import time

import pytest

from tuneoff.compare import gpu, scheduler
from tuneoff.compare import jobs as runners
from tuneoff.compare.experiment import ExperimentConfig, Job, plan
from tuneoff.errors import TuneoffError

N = 100_000_000  # parameters of a made-up base


def test_job_memory_by_hand():
    slack = 1 + gpu.ACTIVATIONS
    # full SFT: weight, gradient and two AdamW moments, 16 bytes a parameter
    sft = gpu.job_memory("train", {"arm_spec": {"method": "sft"}}, N)
    assert sft == int(16 * N * slack + gpu.CONTEXT)
    # LoRA SFT: the frozen weights (4 bytes) plus 12 more bytes on 2 % of them
    lora = gpu.job_memory("train", {"arm_spec": {"method": "sft", "lora": True}}, N)
    assert lora == int((4 * N + 12 * N * 0.02) * slack + gpu.CONTEXT)
    # PPO: the policy, π_ref, the proxy RM (4 bytes each when frozen) and a fully trained critic
    ppo = gpu.job_memory("train", {"arm_spec": {"method": "ppo"}}, N)
    assert ppo == int((16 * N + 4 * N + 4 * N + 16 * N) * slack + gpu.CONTEXT)
    # DPO with LoRA: π_ref is the policy with its adapters off, no copy
    dpo = gpu.job_memory("train", {"arm_spec": {"method": "dpo", "lora": True}}, N)
    assert dpo == lora
    assert gpu.job_memory("gold", {}, N) == 0  # the gold judge is a CPU model
    assert gpu.job_memory("eval", {"method": "base"}, N) == int(4 * N * 3 * slack + gpu.CONTEXT)


def test_fits():
    assert gpu.fits([], 10, 5)  # too big for the budget: runs, alone
    assert gpu.fits([2, 3], 5, 10) and not gpu.fits([2, 3], 6, 10)


def grab(spec, folder, inputs):
    """A job that records when it ran (start, end) in its result."""
    start = time.time()
    time.sleep(0.6)
    return {"start": start, "end": time.time()}


def test_scheduler_runs_jobs_together_only_while_their_estimates_fit(tmp_path, monkeypatch):
    monkeypatch.setitem(runners.RUNNERS, "t-grab", grab)
    names = ["big", "small-1", "small-2", "small-3"]
    jobs = [Job(n, "t-grab", {}, [], str(tmp_path / n), f"key-{n}", 1.0) for n in names]
    needs = {"big": 8, "small-1": 3, "small-2": 3, "small-3": 3}
    records = scheduler.run(jobs, workers=4, threads=1, show_progress=False, gpu=(needs, 10))
    spans = {n: (records[n]["result"]["start"], records[n]["result"]["end"]) for n in names}

    def overlap(a, b):
        return spans[a][0] < spans[b][1] and spans[b][0] < spans[a][1]

    assert not any(overlap("big", s) for s in names[1:])  # 8 + 3 > 10: the big job ran with nothing beside it
    assert overlap("small-1", "small-2") or overlap("small-2", "small-3")  # 3 + 3 ≤ 10: small ones shared it
    for moment in [t for span in spans.values() for t in span]:
        busy = sum(needs[n] for n, (s, e) in spans.items() if s <= moment < e)
        assert busy <= 10


def test_no_gpu_here_and_device_cuda_refused(tmp_path, monkeypatch):
    from tuneoff.compare.cli import _gpu_sharing

    monkeypatch.setattr(gpu, "probe", lambda: gpu.Device(False))
    config = ExperimentConfig(arms={"base": {"method": "base"}})
    assert _gpu_sharing(config, []) is None
    with pytest.raises(TuneoffError, match="cuda"):
        _gpu_sharing(ExperimentConfig(arms={"base": {"method": "base"}}, device="cuda"), [])
    with pytest.raises(TuneoffError, match="device"):
        ExperimentConfig(arms={"base": {"method": "base"}}, device="gpu")


def test_a_gpu_is_shared_by_memory(monkeypatch, capsys):
    from tuneoff.compare.cli import _gpu_sharing

    monkeypatch.setattr(gpu, "probe", lambda: gpu.Device(True, free=40 * 2**30, total=80 * 2**30, name="H100"))
    monkeypatch.setattr(gpu, "count_parameters", lambda model: N)
    config = ExperimentConfig(arms={"base": {"method": "base"}, "sft": {"method": "sft"}}, seeds=[0])
    jobs = plan(config, "/nonexistent")
    needs, budget = _gpu_sharing(config, jobs)
    assert budget == int(0.9 * 40 * 2**30)
    assert needs["train:sft/seed-0"] == gpu.job_memory("train", {"arm_spec": {"method": "sft"}}, N)
    assert "GPU H100: 40.0 of 80.0 GiB free" in capsys.readouterr().out


def test_device_and_precision_reach_every_training_and_evaluation_job():
    arms = {"base": {"method": "base"}, "sft": {"method": "sft"}, "ppo": {"method": "ppo", "precision": "fp32"}}
    auto = plan(ExperimentConfig(arms=arms, seeds=[0]), "/nonexistent")
    placed = plan(ExperimentConfig(arms=arms, seeds=[0], device="cuda", precision="bf16"), "/nonexistent")
    by_name = {j.name: j for j in placed}
    assert "placement" not in json.dumps([j.spec for j in auto])  # auto adds nothing: CPU cache keys unchanged
    assert by_name["train:sft/seed-0"].spec["placement"] == {"device": "cuda", "precision": "bf16"}
    assert by_name["rm"].spec["rm"]["device"] == "cuda"
    assert by_name["eval:sft/seed-0"].spec["device"] == "cuda"
    assert by_name["train:ppo/seed-0"].spec["arm_spec"]["precision"] == "fp32"  # the arm's own setting wins
