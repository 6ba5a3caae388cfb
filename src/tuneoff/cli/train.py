"""The training verbs, one per entry of the method table (``tuneoff.train.methods``): parse flags into the method's
config dataclass, resolve ``--data default`` to the default task's files, call its loop."""

from __future__ import annotations

import dataclasses

from tuneoff.config import add_config_arguments, build_config
from tuneoff.train.methods import METHODS


def resolve_data(config):
    """``--data default`` (and ``default:...``) of a preference method names the default task's cached files."""
    from tuneoff.tasks.default_task import is_default, pair_files

    if not hasattr(config, "eval_data") or not is_default(config.data):
        return config
    data, eval_data = pair_files(config.data, config.eval_data)
    print(f"default task data in {data.rsplit('/', 1)[0]}")
    return dataclasses.replace(config, data=data, eval_data=eval_data)


def add_parser(subparsers) -> None:
    """Every training verb."""
    for name, method in METHODS.items():
        parser = subparsers.add_parser(name, help=method.help, description=method.description)
        add_config_arguments(parser, method.config)

        def handler(args, method=method) -> int:
            config = build_config(method.config, args, **method.fixed)
            method.train(resolve_data(config) if method.needs_pairs else config)
            return 0

        parser.set_defaults(func=handler)
