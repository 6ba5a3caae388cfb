"""``tuneoff demo``: the default experiment on CPU, in minutes.

Until the comparison issue lands the demo runs its SFT arm end to end: the base model ``review-gpt``
continues held-out review beginnings (SST-2 dev); SFT on curated positive human-written reviews (SST-2
train, positive label); both models continue the same prompts; the gold judge (a sentiment classifier
trained on the human SST-2 labels, independent of both models) scores every continuation. The report
(``report.html``, self-contained) and ``results.json`` land in the output folder. Re-running reuses what a
previous run finished (the SFT model, the gold judge's cache) and resumes an interrupted SFT run.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from tuneoff.config import SFTConfig
from tuneoff.data.sources import sst2_sft_records
from tuneoff.eval.alignment import continuations, distinct_n, held_out_prompts, mean_ci


@dataclass
class DemoConfig:
    """The default demo's knobs."""

    out: str = "runs/demo"
    """Output folder (report.html, results.json, the SFT run)."""
    model: str = "review-gpt"
    """Base model of every arm."""
    prompts: int = 96
    """Held-out SST-2 dev review beginnings to continue."""
    prompt_words: int = 4
    """Words of each review kept as the prompt."""
    max_new_tokens: int = 32
    """Tokens generated per continuation."""
    sft_steps: int = 300
    """SFT optimizer steps on the curated positive reviews."""
    seed: int = 0
    """Seed for prompt choice, training and sampling."""


def run(config: DemoConfig) -> Path:
    from tuneoff.feedback.gold import load_gold_judge
    from tuneoff.models.load import load_model_and_tokenizer
    from tuneoff.train import common
    from tuneoff.train.sft import train

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    judge = load_gold_judge()
    timings["gold judge (build or load)"] = time.perf_counter() - start

    prompts = held_out_prompts(config.prompts, config.prompt_words, config.seed)
    sft_out = out / "sft"
    if not (sft_out / "model" / "config.json").exists():
        start = time.perf_counter()
        data = out / "data" / "sst2_positive_sft.jsonl"  # curated: positive human-written reviews, SST-2 train
        data.parent.mkdir(exist_ok=True)
        records = sst2_sft_records(label=1, prompt_words=config.prompt_words)
        random.Random(config.seed).shuffle(records)
        data.write_text("".join(json.dumps(r) + "\n" for r in records[:3000]), encoding="utf-8")
        timings["data preparation"] = time.perf_counter() - start
        start = time.perf_counter()
        sft = SFTConfig(model=config.model, data=str(data), out=str(sft_out),
                        max_steps=config.sft_steps, batch_size=16, max_length=64, lr=5e-4, warmup_ratio=0.05,
                        eval_every=100, save_every=100, seed=config.seed, resume=bool(common.checkpoints(sft_out)))
        train(sft)
        timings["sft training"] = time.perf_counter() - start

    arms = {"base": config.model, "sft": str(sft_out / "model")}
    results: dict = {"config": asdict(config), "arms": {}, "samples": {}}
    for arm, model in arms.items():
        start = time.perf_counter()
        lm, tokenizer = load_model_and_tokenizer(model)
        texts = continuations(lm, tokenizer, prompts, config.max_new_tokens, config.seed)
        timings[f"{arm} generation"] = time.perf_counter() - start
        scores = judge.score([p + " " + t for p, t in zip(prompts, texts)]).tolist()
        results["arms"][arm] = {"gold_reward": mean_ci(scores), "distinct_1": distinct_n(texts, 1), "distinct_2": distinct_n(texts, 2),
                                "mean_words": sum(len(t.split()) for t in texts) / len(texts)}
        results["samples"][arm] = [{"prompt": p, "continuation": t, "gold": s} for p, t, s in list(zip(prompts, texts, scores))[:8]]
    metrics = [json.loads(l) for l in (sft_out / "metrics.jsonl").read_text().splitlines()]
    results["sft_curve"] = [m for m in metrics if "train/loss" in m or "eval/loss" in m]
    results["timings_s"] = timings
    results["versions"] = {"torch": torch.__version__, **_versions()}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    write_report(results, out / "report.html")
    return out / "report.html"


def _versions() -> dict:
    import transformers

    import tuneoff

    return {"transformers": transformers.__version__, "tuneoff": tuneoff.__version__}


def write_report(results: dict, path: Path) -> None:
    """A self-contained HTML page; every model text is escaped by jinja2's autoescape."""
    from jinja2 import Environment, PackageLoader, select_autoescape

    env = Environment(loader=PackageLoader("tuneoff", "templates"), autoescape=select_autoescape(["html"]))
    losses = [(m["step"], m["train/loss"]) for m in results["sft_curve"] if "train/loss" in m]
    path.write_text(env.get_template("demo_report.html").render(r=results, losses=losses), encoding="utf-8")


def add_parser(subparsers) -> None:
    from tuneoff.config import add_config_arguments, build_config

    parser = subparsers.add_parser("demo", help="run the default experiment on CPU and write report.html",
                                   description=__doc__.split("\n\n")[1])
    add_config_arguments(parser, DemoConfig)

    def handler(args) -> int:
        report = run(build_config(DemoConfig, args))
        print(f"demo: report written to {report}")
        return 0

    parser.set_defaults(func=handler)
