"""An experiment: arms × seeds on one base model, data and budget, planned as a graph of cached jobs.

One YAML file (``tuneoff compare --config experiment.yaml``) names everything::

    name: demo
    base: review-gpt                 # every arm starts here (or from another arm: `init`)
    seeds: [0, 1, 2]
    feedback: {pairs: 2000, temperature: 1.0, length_bias: 0.0, flip_rate: 0.0}   # simulated annotators
    sft_data: curated                # curated | raw | a file of SFT records
    arms:
      base: {method: base}
      sft: {method: sft, max_steps: 100, lr: 5.0e-4}
      sft+ppo: {method: ppo, init: sft, max_steps: 15}
      dpo: {method: dpo, max_steps: 150}
      grpo: {method: grpo, max_steps: 40}
    priorities: {preset: balanced}

``extends: NAME`` starts from a shipped preset (``src/tuneoff/assets/experiments/NAME.yaml``) or another file
and overrides its keys (mappings merge, everything else replaces), so each knob's config is a few lines.

The plan (:func:`plan`) is a list of :class:`Job`: the shared stages (gold judge, labelled pairs, proxy reward
model) once, then one job per arm × seed that trains (except ``base``) and evaluates. Each job's key hashes its
own settings and its inputs' keys: a finished job whose key is unchanged is reused on a rerun, anything
downstream of a change is recomputed.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from pathlib import Path

from tuneoff.errors import TuneoffError
from tuneoff.train.methods import ARM_METHODS, METHODS, ONLINE

FORMAT_VERSION = 1
"""Bump when what a job computes changes: it is part of every job key."""
PRESETS_DIR = Path(__file__).resolve().parent.parent / "assets" / "experiments"


@dataclasses.dataclass
class ExperimentConfig:
    """The comparison's knobs (YAML keys = these names)."""

    name: str = "experiment"
    """Shown in the report."""
    base: str = "review-gpt"
    """Base model of every arm: a preset (tiny, review-gpt, smollm2-135m) or a Hugging Face folder."""
    seeds: list = dataclasses.field(default_factory=lambda: [0, 1, 2])
    """Every trained arm runs once per seed (training order, sampling, evaluation samples)."""
    workers: int = 0
    """Jobs run at once, each in its own process; 0: one per CPU core."""
    threads: int = 1
    """torch threads per job process (on 2 cores, two 1-thread jobs beat one 2-thread job for small models)."""
    device: str = "auto"
    """Where jobs run: auto (a CUDA GPU when there is one: jobs share it by estimated memory, tuneoff.compare.gpu),
    cpu or cuda. Trained arms, reward models and evaluations alike."""
    precision: str = "auto"
    """Autocast precision of every training job (auto: bf16 on a GPU that supports it, else fp32); an arm may set
    its own."""
    judge: str = "gold"
    """Who says what is good: `gold` (the SST-2 sentiment classifier trained on human labels; the default task),
    `rm` (a reward model trained on `judge_data`, disjoint from the feedback: for real-data presets) or the folder
    of a reward model you trust (one `tuneoff rm` wrote, or any Hugging Face sequence classifier with one label)."""
    judge_data: str = ""
    """Preference file of the held-out judge when `judge` is rm."""
    judge_rm: dict = dataclasses.field(default_factory=dict)
    """Training fields (RMConfig) of the held-out judge."""
    feedback: dict = dataclasses.field(default_factory=dict)
    """Preference labels. Simulated (default): fields of tuneoff.tasks.default_task.DefaultTaskConfig (pairs, responses,
    eval_pairs, temperature, length_bias, flip_rate, annotators, max_new_tokens). From files: {train: FILE,
    eval: FILE}, preference records people (or anyone) made. Real shipped data: {source: real, sources:
    [hh-rlhf-harmless, pandalm], pairs, eval_pairs, judge_pairs, prompts, eval_prompts} (caps; 0 = all), split
    by prompt into judge / feedback / held-out (tuneoff.tasks.real_data); use with judge: rm and
    prompts: feedback, eval_prompts: feedback."""
    prompts: str = "default"
    """RL training prompts: `default` (beginnings of SST-2 train sentences), `feedback` (the prompts of the real
    feedback split) or a prompt file."""
    eval_prompts: str = "default"
    """Held-out evaluation prompts: `default` (beginnings of SST-2 dev sentences, never trained on), `feedback`
    (the held-out prompt split of real feedback) or a file."""
    sft_data: str = "curated"
    """SFT demonstrations: `curated` (SST-2 train reviews that people labelled positive), `high-gold` (reviews the
    gold judge scores P(positive) ≥ 0.9, whatever their label), `raw` (all reviews, either sentiment) or a file
    of SFT records. An sft arm may override it."""
    sft_records: int = 3000
    """How many curated/raw reviews the SFT arm sees."""
    prompt_words: int = 4
    """Words of each SST-2 sentence kept as the prompt (default prompts only)."""
    eval: dict = dataclasses.field(default_factory=dict)
    """Held-out evaluation: prompts (96), diversity_prompts (24), samples_per_prompt (4), max_new_tokens (24),
    temperature (1.0), prompt_seed (0), samples_shown (6), max_prompt_length (64 tokens, the last ones kept)."""
    rm: dict | str = dataclasses.field(default_factory=dict)
    """Training fields (RMConfig) of the proxy reward model the RL arms optimise, or the folder of a reward model
    to optimise instead (no proxy is trained: one `tuneoff rm` wrote, or a Hugging Face sequence classifier)."""
    arms: dict = dataclasses.field(default_factory=dict)
    """name -> {method: base|sft|ppo|grpo|rloo|dpo, init: another arm (optional), description, and any training
    field of that method's config (max_steps, lr, kl_coef, ...); an sft arm may set its own sft_data}. In a
    file that extends another, `name: null` drops an inherited arm."""
    priorities: dict = dataclasses.field(default_factory=lambda: {"preset": "balanced"})
    """Weights of alignment, diversity, cost and stability for the recommendation, or {preset: NAME}."""
    notes: list = dataclasses.field(default_factory=list)
    """Lines shown in the report (what this experiment is about)."""

    def __post_init__(self):
        if not self.arms:
            raise TuneoffError("experiment has no arms: add e.g. `arms: {base: {method: base}, sft: {method: sft}}`")
        if not self.seeds or not all(isinstance(s, int) for s in self.seeds):
            raise TuneoffError(f"seeds must be a non-empty list of integers, got {self.seeds!r}")
        if self.judge not in ("gold", "rm"):
            self.judge = self._reward_model_folder("judge", self.judge)
        if isinstance(self.rm, str):
            self.rm = self._reward_model_folder("rm", self.rm)
        elif not isinstance(self.rm, dict):
            raise TuneoffError(f"rm must be a mapping of training fields or a reward model folder, got {self.rm!r}")
        if self.judge == "rm" and not self.judge_data and self.feedback.get("source") != "real":
            raise TuneoffError(
                "judge: rm needs judge_data, a preference file disjoint from the feedback "
                "(with feedback source: real, the judge split is made for you)"
            )
        if self.judge == "gold" and self.feedback.get("source") == "real":
            raise TuneoffError(
                "the gold judge scores SST-2 sentiment; with real preferences (feedback source: real) use judge: rm"
            )
        for name, arm in self.arms.items():
            _check_arm(name, arm, self.arms)
        if self.device not in ("auto", "cpu", "cuda"):
            raise TuneoffError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise TuneoffError(f"precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")

    @staticmethod
    def _reward_model_folder(field: str, value) -> str:
        """A given reward model's folder, absolute, after checking it is one (tuneoff's or a HF classifier)."""
        from tuneoff.feedback.judges import reward_model_kind

        if not isinstance(value, str) or not value:
            raise TuneoffError(f"{field} must be gold, rm or a reward model folder, got {value!r}")
        if not Path(value).is_dir():
            choices = "gold, rm or " if field == "judge" else ""
            raise TuneoffError(f"{field}: {value!r} is not {choices}a reward model folder (no such folder)")
        reward_model_kind(value)
        return str(Path(value).resolve())

    @property
    def given_judge(self) -> bool:
        """The judge is a reward model folder the user gave."""
        return self.judge not in ("gold", "rm")

    @property
    def placement(self) -> dict:
        """device and precision where they are not auto: the training fields every job passes on (auto adds
        nothing, so the cache keys of CPU experiments stay as they were)."""
        return {k: v for k, v in (("device", self.device), ("precision", self.precision)) if v != "auto"}

    @property
    def eval_settings(self) -> dict:
        defaults = {
            "prompts": 96,
            "diversity_prompts": 24,
            "samples_per_prompt": 4,
            "max_new_tokens": 24,
            "temperature": 1.0,
            "prompt_seed": 0,
            "samples_shown": 6,
            "max_prompt_length": 64,
        }
        unknown = set(self.eval) - set(defaults)
        if unknown:
            raise TuneoffError(f"eval: unknown field(s) {', '.join(sorted(unknown))} (known: {', '.join(defaults)})")
        return {**defaults, **self.eval}


def _check_arm(name: str, arm, arms: dict) -> None:
    if not isinstance(arm, dict) or arm.get("method") not in ARM_METHODS:
        raise TuneoffError(f"arm {name!r}: needs `method`, one of {', '.join(ARM_METHODS)} (got {arm!r})")
    seen, current = {name}, arm
    while current.get("init"):
        parent = current["init"]
        if parent not in arms:
            raise TuneoffError(f"arm {name!r}: init {parent!r} is not an arm of this experiment")
        if parent in seen:
            raise TuneoffError(f"arm {name!r}: init chain loops through {parent!r}")
        seen.add(parent)
        current = arms[parent]
    if arm["method"] == "base" and arm.get("init"):
        raise TuneoffError(f"arm {name!r}: a base arm trains nothing, so it takes no init")
    fields = _method_fields(arm["method"])
    unknown = (
        set(arm) - {"method", "init", "description"} - ({"sft_data"} if arm["method"] == "sft" else set()) - fields
    )
    if unknown:
        raise TuneoffError(f"arm {name!r}: unknown field(s) {', '.join(sorted(unknown))} for method {arm['method']}")


def _method_fields(method: str) -> set[str]:
    """The training fields an arm of ``method`` may set (the experiment sets model, data, out and seed)."""
    owned = {"model", "data", "out", "seed", "resume", "reward_model", "reference", "baseline", "eval_data"}
    cls = METHODS[method].config if method in METHODS else None
    return {f.name for f in dataclasses.fields(cls)} - owned if cls else set()


# ---------------------------------------------------------------- loading


def _merge(base: dict, override: dict) -> dict:
    """Mappings merge key by key (recursively); any other value replaces; null removes an inherited mapping."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if value is None and isinstance(base, dict) and key in base and isinstance(base[key], dict):
            del merged[key]  # `name: null` drops an inherited arm (or any inherited mapping)
            continue
        merged[key] = (
            _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
        )
    return merged


def _read(path: Path, seen: tuple = ()) -> dict:
    from tuneoff.config import load_yaml

    data = load_yaml(path)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    candidate = Path(parent) if str(parent).endswith((".yaml", ".yml")) else PRESETS_DIR / f"{parent}.yaml"
    if not candidate.is_absolute() and not candidate.exists():
        candidate = path.parent / candidate
    if not candidate.exists():
        shipped = ", ".join(sorted(p.stem for p in PRESETS_DIR.glob("*.yaml")))
        raise TuneoffError(f"{path}: extends {parent!r}: no such preset (shipped: {shipped}) or file")
    if candidate.resolve() in seen:
        raise TuneoffError(f"{path}: extends loops through {candidate}")
    return _merge(_read(candidate, seen + (candidate.resolve(),)), data)


def load_experiment(path: str | Path, **overrides) -> ExperimentConfig:
    """Read an experiment YAML (following `extends`), then apply ``overrides`` (e.g. seeds from the CLI)."""
    path = Path(path)
    data = {**_read(path), **{k: v for k, v in overrides.items() if v is not None}}
    names = {f.name for f in dataclasses.fields(ExperimentConfig)}
    unknown = set(data) - names
    if unknown:
        raise TuneoffError(f"{path}: unknown field(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(names))})")
    for key in ("feedback", "eval", "arms", "priorities", "judge_rm"):
        if key in data and not isinstance(data[key], dict):
            raise TuneoffError(f"{path}: field '{key}' must be a mapping, got {data[key]!r}")
    return ExperimentConfig(**data)


def preset_path(name: str) -> Path:
    path = PRESETS_DIR / f"{name}.yaml"
    if not path.exists():
        raise TuneoffError(f"no shipped experiment preset {name!r}")
    return path


# ---------------------------------------------------------------- the plan


@dataclasses.dataclass
class Job:
    """One unit of work in its own process: ``kind`` says which runner (tuneoff.compare.jobs) executes ``spec``."""

    name: str
    kind: str
    spec: dict
    deps: list = dataclasses.field(default_factory=list)
    folder: str = ""
    key: str = ""
    weight: float = 1.0
    """Rough relative duration, so the longest chains start first."""


def _key(kind: str, spec: dict, deps: list[Job]) -> str:
    payload = {"kind": kind, "spec": spec, "deps": sorted(d.key for d in deps), "format": FORMAT_VERSION}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _init_chain(arm: str, arms: dict) -> list[str]:
    chain = [arm]
    while arms[chain[-1]].get("init"):
        chain.append(arms[chain[-1]]["init"])
    return chain


def plan(config: ExperimentConfig, out: str | Path) -> list[Job]:
    """Every job of the experiment, each after the jobs it reads from, with its folder under ``out``."""
    out = Path(out)
    jobs: dict[str, Job] = {}

    def add(name: str, kind: str, spec: dict, deps: list[Job], folder: Path | None, weight: float = 1.0) -> Job:
        """A job; shared stages (folder None) live in stages/<key>, so other settings never overwrite them."""
        job = Job(name, kind, spec, [d.name for d in deps], "", _key(kind, spec, deps), weight)
        job.folder = str(folder if folder is not None else stages / job.key)
        jobs[name] = job
        return job

    stages = out / "stages"
    real = config.feedback.get("source") == "real"
    pairs = rm = None
    if real:  # human preferences split by prompt: also the judge's data, the RL and the evaluation prompts
        pairs = add("pairs", "real_pairs", {k: v for k, v in config.feedback.items() if k != "source"}, [], None, 0.1)
    judge = add(
        "judge",
        {"gold": "gold", "rm": "rm"}.get(config.judge, "given_rm"),
        {"role": "judge", "model": config.judge}
        if config.given_judge
        else {
            "role": "judge",
            "data": config.judge_data,
            "model": config.base,
            "rm": {**config.placement, **config.judge_rm},
            "threads": config.threads,
        }
        if config.judge == "rm"
        else {},
        [pairs] if config.judge == "rm" and real and not config.judge_data else [],
        None,
        0.3,
    )
    given_rm = isinstance(config.rm, str)
    needs_pairs = any(
        (a["method"] in ONLINE and not given_rm) or _trains_on_pairs(a["method"]) for a in config.arms.values()
    )
    if needs_pairs and not real:
        if "train" in config.feedback:
            pairs = add(
                "pairs",
                "pair_files",
                {"train": config.feedback["train"], "eval": config.feedback.get("eval", "")},
                [],
                None,
                0.1,
            )
        else:
            pairs = add(
                "pairs",
                "pairs",
                {
                    "task": {"model": config.base, "prompt_words": config.prompt_words, **config.feedback},
                    "threads": config.threads,
                },
                [judge] if config.judge == "gold" else [],
                None,
                1.0,
            )
    if any(a["method"] in ONLINE for a in config.arms.values()) and given_rm:
        rm = add("rm", "given_rm", {"role": "proxy", "model": config.rm}, [], None, 0.1)
    elif any(a["method"] in ONLINE for a in config.arms.values()):
        rm = add(
            "rm",
            "rm",
            {"role": "proxy", "model": config.base, "rm": {**config.placement, **config.rm}, "threads": config.threads},
            [pairs],
            None,
            2.0,
        )

    shared = {
        "base": config.base,
        "threads": config.threads,
        "prompts": config.prompts,
        "prompt_words": config.prompt_words,
        "sft_data": config.sft_data,
        "sft_records": config.sft_records,
        **({"placement": config.placement} if config.placement else {}),
    }
    for seed in config.seeds:
        for arm in _arm_order(config.arms):
            arm_spec = dict(config.arms[arm])
            method, init = arm_spec["method"], arm_spec.get("init")
            run = out / "runs" / arm / f"seed-{seed}"
            trained = None
            if method != "base":
                deps = (
                    ([jobs[f"train:{init}/seed-{seed}"]] if init else [])
                    + ([pairs] if _trains_on_pairs(method) or (real and method in ONLINE and pairs) else [])
                    + ([rm] if method in ONLINE else [])
                )
                trained = add(
                    f"train:{arm}/seed-{seed}",
                    "train",
                    {**shared, "arm": arm, "arm_spec": arm_spec, "seed": seed},
                    deps,
                    run,
                    {"sft": 1.0, "dpo": 1.2}.get(method, 1.5),
                )
            spec = {
                "arm": arm,
                "method": method,
                "base": config.base,
                "seed": seed,
                "threads": config.threads,
                "eval": config.eval_settings,
                "eval_prompts": config.eval_prompts,
                "prompt_words": config.prompt_words,
                "judge": config.judge,
                **({"device": config.device} if config.device != "auto" else {}),
            }
            add(
                f"eval:{arm}/seed-{seed}",
                "eval",
                spec,
                [judge] + [d for d in (trained, rm, pairs if real else None) if d is not None],
                run / "eval",
                0.4,
            )
    return list(jobs.values())


def _trains_on_pairs(method: str) -> bool:
    return method in METHODS and METHODS[method].needs_pairs


def _arm_order(arms: dict) -> list[str]:
    """Arms with their `init` arm first."""
    ordered: list[str] = []
    for arm in arms:
        for name in reversed(_init_chain(arm, arms)):
            if name not in ordered:
                ordered.append(name)
    return ordered
