"""Configuration: one dataclass per method; YAML keys = field names = CLI flags.

A field's documentation is the docstring written under it (CleanRL style); ``field_docs`` reads it from the
source so ``tuneoff <verb> --help`` can list every field with its default. Precedence: dataclass default <
``--config`` YAML < command-line flags. The resolved config is written to the run's output folder.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import typing
from pathlib import Path

from tuneoff.errors import TuneoffError


def field_docs(cls) -> dict[str, str]:
    """{field name: the docstring under it} for a dataclass and its bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = tree.body[0].body
        for node, following in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                if isinstance(following, ast.Expr) and isinstance(getattr(following, "value", None), ast.Constant):
                    docs[node.target.id] = " ".join(str(following.value.value).split())
    return docs


def _scalar_type(annotation) -> type:
    """The type argparse should parse a field with (``int | None`` -> int)."""
    if isinstance(annotation, str):
        annotation = eval(annotation, {"typing": typing})  # annotations are plain builtins here
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if args else annotation


def field_types(cls) -> dict[str, type]:
    return {f.name: _scalar_type(f.type) for f in dataclasses.fields(cls)}


def add_config_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """One flag per field (``--max-steps`` for ``max_steps``) plus ``--config FILE.yaml``."""
    parser.add_argument("--config", default=None, help="YAML file whose keys are the field names below")
    docs, types = field_docs(cls), field_types(cls)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{docs.get(f.name, '')} (default: {default!r})".replace("%", "%%")
        kind = types[f.name]
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(flag, type=kind, default=argparse.SUPPRESS, metavar=f.name.upper(), help=help_text)


def _coerce(cls, key: str, value, source: str):
    kind = field_types(cls)[key]
    if value is None or isinstance(value, kind) or (kind is float and isinstance(value, int) and not isinstance(value, bool)):
        return float(value) if kind is float and value is not None else value
    raise TuneoffError(f"{source}: field '{key}': expected {kind.__name__}, got {value!r}")


def load_yaml(path: str | Path) -> dict:
    import yaml

    path = Path(path)
    if not path.exists():
        raise TuneoffError(f"{path}: no such config file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise TuneoffError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise TuneoffError(f"{path}: expected a mapping of field names to values")
    return data


def build_config(cls, args: argparse.Namespace | None = None, **overrides):
    """Defaults, then the YAML named by ``args.config``, then flags given on the command line, then overrides."""
    names = {f.name for f in dataclasses.fields(cls)}
    values: dict = {}
    if args is not None and getattr(args, "config", None):
        for key, value in load_yaml(args.config).items():
            key = str(key).replace("-", "_")
            if key not in names:
                raise TuneoffError(f"{args.config}: unknown field '{key}' (known: {', '.join(sorted(names))})")
            values[key] = _coerce(cls, key, value, args.config)
    if args is not None:
        values.update({k: v for k, v in vars(args).items() if k in names})
    values.update(overrides)
    return cls(**values)


def save_config(config, path: str | Path) -> None:
    import yaml

    Path(path).write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False), encoding="utf-8")


@dataclasses.dataclass
class TrainConfig:
    """Fields every training verb shares."""

    model: str = "tiny"
    """Model preset (tiny, review-gpt, smollm2-135m) or a local Hugging Face folder."""
    data: str = ""
    """Training data: JSONL, JSON, CSV, Parquet or a `datasets` folder."""
    out: str = "runs/run"
    """Output folder: resolved config, metrics.jsonl, TensorBoard events, checkpoints, final model."""
    max_steps: int = -1
    """Optimizer steps to run; -1 means `epochs` passes over the training data."""
    epochs: float = 1.0
    """Passes over the training data when max_steps is -1."""
    seed: int = 0
    """Seed for weight init, data order, dropout and sampling."""
    resume: bool = False
    """Continue from the last checkpoint in `out` (model, optimizer, scheduler, RNG and data position)."""
    from_scratch: bool = False
    """Initialise the model's weights randomly from its config (pretraining) instead of loading them."""
    batch_size: int = 8
    """Sequences per micro-batch per process."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    lr: float = 5e-5
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.0
    """AdamW weight decay (not applied to biases and norms)."""
    warmup_ratio: float = 0.03
    """Fraction of the steps spent warming the learning rate up linearly from 0."""
    schedule: str = "cosine"
    """Learning-rate decay after warmup: cosine, linear or constant."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this value (0 turns clipping off)."""
    max_length: int = 512
    """Longest sequence in tokens; see `overlong`."""
    overlong: str = "truncate"
    """Records longer than max_length: truncate (cut the end), drop (skip, counted in the log) or error."""
    eval_fraction: float = 0.05
    """Share of the data held out for evaluation when `eval_data` is not given (0 turns evaluation off)."""
    eval_data: str = ""
    """Held-out evaluation file (same format as `data`)."""
    eval_every: int = 50
    """Evaluate every this many steps (and at the end)."""
    save_every: int = 100
    """Write a checkpoint every this many steps (and at the end)."""
    keep_checkpoints: int = 2
    """How many recent checkpoints to keep on disk."""
    log_every: int = 10
    """Log metrics every this many steps."""
    lora: bool = False
    """Train LoRA adapters (peft) instead of all weights."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA scaling numerator (scale = alpha / r)."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA branch."""
    lora_target_modules: str = "all-linear"
    """Modules to adapt: all-linear or a comma-separated list of module names."""
    threads: int = 0
    """torch CPU threads per process (0: leave torch's default)."""

    def __post_init__(self):
        if self.schedule not in ("cosine", "linear", "constant"):
            raise TuneoffError(f"schedule must be cosine, linear or constant, got '{self.schedule}'")
        if self.overlong not in ("truncate", "drop", "error"):
            raise TuneoffError(f"overlong must be truncate, drop or error, got '{self.overlong}'")
        for name in ("batch_size", "grad_accum", "max_length"):
            if getattr(self, name) < 1:
                raise TuneoffError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.eval_fraction < 1:
            raise TuneoffError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")


@dataclasses.dataclass
class SFTConfig(TrainConfig):
    """Supervised fine-tuning: next-token loss on completion (assistant) tokens."""

    out: str = "runs/sft"
    """Output folder: resolved config, metrics.jsonl, TensorBoard events, checkpoints, final model."""
    packing: bool = False
    """Pack several short examples into each max_length row (padding-free; attention never crosses examples)."""
    completion_only_loss: bool = True
    """Compute the loss on completion/assistant tokens only (prompt tokens are masked with -100)."""
