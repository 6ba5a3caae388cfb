"""Where each verb group plugs into the CLI. Keep these imports light: heavy ones go inside handlers."""

from __future__ import annotations

import importlib

# module path of each verb group; each module has add_parser(subparsers)
MODULES = [
    "tuneoff.cli.train",
    "tuneoff.data.cli",
    "tuneoff.feedback.gold_cli",
    "tuneoff.cli.label",
    "tuneoff.eval.cli",
    "tuneoff.compare.cli",
]


def _load(name: str):
    return importlib.import_module(name).add_parser


class _Registry:
    def __iter__(self):
        for name in MODULES:
            try:
                yield _load(name)
            except ModuleNotFoundError as error:
                if error.name != name:  # a verb module that exists but fails to import is a real bug
                    raise


REGISTRY = _Registry()
