"""Every file an experiment names, checked before any job starts.

A job that finds its input missing fails minutes into a run, and everything downstream of it is skipped:
:func:`check_inputs` looks at each named file first (it exists, and its records parse as what the field holds:
preference pairs, SFT records or prompts), so a bad path is one error naming the field and the file.
Paths are read as the jobs read them: relative to the working directory.
"""

from __future__ import annotations

from pathlib import Path

from tuneoff.errors import TuneoffError

SFT_CHOICES = ("curated", "high-gold", "raw")
"""`sft_data` values that name shipped data rather than a file (tuneoff.compare.jobs builds them)."""
PROMPT_CHOICES = ("default", "feedback")
"""`prompts` / `eval_prompts` values that name shipped or derived prompts rather than a file."""
KIND_WORDS = {"preference": "preference", "sft": "SFT", "prompt": "prompt"}


def named_files(config) -> list[tuple[str, str, str]]:
    """``(field, path, kind)`` of every file ``config`` (an ExperimentConfig) names; kind is a loader of
    tuneoff.data.formats (``preference``, ``sft``, ``prompt``)."""
    files = []
    feedback = config.feedback or {}
    if feedback.get("source") != "real":
        if "eval" in feedback and "train" not in feedback:
            raise TuneoffError(
                "feedback: eval names held-out pairs of a file; give the training pairs too "
                "(feedback: {train: FILE, eval: FILE})"
            )
        for key in ("train", "eval"):
            if feedback.get(key):
                files.append((f"feedback.{key}", feedback[key], "preference"))
    if config.judge_data:
        files.append(("judge_data", config.judge_data, "preference"))
    if config.sft_data not in SFT_CHOICES:
        files.append(("sft_data", config.sft_data, "sft"))
    for arm, spec in config.arms.items():
        own = spec.get("sft_data") if isinstance(spec, dict) else None
        if own is not None and own not in SFT_CHOICES:
            files.append((f"arms.{arm}.sft_data", own, "sft"))
    for key in ("prompts", "eval_prompts"):
        value = getattr(config, key)
        if value == "feedback" and feedback.get("source") != "real":
            raise TuneoffError(
                f"{key}: feedback means the prompts of real feedback splits "
                f"(feedback: {{source: real}}); with this feedback use default or a prompt file"
            )
        if value not in PROMPT_CHOICES:
            files.append((key, value, "prompt"))
    return files


def check_inputs(config) -> None:
    """Raise TuneoffError naming the field and the path of the first named file that is missing or does not
    parse as its kind (see :func:`named_files`); return quietly when every one is usable."""
    from tuneoff.data.formats import LOADERS

    shipped = {"sft": SFT_CHOICES, "prompt": PROMPT_CHOICES}
    for field, value, kind in named_files(config):
        if not isinstance(value, str) or not value.strip():
            raise TuneoffError(f"{field}: expected a file path, got {value!r}")
        path = Path(value)
        if not path.exists():
            hint = f" (or one of {', '.join(shipped[kind])})" if kind in shipped else ""
            raise TuneoffError(f"{field}: {value}: no such file{hint}")
        try:
            LOADERS[kind](path)
        except TuneoffError as error:  # DataError names the file, the record and the field
            raise TuneoffError(f"{field}: not a usable {KIND_WORDS[kind]} file: {error}") from None
