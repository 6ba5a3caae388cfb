import sys
import time

import pytest

from tuneoff.eval.cost import PhaseTimer, inference_flops, run_measured, train_flops


def test_phase_timer_accumulates_and_adds():
    timer = PhaseTimer()
    for _ in range(2):
        with timer.phase("generation"):
            time.sleep(0.02)  # wall time, next to no CPU
    with pytest.raises(RuntimeError):
        with timer.phase("training"):
            raise RuntimeError("the block's time still counts")
    timer.add("scoring", wall_s=1.5, cpu_s=0.25)
    timer.add("scoring", wall_s=0.5, cpu_s=0.25)
    out = timer.as_dict()
    assert set(out["phases"]) == {"generation", "training", "scoring"}
    assert out["phases"]["scoring"] == {"wall_s": 2.0, "cpu_s": 0.5}
    assert out["phases"]["generation"]["wall_s"] >= 0.04 and out["phases"]["generation"]["cpu_s"] < 0.04
    assert out["wall_s"] == pytest.approx(sum(p["wall_s"] for p in out["phases"].values()))
    assert out["cpu_s"] == pytest.approx(sum(p["cpu_s"] for p in out["phases"].values()))


def test_run_measured_sees_the_childs_memory_and_cpu():
    # the child writes ~50 MiB (bytes * n touches every page; a zeroed bytearray may stay unmapped)
    # and spins until it has used 0.3 s of CPU; loose lower bounds only — it is a real measurement
    code = "import time\nb = b'x' * (50 << 20)\nwhile time.process_time() < 0.3: pass\n"
    out = run_measured([sys.executable, "-c", code])
    assert out["returncode"] == 0
    assert out["cpu_s"] >= 0.25 and out["wall_s"] >= 0.25
    assert 50 <= out["peak_rss_mb"] < 1000
    assert run_measured([sys.executable, "-c", "import sys; sys.exit(3)"])["returncode"] == 3


def test_flops_hand_computed():
    # 124M parameters, 1000 tokens: 6 · 1.24e8 · 1e3 = 7.44e11 to train, 2 · 1.24e8 · 1e3 = 2.48e11 forward
    assert train_flops(124_000_000, 1000) == pytest.approx(7.44e11)
    assert inference_flops(124_000_000, 1000) == pytest.approx(2.48e11)
    assert train_flops(10, 0) == 0.0
