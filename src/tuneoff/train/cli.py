"""CLI verbs for the training methods: parse flags into the method's config dataclass, call its loop."""

from __future__ import annotations

from tuneoff.config import DPOConfig, GRPOConfig, PPOConfig, RMConfig, SFTConfig, add_config_arguments, build_config


def _sft(args) -> int:
    from tuneoff.train.sft import train

    train(build_config(SFTConfig, args))
    return 0


def _rm(args) -> int:
    from tuneoff.train.reward import train

    train(build_config(RMConfig, args))
    return 0


def _dpo(args) -> int:
    from tuneoff.train.dpo import train

    train(build_config(DPOConfig, args))
    return 0


def add_sft_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "sft", help="supervised fine-tuning (or pretraining on {text} records)",
        description="Supervised fine-tuning: next-token loss on completion/assistant tokens. Every field below can be "
        "set in the --config YAML (same names) or as a flag; flags win.",
    )
    add_config_arguments(parser, SFTConfig)
    parser.set_defaults(func=_sft)


def add_rm_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "rm", help="train a reward model on preference pairs (Bradley-Terry)",
        description="Reward model: a scalar head on the last real token of a causal LM, trained with the "
        "Bradley-Terry loss -log sigmoid(r_chosen - r_rejected - margin); held-out pairwise accuracy, calibration "
        "(ECE) and a length-bias probe. --data default trains on the default task (review-gpt continuations "
        "judged by simulated annotators, evaluated against the gold judge). Every field below can be set in the "
        "--config YAML (same names) or as a flag; flags win.",
    )
    add_config_arguments(parser, RMConfig)
    parser.set_defaults(func=_rm)


def add_dpo_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "dpo", help="direct preference optimisation (DPO or IPO) on preference pairs",
        description="DPO (Rafailov et al. 2023) or IPO (Azar et al. 2023) on {prompt, chosen, rejected} pairs: the "
        "reference model's log-probs are computed once and cached in --out; TRL-named metrics (rewards/chosen, "
        "rewards/accuracies, rewards/margins, logps/chosen...). --data default trains on the default task's pairs. "
        "Every field below can be set in the --config YAML (same names) or as a flag; flags win.",
    )
    add_config_arguments(parser, DPOConfig)
    parser.set_defaults(func=_dpo)


def _ppo(args) -> int:
    from tuneoff.train.ppo import train

    train(build_config(PPOConfig, args))
    return 0


def add_ppo_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "ppo", help="RLHF with PPO and a KL penalty against a reward model",
        description="PPO (Ziegler 2019; Stiennon 2020; Ouyang 2022): sample responses to --data prompts, score them with "
        "--reward-model (a `tuneoff rm` folder, or gold), per-token reward -beta*KL + score, GAE, clipped policy and value "
        "losses, adaptive KL. --max-steps counts iterations. Every field below can be set in the --config YAML (same "
        "names) or as a flag; flags win.",
    )
    add_config_arguments(parser, PPOConfig)
    parser.set_defaults(func=_ppo)


def add_critic_free_parsers(subparsers) -> None:
    """grpo and rloo: one loop (train/grpo.py), two baselines; each verb fixes its baseline."""
    for verb, paper in (("grpo", "GRPO (Shao et al. 2024): advantages = (r - group mean) / group std"),
                        ("rloo", "RLOO (Ahmadian et al. 2024): advantages = r - mean of the other k-1 samples")):
        parser = subparsers.add_parser(
            verb, help=f"critic-free RLHF: {verb.upper()}",
            description=f"{paper}; k = --num-generations samples per prompt, clipped ratio, beta*KL(k3) to the reference. "
            "--max-steps counts iterations. Every field below can be set in the --config YAML (same names) or as a flag.",
        )
        add_config_arguments(parser, GRPOConfig)

        def handler(args, verb=verb) -> int:
            from tuneoff.train.grpo import train

            train(build_config(GRPOConfig, args, baseline=verb))
            return 0

        parser.set_defaults(func=handler)


def add_parser(subparsers) -> None:
    """Every training verb of this module (the entry ``tuneoff.verbs`` lists)."""
    add_sft_parser(subparsers)
    add_rm_parser(subparsers)
    add_dpo_parser(subparsers)
    add_ppo_parser(subparsers)
    add_critic_free_parsers(subparsers)
