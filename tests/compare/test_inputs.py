"""Every file an experiment names is checked before any job starts: a missing or malformed one is one error
(exit status 2) that names the field and the path, never a traceback from a job minutes later."""

from __future__ import annotations

import json

import pytest

from tuneoff import cli
from tuneoff.compare.experiment import load_experiment
from tuneoff.compare.inputs import check_inputs, named_files
from tuneoff.errors import TuneoffError

PAIR = {"prompt": "the film", "chosen": " is great", "rejected": " is dull"}
SFT = {"prompt": "the film", "completion": " is great"}


def jsonl(path, *records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture
def files(tmp_path, monkeypatch):
    """Valid files of every kind, and the working directory the jobs resolve paths from."""
    monkeypatch.chdir(tmp_path)
    return {
        "pairs": jsonl(tmp_path / "pairs.jsonl", PAIR),
        "sft": jsonl(tmp_path / "sft.jsonl", SFT),
        "prompts": jsonl(tmp_path / "prompts.jsonl", {"prompt": "the film"}),
        "text": jsonl(tmp_path / "text.jsonl", {"text": "a review, no prompt"}),
    }


def experiment(tmp_path, text: str):
    path = tmp_path / "x.yaml"
    path.write_text("extends: demo\n" + text)
    return load_experiment(path)


def test_a_config_whose_files_all_parse_passes(tmp_path, files):
    config = experiment(
        tmp_path,
        f"feedback: {{train: {files['pairs']}, eval: {files['pairs']}}}\n"
        f"sft_data: {files['sft']}\nprompts: {files['prompts']}\n"
        f"eval_prompts: prompts.jsonl\n"
        f"judge: rm\njudge_data: {files['pairs']}\n"
        f"arms: {{sft: {{sft_data: {files['sft']}}}}}\n",
    )
    check_inputs(config)
    assert {field for field, _, _ in named_files(config)} == {
        "feedback.train",
        "feedback.eval",
        "judge_data",
        "sft_data",
        "arms.sft.sft_data",
        "prompts",
        "eval_prompts",
    }


def test_the_shipped_choices_name_no_file(tmp_path, files):
    config = experiment(tmp_path, "sft_data: high-gold\narms: {sft: {sft_data: raw}}\n")
    assert named_files(config) == []
    check_inputs(config)


@pytest.mark.parametrize(
    "text, field",
    [
        ("feedback: {train: missing.jsonl}\n", "feedback.train"),
        ("feedback: {train: pairs.jsonl, eval: missing.jsonl}\n", "feedback.eval"),
        ("sft_data: missing.jsonl\n", "sft_data"),
        ("arms: {sft: {sft_data: missing.jsonl}}\n", "arms.sft.sft_data"),
        ("prompts: missing.jsonl\n", "prompts"),
        ("eval_prompts: missing.jsonl\n", "eval_prompts"),
        ("judge: rm\njudge_data: missing.jsonl\n", "judge_data"),
    ],
)
def test_a_missing_file_names_its_field_and_path(tmp_path, files, text, field):
    with pytest.raises(TuneoffError) as error:
        check_inputs(experiment(tmp_path, text))
    assert str(error.value).startswith(f"{field}: missing.jsonl: no such file")


@pytest.mark.parametrize(
    "text, message",
    [
        ("feedback: {train: sft.jsonl}\n", "feedback.train: not a usable preference file: sft.jsonl:1:"),
        ("judge: rm\njudge_data: prompts.jsonl\n", "judge_data: not a usable preference file: prompts.jsonl:1:"),
        ("prompts: text.jsonl\n", "prompts: not a usable prompt file: text.jsonl:1:"),
        ("sft_data: prompts.jsonl\n", "sft_data: not a usable SFT file: prompts.jsonl:1:"),
        ("eval_prompts: feedback\n", "eval_prompts: feedback means the prompts of real feedback splits"),
        ("feedback: {eval: pairs.jsonl}\n", "feedback: eval names held-out pairs of a file; give the training pairs"),
    ],
)
def test_a_file_that_does_not_parse_as_its_kind_is_named(tmp_path, files, text, message):
    with pytest.raises(TuneoffError) as error:
        check_inputs(experiment(tmp_path, text))
    assert str(error.value).startswith(message)


def test_empty_and_malformed_files_are_named(tmp_path, files):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "broken.jsonl").write_text('{"prompt": "a", "chosen": "b"\n')
    for name, problem in (("empty.jsonl", "file is empty"), ("broken.jsonl", "broken.jsonl:1")):
        with pytest.raises(TuneoffError, match=f"^feedback.train: not a usable preference file: .*{problem}"):
            check_inputs(experiment(tmp_path, f"feedback: {{train: {name}}}\n"))


def test_compare_with_a_missing_feedback_file_exits_2_before_any_job(tmp_path, files, capsys):
    config = tmp_path / "x.yaml"
    config.write_text("extends: demo\nbase: tiny\nseeds: [0]\nfeedback: {train: train.jsonl}\n")
    out = tmp_path / "runs" / "x"
    assert cli.main(["compare", "--config", str(config), "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.err == "error: feedback.train: train.jsonl: no such file\n"
    assert captured.out == "" and not out.exists()  # nothing planned, no folder made, no job started
