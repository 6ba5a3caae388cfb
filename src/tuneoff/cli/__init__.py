"""The `tuneoff` command: parse, build a config, call the library. Nothing else lives here.

Each verb group registers itself with ``add_parser(subparsers)``; its handler receives the parsed
``argparse.Namespace``. A :class:`tuneoff.errors.TuneoffError` becomes one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys

from tuneoff.errors import TuneoffError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tuneoff", description="Tune language models by SFT and RLHF and compare them."
    )
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    from tuneoff import verbs  # registry of verb groups; each add_parser is cheap (heavy imports happen in handlers)

    for add_parser in verbs.REGISTRY:
        add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except TuneoffError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
