"""CLI verbs for the training methods: parse flags into the method's config dataclass, call its loop."""

from __future__ import annotations

from tuneoff.config import SFTConfig, add_config_arguments, build_config


def _sft(args) -> int:
    from tuneoff.train.sft import train

    train(build_config(SFTConfig, args))
    return 0


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "sft", help="supervised fine-tuning (or pretraining on {text} records)",
        description="Supervised fine-tuning: next-token loss on completion/assistant tokens. Every field below can be "
        "set in the --config YAML (same names) or as a flag; flags win.",
    )
    add_config_arguments(parser, SFTConfig)
    parser.set_defaults(func=_sft)
