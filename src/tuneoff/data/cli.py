"""The ``tuneoff validate FILE --kind sft|preference|kto|prompt`` verb: check a data file before training on it.

Prints ``train.jsonl: 120 valid sft records``; a bad record raises :class:`tuneoff.errors.DataError`,
which the main CLI prints as one line and turns into exit status 2.
"""

from __future__ import annotations

import argparse

KINDS = ("sft", "preference", "kto", "unpaired", "prompt")
"""Record kinds; ``kto`` (alias ``unpaired``) is unpaired preference data: prompt, completion and a boolean label."""


def validate(args: argparse.Namespace) -> int:
    from tuneoff.data.formats import validate_file

    count = validate_file(args.file, args.kind)
    print(f"{args.file}: {count} valid {args.kind} record{'' if count == 1 else 's'}")
    return 0


def add_parser(subparsers) -> None:
    """Register ``validate`` with the top-level CLI's subparsers."""
    parser = subparsers.add_parser(
        "validate",
        help="check a data file and count its valid records",
        description="Check every record of a data file; name the first bad one.",
    )
    parser.add_argument(
        "file", metavar="FILE", help=".jsonl, .json, .csv, .parquet (gzipped JSON too) or a datasets folder"
    )
    parser.add_argument(
        "--kind",
        choices=KINDS,
        default="sft",
        help="what the records are (default: sft); kto (alias unpaired): prompt, completion, label",
    )
    parser.set_defaults(func=validate)
