"""The scheduler under failing jobs: a failure never stops the run; what reads from it is recorded as not run,
with the failed input named; everything independent of it still runs; `tuneoff compare` then exits 2."""

from __future__ import annotations

import json
import os
import time

import pytest

from tuneoff import cli
from tuneoff.compare import jobs as runners
from tuneoff.compare import scheduler
from tuneoff.compare.experiment import Job
from tuneoff.errors import TuneoffError


def slow(spec, folder, inputs):
    time.sleep(spec.get("sleep", 1.5))
    return {"value": 1}


def fail(spec, folder, inputs):
    raise TuneoffError("the input file is bad")


def bug(spec, folder, inputs):
    raise ValueError("an unexpected value")


def die(spec, folder, inputs):
    os._exit(3)  # the process dies without writing its record (as when killed for memory)


def echo(spec, folder, inputs):
    return {"seen": sorted(inputs), "value": inputs["slow"]["value"] + 1}


@pytest.fixture
def fake_runners(monkeypatch):
    for kind, runner in {"t-slow": slow, "t-fail": fail, "t-bug": bug, "t-die": die, "t-echo": echo}.items():
        monkeypatch.setitem(runners.RUNNERS, kind, runner)  # the forked job processes see the same table


def job(tmp_path, name, kind, deps=(), **spec):
    return Job(name, kind, spec, list(deps), str(tmp_path / name), f"key-{name}", 1.0)


def test_a_failed_job_marks_what_reads_it_as_not_run_and_the_rest_finishes(tmp_path, fake_runners, capsys):
    plan = [
        job(tmp_path, "slow", "t-slow"),
        job(tmp_path, "bad", "t-fail"),
        job(tmp_path, "bug", "t-bug"),
        job(tmp_path, "dies", "t-die"),
        # fails while `slow` is still running: reading a missing record of `slow` was the KeyError
        job(tmp_path, "after", "t-echo", ["slow", "bad"]),
        job(tmp_path, "chain", "t-echo", ["after"]),
        job(tmp_path, "free", "t-echo", ["slow"]),
        job(tmp_path, "orphan", "t-echo", ["nowhere"]),
    ]
    records = scheduler.run(plan, workers=4, threads=1, show_progress=False)
    status = {name: (r["status"], r.get("error")) for name, r in records.items()}
    assert status == {
        "slow": ("ok", None),
        "free": ("ok", None),
        "bad": ("failed", "the input file is bad"),
        "bug": ("failed", "ValueError: an unexpected value"),
        "dies": ("failed", f"the job's process died (exit code 3); see {tmp_path / 'dies'}/log.txt"),
        "after": ("skipped", "its input bad did not finish"),
        "chain": ("skipped", "its input after did not finish"),
        "orphan": ("skipped", "no job produces its input(s) nowhere"),
    }
    assert records["free"]["result"] == {"seen": ["slow"], "value": 2}  # the dependency's result, as inputs
    assert "Traceback" in (tmp_path / "bug" / "log.txt").read_text()  # a bug keeps its traceback in the job's log
    err = capsys.readouterr().err
    for line in (
        "bad: failed: the input file is bad",
        "after: not run: its input bad did not finish",
        "dies: failed: the job's process died (exit code 3)",
    ):
        assert line in err
    assert scheduler.failures(records) == [
        f"{name}: {'not run' if s == 'skipped' else s}: {e}" for name, (s, e) in status.items() if s != "ok"
    ]


def test_a_rerun_reuses_finished_jobs_and_retries_failed_ones(tmp_path, fake_runners):
    plan = [job(tmp_path, "slow", "t-slow", sleep=0.0), job(tmp_path, "bad", "t-fail")]
    scheduler.run(plan, workers=2, threads=1, show_progress=False)
    (tmp_path / "slow" / scheduler.RECORD).with_name("garbage.json").write_text("{")
    again = scheduler.run(plan, workers=2, threads=1, show_progress=False)
    assert again["slow"]["reused"] is True and again["bad"]["status"] == "failed" and "reused" not in again["bad"]
    (tmp_path / "slow" / scheduler.RECORD).write_text("{ half a record")  # a corrupt record: run the job again
    third = scheduler.run(plan, workers=2, threads=1, show_progress=False)
    assert third["slow"]["status"] == "ok" and "reused" not in third["slow"]


def eval_result(spec, folder, inputs):
    """What an evaluation returns, in miniature (two prompts, no proxy reward)."""
    diversity = {scope: {"ead": 0.5, "self_bleu": 0.5, "embedding": 0.5} for scope in ("per_input", "across_input")}
    return {
        "gold": [0.4, 0.6],
        "proxy": [],
        "kl_per_token": 0.0,
        "lengths": [5, 7],
        "diversity": diversity,
        "samples": [{"prompt": "the film", "response": " was fine", "gold": 0.5}],
        "phases": {"generation": {"wall_s": 0.01}},
    }


def test_compare_reports_the_failed_job_and_exits_2(tmp_path, monkeypatch, capsys):
    judge = {"dev_accuracy": 0.9, "test_accuracy": 0.9}
    monkeypatch.setitem(runners.RUNNERS, "gold", lambda spec, folder, inputs: judge)
    monkeypatch.setitem(runners.RUNNERS, "train", fail)
    monkeypatch.setitem(runners.RUNNERS, "eval", eval_result)
    config = tmp_path / "x.yaml"
    config.write_text("name: failing\nbase: tiny\nseeds: [0]\narms: {base: {method: base}, sft: {method: sft}}\n")
    out = tmp_path / "out"
    assert cli.main(["compare", "--config", str(config), "--out", str(out), "--workers", "2"]) == 2
    captured = capsys.readouterr()
    assert "error: 2 of 4 job(s) did not finish" in captured.err
    assert "train:sft/seed-0: failed: the input file is bad" in captured.err
    assert "eval:sft/seed-0: not run: its input train:sft/seed-0 did not finish" in captured.err
    assert "Traceback" not in captured.err and f"report: {out / 'report.html'}" in captured.out
    results = json.loads((out / "results.json").read_text())  # what did finish is still written and reported
    status = {name: job["status"] for name, job in results["jobs"].items()}
    assert status == {
        "judge": "ok",
        "eval:base/seed-0": "ok",
        "train:sft/seed-0": "failed",
        "eval:sft/seed-0": "skipped",
    }
    assert results["recommendation"]["choice"] == "base"  # sft has nothing measured: it is not ranked
    assert (out / "report.html").read_text(encoding="utf-8").startswith("<!doctype html>")
