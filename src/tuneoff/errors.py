"""Errors that reach the user as one clear message and exit status 2 (never a stack trace)."""

from __future__ import annotations


class TuneoffError(Exception):
    """A problem the user can fix (bad input, bad option). The CLI prints it and exits with status 2."""


class DataError(TuneoffError):
    """A record in a data file is not what tuneoff expects.

    The message names the file, the line (JSONL/JSON/CSV) or row (Parquet, datasets folder), the field
    and what was expected, e.g. ``train.jsonl:3: field 'completion': expected a non-empty string, got ""``.
    """

    def __init__(self, file: str, where: str | int | None, field: str | None, problem: str):
        self.file, self.where, self.field, self.problem = str(file), where, field, problem
        location = self.file if where is None else f"{self.file}:{where}"
        subject = f" field '{field}':" if field else ""
        super().__init__(f"{location}:{subject} {problem}")
