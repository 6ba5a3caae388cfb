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
``preferred`` = ``a`` / ``b`` / ``tie`` (NULL for a skip). A *ranking task* has K > 2 responses (``more``
beyond a and b), shown in a random order drawn per annotator (``order_shown``), and is ranked whole
(``ranking``: response indices, best first) or skipped.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import hmac
import itertools
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
SCHEMA_VERSION = "2"
ROLES = ("annotator", "lead")
SESSION_IDLE_SECONDS = 12 * 3600.0  # a page session unused this long has ended
SESSION_MAX_SECONDS = 7 * 24 * 3600.0  # and none lives longer than this
MAX_REASON = 2000  # characters of an annotator's free-text reason
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
    meta TEXT,                              -- JSON: where the task comes from (an experiment's arms, seed, prompt)
    more TEXT,                              -- JSON [response c, d, ...]: a ranking task of K > 2 responses
    created_at REAL NOT NULL,
    taken INTEGER NOT NULL DEFAULT 0        -- open assignments + labels other than skips (see next_task)
);
CREATE TABLE IF NOT EXISTS annotators (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    token_sha256 TEXT UNIQUE,               -- NULL for imported (or revoked) annotators, who cannot log in
    created_at REAL NOT NULL,
    role TEXT NOT NULL DEFAULT 'annotator' CHECK (role IN ('annotator', 'lead')),  -- a lead also sees /admin
    revoked_at REAL                         -- set by `annotators revoke`: the token and every session end
);
CREATE TABLE IF NOT EXISTS sessions (       -- the page's logins: the cookie holds the session id, never the token
    id_sha256 TEXT PRIMARY KEY,
    annotator_id INTEGER NOT NULL REFERENCES annotators(id),
    csrf TEXT NOT NULL,                     -- the token every form of this session carries
    created_at REAL NOT NULL,
    last_seen REAL NOT NULL,
    ended_at REAL                           -- logout, revoke or rotate
);
CREATE TABLE IF NOT EXISTS undone (         -- judgments their annotator took back: kept, never deleted
    judgment_id INTEGER NOT NULL,
    task_id TEXT NOT NULL,
    annotator_id INTEGER NOT NULL,
    a_on_left INTEGER,
    choice TEXT,
    preferred TEXT,
    seconds REAL,
    reason TEXT,
    ranking TEXT,
    order_shown TEXT,
    created_at REAL NOT NULL,
    undone_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS assignments (
    task_id TEXT NOT NULL REFERENCES tasks(id),
    annotator_id INTEGER NOT NULL REFERENCES annotators(id),
    a_on_left INTEGER NOT NULL,             -- the random order this annotator sees
    order_shown TEXT,                       -- a ranking task: JSON response indices in the order shown
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
    reason TEXT,                            -- the annotator's optional free-text reason
    ranking TEXT,                           -- a ranking task: JSON response indices, best first (choice NULL)
    order_shown TEXT,                       -- and the order they were shown in
    UNIQUE (task_id, annotator_id)          -- nobody judges a task twice
);
CREATE INDEX IF NOT EXISTS judgments_by_annotator ON judgments (annotator_id);
CREATE INDEX IF NOT EXISTS assignments_by_annotator ON assignments (annotator_id, state);
CREATE INDEX IF NOT EXISTS assignments_by_state ON assignments (state, assigned_at);
CREATE INDEX IF NOT EXISTS sessions_by_annotator ON sessions (annotator_id);
"""

MIGRATIONS = {
    "1": [  # schema 1 -> 2: roles, revocation, server-side sessions, reasons, undo, task metadata
        "ALTER TABLE tasks ADD COLUMN meta TEXT",
        "ALTER TABLE annotators ADD COLUMN role TEXT NOT NULL DEFAULT 'annotator'",
        "ALTER TABLE annotators ADD COLUMN revoked_at REAL",
        "ALTER TABLE judgments ADD COLUMN reason TEXT",
        "ALTER TABLE tasks ADD COLUMN more TEXT",
        "ALTER TABLE assignments ADD COLUMN order_shown TEXT",
        "ALTER TABLE judgments ADD COLUMN ranking TEXT",
        "ALTER TABLE judgments ADD COLUMN order_shown TEXT",
    ],
}


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
    meta: dict | None = None
    more: tuple[str, ...] = ()
    """Responses beyond a and b: a ranking task of K = 2 + len(more) responses, ranked whole by each annotator."""

    @property
    def id(self) -> str:
        return task_id(self.prompt, self.response_a, self.response_b, key=self.key, more=self.more)


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
    meta: dict | None = None
    more: tuple[str, ...] = ()

    @property
    def responses(self) -> tuple[str, ...]:
        """Every response: a, b, then the ranking task's others."""
        return (self.response_a, self.response_b, *self.more)


@dataclass(frozen=True)
class Annotator:
    id: int
    name: str
    can_log_in: bool
    role: str = "annotator"
    revoked: bool = False


@dataclass(frozen=True)
class Session:
    annotator: Annotator
    csrf: str


@dataclass(frozen=True)
class Assignment:
    task: Task
    a_on_left: bool
    assigned_at: float
    order: tuple[int, ...] | None = None
    """A ranking task: the response indices in the order this annotator sees them."""

    @property
    def shown(self) -> list[str]:
        """A ranking task's responses in the order shown."""
        return [self.task.responses[i] for i in self.order or ()]

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
    reason: str | None = None
    ranking: tuple[int, ...] | None = None
    """A ranking task: response indices, best first (``choice`` and ``preferred`` are None)."""
    order_shown: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Progress:
    done: int
    remaining: int


class NotAssigned(TuneoffError):
    """The annotator was never given this task (e.g. a form posted with another annotator's task id)."""


class ConflictingJudgment(TuneoffError):
    """The annotator already judged this task differently; the first judgment stands."""


class NothingToUndo(TuneoffError):
    """The annotator has no judgment to take back."""


def shorten(value, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters: what error messages echo of a client's input."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def task_id(prompt: str, response_a: str, response_b: str, *, key: str | None = None, more: Sequence[str] = ()) -> str:
    """A stable id: the same content (or the same source key) gives the same id in every database."""
    content = [prompt, response_a, response_b, *more]
    material = json.dumps(["key", key] if key is not None else content, ensure_ascii=False)
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
            conn.executescript(SCHEMA.split("CREATE TABLE IF NOT EXISTS tasks")[0])  # meta first: the version
            known = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if known is not None and known[0] in MIGRATIONS:
                self._migrate(conn, known[0])
            conn.executescript(SCHEMA)
            conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)", (SCHEMA_VERSION,))
            version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0]
        except sqlite3.DatabaseError as error:
            self.close()
            raise TuneoffError(f"{self.path} is not a tuneoff feedback database ({error})") from error
        if version != SCHEMA_VERSION:
            self.close()
            raise TuneoffError(f"{self.path} has feedback schema {version}; this tuneoff reads schema {SCHEMA_VERSION}")

    @staticmethod
    def _migrate(conn: sqlite3.Connection, version: str) -> None:
        """Bring a database of an older schema up to this one, in one transaction (nothing is lost)."""
        conn.execute("BEGIN IMMEDIATE")
        try:  # another process may have migrated between our read and the write lock: read again under it
            version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0]
            while version in MIGRATIONS:
                for statement in MIGRATIONS[version]:
                    conn.execute(statement)
                version = str(int(version) + 1)
            conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (version,))
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

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
                    " source_b, origin, meta, more, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        task.id,
                        task.prompt,
                        None if task.prompt_messages is None else json.dumps(task.prompt_messages),
                        task.response_a,
                        task.response_b,
                        task.source_a,
                        task.source_b,
                        task.key,
                        None if task.meta is None else json.dumps(task.meta, sort_keys=True),
                        json.dumps(list(task.more)) if task.more else None,
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
        self, name: str, *, with_token: bool = True, role: str = "annotator", now: float | None = None
    ) -> tuple[Annotator, str | None]:
        """Create an annotator (a ``lead`` also sees the admin page); returns it and its token (shown once: only
        the token's hash is kept)."""
        name = name.strip()
        if not name or len(name) > 100:
            raise TuneoffError("an annotator name must be 1 to 100 characters")
        if role not in ROLES:
            raise TuneoffError(f"role must be one of {', '.join(ROLES)}; got {shorten(role)}")
        token = secrets.token_urlsafe(32) if with_token else None
        now = time.time() if now is None else now
        with self._write() as db:
            if db.execute("SELECT 1 FROM annotators WHERE name = ?", (name,)).fetchone():
                raise TuneoffError(f"annotator '{name}' already exists in {self.path}")
            cursor = db.execute(
                "INSERT INTO annotators (name, token_sha256, created_at, role) VALUES (?, ?, ?, ?)",
                (name, None if token is None else hash_token(token), now, role),
            )
        return Annotator(cursor.lastrowid, name, token is not None, role), token

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
        row = self._conn().execute("SELECT * FROM annotators WHERE token_sha256 = ?", (digest,)).fetchone()
        # The lookup is by hash (nothing about the token leaks); the final check is constant-time anyway.
        if row is None or not hmac.compare_digest(row["token_sha256"], digest):
            return None
        return _annotator(row)

    def annotators(self) -> list[Annotator]:
        return [_annotator(r) for r in self._conn().execute("SELECT * FROM annotators ORDER BY id")]

    def annotator_named(self, name: str) -> Annotator:
        row = self._conn().execute("SELECT * FROM annotators WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise TuneoffError(f"no annotator named {shorten(name)} in {self.path}")
        return _annotator(row)

    def revoke(self, name: str, *, now: float | None = None) -> Annotator:
        """End an annotator's access: the token stops working and every session ends; their labels stay."""
        now = time.time() if now is None else now
        annotator = self.annotator_named(name)
        with self._write() as db:
            db.execute("UPDATE annotators SET token_sha256 = NULL, revoked_at = ? WHERE id = ?", (now, annotator.id))
            db.execute(
                "UPDATE sessions SET ended_at = ? WHERE annotator_id = ? AND ended_at IS NULL", (now, annotator.id)
            )
        return self.annotator_named(name)

    def rotate(self, name: str, *, now: float | None = None) -> str:
        """A new token for an annotator (returned once); the old one stops working and every session ends. A
        revoked annotator gets access back this way."""
        now = time.time() if now is None else now
        annotator = self.annotator_named(name)
        token = secrets.token_urlsafe(32)
        with self._write() as db:
            db.execute(
                "UPDATE annotators SET token_sha256 = ?, revoked_at = NULL WHERE id = ?",
                (hash_token(token), annotator.id),
            )
            db.execute(
                "UPDATE sessions SET ended_at = ? WHERE annotator_id = ? AND ended_at IS NULL", (now, annotator.id)
            )
        return token

    # -- sessions (the page) -------------------------------------------------------------------------
    def open_session(self, annotator_id: int, *, token: str | None = None, now: float | None = None) -> str | None:
        """A new page session for the annotator; returns its id (the cookie's value; only its hash is kept). With
        ``token``, only if that is still the annotator's token, checked in the same transaction (a login racing a
        rotate or revoke opens nothing): None otherwise."""
        now = time.time() if now is None else now
        session_id = secrets.token_urlsafe(32)
        with self._write() as db:
            if token is not None:
                row = db.execute("SELECT token_sha256 FROM annotators WHERE id = ?", (annotator_id,)).fetchone()
                if (
                    row is None
                    or row["token_sha256"] is None
                    or not hmac.compare_digest(row["token_sha256"], hash_token(token))
                ):
                    return None
            db.execute(
                "INSERT INTO sessions (id_sha256, annotator_id, csrf, created_at, last_seen) VALUES (?, ?, ?, ?, ?)",
                (hash_token(session_id), annotator_id, secrets.token_urlsafe(32), now, now),
            )
        return session_id

    def session(self, session_id: str | None, *, now: float | None = None) -> Session | None:
        """The live session behind a cookie value: not ended, not idle past SESSION_IDLE_SECONDS nor older than
        SESSION_MAX_SECONDS, its annotator not revoked. Marks it seen (at most once a minute)."""
        if not session_id or len(session_id) > 512:
            return None
        now = time.time() if now is None else now
        digest = hash_token(session_id)
        row = (
            self._conn()
            .execute(
                "SELECT s.csrf, s.created_at, s.last_seen, s.ended_at, a.* FROM sessions s"
                " JOIN annotators a ON a.id = s.annotator_id WHERE s.id_sha256 = ?",
                (digest,),
            )
            .fetchone()
        )
        if row is None or row["ended_at"] is not None or row["token_sha256"] is None:
            return None
        if now - row["last_seen"] > SESSION_IDLE_SECONDS or now - row["created_at"] > SESSION_MAX_SECONDS:
            return None
        if now - row["last_seen"] > 60:
            with self._write(durable=False) as db:
                db.execute("UPDATE sessions SET last_seen = ? WHERE id_sha256 = ?", (now, digest))
        return Session(_annotator(row), row["csrf"])

    def end_session(self, session_id: str | None, *, now: float | None = None) -> None:
        """Log out: the session id stops working at once."""
        if not session_id or len(session_id) > 512:
            return
        with self._write() as db:
            db.execute(
                "UPDATE sessions SET ended_at = ? WHERE id_sha256 = ? AND ended_at IS NULL",
                (time.time() if now is None else now, hash_token(session_id)),
            )

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
                "SELECT task_id, a_on_left, order_shown, assigned_at FROM assignments WHERE annotator_id = ?"
                " AND state = 'open' ORDER BY assigned_at LIMIT 1",
                (annotator_id,),
            ).fetchone()
            if row is not None:
                order = None if row["order_shown"] is None else tuple(json.loads(row["order_shown"]))
                return Assignment(self.task(row["task_id"]), bool(row["a_on_left"]), row["assigned_at"], order)
            row = db.execute(
                f"SELECT t.id FROM tasks t WHERE {_OPEN_FOR_ME} ORDER BY t.seq LIMIT 1",
                {"me": annotator_id, "k": annotators_per_task},
            ).fetchone()
            if row is None:
                return None
            task = self.task(row["id"])
            a_on_left = secrets.randbelow(2) == 1  # the order this annotator sees, drawn once and recorded
            order = None
            if task.more:  # a ranking task: a random order of all K responses
                order = list(range(len(task.responses)))
                secrets.SystemRandom().shuffle(order)
                order, a_on_left = tuple(order), order.index(0) < order.index(1)
            db.execute(
                "INSERT INTO assignments (task_id, annotator_id, a_on_left, order_shown, assigned_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (row["id"], annotator_id, int(a_on_left), None if order is None else json.dumps(order), now),
            )
            db.execute("UPDATE tasks SET taken = taken + 1 WHERE id = ?", (row["id"],))
        return Assignment(task, a_on_left, now, order)

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
        self,
        annotator_id: int,
        task_id: str,
        choice: str,
        *,
        ranking: Sequence[int] | None = None,
        seconds: float | None = None,
        reason: str | None = None,
        now: float | None = None,
    ) -> tuple[int, bool]:
        """Store a judgment on an assigned task; returns (judgment id, newly created).

        A pair is judged left, right, tie or skip; a ranking task (K > 2 responses) is skipped or ranked:
        ``choice="rank"`` with ``ranking``, the positions in the order shown (0 = first shown), best first; it is
        stored as response indices with the order shown. Idempotent per annotator and task: repeating the same
        answer returns the stored judgment; a different one raises :class:`ConflictingJudgment`. ``seconds`` is
        the client's measure of the time taken (display to answer); without a plausible one, the time since
        assignment is kept.
        """
        if choice not in (*CHOICES, "rank"):
            raise TuneoffError(f"choice must be one of {', '.join(CHOICES)} or rank; got {shorten(choice)}")
        if (choice == "rank") != (ranking is not None):
            raise TuneoffError("a ranking goes with choice 'rank', and choice 'rank' needs a ranking")
        reason = (reason or "").strip() or None
        if reason is not None and len(reason) > MAX_REASON:
            raise TuneoffError(f"a reason must be at most {MAX_REASON} characters; got {len(reason)}")
        now = time.time() if now is None else now
        with self._write() as db:
            assigned = db.execute(
                "SELECT a_on_left, order_shown, assigned_at, state FROM assignments WHERE task_id = ?"
                " AND annotator_id = ?",
                (task_id, annotator_id),
            ).fetchone()
            if assigned is None:
                raise NotAssigned(f"task {shorten(task_id)} is not assigned to this annotator")
            order = None if assigned["order_shown"] is None else json.loads(assigned["order_shown"])
            ranked = None
            if order is None and choice == "rank":
                raise TuneoffError(f"task {shorten(task_id)} compares two responses: choose left, right or tie")
            if order is not None and choice in ("left", "right", "tie"):
                raise TuneoffError(f"task {shorten(task_id)} ranks {len(order)} responses: send a ranking or skip")
            if choice == "rank":
                positions = list(ranking)
                if sorted(positions) != list(range(len(order))) or not all(type(p) is int for p in positions):
                    raise TuneoffError(
                        f"a ranking must list each of the {len(order)} positions shown (0 to {len(order) - 1}) once"
                    )
                ranked = json.dumps([order[p] for p in positions])
            row = db.execute(
                "SELECT id, choice, ranking FROM judgments WHERE task_id = ? AND annotator_id = ?",
                (task_id, annotator_id),
            ).fetchone()
            if row is not None:
                stored = "rank" if row["ranking"] is not None else row["choice"]
                if stored != choice or row["ranking"] != ranked:
                    raise ConflictingJudgment(
                        f"task {shorten(task_id)} was already judged '{stored}' by this annotator"
                    )
                return row["id"], False
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
                "INSERT INTO judgments (task_id, annotator_id, a_on_left, choice, preferred, seconds, created_at,"
                " reason, ranking, order_shown) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    task_id,
                    annotator_id,
                    int(a_on_left),
                    None if choice == "rank" else choice,
                    None if choice == "rank" else preferred_from_choice(choice, a_on_left),
                    float(seconds),
                    now,
                    reason,
                    ranked,
                    assigned["order_shown"],
                ),
            )
        return cursor.lastrowid, True

    def undo_last(self, annotator_id: int, *, now: float | None = None) -> str:
        """Take back the annotator's latest judgment made on this page (not an imported label): it moves to the
        ``undone`` table (kept, never deleted) and the task is theirs again, shown in the same order, first in
        their queue. Returns the task id."""
        now = time.time() if now is None else now
        with self._write() as db:
            row = db.execute(
                "SELECT * FROM judgments WHERE annotator_id = ? AND a_on_left IS NOT NULL ORDER BY id DESC LIMIT 1",
                (annotator_id,),
            ).fetchone()
            if row is None:
                raise NothingToUndo("there is no judgment of yours to undo")
            db.execute(
                "INSERT INTO undone (judgment_id, task_id, annotator_id, a_on_left, choice, preferred, seconds, reason,"
                " ranking, order_shown, created_at, undone_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    row["id"],
                    row["task_id"],
                    annotator_id,
                    row["a_on_left"],
                    row["choice"],
                    row["preferred"],
                    row["seconds"],
                    row["reason"],
                    row["ranking"],
                    row["order_shown"],
                    row["created_at"],
                    now,
                ),
            )
            db.execute("DELETE FROM judgments WHERE id = ?", (row["id"],))
            # The slot: a label (not a skip) already holds one, which the reopened assignment now holds; a skip
            # gave its slot back, so the reopened assignment takes one again.
            # First in their queue: just before the task the page went on to (open assignments go oldest first).
            earliest = db.execute(
                "SELECT MIN(assigned_at) FROM assignments WHERE annotator_id = ? AND state = 'open'", (annotator_id,)
            ).fetchone()[0]
            db.execute(
                "UPDATE assignments SET state = 'open', assigned_at = ? WHERE task_id = ? AND annotator_id = ?",
                (now if earliest is None else min(now, earliest - 1e-3), row["task_id"], annotator_id),
            )
            db.execute(
                "UPDATE tasks SET taken = taken + ? WHERE id = ?", (int(row["choice"] == "skip"), row["task_id"])
            )
        return row["task_id"]

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
                r["reason"],
                None if r["ranking"] is None else tuple(json.loads(r["ranking"])),
                None if r["order_shown"] is None else tuple(json.loads(r["order_shown"])),
            )
            for r in rows
        ]

    def undone(self) -> list[dict]:
        """The judgments their annotators took back, oldest first."""
        return [dict(r) for r in self._conn().execute("SELECT * FROM undone ORDER BY undone_at, judgment_id")]


# A task is open to annotator :me when fewer than :k annotators are on it and :me is not among them.
_OPEN_FOR_ME = """
    t.taken < :k
    AND NOT EXISTS (SELECT 1 FROM assignments s WHERE s.task_id = t.id AND s.annotator_id = :me)
    AND NOT EXISTS (SELECT 1 FROM judgments j WHERE j.task_id = t.id AND j.annotator_id = :me)
"""


def _plausible_seconds(seconds) -> bool:
    return isinstance(seconds, (int, float)) and math.isfinite(seconds) and 0 <= seconds <= MAX_SECONDS


def _annotator(row: sqlite3.Row) -> Annotator:
    return Annotator(
        row["id"], row["name"], row["token_sha256"] is not None, row["role"], row["revoked_at"] is not None
    )


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
        None if row["meta"] is None else json.loads(row["meta"]),
        tuple(json.loads(row["more"])) if row["more"] else (),
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
    return tasks_from_generation_files(prompts_path, [responses_a, responses_b])


def tasks_from_generation_files(prompts_path, paths: Sequence) -> list[NewTask]:
    """Line i of K ≥ 2 generation files answers prompt i (from the prompts file, or the files themselves): a pair
    task for K = 2, a ranking task of K responses for K > 2."""
    if len(paths) < 2:
        raise TuneoffError("a task needs at least two generation files")
    generations = [read_generations(path) for path in paths]
    for path, gen in zip(paths[1:], generations[1:]):
        if len(gen) != len(generations[0]):
            raise DataError(str(path), None, None, f"has {len(gen)} responses but {paths[0]} has {len(generations[0])}")
    if prompts_path is not None:
        prompts = load_prompt_texts(prompts_path)
        if len(prompts) != len(generations[0]):
            raise DataError(
                str(paths[0]),
                None,
                None,
                f"has {len(generations[0])} responses for {len(prompts)} prompts in {prompts_path}",
            )
    else:
        prompts = [(p, None) for p, _ in generations[0]]
    tasks = []
    for i, (prompt, messages) in enumerate(prompts):
        answers = [gen[i] for gen in generations]
        for path, (own, _) in zip(paths, answers):
            if own is None and prompts_path is None:
                raise DataError(str(path), f"record {i + 1}", "prompt", "expected a prompt (or pass --prompts)")
            if own is not None and own != prompt:
                raise DataError(str(path), f"record {i + 1}", "prompt", "does not match the prompt it is paired with")
        texts = [text for _, text in answers]
        tasks.append(
            NewTask(
                prompt,
                texts[0],
                texts[1],
                messages,
                source_a=Path(paths[0]).name,
                source_b=Path(paths[1]).name,
                more=tuple(texts[2:]),
            )
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
    ``per-annotator``: one record per label, with ``annotator``. A ranking of K responses counts as its C(K, 2)
    pairs, each exported as a task ``ID:i-j`` (responses i and j of the task, the better one chosen). A tie is
    dropped, or kept with ``"tie": true`` (chosen = a, rejected = b: a reader must honour the flag). The file is
    written whole or not at all. Returns counts.
    """
    from tuneoff.feedback.agreement import majority

    if mode not in EXPORT_MODES or ties not in TIE_POLICIES:
        raise TuneoffError(f"export mode must be one of {EXPORT_MODES} and ties one of {TIE_POLICIES}")
    tasks = {task.id: task for task in store.tasks()}
    by_task: dict[str, list[Judgment]] = {}
    for judgment in store.judgments():
        if judgment.preferred is not None:
            by_task.setdefault(judgment.task_id, []).append(judgment)
        elif judgment.ranking is not None:  # K responses ranked: all C(K, 2) pairs, each a pair task of its own
            task = tasks[judgment.task_id]
            place = {index: rank for rank, index in enumerate(judgment.ranking)}
            for i, j in itertools.combinations(range(len(task.responses)), 2):
                pair_id = f"{task.id}:{i}-{j}"
                tasks.setdefault(pair_id, dataclasses.replace(task, id=pair_id, response_a=task.responses[i],
                                                              response_b=task.responses[j], more=()))  # fmt: skip
                label = "a" if place[i] < place[j] else "b"
                by_task.setdefault(pair_id, []).append(dataclasses.replace(judgment, preferred=label))
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
