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
    if (
        value is None
        or isinstance(value, kind)
        or (kind is float and isinstance(value, int) and not isinstance(value, bool))
    ):
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


DEVICES = ("auto", "cpu", "cuda")
"""TrainConfig.device choices; resolved at run start (tuneoff.train.common.make_accelerator)."""
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
"""TrainConfig.precision choices; fp32 is accelerate's mixed_precision "no"."""


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
    device: str = "auto"
    """Where to train: auto (a CUDA GPU when there is one, else the CPU), cpu or cuda."""
    precision: str = "auto"
    """Autocast precision of the forward passes: auto (bf16 on a CUDA GPU that supports it, else fp32), fp32, bf16
    or fp16 (CUDA only). Weights, optimizer state, losses and log-probs stay fp32."""

    def __post_init__(self):
        if self.schedule not in ("cosine", "linear", "constant"):
            raise TuneoffError(f"schedule must be cosine, linear or constant, got '{self.schedule}'")
        if self.device not in DEVICES:
            raise TuneoffError(f"device must be auto, cpu or cuda, got '{self.device}'")
        if self.precision not in PRECISIONS:
            raise TuneoffError(f"precision must be auto, fp32, bf16 or fp16, got '{self.precision}'")
        for name in ("batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise TuneoffError(f"{name} must be at least 1, got {getattr(self, name)}")


@dataclasses.dataclass
class OfflineConfig(TrainConfig):
    """Fields the methods that train on a fixed data set share (SFT, RM, DPO, KTO)."""

    from_scratch: bool = False
    """Initialise the model's weights randomly from its config (pretraining) instead of loading them."""
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

    def __post_init__(self):
        super().__post_init__()
        if self.overlong not in ("truncate", "drop", "error"):
            raise TuneoffError(f"overlong must be truncate, drop or error, got '{self.overlong}'")
        if self.max_length < 1:
            raise TuneoffError(f"max_length must be at least 1, got {self.max_length}")
        if not 0 <= self.eval_fraction < 1:
            raise TuneoffError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")


@dataclasses.dataclass
class SFTConfig(OfflineConfig):
    """Supervised fine-tuning: next-token loss on completion (assistant) tokens."""

    out: str = "runs/sft"
    """Output folder: resolved config, metrics.jsonl, TensorBoard events, checkpoints, final model."""
    packing: bool = False
    """Pack several short examples into each max_length row (padding-free; attention never crosses examples)."""
    completion_only_loss: bool = True
    """Compute the loss on completion/assistant tokens only (prompt tokens are masked with -100)."""


@dataclasses.dataclass
class RMConfig(OfflineConfig):
    """Reward model: Bradley–Terry loss -log σ(r_w − r_l − m) on preference pairs, scalar head on the last real
    token."""

    out: str = "runs/rm"
    """Output folder: resolved config, metrics.jsonl, TensorBoard events, checkpoints, final reward model (model/)."""
    data: str = ""
    """Preference pairs ({prompt, chosen, rejected}, implicit-prompt or messages form), or `default`: the default
    task's pairs of review-gpt continuations labelled by simulated annotators, with a held-out split labelled by
    the gold judge (built once and cached; see tuneoff.tasks.default_task); `default:PAIRS` the same with PAIRS
    training pairs (4000 by default), `default:KEY=VALUE,...` other settings of it (e.g.
    `default:pairs=60000,responses=4`: four responses per prompt, all six pairs labelled)."""
    batch_size: int = 8
    """Preference pairs per micro-batch per process (run in one forward; a prompt's pairs sit next to each
    other in the order, and a response several pairs of a micro-batch compare is one sequence)."""
    lr: float = 1e-5
    """Peak learning rate of AdamW."""
    overlong: str = "truncate"
    """Pairs with a sequence over max_length: truncate (keep its last max_length tokens: the prompt's beginning
    goes, the response's end stays), drop (skip the pair, counted in the log) or error."""
    margin: float = 0.0
    """Constant margin m added to every pair: the preferred response must win by m to reach a low loss."""
    margin_field: str = ""
    """Name of a numeric field of each record holding that pair's margin (added to `margin`), e.g. `margin`."""
    eval_fraction: float = 0.1
    """Share of the prompts held out for evaluation when `eval_data` is not given (pairs sharing a prompt stay
    on one side; 0 turns evaluation off)."""
    disable_dropout: bool = True
    """Turn the backbone's dropout off, so that both responses of a pair are scored by the same function."""
    calibration_bins: int = 10
    """Equal-width bins of the expected calibration error of σ(r_w − r_l)."""
    pooling: str = "last"
    """Where the scalar head reads the sequence: last (the last real token, as InstructGPT and TRL) or mean (the
    mean hidden state over the real tokens: a bag of contextual features, more sample-efficient when the
    preference is about words anywhere in the response, as on the default task)."""

    def __post_init__(self):
        super().__post_init__()
        if self.pooling not in ("last", "mean"):
            raise TuneoffError(f"pooling must be last or mean, got '{self.pooling}'")
        if self.calibration_bins < 1:
            raise TuneoffError(f"calibration_bins must be at least 1, got {self.calibration_bins}")


@dataclasses.dataclass
class DPOConfig(OfflineConfig):
    """Direct preference optimisation (Rafailov et al. 2023) and IPO (Azar et al. 2023) on preference pairs."""

    out: str = "runs/dpo"
    """Output folder: resolved config, metrics.jsonl, TensorBoard events, checkpoints, cached reference
    log-probs, final model (model/)."""
    data: str = ""
    """Preference pairs ({prompt, chosen, rejected}, implicit-prompt or messages form), or `default`: the default
    task's pairs (see tuneoff.tasks.default_task; held out: its gold-labelled pairs); `default:PAIRS` with PAIRS
    training pairs (4000 by default), `default:KEY=VALUE,...` other settings of it."""
    batch_size: int = 8
    """Preference pairs per micro-batch per process (chosen and rejected run in one forward: 2× rows)."""
    lr: float = 1e-5
    """Peak learning rate of AdamW (TRL's default is 1e-6, sized for billion-parameter models)."""
    max_prompt_length: int = 0
    """Longest prompt in tokens (see `overlong`); below max_length. 0: half of max_length."""
    overlong: str = "truncate"
    """Pairs over max_prompt_length or max_length: truncate (the prompt keeps its last max_prompt_length tokens,
    then each response is cut at its end to fit max_length), drop (skip the pair, counted in the log) or error."""
    beta: float = 0.1
    """β: strength of the implicit KL penalty to the reference (DPO's temperature; IPO's τ)."""
    loss_type: str = "sigmoid"
    """sigmoid (DPO, summed log-probs) or ipo (IPO, per-token mean log-probs); see tuneoff.losses.DPO_LOSSES."""
    label_smoothing: float = 0.0
    """Conservative DPO: the share of labels assumed flipped, in [0, 0.5) (sigmoid loss only)."""
    ref_model: str = ""
    """Reference policy π_ref: empty = the starting model (with LoRA, the base with adapters disabled); or a
    preset or folder. Its log-probs are computed once before training and cached in `out`."""
    ref_batch_size: int = 32
    """Pairs per forward of the one-off reference pass (no gradients, so larger than batch_size is fine)."""
    disable_dropout: bool = True
    """Turn the policy's dropout off, so that π and π_ref are the same function at step 0 (as TRL does)."""
    eval_fraction: float = 0.1
    """Share of the prompts held out for evaluation when `eval_data` is not given (pairs sharing a prompt stay
    on one side; 0 turns evaluation off)."""

    def __post_init__(self):
        super().__post_init__()
        from tuneoff.losses import DPO_LOSSES

        if self.loss_type not in DPO_LOSSES:
            raise TuneoffError(f"loss_type must be one of {', '.join(DPO_LOSSES)}, got '{self.loss_type}'")
        if self.beta <= 0:
            raise TuneoffError(f"beta must be positive, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise TuneoffError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise TuneoffError(f"label_smoothing applies to the sigmoid loss only, not '{self.loss_type}'")
        if self.max_prompt_length == 0:
            self.max_prompt_length = max(1, self.max_length // 2)
        if not 1 <= self.max_prompt_length < self.max_length:
            raise TuneoffError(
                f"max_prompt_length must be in [1, max_length = {self.max_length}), got {self.max_prompt_length}"
            )
        if self.ref_batch_size < 1:
            raise TuneoffError(f"ref_batch_size must be at least 1, got {self.ref_batch_size}")


@dataclasses.dataclass
class KTOConfig(OfflineConfig):
    """KTO (Ethayarajh et al. 2024): prospect-theoretic alignment on unpaired data, each completion labelled
    desirable or undesirable, against a reference point z_0 = KL(π‖π_ref) estimated on mismatched pairs."""

    out: str = "runs/kto"
    """Output folder: resolved config, metrics.jsonl, TensorBoard events, checkpoints, final model (model/)."""
    data: str = ""
    """Unpaired preference records ({prompt, completion, label: true|false}, or prompt and completion as message
    lists), or preference pairs ({prompt, chosen, rejected}), unpaired as TRL does: chosen desirable, rejected
    undesirable."""
    batch_size: int = 8
    """Examples per micro-batch per process (at least 2: the KL reference point pairs each prompt with another
    example's completion)."""
    lr: float = 1e-5
    """Peak learning rate of AdamW (TRL's default is 1e-6, sized for billion-parameter models)."""
    max_prompt_length: int = 0
    """Longest prompt in tokens (see `overlong`); below max_length. 0: half of max_length."""
    overlong: str = "truncate"
    """Examples over max_prompt_length or max_length: truncate (the prompt keeps its last max_prompt_length
    tokens, then the completion is cut at its end), drop (skip, counted in the log) or error."""
    beta: float = 0.1
    """β: the scale of the implied reward β·log(π/π_ref) and so of the KL penalty."""
    desirable_weight: float = 1.0
    """λ_D: weight of the desirable examples' losses (the paper keeps λ_D·n_D / (λ_U·n_U) in [1, 4/3])."""
    undesirable_weight: float = 1.0
    """λ_U: weight of the undesirable examples' losses."""
    ref_model: str = ""
    """Reference policy π_ref: empty = the starting model (with LoRA, the base with adapters disabled); or a
    preset or folder with the same tokenizer."""
    disable_dropout: bool = True
    """Turn the policy's dropout off, so that π and π_ref are the same function at step 0 (as TRL does)."""
    eval_fraction: float = 0.1
    """Share of the prompts held out for evaluation when `eval_data` is not given (0 turns evaluation off)."""

    def __post_init__(self):
        super().__post_init__()
        if self.beta <= 0:
            raise TuneoffError(f"beta must be positive, got {self.beta}")
        if self.batch_size < 2:
            raise TuneoffError(f"batch_size must be at least 2 (the KL term pairs examples), got {self.batch_size}")
        if self.desirable_weight <= 0 or self.undesirable_weight <= 0:
            raise TuneoffError("desirable_weight and undesirable_weight must be positive")
        if self.max_prompt_length == 0:
            self.max_prompt_length = max(1, self.max_length // 2)
        if not 1 <= self.max_prompt_length < self.max_length:
            raise TuneoffError(
                f"max_prompt_length must be in [1, max_length = {self.max_length}), got {self.max_prompt_length}"
            )


@dataclasses.dataclass
class RLConfig(TrainConfig):
    """Fields the online RL methods share (PPO, GRPO, RLOO). `data` is a prompt file; `max_steps` counts iterations."""

    out: str = "runs/rl"
    """Output folder: resolved config, metrics.jsonl, TensorBoard events, checkpoints, final model."""
    reward_model: str = ""
    """Reward: the folder of a `tuneoff rm` model, or `gold` (the gold judge; oracle runs)."""
    reference: str = ""
    """Reference policy for the KL penalty (default: the starting model; with LoRA, the base without adapters)."""
    rollout_batch: int = 32
    """Episodes (sampled responses) per iteration per process."""
    max_prompt_length: int = 64
    """Prompt tokens kept (the last ones)."""
    max_new_tokens: int = 32
    """Longest response in tokens."""
    temperature: float = 1.0
    """Sampling temperature (also used when recomputing log-probs)."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    truncation: str = "keep"
    """Responses that reach max_new_tokens without EOS: keep (scored as they are), penalty (score minus
    truncation_penalty) or mask (left out of the update)."""
    truncation_penalty: float = 1.0
    """Subtracted from the score of a truncated response when truncation is penalty."""
    kl_coef: float = 0.05
    """β: weight of the KL(π‖π_ref) penalty."""
    kl_estimator: str = "k1"
    """Per-token KL estimator: k1 (log π − log π_ref) or k3 (exp(ρ) − ρ − 1)."""
    kl_stop: float = 40.0
    """Stop the run when the mean per-sequence KL (nats) exceeds this bound."""
    update_epochs: int = 1
    """Passes over each iteration's episodes."""
    clip_range: float = 0.2
    """ε of the clipped ratio objective."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus."""
    eval_every: int = 10
    """Log gold-judge scores of the rollouts every this many iterations (when the reward is not the gold judge)."""

    def __post_init__(self):
        super().__post_init__()
        if self.truncation not in ("keep", "penalty", "mask"):
            raise TuneoffError(f"truncation must be keep, penalty or mask, got '{self.truncation}'")
        if self.kl_estimator not in ("k1", "k3"):
            raise TuneoffError(f"kl_estimator must be k1 or k3, got '{self.kl_estimator}'")
        if self.rollout_batch % self.batch_size:
            raise TuneoffError(
                f"rollout_batch ({self.rollout_batch}) must be a multiple of batch_size ({self.batch_size})"
            )


@dataclasses.dataclass
class PPOConfig(RLConfig):
    """PPO with a KL penalty (Ziegler 2019; Stiennon 2020; Ouyang 2022): per-token reward −β·KL plus the score
    at the last token, a critic, GAE, whitened advantages, clipped ratio and value losses."""

    out: str = "runs/ppo"
    """Output folder: resolved config, metrics.jsonl, TensorBoard events, checkpoints, final model."""
    lr: float = 1e-5
    """Peak learning rate of AdamW (policy and critic)."""
    update_epochs: int = 4
    """PPO epochs over each iteration's episodes."""
    gamma: float = 1.0
    """Discount γ."""
    lam: float = 0.95
    """GAE λ."""
    clip_range_value: float = 0.2
    """ε of the clipped value loss."""
    vf_coef: float = 0.1
    """Weight of the value loss."""
    adaptive_kl: bool = True
    """Adapt β towards kl_target (Ziegler 2019); false keeps β fixed."""
    kl_target: float = 6.0
    """Target per-sequence KL of the adaptive controller."""
    kl_horizon: int = 10000
    """Horizon (episodes) of the adaptive controller."""
    ptx_data: str = ""
    """PPO-ptx (Ouyang 2022, Eq. 2): an SFT file (any SFT format); each minibatch's update adds ptx_coef × the
    mean NLL of one micro-batch of it (batch_size records, cut to max_prompt_length + max_new_tokens tokens)."""
    ptx_coef: float = 0.0
    """γ of PPO-ptx: the weight of the SFT loss (0: plain PPO, ptx_data unused)."""
    warmup_ratio: float = 0.0
    """Fraction of the steps spent warming the learning rate up linearly from 0."""
    schedule: str = "constant"
    """Learning-rate decay after warmup: cosine, linear or constant."""

    def __post_init__(self):
        super().__post_init__()
        if self.ptx_coef < 0:
            raise TuneoffError(f"ptx_coef must be at least 0, got {self.ptx_coef}")
        if self.ptx_coef > 0 and not self.ptx_data:
            raise TuneoffError("ptx_coef > 0 needs ptx_data: an SFT file whose loss PPO-ptx mixes into the updates")


@dataclasses.dataclass
class GRPOConfig(RLConfig):
    """Critic-free RL: k samples per prompt, advantages from a group baseline (GRPO: group-normalised, Shao et al.
    2024; RLOO: leave-one-out mean, Ahmadian et al. 2024), clipped ratio, and a KL term to the reference."""

    out: str = "runs/grpo"
    """Output folder: resolved config, metrics.jsonl, TensorBoard events, checkpoints, final model."""
    baseline: str = "grpo"
    """Advantage baseline: grpo (group mean, divided by the group std when scale_rewards) or rloo (leave-one-out
    mean)."""
    num_generations: int = 4
    """k: responses sampled per prompt (rollout_batch must be a multiple)."""
    scale_rewards: bool = True
    """GRPO only: divide by the group's std (Dr. GRPO argues against it for long answers)."""
    kl_coef: float = 0.05
    """β of the k3 KL(π‖π_ref) term in the loss. On by default (TRL's default is 0): the comparison holds every
    arm to a KL budget, and without it the policy drifts freely and hacks a learned reward."""
    kl_estimator: str = "k3"
    """Per-token KL estimator in the loss: k3 (non-negative, DeepSeekMath) or k1."""
    lr: float = 1e-5
    """Peak learning rate of AdamW."""
    warmup_ratio: float = 0.0
    """Fraction of the steps spent warming the learning rate up linearly from 0."""
    schedule: str = "constant"
    """Learning-rate decay after warmup: cosine, linear or constant."""

    def __post_init__(self):
        super().__post_init__()
        if self.baseline not in ("grpo", "rloo"):
            raise TuneoffError(f"baseline must be grpo or rloo, got '{self.baseline}'")
        if self.num_generations < 2 or self.rollout_batch % self.num_generations:
            raise TuneoffError(
                f"num_generations must be ≥ 2 and divide rollout_batch ({self.rollout_batch}), got "
                f"{self.num_generations}"
            )
