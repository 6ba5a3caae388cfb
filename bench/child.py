"""One benchmark run in a fresh process: `python -m bench.child FOLDER/spec.json` writes FOLDER/result.json.

The parent (`bench.run`) starts one of these per run, so that each run's peak RSS is its own (os.wait4) and no
run inherits another's allocator state, thread pools or imported modules.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from bench.harness import Meter


def sample(spec: dict, meter: Meter) -> None:
    """`units` generate calls of one sampler (bench/rollout.py), the first one a warm-up."""
    from bench.rollout import SAMPLERS, prompt_batch
    from tuneoff.models.load import load_model_and_tokenizer

    device = torch.device(spec.get("device", "cpu"))
    model, tokenizer = load_model_and_tokenizer(spec["model"])
    model.eval().to(device)
    meter.describe_model(model, lora=False)
    ids, mask = (t.to(device) for t in prompt_batch(tokenizer, spec["batch_size"]))
    sampler = SAMPLERS[spec["side"]](model, tokenizer, ids, mask, spec["new_tokens"])
    # bf16: autocast over float32 weights, as tuneoff's --precision bf16 and TRL's bf16=True run their rollouts
    low = spec.get("precision") == "bf16"
    for _ in range(spec["units"]):  # the window starts at the end of the first (warm-up) call
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=low):
            meter.add_episodes(ids.shape[0], sampler())
        meter.mark()


def run(spec: dict, meter: Meter) -> None:
    if spec["kind"] == "sampling":
        return sample(spec, meter)
    if spec["kind"] in ("grpo", "ppo"):
        meter.watch_gold_judge()
    if spec["side"] == "tuneoff":
        from bench import tuneoff_side as side
    elif spec["side"] == "trl-1.12":
        from bench import trl_ppo as side
    else:
        from bench import trl_side as side
    side.run(spec, meter)


def profile_window(meter: Meter):
    """A torch profiler that starts at the end of the warm-up unit (the first mark) and records until stopped."""
    from torch.profiler import ProfilerActivity, profile

    profiler = profile(activities=[ProfilerActivity.CPU])
    mark = meter.mark

    def marked() -> None:
        mark()
        if len(meter.marks) == 1:
            profiler.start()

    meter.mark = marked
    return profiler


def main() -> None:
    spec_path = Path(sys.argv[1])
    spec = json.loads(spec_path.read_text())
    torch.set_num_threads(spec["threads"])  # before any thread pool exists; tuneoff's `threads` field says the same
    started = time.perf_counter()
    meter = Meter(spec["steps_per_unit"]).install()
    profiler = profile_window(meter) if spec.get("profile") else None
    run(spec, meter)
    result = {**meter.summary(), "child_s": time.perf_counter() - started, "threads": torch.get_num_threads()}
    if profiler is not None:  # bench/profile.py: self CPU time by kind of work over the timed window
        from bench.profile import by_kind

        profiler.stop()
        result["profile"] = by_kind(profiler.key_averages())
    if torch.cuda.is_available():  # the GPU's own peak next to the process's RSS
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    (spec_path.parent / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
