"""`tuneoff label ...` through its own parser (the verb group the main CLI registers)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from tuneoff.cli import label as label_cli
from tuneoff.feedback.store import Store

PANDALM = Path("/work/shared/data/pandalm/testset-v1.json.gz")
TINY_TOKENIZER = Path(__file__).resolve().parents[2] / "src/tuneoff/assets/review-gpt/tokenizer.json"


def run(*argv: str) -> int:
    return label_cli.main(["label", *map(str, argv)])


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_parser_has_every_sub_verb():
    parser = argparse.ArgumentParser()
    label_cli.add_parser(parser.add_subparsers(dest="verb"))
    serve = parser.parse_args(["label", "serve", "--db", "x.sqlite", "--port", "9000"])
    assert (serve.func, serve.host, serve.port, serve.annotators_per_task) == (
        label_cli.run_serve,
        "127.0.0.1",
        9000,
        3,
    )
    assert parser.parse_args(["label", "annotators", "add", "ann", "--db", "x"]).func is label_cli.run_annotators_add
    assert parser.parse_args(["label", "add", "--db", "x", "--pandalm", "p"]).func is label_cli.run_add
    export = parser.parse_args(["label", "export", "--db", "x", "--out", "o"])
    assert (export.func, export.mode, export.ties) == (label_cli.run_export, "majority", "drop")
    assert parser.parse_args(["label", "stats", "--db", "x"]).func is label_cli.run_stats


def test_generation_files_to_annotators_to_export(tmp_path, capsys):
    db = tmp_path / "fb.sqlite"
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"p{i}"} for i in range(3)])
    a = write_jsonl(tmp_path / "a.jsonl", [{"completion": f"a{i}"} for i in range(3)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"completion": f"b{i}"} for i in range(3)])
    assert run("add", "--db", db, "--prompts", prompts, "--responses-a", a, "--responses-b", b) == 0
    assert "tasks added 3, tasks existing 0" in capsys.readouterr().out
    assert run("add", "--db", db, "--prompts", prompts, "--responses-a", a, "--responses-b", b) == 0
    assert "tasks added 0, tasks existing 3" in capsys.readouterr().out  # stable ids: nothing queued twice

    assert run("annotators", "add", "ann", "--db", db) == 0
    token = capsys.readouterr().out.split("token ")[1].strip()
    with Store(db) as store:
        annotator = store.annotator_by_token(token)
        assignment = store.next_task(annotator.id, annotators_per_task=1)
        store.record_judgment(annotator.id, assignment.task.id, "left" if assignment.a_on_left else "right")
    assert run("annotators", "list", "--db", db) == 0
    assert "ann\tannotator\ttoken" in capsys.readouterr().out

    out = tmp_path / "prefs.jsonl"
    assert run("export", "--db", db, "--out", out) == 0
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert (record["prompt"], record["chosen"], record["rejected"], record["annotators"]) == ("p0", "a0", "b0", ["ann"])


@pytest.mark.skipif(not PANDALM.exists(), reason="PandaLM test set not in ../shared/data")
def test_pandalm_import_and_stats(tmp_path, capsys):
    db, figures = tmp_path / "fb.sqlite", tmp_path / "stats.json"
    assert run("add", "--db", db, "--pandalm", PANDALM) == 0
    assert run("stats", "--db", db, "--json", figures) == 0
    text = capsys.readouterr().out
    assert "Fleiss' kappa: 0.864" in text
    assert "position bias (chose the left side; only judgments with a recorded order): n/a" in text  # order unknown
    summary = json.loads(figures.read_text())  # strict JSON: undefined figures are null, never NaN
    assert summary["judgments"] == 2997 and summary["position_bias"]["overall"]["rate"] is None
    assert summary["krippendorff_alpha"]["value"] == pytest.approx(0.864, abs=1e-3)


def test_user_errors_exit_2_with_one_line(tmp_path, capsys):
    db = tmp_path / "fb.sqlite"
    assert run("add", "--db", db) == 2
    assert "give exactly one source" in capsys.readouterr().err
    assert run("add", "--db", db, "--pandalm", "x", "--model-a", "tiny") == 2
    assert run("add", "--db", db, "--responses-a", "a.jsonl") == 2
    assert "go together" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"completion": 1}\n')
    assert run("add", "--db", db, "--responses-a", bad, "--responses-b", bad) == 2
    assert "bad.jsonl:1: field 'completion'" in capsys.readouterr().err
    assert run("stats", "--db", tmp_path / "absent.sqlite") == 2
    assert "no feedback database" in capsys.readouterr().err
    assert run("annotators", "add", "ann", "--db", db) == 0
    assert run("annotators", "add", "ann", "--db", db) == 2
    assert "already exists" in capsys.readouterr().err


def test_preference_file_import_keeps_its_labels(tmp_path, capsys):
    db = tmp_path / "fb.sqlite"
    prefs = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": "q", "chosen": "good", "rejected": "bad"}])
    assert run("add", "--db", db, "--preferences", prefs, "--as-annotator", "original") == 0
    assert "labels added 1" in capsys.readouterr().out
    with Store(db) as store:
        assert [(j.annotator, j.preferred in ("a", "b")) for j in store.judgments()] == [("original", True)]


@pytest.mark.skipif(not TINY_TOKENIZER.exists(), reason="review-gpt's tokenizer (for the tiny model) is not built")
def test_two_samples_per_prompt_from_a_model(tmp_path, capsys):
    db = tmp_path / "fb.sqlite"
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "the movie was"}, {"prompt": "a dull"}])
    assert (
        run("add", "--db", db, "--prompts", prompts, "--model-a", "tiny", "--max-new-tokens", "4", "--seed", "1") == 0
    )
    with Store(db) as store:
        tasks = store.tasks()
    assert [t.prompt for t in tasks] == ["the movie was", "a dull"]
    assert all(t.source_a == t.source_b == "tiny" and t.response_a != t.response_b for t in tasks)


def test_registered_in_the_tuneoff_cli(tmp_path, capsys):
    from tuneoff import cli

    assert cli.main(["label", "annotators", "add", "ann", "--db", str(tmp_path / "fb.sqlite")]) == 0
    assert capsys.readouterr().out.startswith("annotator ann: token ")
    assert (
        cli.main(["label", "export", "--db", str(tmp_path / "absent.sqlite"), "--out", str(tmp_path / "o.jsonl")]) == 2
    )
    assert "no feedback database" in capsys.readouterr().err


def serve(tmp_path, *argv) -> int:
    return run("serve", "--db", tmp_path / "fb.sqlite", *argv)


@pytest.mark.parametrize(
    "argv, message",
    [
        ((), "error: no feedback database at "),
        (("--host", "0.0.0.0"), "error: no feedback database at "),  # and no plain-HTTP warning before it
        (("--port", "0"), "error: --port must be between 1 and 65535, got 0"),
        (("--port", "70000"), "error: --port must be between 1 and 65535, got 70000"),
        (("--annotators-per-task", "0"), "error: --annotators-per-task must be at least 1"),
        (("--lease-minutes", "-1"), "error: --lease-minutes must be a positive number, got -1.0"),
        (("--lease-minutes", "nan"), "error: --lease-minutes must be a positive number, got nan"),
    ],
)
def test_serve_checks_every_input_before_printing_anything(tmp_path, capsys, monkeypatch, argv, message):
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("served despite a bad input"))
    assert serve(tmp_path, *argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith(message) and captured.err.count("\n") == 1
    assert "labelling page" not in captured.err and "warning" not in captured.err


def test_serve_on_a_port_in_use_is_an_error_before_the_url(tmp_path, capsys, monkeypatch):
    import socket

    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("served on a port in use"))
    Store(tmp_path / "fb.sqlite").close()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert serve(tmp_path, "--port", port) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot serve on 127.0.0.1:{port}: ") and "labelling page" not in err


def test_serve_prints_the_url_once_the_inputs_are_good(tmp_path, capsys, monkeypatch):
    import uvicorn

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: calls.append((app, options)))
    Store(tmp_path / "fb.sqlite").close()
    assert serve(tmp_path, "--port", "8765", "--annotators-per-task", "2") == 0
    err = capsys.readouterr().err
    assert err == "labelling page: http://127.0.0.1:8765/login  (annotators log in with their token)\n"
    ((app, options),) = calls
    assert options == {"host": "127.0.0.1", "port": 8765, "log_level": "info"}
    assert app.state.store.path == tmp_path / "fb.sqlite"
    app.state.store.close()


def test_leads_revoke_and_rotate(tmp_path, capsys):
    db = tmp_path / "fb.sqlite"
    assert run("annotators", "add", "lead", "--db", db, "--lead") == 0
    assert capsys.readouterr().out.startswith("lead lead: token ")
    assert run("annotators", "add", "ann", "--db", db) == 0
    old = capsys.readouterr().out.split("token ")[1].strip()
    assert run("annotators", "rotate", "ann", "--db", db) == 0
    new = capsys.readouterr().out.split("new token ")[1].strip()
    with Store(db) as store:
        assert store.annotator_by_token(old) is None and store.annotator_by_token(new).name == "ann"
    assert run("annotators", "revoke", "ann", "--db", db) == 0
    assert "access revoked" in capsys.readouterr().out
    assert run("annotators", "list", "--db", db) == 0
    assert capsys.readouterr().out.splitlines() == ["1\tlead\tlead\ttoken", "2\tann\tannotator\trevoked"]
    assert run("annotators", "revoke", "nobody", "--db", db) == 2
    assert "no annotator named 'nobody'" in capsys.readouterr().err


def test_stats_say_n_a_for_a_pair_with_a_single_shared_task(tmp_path, capsys):
    from tuneoff.feedback.store import NewTask

    db = tmp_path / "fb.sqlite"
    with Store(db) as store:
        store.add_tasks([NewTask("p", "a", "b")])
        people = [store.add_annotator(name)[0] for name in ("x", "y")]
        for person in people:  # both prefer a: one shared task, full agreement, chance agreement 1: kappa 0/0
            shown = store.next_task(person.id, annotators_per_task=2)
            store.record_judgment(person.id, shown.task.id, "left" if shown.a_on_left else "right")
    assert run("stats", "--db", db) == 0
    out = capsys.readouterr().out
    assert "x ~ y: n/a (n = 1)" in out and "nan" not in out
