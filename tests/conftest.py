import json
import os
import random
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from tuneoff.models.load import load_tokenizer

    return load_tokenizer("tiny")


def run_cli(*args: str, cwd=None, env=None, timeout=600):
    """Run `python -m tuneoff.cli ARGS` in a fresh process; returns CompletedProcess (text)."""
    import subprocess

    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "tuneoff.cli", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def kill_after_checkpoint(verb: str, args: list, out, checkpoint: str, final: str) -> list[str]:
    """Start `tuneoff VERB ARGS --out OUT`, SIGKILL it once `checkpoints/CHECKPOINT` exists, and return the
    checkpoints left behind; fails if the run reached its FINAL checkpoint before the kill (nothing to resume)."""
    import signal
    import subprocess
    import time

    process = subprocess.Popen(
        [sys.executable, "-m", "tuneoff.cli", verb, *args, "--out", str(out)],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while not (out / "checkpoints" / checkpoint).exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    kept = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    assert kept and kept[-1] < final, f"the run finished before the kill: {kept}"
    return kept


@pytest.fixture(scope="session")
def sft_and_pair_files(tmp_path_factory) -> dict[str, Path]:
    """32 SST-2 SFT records ("sft") and 32 preference pairs ("pairs": a positive completion over a negative one)."""
    from tuneoff.data.sources import sst2_sft_records

    folder = tmp_path_factory.mktemp("sft-and-pairs")
    positive, negative = sst2_sft_records(label=1)[:32], sst2_sft_records(label=0)[:32]
    random.Random(0).shuffle(negative)
    records = {
        "sft": [{"prompt": r["prompt"], "completion": r["completion"]} for r in positive],
        "pairs": [
            {"prompt": g["prompt"], "chosen": g["completion"], "rejected": b["completion"]}
            for g, b in zip(positive, negative)
        ],
    }
    out = {}
    for name, rows in records.items():
        out[name] = folder / f"{name}.jsonl"
        out[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out
