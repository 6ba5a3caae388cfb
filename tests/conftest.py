import os
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
    return subprocess.run([sys.executable, "-m", "tuneoff.cli", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
