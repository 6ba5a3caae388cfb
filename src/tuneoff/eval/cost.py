"""Cost of a run: wall and CPU seconds per phase, a subprocess's own resource usage, and FLOP estimates.

FLOPs follow Kaplan et al. 2020, "Scaling Laws for Neural Language Models" (arXiv:2001.08361): C ≈ 6·N·T to train
(forward 2·N·T + backward 4·N·T) and 2·N·T for a forward pass, N = non-embedding parameters, T = tokens.
"""

from __future__ import annotations

import os
import subprocess
import time
from contextlib import contextmanager


class PhaseTimer:
    """Wall seconds (time.perf_counter) and CPU seconds (time.process_time: all threads of *this* process, not
    its children, not the GPU) accumulated per named phase ("data", "generation", "training", "scoring").

    Phases should not nest: the totals are plain sums. CUDA work is asynchronous, so synchronise the device
    before a phase ends if its wall time should include the kernels it launched.
    """

    def __init__(self):
        self.phases: dict[str, dict[str, float]] = {}

    def add(self, phase: str, wall_s: float, cpu_s: float) -> None:
        """Add externally measured seconds (e.g. a subprocess from ``run_measured``) to ``phase``."""
        totals = self.phases.setdefault(phase, {"wall_s": 0.0, "cpu_s": 0.0})
        totals["wall_s"] += float(wall_s)
        totals["cpu_s"] += float(cpu_s)

    @contextmanager
    def phase(self, name: str):
        """``with timer.phase("training"): ...`` — the time inside the block, added even if it raises."""
        wall0, cpu0 = time.perf_counter(), time.process_time()
        try:
            yield self
        finally:
            self.add(name, time.perf_counter() - wall0, time.process_time() - cpu0)

    def as_dict(self) -> dict:
        """{"phases": {name: {"wall_s", "cpu_s"}}, "wall_s": sum over phases, "cpu_s": sum over phases}."""
        return {
            "phases": {name: dict(t) for name, t in self.phases.items()},
            "wall_s": sum(t["wall_s"] for t in self.phases.values()),
            "cpu_s": sum(t["cpu_s"] for t in self.phases.values()),
        }


def run_measured(argv: list[str], env=None, cwd=None) -> dict:
    """Run ``argv`` to completion (stdout/stderr inherited) and return its own resource usage from os.wait4:
    {"returncode", "wall_s", "cpu_s" (user + system), "peak_rss_mb"}.

    The rusage covers the child and any descendants it waited for; peak_rss_mb is ru_maxrss (KiB on Linux)
    / 1024, the largest resident set of one of them — not a sum (macOS reports bytes there; Linux is assumed).
    """
    wall0 = time.perf_counter()
    process = subprocess.Popen(argv, env=env, cwd=cwd)
    try:
        _, status, usage = os.wait4(process.pid, 0)
    except BaseException:
        process.kill()
        process.wait()
        raise
    wall_s = time.perf_counter() - wall0
    process.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4: tell Popen, so it never waits again
    return {
        "returncode": process.returncode,
        "wall_s": wall_s,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "peak_rss_mb": usage.ru_maxrss / 1024,
    }


def train_flops(n_params: int, tokens: int) -> float:
    """≈ 6·N·T training FLOPs (Kaplan et al. 2020). Ignores attention's T²-per-sequence term (≈ 6·n_layer·ctx·d_model
    per token), which is small when d_model ≫ ctx / 12, and the embedding layers."""
    return 6.0 * n_params * tokens


def inference_flops(n_params: int, tokens: int) -> float:
    """≈ 2·N·T forward FLOPs (Kaplan et al. 2020), for generation and scoring; same omissions as ``train_flops``."""
    return 2.0 * n_params * tokens
