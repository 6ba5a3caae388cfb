"""The SQLite store behind human feedback collection: tasks, annotators, assignments, judgments.

One file, WAL mode. A judgment is committed with ``synchronous=FULL`` before the server answers, so an
acknowledged label survives a killed server and a power cut (assignments, cheap to redo, commit with
``NORMAL``: they survive a killed server, and the next judgment's fsync flushes them). Every write that
reads-then-writes runs
inside ``BEGIN IMMEDIATE``, which takes SQLite's single write lock up front; concurrent requests (threads
or processes) therefore serialise there, so two annotators can never both take the last free slot of a
task and nobody is ever given the same task twice.

Vocabulary: a *task* compares response ``a`` with response ``b`` for one prompt. An annotator sees them
in a random left/right order drawn per annotator and task (recorded as ``a_on_left``), and answers
``left`` / ``right`` / ``tie`` / ``skip``; the store keeps both that ``choice`` and what it means,
``preferred`` = ``a`` / ``b`` / ``tie`` (NULL for a skip).
"""

from __future__ import annotations

import gzip
import hashlib
import hmac
import json
import math
import os
import secrets
import sqlite3
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from tuneoff.errors import DataError, TuneoffError

CHOICES = ("left", "right", "tie", "skip")
SCHEMA_VERSION = "1"
MAX_SECONDS = 24 * 3600.0  # a client-reported time above a day is not a time taken to judge

SCHEMA = """
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


@dataclass(frozen=True)
class NewTask:
    """A comparison to queue. ``key`` (e.g. ``"pandalm:17"``) fixes the id when content may repeat."""

    prompt: str
    response_a: str
    response_b: str
    prompt_messages: list | None = None
    source_a: str | None = None
    source_b: str | None = None
    key: str | None = None

    @property
    def id(self) -> str:
        return task_id(self.prompt, self.response_a, self.response_b, key=self.key)


@dataclass(frozen=True)
class Task:
    id: str
    prompt: str
    response_a: str
    response_b: str
    prompt_messages: list | None
    source_a: str | None
    source_b: str | None
    origin: str | None


@dataclass(frozen=True)
class Annotator:
    id: int
    name: str
    can_log_in: bool


@dataclass(frozen=True)
class Assignment:
    task: Task
    a_on_left: bool
    assigned_at: float

    @property
    def left(self) -> str:
        return self.task.response_a if self.a_on_left else self.task.response_b

    @property
    def right(self) -> str:
        return self.task.response_b if self.a_on_left else self.task.response_a


@dataclass(frozen=True)
class Judgment:
    id: int
    task_id: str
    annotator: str
    a_on_left: bool | None
    choice: str | None
    preferred: str | None
    seconds: float | None
    created_at: float
    len_a: int
    len_b: int


@dataclass(frozen=True)
class Progress:
    done: int
    remaining: int


class NotAssigned(TuneoffError):
    """The annotator was never given this task (e.g. a form posted with another annotator's task id)."""


class ConflictingJudgment(TuneoffError):
    """The annotator already judged this task differently; the first judgment stands."""


def task_id(prompt: str, response_a: str, response_b: str, *, key: str | None = None) -> str:
    """A stable id: the same content (or the same source key) gives the same id in every database."""
    material = json.dumps(["key", key] if key is not None else [prompt, response_a, response_b], ensure_ascii=False)
    return hashlib.sha256(material.encode("utf-8")).hexdigest()[:16]


def hash_token(token: str) -> str:
    # Tokens are 256 random bits, so a fast unsalted hash is safe: nothing to brute-force.
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def preferred_from_choice(choice: str, a_on_left: bool) -> str | None:
    """Map what the annotator pressed to which response they preferred."""
    if choice == "left":
        return "a" if a_on_left else "b"
    if choice == "right":
        return "b" if a_on_left else "a"
    return {"tie": "tie", "skip": None}[choice]


class Store:
    """Thread-safe access to one feedback database (one SQLite connection per thread)."""

    def __init__(self, path: str | os.PathLike, *, create: bool = True):
        self.path = Path(path)
        if not create and not self.path.exists():
            raise TuneoffError(
                f"no feedback database at {self.path}: create one with `tuneoff label add --db {self.path} ...`"
            )
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        conn = self._conn()
        try:
            if conn.execute("PRAGMA journal_mode=WAL").fetchone()[0].lower() != "wal":
                raise TuneoffError(f"{self.path}: SQLite refused WAL mode (is it on a network file system?)")
            conn.executescript(SCHEMA)
            conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)", (SCHEMA_VERSION,))
            version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0]
        except sqlite3.DatabaseError as error:
            self.close()
            raise TuneoffError(f"{self.path} is not a tuneoff feedback database ({error})") from error
        if version != SCHEMA_VERSION:
            self.close()
            raise TuneoffError(f"{self.path} has feedback schema {version}; this tuneoff reads schema {SCHEMA_VERSION}")

    # -- connections -------------------------------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            try:
                conn = sqlite3.connect(self.path, timeout=60.0, isolation_level=None, check_same_thread=False)
                conn.row_factory = sqlite3.Row
                conn.execute("PRAGMA synchronous=FULL")  # an acknowledged judgment survives a power cut too
                conn.execute("PRAGMA foreign_keys=ON")
                conn.execute("PRAGMA busy_timeout=60000")
            except sqlite3.Error as error:
                raise TuneoffError(f"{self.path} is not a tuneoff feedback database ({error})") from error
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    @contextmanager
    def _write(self, *, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """A write transaction holding SQLite's write lock from its first statement (no lost races).

        ``durable``: COMMIT waits for fsync (``synchronous=FULL``), so the change survives a power cut.
        Without it (``NORMAL``) a commit still survives a killed process, and the next durable commit
        flushes it too (the WAL is written in order); assignments use it: they are cheap to redo.
        """
        conn = self._conn()
        # Threads of this process queue on a mutex: SQLite's own busy handler sleeps in growing steps
        # (up to 100 ms), which under many threads wastes time; it still arbitrates between processes.
        with self._write_lock:
            conn.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            for conn in self._all:
                conn.close()
            self._all.clear()
        self._local = threading.local()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def journal_mode(self) -> str:
        return self._conn().execute("PRAGMA journal_mode").fetchone()[0]

    # -- tasks -------------------------------------------------------------------------------------
    def add_tasks(self, tasks: Iterable[NewTask], *, now: float | None = None) -> tuple[int, int]:
        """Queue tasks; one already present (same id) is left as it is. Returns (added, already there)."""
        now = time.time() if now is None else now
        added = existing = 0
        with self._write() as db:
            for task in tasks:
                cursor = db.execute(
                    "INSERT OR IGNORE INTO tasks (id, prompt, prompt_messages, response_a, response_b, source_a,"
                    " source_b, origin, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        task.id,
                        task.prompt,
                        None if task.prompt_messages is None else json.dumps(task.prompt_messages),
                        task.response_a,
                        task.response_b,
                        task.source_a,
                        task.source_b,
                        task.key,
                        now,
                    ),
                )
                added += cursor.rowcount
                existing += 1 - cursor.rowcount
        return added, existing

    def task(self, task_id: str) -> Task | None:
        row = self._conn().execute("SELECT * FROM tasks WHERE id = ?", (task_id,)).fetchone()
        return None if row is None else _task(row)

    def tasks(self) -> list[Task]:
        return [_task(row) for row in self._conn().execute("SELECT * FROM tasks ORDER BY seq")]

    def count_tasks(self) -> int:
        return self._conn().execute("SELECT COUNT(*) FROM tasks").fetchone()[0]

    # -- annotators --------------------------------------------------------------------------------
    def add_annotator(
        self, name: str, *, with_token: bool = True, now: float | None = None
    ) -> tuple[Annotator, str | None]:
        """Create an annotator; returns it and its token (shown once: only the token's hash is kept)."""
        name = name.strip()
        if not name or len(name) > 100:
            raise TuneoffError("an annotator name must be 1 to 100 characters")
        token = secrets.token_urlsafe(32) if with_token else None
        now = time.time() if now is None else now
        with self._write() as db:
            if db.execute("SELECT 1 FROM annotators WHERE name = ?", (name,)).fetchone():
                raise TuneoffError(f"annotator '{name}' already exists in {self.path}")
            cursor = db.execute(
                "INSERT INTO annotators (name, token_sha256, created_at) VALUES (?, ?, ?)",
                (name, None if token is None else hash_token(token), now),
            )
        return Annotator(cursor.lastrowid, name, token is not None), token

    def imported_annotator(self, name: str) -> Annotator:
        """The token-less annotator that stands for an imported label column (created on first use)."""
        row = self._conn().execute("SELECT id, token_sha256 FROM annotators WHERE name = ?", (name,)).fetchone()
        if row is not None:
            return Annotator(row["id"], name, row["token_sha256"] is not None)
        return self.add_annotator(name, with_token=False)[0]

    def annotator_by_token(self, token: str | None) -> Annotator | None:
        if not token or len(token) > 512:
            return None
        digest = hash_token(token)
        row = (
            self._conn()
            .execute("SELECT id, name, token_sha256 FROM annotators WHERE token_sha256 = ?", (digest,))
            .fetchone()
        )
        # The lookup is by hash (nothing about the token leaks); the final check is constant-time anyway.
        if row is None or not hmac.compare_digest(row["token_sha256"], digest):
            return None
        return Annotator(row["id"], row["name"], True)

    def annotators(self) -> list[Annotator]:
        rows = self._conn().execute("SELECT id, name, token_sha256 FROM annotators ORDER BY id")
        return [Annotator(r["id"], r["name"], r["token_sha256"] is not None) for r in rows]

    # -- assignment --------------------------------------------------------------------------------
    def next_task(
        self, annotator_id: int, *, annotators_per_task: int, lease_seconds: float = 1800.0, now: float | None = None
    ) -> Assignment | None:
        """The annotator's open task, or a new one that still lacks annotators; None when nothing is left.

        A task takes ``annotators_per_task`` distinct annotators, counted in ``tasks.taken``: open
        assignments plus labels other than skips. An assignment left open longer than ``lease_seconds``
        expires and frees its slot; if its owner answers after all, the late label is still kept (no
        label is ever lost), so such a task may end with one label more than asked.
        """
        now = time.time() if now is None else now
        with self._write(durable=False) as db:
            self._expire(db, now - lease_seconds)
            row = db.execute(
                "SELECT task_id, a_on_left, assigned_at FROM assignments WHERE annotator_id = ? AND state = 'open'"
                " ORDER BY assigned_at LIMIT 1",
                (annotator_id,),
            ).fetchone()
            if row is not None:
                return Assignment(self.task(row["task_id"]), bool(row["a_on_left"]), row["assigned_at"])
            row = db.execute(
                f"SELECT t.id FROM tasks t WHERE {_OPEN_FOR_ME} ORDER BY t.seq LIMIT 1",
                {"me": annotator_id, "k": annotators_per_task},
            ).fetchone()
            if row is None:
                return None
            a_on_left = secrets.randbelow(2) == 1  # the order this annotator sees, drawn once and recorded
            db.execute(
                "INSERT INTO assignments (task_id, annotator_id, a_on_left, assigned_at) VALUES (?, ?, ?, ?)",
                (row["id"], annotator_id, int(a_on_left), now),
            )
            db.execute("UPDATE tasks SET taken = taken + 1 WHERE id = ?", (row["id"],))
        return Assignment(self.task(row["id"]), a_on_left, now)

    @staticmethod
    def _expire(db: sqlite3.Connection, cutoff: float) -> None:
        for row in db.execute(
            "SELECT task_id, annotator_id FROM assignments WHERE state = 'open' AND assigned_at <= ?", (cutoff,)
        ).fetchall():
            db.execute("UPDATE assignments SET state = 'expired' WHERE task_id = ? AND annotator_id = ?", tuple(row))
            db.execute("UPDATE tasks SET taken = taken - 1 WHERE id = ?", (row["task_id"],))

    def progress(self, annotator_id: int, *, annotators_per_task: int) -> Progress:
        """Done: tasks this annotator answered (skips included). Remaining: their open task + tasks open to them."""
        db = self._conn()
        done = db.execute("SELECT COUNT(*) FROM judgments WHERE annotator_id = ?", (annotator_id,)).fetchone()[0]
        mine_open = db.execute(
            "SELECT COUNT(*) FROM assignments WHERE annotator_id = ? AND state = 'open'", (annotator_id,)
        ).fetchone()[0]
        free = db.execute(
            f"SELECT COUNT(*) FROM tasks t WHERE {_OPEN_FOR_ME}", {"me": annotator_id, "k": annotators_per_task}
        ).fetchone()[0]
        return Progress(done, mine_open + free)

    # -- judgments ---------------------------------------------------------------------------------
    def record_judgment(
        self, annotator_id: int, task_id: str, choice: str, *, seconds: float | None = None, now: float | None = None
    ) -> tuple[int, bool]:
        """Store a judgment on an assigned task; returns (judgment id, newly created).

        Idempotent per annotator and task: repeating the same choice returns the stored judgment; a
        different choice raises :class:`ConflictingJudgment`. ``seconds`` is the client's measure of the
        time taken (display to answer); without a plausible one, the time since assignment is kept.
        """
        if choice not in CHOICES:
            raise TuneoffError(f"choice must be one of {', '.join(CHOICES)}; got {choice!r}")
        now = time.time() if now is None else now
        with self._write() as db:
            row = db.execute(
                "SELECT id, choice FROM judgments WHERE task_id = ? AND annotator_id = ?", (task_id, annotator_id)
            ).fetchone()
            if row is not None:
                if row["choice"] != choice:
                    raise ConflictingJudgment(f"task {task_id} was already judged '{row['choice']}' by this annotator")
                return row["id"], False
            assigned = db.execute(
                "SELECT a_on_left, assigned_at, state FROM assignments WHERE task_id = ? AND annotator_id = ?",
                (task_id, annotator_id),
            ).fetchone()
            if assigned is None:
                raise NotAssigned(f"task {task_id!r} is not assigned to this annotator")
            # The slot counter: an open slot becomes a label (a skip gives it back); a late label retakes one.
            change = {("open", True): -1, ("expired", False): 1}.get((assigned["state"], choice == "skip"), 0)
            db.execute(
                "UPDATE assignments SET state = 'judged' WHERE task_id = ? AND annotator_id = ?",
                (task_id, annotator_id),
            )
            db.execute("UPDATE tasks SET taken = taken + ? WHERE id = ?", (change, task_id))
            if not _plausible_seconds(seconds):
                seconds = max(0.0, now - assigned["assigned_at"])
            a_on_left = bool(assigned["a_on_left"])
            cursor = db.execute(
                "INSERT INTO judgments (task_id, annotator_id, a_on_left, choice, preferred, seconds, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    task_id,
                    annotator_id,
                    int(a_on_left),
                    choice,
                    preferred_from_choice(choice, a_on_left),
                    float(seconds),
                    now,
                ),
            )
        return cursor.lastrowid, True

    def import_judgments(self, rows: Iterable[tuple[int, str, str]], *, now: float | None = None) -> tuple[int, int]:
        """Store labels from a file: (annotator id, task id, preferred a/b/tie); the order shown is unknown.

        A label already present for that annotator and task is kept. Returns (added, already there).
        """
        now = time.time() if now is None else now
        added = existing = 0
        with self._write() as db:
            for annotator_id, task_id_, preferred in rows:
                if preferred not in ("a", "b", "tie"):
                    raise TuneoffError(f"imported label must be a, b or tie; got {preferred!r}")
                cursor = db.execute(
                    "INSERT OR IGNORE INTO judgments (task_id, annotator_id, a_on_left, choice, preferred, seconds, "
                    "created_at)"
                    " VALUES (?, ?, NULL, NULL, ?, NULL, ?)",
                    (task_id_, annotator_id, preferred, now),
                )
                db.execute("UPDATE tasks SET taken = taken + ? WHERE id = ?", (cursor.rowcount, task_id_))
                added += cursor.rowcount
                existing += 1 - cursor.rowcount
        return added, existing

    def judgments(self) -> list[Judgment]:
        """Every judgment with its annotator's name and the two responses' lengths, in the order stored."""
        rows = self._conn().execute(
            "SELECT j.*, a.name, length(t.response_a) AS len_a, length(t.response_b) AS len_b FROM judgments j"
            " JOIN annotators a ON a.id = j.annotator_id JOIN tasks t ON t.id = j.task_id ORDER BY j.id"
        )
        return [
            Judgment(
                r["id"],
                r["task_id"],
                r["name"],
                None if r["a_on_left"] is None else bool(r["a_on_left"]),
                r["choice"],
                r["preferred"],
                r["seconds"],
                r["created_at"],
                r["len_a"],
                r["len_b"],
            )
            for r in rows
        ]


# A task is open to annotator :me when fewer than :k annotators are on it and :me is not among them.
_OPEN_FOR_ME = """
    t.taken < :k
    AND NOT EXISTS (SELECT 1 FROM assignments s WHERE s.task_id = t.id AND s.annotator_id = :me)
    AND NOT EXISTS (SELECT 1 FROM judgments j WHERE j.task_id = t.id AND j.annotator_id = :me)
"""


def _plausible_seconds(seconds) -> bool:
    return isinstance(seconds, (int, float)) and math.isfinite(seconds) and 0 <= seconds <= MAX_SECONDS


def _task(row: sqlite3.Row) -> Task:
    messages = None if row["prompt_messages"] is None else json.loads(row["prompt_messages"])
    return Task(
        row["id"],
        row["prompt"],
        row["response_a"],
        row["response_b"],
        messages,
        row["source_a"],
        row["source_b"],
        row["origin"],
    )


# -- building the queue from files -----------------------------------------------------------------
RESPONSE_FIELDS = ("completion", "response", "output", "generation", "text")


def read_json_records(path: str | os.PathLike) -> list[tuple[int, dict]]:
    """(line number, record) for a JSONL file, or (index + 1, record) for a JSON list; ``.gz`` allowed."""
    path = Path(path)
    if not path.exists():
        raise DataError(str(path), None, None, "file not found")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(str(path), None, None, f"cannot read: {error}") from error
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            records = list(enumerate(json.loads(text), start=1))
        except json.JSONDecodeError as error:
            raise DataError(str(path), error.lineno, None, f"invalid JSON: {error.msg}") from error
    else:
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append((number, json.loads(line)))
            except json.JSONDecodeError as error:
                raise DataError(str(path), number, None, f"invalid JSON: {error.msg}") from error
    for number, record in records:
        if not isinstance(record, dict):
            raise DataError(str(path), number, None, f"expected a JSON object, got {type(record).__name__}")
    return records


def render_messages(messages: Sequence[dict]) -> str:
    """A conversation as annotators read it: one 'role: content' block per message."""
    return "\n\n".join(f"{m.get('role', '?')}: {m.get('content', '')}" for m in messages)


def load_prompt_texts(path: str | os.PathLike) -> list[tuple[str, list | None]]:
    """(display text, messages or None) per prompt of a prompts file ({"prompt"} or {"messages"})."""
    try:
        from tuneoff.data.formats import load_prompts  # the project's reader, where it exists
    except ImportError:
        load_prompts = None
    if load_prompts is not None:
        prompts = load_prompts(path)
        return [
            (p.prompt, None)
            if p.prompt is not None
            else (render_messages(_as_dicts(p.messages)), _as_dicts(p.messages))
            for p in prompts
        ]
    out = []
    for number, record in read_json_records(path):
        prompt, messages = _prompt_of(record, path, number)
        if prompt is None:
            raise DataError(str(path), number, "prompt", "expected a non-empty string 'prompt' or a 'messages' list")
        out.append((prompt, messages))
    return out


def _as_dicts(messages) -> list[dict]:
    return [m if isinstance(m, dict) else {"role": m.role, "content": m.content} for m in messages]


def _prompt_of(record: dict, path, number) -> tuple[str | None, list | None]:
    if isinstance(record.get("prompt"), str) and record["prompt"]:
        return record["prompt"], None
    messages = record.get("messages", record.get("prompt"))
    if isinstance(messages, list) and messages:
        if not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
            raise DataError(str(path), number, "messages", "expected a list of {role, content} objects")
        return render_messages(messages), messages
    return None, None


def read_generations(path: str | os.PathLike) -> list[tuple[str | None, str]]:
    """(prompt or None, response) per line of a generation file: {"prompt"?, "completion"|"response"|"output"|...}."""
    out = []
    for number, record in read_json_records(path):
        field = next((f for f in RESPONSE_FIELDS if f in record), None)
        if field is None or not isinstance(record[field], str):
            raise DataError(
                str(path), number, field or "completion", f"expected a string in one of {', '.join(RESPONSE_FIELDS)}"
            )
        out.append((_prompt_of(record, path, number)[0], record[field]))
    return out


def tasks_from_generations(prompts_path, responses_a, responses_b) -> list[NewTask]:
    """Pair line i of two generation files; prompts come from the prompts file (line i) or the files themselves."""
    gen_a, gen_b = read_generations(responses_a), read_generations(responses_b)
    if len(gen_a) != len(gen_b):
        raise DataError(str(responses_b), None, None, f"has {len(gen_b)} responses but {responses_a} has {len(gen_a)}")
    if prompts_path is not None:
        prompts = load_prompt_texts(prompts_path)
        if len(prompts) != len(gen_a):
            raise DataError(
                str(responses_a), None, None, f"has {len(gen_a)} responses for {len(prompts)} prompts in {prompts_path}"
            )
    else:
        prompts = [(p, None) for p, _ in gen_a]
    tasks = []
    for i, ((prompt, messages), (pa, ra), (pb, rb)) in enumerate(zip(prompts, gen_a, gen_b)):
        for path, own in ((responses_a, pa), (responses_b, pb)):
            if own is None and prompts_path is None:
                raise DataError(str(path), f"record {i + 1}", "prompt", "expected a prompt (or pass --prompts)")
            if own is not None and own != prompt:
                raise DataError(str(path), f"record {i + 1}", "prompt", "does not match the prompt it is paired with")
        tasks.append(
            NewTask(prompt, ra, rb, messages, source_a=Path(responses_a).name, source_b=Path(responses_b).name)
        )
    return tasks


def read_pandalm(path: str | os.PathLike) -> list[tuple[NewTask, list[str]]]:
    """PandaLM's human test set: each pair with its three labels (0 tie, 1 first better, 2 second better).

    Returns (task, [label per annotator as a/b/tie]). Six records hold JSON ``true`` for a response
    (the text "True" read by a YAML-minded tool); they are kept as the string "True".
    """
    out = []
    labels = {0: "tie", 1: "a", 2: "b"}
    for number, record in read_json_records(path):
        try:
            prompt = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
            responses = [
                r if isinstance(r, str) else json.dumps(r).capitalize() if isinstance(r, bool) else str(r)
                for r in (record["response1"], record["response2"])
            ]
            votes = [labels[record[f"annotator{k}"]] for k in (1, 2, 3)]
        except (KeyError, TypeError) as error:
            raise DataError(str(path), number, str(error).strip("'"), "expected a PandaLM record") from error
        models = str(record.get("cmp_key", "_")).split("_", 1) + [None]
        task = NewTask(
            prompt,
            responses[0],
            responses[1],
            source_a=models[0],
            source_b=models[1],
            key=f"pandalm:{record.get('idx', number - 1)}",
        )
        out.append((task, votes))
    return out


def import_pandalm(store: Store, path: str | os.PathLike) -> dict:
    records = read_pandalm(path)
    added, existing = store.add_tasks(task for task, _ in records)
    annotators = [store.imported_annotator(f"pandalm-annotator{k}") for k in (1, 2, 3)]
    labels = [(annotators[k].id, task.id, votes[k]) for task, votes in records for k in range(3)]
    labels_added, labels_existing = store.import_judgments(labels)
    return {
        "tasks_added": added,
        "tasks_existing": existing,
        "labels_added": labels_added,
        "labels_existing": labels_existing,
    }


def import_preferences(store: Store, path: str | os.PathLike, *, as_annotator: str | None = None) -> dict:
    """Queue the pairs of a preference file ({"prompt","chosen","rejected"}), chosen placed as a or b by
    a hash of the pair (so a is not always the winner); ``as_annotator`` also keeps the file's labels."""
    tasks, labels = [], []
    for number, record in read_json_records(path):
        prompt, messages = _prompt_of(record, path, number)
        if prompt is None:
            raise DataError(str(path), number, "prompt", "expected a non-empty string or a messages list")
        texts = []
        for field in ("chosen", "rejected"):
            value = record.get(field)
            if isinstance(value, list) and value and isinstance(value[-1], dict):
                value = value[-1].get("content")
            if not isinstance(value, str):
                raise DataError(str(path), number, field, "expected a string (or a messages list)")
            texts.append(value)
        chosen_is_a = hashlib.sha256(json.dumps([prompt, *texts]).encode()).digest()[0] % 2 == 0
        a, b = texts if chosen_is_a else texts[::-1]
        tasks.append(NewTask(prompt, a, b, messages, source_a=Path(path).name, source_b=Path(path).name))
        labels.append("a" if chosen_is_a else "b")
    added, existing = store.add_tasks(tasks)
    counts = {"tasks_added": added, "tasks_existing": existing}
    if as_annotator:
        annotator = store.imported_annotator(as_annotator)
        counts["labels_added"], counts["labels_existing"] = store.import_judgments(
            (annotator.id, task.id, label) for task, label in zip(tasks, labels)
        )
    return counts


# -- export ----------------------------------------------------------------------------------------
EXPORT_MODES = ("majority", "per-annotator")
TIE_POLICIES = ("drop", "keep")


def export_preferences(
    store: Store, out: str | os.PathLike, *, mode: str = "majority", ties: str = "drop", min_annotators: int = 1
) -> dict:
    """Write the preference JSONL the reward model reads ({"prompt","chosen","rejected"} + provenance).

    ``majority``: one record per task, the strict plurality of its labels (skips ignored); tasks with
    no strict majority or fewer than ``min_annotators`` labels, or an empty response, are left out.
    ``per-annotator``: one record
    per label, with ``annotator``. A tie is dropped, or kept with ``"tie": true`` (chosen = a, rejected = b:
    a reader must honour the flag). The file is written whole or not at all. Returns counts.
    """
    from tuneoff.feedback.agreement import majority

    if mode not in EXPORT_MODES or ties not in TIE_POLICIES:
        raise TuneoffError(f"export mode must be one of {EXPORT_MODES} and ties one of {TIE_POLICIES}")
    tasks = {task.id: task for task in store.tasks()}
    by_task: dict[str, list[Judgment]] = {}
    for judgment in store.judgments():
        if judgment.preferred is not None:
            by_task.setdefault(judgment.task_id, []).append(judgment)
    counts = {"records": 0, "ties_dropped": 0, "no_majority": 0, "too_few_annotators": 0, "empty_response": 0}
    records = []
    for task_id_, judged in by_task.items():
        if mode == "per-annotator":
            groups = [(j.preferred, [j.annotator], {"annotator": j.annotator}) for j in judged]
        elif len(judged) < min_annotators:
            counts["too_few_annotators"] += 1
            continue
        else:
            votes = {label: sum(j.preferred == label for j in judged) for label in ("a", "b", "tie")}
            label = majority([j.preferred for j in judged])
            if label is None:
                counts["no_majority"] += 1
                continue
            groups = [(label, [j.annotator for j in judged], {"votes": votes})]
        for label, names, extra in groups:
            if label == "tie" and ties == "drop":
                counts["ties_dropped"] += 1
                continue
            if not tasks[task_id_].response_a.strip() or not tasks[task_id_].response_b.strip():
                counts["empty_response"] += 1  # preference readers refuse empty text; nothing to learn from
                continue
            records.append(_preference_record(tasks[task_id_], label, names, extra))
    counts["records"] = len(records)
    _write_jsonl_atomically(out, records)
    return counts


def _preference_record(task: Task, label: str, annotators: list[str], extra: dict) -> dict:
    chosen, rejected = (task.response_b, task.response_a) if label == "b" else (task.response_a, task.response_b)
    if task.prompt_messages is not None:  # the conversational form of the same record (TRL's)
        record = {
            "prompt": task.prompt_messages,
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
        }
    else:
        record = {"prompt": task.prompt, "chosen": chosen, "rejected": rejected}
    record.update(task_id=task.id, annotators=annotators, tie=label == "tie", **extra)
    return record


def _write_jsonl_atomically(out: str | os.PathLike, records: Iterable[dict]) -> None:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=out.parent, prefix=f".{out.name}.", delete=False)
    try:
        with handle:
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        os.replace(handle.name, out)
    except BaseException:
        os.unlink(handle.name)
        raise
