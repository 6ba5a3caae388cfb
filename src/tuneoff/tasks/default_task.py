"""The default task's preference data: pairs of ``review-gpt`` continuations judged by simulated annotators.

1. Prompts: the first ``prompt_words`` words of distinct SST-2 *train* sentences (dev and test stay for the
   demo's held-out prompts), shuffled by ``seed``; the first ``eval_pairs`` prompts are held out.
2. Responses: ``responses`` (K) sampled continuations per training prompt from ``review-gpt`` (temperature 1,
   top-p 1, at most ``max_new_tokens`` tokens, stopping at EOS); every pair of them that differs (and is not
   empty) is a training pair, K(K − 1)/2 per prompt, up to ``pairs`` in all. Held-out prompts get two
   continuations each, drawn as the K = 2 build draws them (the same :data:`GENERATE_BATCH` batches from the
   same seed), so the gold-labelled held-out pairs do not depend on K when both builds cover the first
   generate batches (eval_pairs + pairs ≥ 512 with the defaults). ``eval_annotated.jsonl`` does depend on K:
   the annotators draw for the training pairs first.
3. Training labels: a panel of ``annotators`` simulated annotators (:mod:`tuneoff.feedback.simulate`), pair i
   judged by annotator i mod n, each choosing by a Bradley–Terry draw on the gold judge's logits of the
   whole review (prompt + continuation, :func:`tuneoff.feedback.judges.judge_text`) with temperature
   ``temperature`` and length bias ``length_bias``; they see the two responses in a random order. The default,
   T = 1 with no bias, is the "typical" annotator of :func:`tuneoff.feedback.simulate.mixed_panel`; at T = 1
   about one label in five disagrees with gold on these pairs (80.0% agreement on the default build;
   ``info.json`` records the measured rate).
4. Held-out labels: the gold judge's own ordering (chosen = the higher gold logit), so a reward model's
   held-out accuracy *is* its agreement with gold. ``eval_annotated.jsonl`` holds the same pairs labelled
   by the simulated annotators, for calibration against the noisy labels.

The files are built once per setting (generation, on a GPU when there is one: 236 s for the default 4,500 prompts
on 2 busy CPU cores, 24 s for 21,000 on an H100; samples differ between devices) and cached under
``$TUNEOFF_CACHE/default-task/<key>/`` (default ``~/.cache/tuneoff``); ``<key>`` hashes the settings, the
review-gpt weights and :data:`FORMAT_VERSION`. ``python -m tuneoff.tasks.default_task --help`` builds other
settings; ``tuneoff rm --data default`` uses the defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import math
import random
import shutil
import tempfile
import time
from pathlib import Path

FORMAT_VERSION = 2
"""Bump when the recipe above changes: it is part of the cache key. 2: responses drawn by
:func:`tuneoff.rollout.sample_responses` (1: transformers' ``generate``)."""
TRAIN_FILE, EVAL_FILE, EVAL_ANNOTATED_FILE, INFO_FILE = (
    "train.jsonl",
    "eval_gold.jsonl",
    "eval_annotated.jsonl",
    "info.json",
)
GENERATE_BATCH = 256
"""Prompts per sampling call. Part of the recipe: a prompt's samples depend on the batch it is drawn in."""


@dataclasses.dataclass(frozen=True)
class DefaultTaskConfig:
    """Knobs of the default task's preference data."""

    pairs: int = 4000
    """Training pairs before dropping pairs with an empty or duplicate continuation: K(K − 1)/2 per prompt, so
    ⌈pairs / (K(K − 1)/2)⌉ training prompts, at most every distinct beginning (about 22,400 after the held-out)."""
    responses: int = 2
    """K: continuations sampled per training prompt; all K(K − 1)/2 pairs of them are labelled. Each response
    in more comparisons teaches a reward model more per sequence it reads (tuneoff rm scores a response once
    per micro-batch, however many pairs compare it)."""
    eval_pairs: int = 500
    """Held-out pairs (their prompts are not among the training prompts), labelled by the gold judge."""
    prompt_words: int = 4
    """Words of each SST-2 train sentence kept as the prompt."""
    max_new_tokens: int = 24
    """Longest continuation in tokens."""
    temperature: float = 1.0
    """Annotator noise T on the gold judge's logit scale (0: always agree with gold)."""
    length_bias: float = 0.0
    """Annotator length bias: logit added per 10 words that a response is longer than the other."""
    annotators: int = 4
    """Simulated annotators in the panel (same habits, independent random draws)."""
    flip_rate: float = 0.0
    """Label noise on top of the annotators' own: this share of training labels, drawn at random, is flipped
    (chosen and rejected swapped), as from careless or adversarial labellers."""
    seed: int = 0
    """Seeds the prompt choice, sampling and the annotators."""
    model: str = "review-gpt"
    """The model whose continuations are compared."""

    def __post_init__(self):
        problems = [
            f"{name} must be {rule}, got {getattr(self, name)!r}"
            for name, ok, rule in [
                ("pairs", self.pairs >= 1, "at least 1"),
                ("responses", self.responses >= 2, "at least 2"),
                ("eval_pairs", self.eval_pairs >= 1, "at least 1"),
                ("prompt_words", self.prompt_words >= 1, "at least 1"),
                ("max_new_tokens", self.max_new_tokens >= 1, "at least 1"),
                ("annotators", self.annotators >= 1, "at least 1"),
                ("temperature", math.isfinite(self.temperature) and self.temperature >= 0, "finite and at least 0"),
                ("length_bias", math.isfinite(self.length_bias), "finite"),
                ("flip_rate", 0 <= self.flip_rate <= 1, "in [0, 1]"),
            ]
            if not ok
        ]
        if problems:
            raise ValueError("default task: " + "; ".join(problems))


def train_prompts(words: int, seed: int) -> list[str]:
    """Distinct first-``words``-word beginnings of SST-2 train sentences with more words to continue, shuffled."""
    from tuneoff.data.sources import sst2_sentences

    prompts = sorted({" ".join(s.split()[:words]) for s in sst2_sentences(min_words=words + 4)})
    random.Random(seed).shuffle(prompts)
    return prompts


def sample_responses(
    model_name: str, prompts: list[str], count: int, max_new_tokens: int, seed: int, batch_size: int = GENERATE_BATCH
) -> list[tuple[str, list[str]]]:
    """(prompt, responses): ``count`` continuations of each prompt sampled at temperature 1 from the whole
    vocabulary (decoded, special tokens dropped) by :func:`tuneoff.rollout.sample_responses`, the sampler every
    policy draws from, ``batch_size`` prompts (× ``count`` rows) per call, from a generator seeded with ``seed``."""
    import torch

    from tuneoff.models.load import load_model_and_tokenizer
    from tuneoff.rollout import sample_responses as sample

    model, tokenizer = load_model_and_tokenizer(model_name)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.eval().to(device)
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    rows = [row for row in ids for _ in range(count)]  # each prompt's count samples side by side
    generator = torch.Generator(device).manual_seed(seed)
    _, texts, _ = sample(model, tokenizer, rows, max_new_tokens, 1.0, generator, batch=batch_size * count)
    return [(prompt, texts[count * i : count * (i + 1)]) for i, prompt in enumerate(prompts)]


def sample_pairs(
    model_name: str, prompts: list[str], max_new_tokens: int, seed: int, batch_size: int = GENERATE_BATCH
) -> list[tuple[str, str, str]]:
    """(prompt, first, second): two sampled continuations of each prompt."""
    return [(p, a, b) for p, (a, b) in sample_responses(model_name, prompts, 2, max_new_tokens, seed, batch_size)]


def all_pairs(groups: list[tuple[str, list[str]]]) -> list[tuple[str, str, str]]:
    """(prompt, a, b) for every pair of a prompt's responses (in sampling order), skipping empty and equal ones."""
    return [
        (prompt, a, b)
        for prompt, responses in groups
        for a, b in itertools.combinations(responses, 2)
        if a.strip() and b.strip() and a != b
    ]


def flip_labels(records: list[dict], rate: float, seed: int) -> list[dict]:
    """Swap chosen and rejected in a random ``rate`` share of the records (exactly round(rate · N) of them)."""
    if not 0 <= rate <= 1:
        raise ValueError(f"flip_rate must be in [0, 1], got {rate}")
    flipped = set(random.Random(seed).sample(range(len(records)), round(rate * len(records))))
    return [
        {**r, "chosen": r["rejected"], "rejected": r["chosen"], "flipped": True} if i in flipped else r
        for i, r in enumerate(records)
    ]


def gold_ordered(pairs: list[tuple[str, str, str]], judge) -> list[dict]:
    """Records with chosen = the response whose whole review (prompt + response) the gold judge scores higher."""
    from tuneoff.feedback.judges import judge_text

    kept = [p for p in pairs if p[1].strip() and p[2].strip() and p[1] != p[2]]
    first = judge.logit([judge_text(p, a) for p, a, _ in kept])  # (N,)
    second = judge.logit([judge_text(p, b) for p, _, b in kept])  # (N,)
    return [
        {
            "prompt": p,
            "chosen": a if s1 > s2 else b,
            "rejected": b if s1 > s2 else a,
            "annotator": "gold",
            "gold_gap": float(abs(s1 - s2)),
        }
        for (p, a, b), s1, s2 in zip(kept, first, second)
        if s1 != s2
    ]


def agreement_with_gold(records: list[dict], judge) -> float:
    """Share of preference records whose chosen response the gold judge scores higher."""
    from tuneoff.feedback.judges import judge_text

    if not records:
        return float("nan")
    chosen = judge.logit([judge_text(r["prompt"], r["chosen"]) for r in records])
    rejected = judge.logit([judge_text(r["prompt"], r["rejected"]) for r in records])
    return float((chosen > rejected).mean())


def build(config: DefaultTaskConfig, folder: str | Path) -> Path:
    """Write train.jsonl, eval_gold.jsonl, eval_annotated.jsonl and info.json into ``folder``; returns it."""
    from tuneoff.data.formats import write_jsonl
    from tuneoff.feedback.gold import load_gold_judge
    from tuneoff.feedback.simulate import make_annotators, simulate_preferences

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    judge = load_gold_judge()
    per_prompt = math.comb(config.responses, 2)
    prompts = train_prompts(config.prompt_words, config.seed)
    start = time.perf_counter()
    if config.responses == 2:
        pairs = sample_pairs(
            config.model, prompts[: config.eval_pairs + config.pairs], config.max_new_tokens, config.seed
        )
        held_out, training = pairs[: config.eval_pairs], pairs[config.eval_pairs :]
    else:  # held-out: the K = 2 build's samples (its first generate batches, sampled the same way), then K per prompt
        span = min(
            len(prompts), config.eval_pairs + config.pairs, -(-config.eval_pairs // GENERATE_BATCH) * GENERATE_BATCH
        )
        held_out = sample_pairs(config.model, prompts[:span], config.max_new_tokens, config.seed)[: config.eval_pairs]
        training_prompts = prompts[config.eval_pairs : config.eval_pairs + math.ceil(config.pairs / per_prompt)]
        training = all_pairs(
            sample_responses(config.model, training_prompts, config.responses, config.max_new_tokens, config.seed)
        )
        training = training[: config.pairs]
    generation_s = time.perf_counter() - start
    panel = make_annotators(
        config.annotators, temperature=config.temperature, length_bias=config.length_bias, seed=config.seed
    )
    train_records = flip_labels(
        simulate_preferences(training, panel, judge.logit, shuffle_order=True), config.flip_rate, config.seed
    )
    eval_records = gold_ordered(held_out, judge)
    eval_annotated = simulate_preferences(held_out, panel, judge.logit, shuffle_order=True)
    write_jsonl(folder / TRAIN_FILE, train_records)
    write_jsonl(folder / EVAL_FILE, eval_records)
    write_jsonl(folder / EVAL_ANNOTATED_FILE, eval_annotated)
    info = {
        "config": dataclasses.asdict(config),
        "format": FORMAT_VERSION,
        "train_pairs": len(train_records),
        "eval_pairs": len(eval_records),
        "train_label_agreement_with_gold": agreement_with_gold(train_records, judge),
        "eval_annotated_agreement_with_gold": agreement_with_gold(eval_annotated, judge),
        "generation_s": round(generation_s, 1),
        "gold_judge": judge.info.get("key", ""),
    }
    (folder / INFO_FILE).write_text(json.dumps(info, indent=1))
    return folder


def cache_key(config: DefaultTaskConfig) -> str:
    from tuneoff.models.load import resolve

    settings = dataclasses.asdict(config)
    if settings["responses"] == 2:  # the recipe before K existed: its caches keep their keys
        del settings["responses"]
    digest = hashlib.sha256(json.dumps({"config": settings, "format": FORMAT_VERSION}, sort_keys=True).encode())
    for weights in sorted(resolve(config.model).glob("*.safetensors")):
        digest.update(weights.read_bytes())
    return digest.hexdigest()[:16]


def default_task_files(config: DefaultTaskConfig = DefaultTaskConfig()) -> Path:
    """The cached folder of the default task's files for ``config``, built first when missing (atomically)."""
    from tuneoff.models.load import cache_dir

    target = cache_dir() / "default-task" / cache_key(config)
    if (target / INFO_FILE).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".build-"))
    try:
        build(config, staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def is_default(data: str) -> bool:
    """Whether ``data`` names the default task: ``default``, ``default:PAIRS`` or ``default:KEY=VALUE,...``."""
    return data == "default" or data.startswith("default:")


def task_config(data: str) -> DefaultTaskConfig:
    """The settings ``data`` names: ``default``; ``default:PAIRS`` (that many training pairs); or
    ``default:KEY=VALUE,...`` with fields of :class:`DefaultTaskConfig` (e.g. ``default:pairs=72000,responses=4``)."""
    from tuneoff.config import field_types
    from tuneoff.errors import TuneoffError

    _, _, spec = data.partition(":")
    if data == "default":
        return DefaultTaskConfig()
    if spec.isdigit() and int(spec) > 0:
        return DefaultTaskConfig(pairs=int(spec))
    if "=" not in spec:
        raise TuneoffError(
            f"--data {data}: expected default, default:PAIRS with PAIRS a positive whole number, "
            "or default:KEY=VALUE,... (e.g. default:pairs=72000,responses=4)"
        )
    types = field_types(DefaultTaskConfig)
    settings: dict = {}
    for item in spec.split(","):
        key, _, value = item.partition("=")
        key = key.strip()
        if key in settings:
            raise TuneoffError(f"--data {data}: {key} is set twice")
        if key not in types:
            raise TuneoffError(f"--data {data}: unknown setting {key!r}; known: {', '.join(types)}")
        kind = types[key]
        try:
            settings[key] = kind(value.strip())
        except ValueError:
            raise TuneoffError(
                f"--data {data}: {key}={value!r} is not {'a whole number' if kind is int else 'a number'}"
            ) from None
    try:
        return DefaultTaskConfig(**settings)
    except ValueError as error:
        raise TuneoffError(f"--data {data}: {error}") from None


def pair_files(data: str, eval_data: str) -> tuple[str, str]:
    """(training file, held-out file) of a preference run; ``default`` names the default task's cached files
    (built first when missing), ``default:PAIRS`` or ``default:KEY=VALUE,...`` other settings of it
    (:func:`task_config`; one pair per prompt allows about 22,400 pairs, ``responses=K`` K(K − 1)/2 per
    prompt); the held-out file is the same 497 gold-labelled pairs whatever the training pairs (unless a
    setting changes the prompts, sampling or gold), unless ``eval_data`` is given."""
    if not is_default(data):
        return data, eval_data
    folder = default_task_files(task_config(data))
    return str(folder / TRAIN_FILE), eval_data or str(folder / EVAL_FILE)


def main(argv: list[str] | None = None) -> None:
    from tuneoff.config import add_config_arguments, build_config

    parser = argparse.ArgumentParser(prog="python -m tuneoff.tasks.default_task", description=__doc__.split("\n\n")[0])
    add_config_arguments(parser, DefaultTaskConfig)
    parser.add_argument("--out", default=None, help="write the files here instead of the cache")
    args = parser.parse_args(argv)
    config = build_config(DefaultTaskConfig, args)
    folder = build(config, args.out) if args.out else default_task_files(config)
    print(folder)
    print((folder / INFO_FILE).read_text())


if __name__ == "__main__":
    main()
