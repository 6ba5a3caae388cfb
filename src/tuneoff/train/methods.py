"""The table of training methods: what the CLI, the experiment planner, the job runner and the report know of each.

Adding a method is one entry here, its config class in ``tuneoff.config`` and its loop module (``setup`` and
``train(config) -> Path`` on ``tuneoff.train.loop``): the verb, ``method:`` in experiments, its data, reward
model and FLOP estimate follow from the entry.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tuneoff import config as configs
from tuneoff.train import metrics as names

DATA_KINDS = ("sft", "pairs", "unpaired", "prompts")
"""What a method's --data holds: SFT records, preference pairs, unpaired labelled completions, RL prompts."""


@dataclass(frozen=True)
class Method:
    name: str
    config: type
    module: str
    """The loop: a module of tuneoff.train with ``train(config) -> Path``."""
    help: str
    """One line for ``tuneoff --help``."""
    description: str
    """The verb's --help text, before its fields."""
    data: str
    """One of DATA_KINDS."""
    online: bool = False
    """Samples from the policy while it trains, rewarded by a reward model (needs a proxy RM in experiments)."""
    arm: bool = True
    """Can be an arm of an experiment (the reward model is a stage, not an arm)."""
    flops_per_token: Callable[[int, object], float] = lambda n, config: 6.0 * n
    """Training FLOPs per processed token for a model of n parameters: 6n (forward 2n + backward 4n) for the
    offline methods, counted on the loop's input tokens; online methods count sampled episode tokens."""
    metrics: tuple = ()
    """The training metrics it logs, besides the shared ones (train/lr, train/grad_norm, rates)."""
    fixed: dict = field(default_factory=dict)
    """Fields the verb sets (rloo: baseline rloo)."""

    def train(self, config) -> Path:
        return importlib.import_module(f"tuneoff.train.{self.module}").train(config)

    @property
    def needs_pairs(self) -> bool:
        """Trains on human (or simulated) preference labels directly."""
        return self.data in ("pairs", "unpaired")


def _ppo_flops(n: int, config) -> float:
    """Per sampled token: sampling 2n, the reference 2n, the critic 2n once, policy and critic 6n each per epoch."""
    return 6 * n + 12 * n * config.update_epochs


def _critic_free_flops(n: int, config) -> float:
    """Per sampled token: sampling 2n, the reference 2n, the policy 6n per update epoch."""
    return 4 * n + 6 * n * config.update_epochs


_SETTINGS = " Every field below can be set in the --config YAML (same names) or as a flag; flags win."
_RL = (
    names.OBJECTIVE_KL,
    names.SCORES,
    names.ENTROPY,
    names.POLICY_LOSS,
    names.CLIPFRAC,
    names.APPROX_KL,
    names.EPISODE_LENGTH,
    names.EPISODE_ENDED,
    names.EPISODES_PER_S,
    names.GOLD,
    names.GOLD_P,
)
_PREFERENCE = (
    names.REWARDS_CHOSEN,
    names.REWARDS_REJECTED,
    names.REWARDS_MARGINS,
    names.LOGPS_CHOSEN,
    names.LOGPS_REJECTED,
)
_CRITIC_FREE = (
    "GRPO (Shao et al. 2024): advantages = (r - group mean) / group std",
    "RLOO (Ahmadian et al. 2024): advantages = r - mean of the other k-1 samples",
)

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "sft",
            configs.SFTConfig,
            "sft",
            "supervised fine-tuning (or pretraining on {text} records)",
            "Supervised fine-tuning: next-token loss on completion/assistant tokens." + _SETTINGS,
            "sft",
            metrics=(
                names.LOSS,
                names.TOKENS_PER_S,
                names.TRAINED_TOKENS_PER_S,
                names.EVAL_LOSS,
                names.EVAL_PERPLEXITY,
            ),
        ),
        Method(
            "rm",
            configs.RMConfig,
            "reward",
            "train a reward model on preference pairs (Bradley-Terry)",
            "Reward model: a scalar head on a causal LM, trained with the Bradley-Terry loss -log sigmoid(r_chosen - "
            "r_rejected - margin); held-out pairwise accuracy, calibration (ECE) and a length-bias probe. --data "
            "default "
            "trains on the default task (review-gpt continuations judged by simulated annotators, evaluated against "
            "the "
            "gold judge)." + _SETTINGS,
            "pairs",
            arm=False,
            metrics=(names.LOSS, names.ACCURACY, names.PAIRS_PER_S, names.EVAL_ACCURACY, names.EVAL_ECE),
        ),
        Method(
            "dpo",
            configs.DPOConfig,
            "dpo",
            "direct preference optimisation (DPO or IPO) on preference pairs",
            "DPO (Rafailov et al. 2023) or IPO (Azar et al. 2023) on {prompt, chosen, rejected} pairs: the reference "
            "model's log-probs are computed once and cached in --out; TRL-named metrics (rewards/chosen, "
            "rewards/accuracies, rewards/margins, logps/chosen...). --data default trains on the default task's pairs."
            + _SETTINGS,
            "pairs",
            metrics=(names.LOSS, names.REWARDS_ACCURACIES, *_PREFERENCE, names.PAIRS_PER_S),
        ),
        Method(
            "kto",
            configs.KTOConfig,
            "kto",
            "KTO on unpaired data: completions labelled desirable or not",
            "KTO (Ethayarajh et al. 2024) on {prompt, completion, label: true|false} records (TRL's unpaired format, "
            "also with message lists) or on preference pairs, unpaired: per-example loss against a reference point "
            "z_0 = KL(pi||pi_ref) from mismatched pairs; TRL-named metrics (rewards/chosen, rewards/rejected, kl...). "
            "--data default trains on the default task's pairs, unpaired." + _SETTINGS,
            "unpaired",
            metrics=(names.LOSS, *_PREFERENCE, names.KL, names.EXAMPLES_PER_S),
        ),
        Method(
            "ppo",
            configs.PPOConfig,
            "ppo",
            "RLHF with PPO and a KL penalty against a reward model",
            "PPO (Ziegler 2019; Stiennon 2020; Ouyang 2022): sample responses to --data prompts, score them with "
            "--reward-model (a `tuneoff rm` folder, or gold), per-token reward -beta*KL + score, GAE, clipped policy "
            "and value losses, adaptive KL; PPO-ptx with --ptx-data and --ptx-coef. --max-steps counts iterations."
            + _SETTINGS,
            "prompts",
            online=True,
            flops_per_token=_ppo_flops,
            metrics=(
                *_RL,
                names.RLHF_REWARD,
                names.KL_COEF,
                names.VALUE_LOSS,
                names.VALUE_CLIPFRAC,
                names.RATIO,
                names.PTX_LOSS,
            ),
        ),
        *(
            Method(
                verb,
                configs.GRPOConfig,
                "grpo",
                f"critic-free RLHF: {verb.upper()}",
                f"{paper}; k = --num-generations samples per prompt, clipped ratio, beta*KL(k3) to the reference. "
                "--max-steps counts iterations." + _SETTINGS,
                "prompts",
                online=True,
                flops_per_token=_critic_free_flops,
                metrics=(*_RL, names.KL_LOSS, names.SCORES_STD_IN_GROUP),
                fixed={"baseline": verb},
            )
            for verb, paper in zip(("grpo", "rloo"), _CRITIC_FREE)
        ),
    )
}
"""name -> Method, in the order the CLI lists them."""

ARM_METHODS = ("base", *(name for name, m in METHODS.items() if m.arm))
"""What an experiment's arm can be: base (no training) or a trainable method."""
ONLINE = tuple(name for name, m in METHODS.items() if m.online)
"""The online RL methods: they need a proxy reward model."""


def method(name: str) -> Method:
    from tuneoff.errors import TuneoffError

    if name not in METHODS:
        raise TuneoffError(f"unknown method {name!r} (known: {', '.join(METHODS)})")
    return METHODS[name]
