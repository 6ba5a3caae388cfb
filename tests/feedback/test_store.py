"""The feedback store: WAL, stable ids, hashed tokens, atomic assignment, idempotent judgments, import/export."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from tuneoff.errors import DataError, TuneoffError
from tuneoff.feedback.store import (
    ConflictingJudgment,
    NewTask,
    NotAssigned,
    Store,
    export_preferences,
    hash_token,
    import_pandalm,
    import_preferences,
    preferred_from_choice,
    read_pandalm,
    task_id,
    tasks_from_generations,
)

PANDALM = Path("/work/shared/data/pandalm/testset-v1.json.gz")
INJECTION = "x'); DROP TABLE judgments; --"


def make_store(tmp_path, n_tasks=3, name="fb.sqlite") -> Store:
    store = Store(tmp_path / name)
    store.add_tasks(NewTask(f"prompt {i}", f"answer a{i}", f"answer b{i}") for i in range(n_tasks))
    return store


def assert_slot_counts(store: Store) -> None:
    """tasks.taken equals its definition: open assignments plus labels other than skips."""
    rows = (
        store._conn()
        .execute(
            "SELECT t.id, t.taken, (SELECT COUNT(*) FROM assignments s WHERE s.task_id = t.id AND s.state = 'open')"
            " + (SELECT COUNT(*) FROM judgments j WHERE j.task_id = t.id AND j.preferred IS NOT NULL) FROM tasks t"
        )
        .fetchall()
    )
    assert [(r[0], r[1]) for r in rows] == [(r[0], r[2]) for r in rows]


def test_wal_mode_and_durable_sync(tmp_path):
    store = make_store(tmp_path)
    assert store.journal_mode() == "wal"
    assert store._conn().execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_task_ids_are_stable_and_adding_twice_keeps_one(tmp_path):
    first, second = Store(tmp_path / "1.sqlite"), Store(tmp_path / "2.sqlite")
    task = NewTask("p", "a", "b")
    assert first.add_tasks([task]) == (1, 0)
    assert first.add_tasks([task]) == (0, 1)
    second.add_tasks([NewTask("other", "x", "y"), task])
    assert task.id == task_id("p", "a", "b") == first.tasks()[0].id
    assert task.id in {t.id for t in second.tasks()}
    assert NewTask("p", "a", "b", key="src:1").id != task.id  # a source key names duplicates apart


def test_tokens_are_stored_hashed_only(tmp_path):
    store = make_store(tmp_path)
    annotator, token = store.add_annotator("ann")
    assert len(token) >= 40
    stored = store._conn().execute("SELECT token_sha256 FROM annotators").fetchone()[0]
    assert stored == hash_token(token) and token not in stored
    store.close()
    for path in tmp_path.iterdir():  # the database, its WAL and shared memory: no raw token anywhere
        assert token.encode() not in path.read_bytes()
    store = Store(tmp_path / "fb.sqlite")
    assert store.annotator_by_token(token) == annotator
    assert store.annotator_by_token(token + "x") is None
    assert store.annotator_by_token("") is None and store.annotator_by_token(None) is None
    with pytest.raises(TuneoffError, match="already exists"):
        store.add_annotator("ann")


def test_assignment_gives_k_distinct_annotators_and_nobody_twice(tmp_path):
    store = make_store(tmp_path, n_tasks=2)
    x, y, z = (store.add_annotator(name)[0].id for name in "xyz")
    k = dict(annotators_per_task=2)
    first = store.next_task(x, **k)
    assert store.next_task(x, **k) == first  # an open task is given again (same order), not a new one
    store.record_judgment(x, first.task.id, "left")
    second = store.next_task(x, **k)
    assert second.task.id != first.task.id
    assert store.next_task(y, **k).task.id == first.task.id  # task 1 has one label of two
    assert store.next_task(z, **k).task.id == second.task.id  # task 1 is full (x judged, y holds it)
    store.record_judgment(x, second.task.id, "tie")
    assert store.next_task(x, **k) is None  # x has seen both tasks
    assert store.progress(x, **k).done == 2 and store.progress(x, **k).remaining == 0
    assert_slot_counts(store)


def test_skip_frees_the_slot_for_someone_else(tmp_path):
    store = make_store(tmp_path, n_tasks=1)
    x, y = (store.add_annotator(name)[0].id for name in "xy")
    task = store.next_task(x, annotators_per_task=1).task
    assert store.next_task(y, annotators_per_task=1) is None
    store.record_judgment(x, task.id, "skip")
    assert store.next_task(x, annotators_per_task=1) is None  # never shown again to the one who skipped
    assert store.next_task(y, annotators_per_task=1).task.id == task.id
    assert_slot_counts(store)


def test_abandoned_assignment_expires_but_its_late_label_is_kept(tmp_path):
    store = make_store(tmp_path, n_tasks=1)
    x, y = (store.add_annotator(name)[0].id for name in "xy")
    task = store.next_task(x, annotators_per_task=1, lease_seconds=60, now=1000.0).task
    assert store.next_task(y, annotators_per_task=1, lease_seconds=60, now=1030.0) is None
    assert store.next_task(y, annotators_per_task=1, lease_seconds=60, now=1061.0).task.id == task.id
    assert store.next_task(x, annotators_per_task=1, lease_seconds=60, now=1062.0) is None  # x's lease is gone
    assert store.record_judgment(x, task.id, "left", now=1100.0)[1]  # but no label is ever lost
    assert_slot_counts(store)


def test_judgments_are_idempotent_and_refused_when_not_assigned(tmp_path):
    store = make_store(tmp_path)
    x, y = (store.add_annotator(name)[0].id for name in "xy")
    assignment = store.next_task(x, annotators_per_task=3)
    judgment_id, created = store.record_judgment(x, assignment.task.id, "right", seconds=2.5)
    assert created and store.record_judgment(x, assignment.task.id, "right") == (judgment_id, False)
    with pytest.raises(ConflictingJudgment):
        store.record_judgment(x, assignment.task.id, "left")
    with pytest.raises(NotAssigned):  # y posts a task that is x's
        store.record_judgment(y, assignment.task.id, "left")
    with pytest.raises(TuneoffError, match="choice"):
        store.record_judgment(x, assignment.task.id, INJECTION)
    (judgment,) = store.judgments()
    assert judgment.a_on_left == assignment.a_on_left and judgment.choice == "right"
    assert judgment.preferred == ("b" if assignment.a_on_left else "a") and judgment.seconds == 2.5


def test_implausible_client_time_falls_back_to_server_time(tmp_path):
    store = make_store(tmp_path)
    x = store.add_annotator("x")[0].id
    task = store.next_task(x, annotators_per_task=1, now=100.0).task
    store.record_judgment(x, task.id, "tie", seconds=float("inf"), now=107.0)
    assert store.judgments()[0].seconds == pytest.approx(7.0)


def test_preferred_from_choice_table():
    assert [preferred_from_choice(c, True) for c in ("left", "right", "tie", "skip")] == ["a", "b", "tie", None]
    assert [preferred_from_choice(c, False) for c in ("left", "right", "tie", "skip")] == ["b", "a", "tie", None]


def test_concurrent_annotators_never_overfill_or_repeat(tmp_path):
    path = tmp_path / "fb.sqlite"
    setup = make_store(tmp_path, n_tasks=12)
    ids = [setup.add_annotator(f"a{i}")[0].id for i in range(6)]
    errors = []

    def work(annotator_id):
        store = Store(path)  # own connections, as another process would have
        try:
            while (assignment := store.next_task(annotator_id, annotators_per_task=2)) is not None:
                store.record_judgment(annotator_id, assignment.task.id, "left")
        except Exception as error:  # noqa: BLE001 - surfaced by the assertion below
            errors.append(error)
        finally:
            store.close()

    threads = [threading.Thread(target=work, args=(i,)) for i in ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    per_task = {}
    for judgment in setup.judgments():
        per_task.setdefault(judgment.task_id, []).append(judgment.annotator)
    assert len(per_task) == 12 and all(len(names) == len(set(names)) == 2 for names in per_task.values())
    assert_slot_counts(setup)


def test_sql_injection_strings_are_stored_verbatim(tmp_path):
    store = Store(tmp_path / "fb.sqlite")
    store.add_tasks([NewTask(INJECTION, "a'; --", 'b" OR 1=1 --')])
    annotator, _ = store.add_annotator("Robert'); DROP TABLE annotators;--")
    (task,) = store.tasks()
    assert (task.prompt, task.response_a, task.response_b) == (INJECTION, "a'; --", 'b" OR 1=1 --')
    assert store.annotators()[0].name == annotator.name == "Robert'); DROP TABLE annotators;--"
    assert store.task(INJECTION) is None


@pytest.mark.skipif(not PANDALM.exists(), reason="PandaLM test set not in ../shared/data")
def test_pandalm_import_keeps_three_annotators_and_is_idempotent(tmp_path):
    store = Store(tmp_path / "fb.sqlite")
    counts = import_pandalm(store, PANDALM)
    assert counts == {"tasks_added": 999, "tasks_existing": 0, "labels_added": 2997, "labels_existing": 0}
    assert import_pandalm(store, PANDALM)["labels_added"] == 0
    assert [a.name for a in store.annotators()] == [f"pandalm-annotator{k}" for k in (1, 2, 3)]
    assert not any(a.can_log_in for a in store.annotators())
    records = {task.key: task for task, _ in read_pandalm(PANDALM)}
    assert records["pandalm:157"].response_a == "True"  # JSON true in the file
    assert records["pandalm:0"].source_a == "bloom-7b" and records["pandalm:0"].source_b == "llama-7b"
    assert all(j.a_on_left is None and j.choice is None for j in store.judgments())
    assert_slot_counts(store)


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_tasks_from_generation_files(tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi"}, {"prompt": "yo"}])
    a = write_jsonl(tmp_path / "a.jsonl", [{"completion": "A1"}, {"response": "A2"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "hi", "output": "B1\nline 2"}, {"completion": "B2"}])
    tasks = tasks_from_generations(prompts, a, b)
    assert [(t.prompt, t.response_a, t.response_b) for t in tasks] == [("hi", "A1", "B1\nline 2"), ("yo", "A2", "B2")]
    assert tasks[0].source_a == "a.jsonl" and tasks[0].prompt_messages is None
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}] * 2)
    tasks = tasks_from_generations(chat, a, write_jsonl(tmp_path / "b2.jsonl", [{"output": "B1"}, {"output": "B2"}]))
    assert tasks[0].prompt == "user: hi" and tasks[0].prompt_messages == [{"role": "user", "content": "hi"}]
    short = write_jsonl(tmp_path / "short.jsonl", [{"completion": "x"}])
    with pytest.raises(DataError, match="short.jsonl"):
        tasks_from_generations(prompts, a, short)
    wrong = write_jsonl(tmp_path / "wrong.jsonl", [{"prompt": "other", "completion": "x"}, {"completion": "y"}])
    with pytest.raises(DataError, match="wrong.jsonl:record 1: field 'prompt'"):
        tasks_from_generations(prompts, a, wrong)
    with pytest.raises(DataError, match="a.jsonl:record 1: field 'prompt'"):
        tasks_from_generations(None, a, b)  # without --prompts the files must carry their prompts
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"completion": "x"}\n{oops\n')
    with pytest.raises(DataError, match="broken.jsonl:2: invalid JSON"):
        tasks_from_generations(None, broken, broken)


def judge_all(store: Store, labels: dict[str, list[str]], k: int) -> None:
    """Each annotator answers their tasks in order with the given preferred sides (a / b / tie / skip)."""
    for name, wanted in labels.items():
        annotator = store.add_annotator(name)[0].id
        for preferred in wanted:
            assignment = store.next_task(annotator, annotators_per_task=k)
            choice = {"tie": "tie", "skip": "skip"}.get(preferred) or (
                "left" if (preferred == "a") == assignment.a_on_left else "right"
            )
            store.record_judgment(annotator, assignment.task.id, choice)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_export_majority_per_annotator_and_ties(tmp_path):
    store = make_store(tmp_path, n_tasks=4)
    # tasks 0..3: votes 0 -> a,a,b ; 1 -> b,b,b ; 2 -> tie,tie,a ; 3 -> a,b,skip (no majority)
    judge_all(store, {"x": ["a", "b", "tie", "a"], "y": ["a", "b", "tie", "b"], "z": ["b", "b", "a", "skip"]}, k=3)
    out = tmp_path / "out" / "prefs.jsonl"
    counts = export_preferences(store, out)
    assert counts == {"records": 2, "ties_dropped": 1, "no_majority": 1, "too_few_annotators": 0, "empty_response": 0}
    first, second = read_jsonl(out)
    assert (first["prompt"], first["chosen"], first["rejected"]) == ("prompt 0", "answer a0", "answer b0")
    assert first["annotators"] == ["x", "y", "z"] and first["votes"] == {"a": 2, "b": 1, "tie": 0}
    assert (second["chosen"], second["rejected"], second["tie"]) == ("answer b1", "answer a1", False)
    kept = export_preferences(store, out, ties="keep")
    assert kept["records"] == 3 and read_jsonl(out)[2]["tie"] is True
    assert export_preferences(store, out, min_annotators=4)["too_few_annotators"] == 4
    per = export_preferences(store, out, mode="per-annotator")
    assert per["records"] == 9 and per["ties_dropped"] == 2  # 12 labels - 1 skip - 2 ties
    assert {r["annotator"] for r in read_jsonl(out)} == {"x", "y", "z"}
    assert sorted(p.name for p in out.parent.iterdir()) == ["prefs.jsonl"]  # no temporary file left behind


def test_preference_file_round_trip_through_the_store(tmp_path):
    pairs = [{"prompt": f"p{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(8)]
    path = write_jsonl(tmp_path / "prefs.jsonl", pairs)
    store = Store(tmp_path / "fb.sqlite")
    counts = import_preferences(store, path, as_annotator="file")
    assert counts == {"tasks_added": 8, "tasks_existing": 0, "labels_added": 8, "labels_existing": 0}
    assert {t.response_a.startswith("good") for t in store.tasks()} == {True, False}  # a is not always the winner
    export_preferences(store, tmp_path / "back.jsonl")
    back = read_jsonl(tmp_path / "back.jsonl")
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in back] == [
        (p["prompt"], p["chosen"], p["rejected"]) for p in pairs
    ]


def test_conversational_prompts_export_in_messages_form(tmp_path):
    store = Store(tmp_path / "fb.sqlite")
    messages = [{"role": "user", "content": "hello"}]
    store.add_tasks([NewTask("user: hello", "A", "B", messages)])
    judge_all(store, {"x": ["b"]}, k=1)
    export_preferences(store, tmp_path / "out.jsonl")
    (record,) = read_jsonl(tmp_path / "out.jsonl")
    assert record["prompt"] == messages and record["chosen"] == [{"role": "assistant", "content": "B"}]


def test_missing_or_foreign_database_is_a_clear_error(tmp_path):
    with pytest.raises(TuneoffError, match="no feedback database"):
        Store(tmp_path / "absent.sqlite", create=False)
    (tmp_path / "notes.txt").write_text("not a database at all, just some text " * 50)
    with pytest.raises(TuneoffError, match="not a tuneoff feedback database"):
        Store(tmp_path / "notes.txt")


def test_export_is_read_by_the_project_preference_reader(tmp_path):
    formats = pytest.importorskip("tuneoff.data.formats")
    store = Store(tmp_path / "fb.sqlite")
    chat = [{"role": "user", "content": "p2"}]
    store.add_tasks([NewTask("p0", "A", "B"), NewTask("p1", "", "B"), NewTask("p2", "A", "B", chat)])
    judge_all(store, {"x": ["a", "b", "b"]}, k=1)
    out = tmp_path / "prefs.jsonl"
    assert export_preferences(store, out, mode="per-annotator")["empty_response"] == 1  # readers refuse empty text
    pairs = formats.load_preferences(out)
    assert [(p.chosen, p.rejected, p.annotator) for p in pairs] == [("A", "B", "x"), ("B", "A", "x")]


V1_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tasks (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- queue order
    id TEXT NOT NULL UNIQUE,                -- stable: a hash of the content (or of the source's own key)
    prompt TEXT NOT NULL,                   -- as shown to annotators
    prompt_messages TEXT,                   -- JSON [{role, content}] when the prompt is a conversation
    response_a TEXT NOT NULL,
    response_b TEXT NOT NULL,
    source_a TEXT,                          -- the model or file that wrote each response
    source_b TEXT,
    origin TEXT,                            -- e.g. "pandalm:17"
    created_at REAL NOT NULL,
    taken INTEGER NOT NULL DEFAULT 0        -- open assignments + labels other than skips (see next_task)
);
CREATE TABLE IF NOT EXISTS annotators (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    token_sha256 TEXT UNIQUE,               -- NULL for imported annotators, who cannot log in
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS assignments (
    task_id TEXT NOT NULL REFERENCES tasks(id),
    annotator_id INTEGER NOT NULL REFERENCES annotators(id),
    a_on_left INTEGER NOT NULL,             -- the random order this annotator sees
    assigned_at REAL NOT NULL,
    state TEXT NOT NULL DEFAULT 'open' CHECK (state IN ('open', 'judged', 'expired')),
    PRIMARY KEY (task_id, annotator_id)
);
CREATE TABLE IF NOT EXISTS judgments (
    id INTEGER PRIMARY KEY,
    task_id TEXT NOT NULL REFERENCES tasks(id),
    annotator_id INTEGER NOT NULL REFERENCES annotators(id),
    a_on_left INTEGER,                      -- NULL when the order shown is unknown (imported labels)
    choice TEXT CHECK (choice IN ('left', 'right', 'tie', 'skip')),
    preferred TEXT CHECK (preferred IN ('a', 'b', 'tie')),
    seconds REAL,
    created_at REAL NOT NULL,
    UNIQUE (task_id, annotator_id)          -- nobody judges a task twice
);
CREATE INDEX IF NOT EXISTS judgments_by_annotator ON judgments (annotator_id);
CREATE INDEX IF NOT EXISTS assignments_by_annotator ON assignments (annotator_id, state);
CREATE INDEX IF NOT EXISTS assignments_by_state ON assignments (state, assigned_at);
"""


def test_a_schema_1_database_is_migrated_with_every_label_kept(tmp_path):
    """A database written by the previous version (schema 1) opens: it gains roles, revocation, sessions, reasons
    and undo, and keeps its tasks, annotators and judgments."""
    import sqlite3

    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as conn:
        conn.executescript(V1_SCHEMA)
        conn.execute("INSERT INTO meta VALUES ('schema_version', '1')")
        conn.execute(
            "INSERT INTO tasks (id, prompt, response_a, response_b, created_at) VALUES ('t1', 'p', 'a', 'b', 0)"
        )
        conn.execute(
            "INSERT INTO annotators (name, token_sha256, created_at) VALUES ('ann', ?, 0)", (hash_token("tok"),)
        )
        conn.execute(
            "INSERT INTO judgments (task_id, annotator_id, a_on_left, choice, preferred, seconds, created_at)"
            " VALUES ('t1', 1, 1, 'left', 'a', 2.0, 0)"
        )
    with Store(path) as store:
        (judgment,) = store.judgments()
        assert (judgment.task_id, judgment.preferred, judgment.reason) == ("t1", "a", None)
        annotator = store.annotator_by_token("tok")
        assert (annotator.name, annotator.role, annotator.revoked) == ("ann", "annotator", False)
        assert store.task("t1").meta is None
        assert store.session(store.open_session(annotator.id)).annotator.name == "ann"
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == "2"


def test_a_ranking_task_is_shown_in_a_random_order_and_stored_as_all_pairs(tmp_path):
    """K = 3 responses: the order shown is drawn and recorded, a ranking given in shown positions is stored as
    response indices, and the export holds its C(3, 2) = 3 pairs, the better response chosen in each."""
    path = tmp_path / "fb.sqlite"
    with Store(path) as store:
        task = NewTask("p", "first", "second", more=("third",))
        store.add_tasks([task])
        ann = store.add_annotator("ann")[0]
        assignment = store.next_task(ann.id, annotators_per_task=1)
        assert sorted(assignment.order) == [0, 1, 2] and assignment.shown == [
            ("first", "second", "third")[i] for i in assignment.order
        ]
        with pytest.raises(TuneoffError, match="ranks 3 responses"):
            store.record_judgment(ann.id, task.id, "left")
        with pytest.raises(TuneoffError, match="each of the 3 positions"):
            store.record_judgment(ann.id, task.id, "rank", ranking=[0, 0, 1])
        shown_best_first = [assignment.order.index(i) for i in (2, 0, 1)]  # third > first > second
        store.record_judgment(ann.id, task.id, "rank", ranking=shown_best_first)
        assert store.record_judgment(ann.id, task.id, "rank", ranking=shown_best_first)[1] is False  # idempotent
        with pytest.raises(ConflictingJudgment):
            store.record_judgment(ann.id, task.id, "rank", ranking=shown_best_first[::-1])
        (judgment,) = store.judgments()
        assert judgment.ranking == (2, 0, 1) and judgment.order_shown == assignment.order
        assert judgment.choice is None and judgment.preferred is None
        out = tmp_path / "prefs.jsonl"
        export_preferences(store, out, mode="per-annotator")
    pairs = {(r["chosen"], r["rejected"]) for r in map(json.loads, out.read_text().splitlines())}
    assert pairs == {("first", "second"), ("third", "first"), ("third", "second")}
