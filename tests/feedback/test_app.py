"""The labelling server: authentication, escaping, refusal of foreign tasks, load and durability."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from tuneoff.feedback.app import COOKIE, create_app  # noqa: E402
from tuneoff.feedback.store import NewTask, Store, hash_token  # noqa: E402

HOSTILE = '<script>alert(1)</script>\n<img src=x onerror="alert(2)">\n<a href="javascript:alert(3)">click</a>'
INJECTION = "x'); DROP TABLE judgments; --"


@pytest.fixture()
def db(tmp_path) -> Path:
    path = tmp_path / "fb.sqlite"
    with Store(path) as store:
        store.add_tasks([NewTask("Say hi\nin two lines", HOSTILE, "line one\nline two")])
        store.add_tasks(NewTask(f"prompt {i}", f"a{i}", f"b{i}") for i in range(4))
    return path


def annotator(db: Path, name: str) -> str:
    with Store(db) as store:
        return store.add_annotator(name)[1]


def count_judgments(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT COUNT(*) FROM judgments").fetchone()[0]


SAME = {"Origin": "http://testserver"}  # what a browser sends with a form of this server's own page


def login(client: TestClient, token: str) -> str:
    """Log in through the form (from this server's page) and return the session's CSRF token."""
    response = client.post("/login", data={"token": token}, headers=SAME, follow_redirects=False)
    assert response.status_code == 303, response.text
    return csrf_of(client.get("/").text)


def csrf_of(page: str) -> str:
    return page.split('name="csrf" value="')[1].split('"')[0]


def task_of(page: str) -> str:
    return page.split('name="task_id" id="task_id" value="')[1].split('"')[0]


def test_every_route_but_login_answers_401_without_a_valid_token(db):
    token = annotator(db, "ann")
    client = TestClient(create_app(db))
    for method, path in [
        ("GET", "/"),
        ("POST", "/judge"),
        ("POST", "/undo"),
        ("POST", "/logout"),
        ("GET", "/admin"),
        ("GET", "/guidelines"),
        ("GET", "/api/next"),
        ("POST", "/api/judgments"),
        ("POST", "/api/undo"),
        ("GET", "/api/progress"),
        ("GET", "/docs"),
        ("GET", "/openapi.json"),
        ("GET", "/no/such/page"),
    ]:
        assert client.request(method, path, headers=SAME).status_code == 401, path
        headers = {"Authorization": "Bearer wrong", **SAME}
        assert client.request(method, path, headers=headers).status_code == 401, path
    # the API takes the bearer header only, the page the session cookie only, and the token is never a cookie
    page = TestClient(create_app(db))
    login(page, token)
    assert page.get("/api/next").status_code == 401 and page.get("/").status_code == 200
    assert client.get("/", headers={"Authorization": f"Bearer {token}"}).status_code == 401
    client.cookies.set(COOKIE, token)
    assert client.get("/").status_code == 401
    assert client.get("/login").status_code == 200
    assert client.post("/login", data={"token": "wrong"}, headers=SAME).status_code == 401


def test_unauthenticated_posts_record_nothing(db):
    token = annotator(db, "ann")
    client = TestClient(create_app(db))
    task = client.get("/api/next", headers={"Authorization": f"Bearer {token}"}).json()["task"]
    for headers in ({}, {"Authorization": "Bearer " + token[:-1]}, {"Authorization": "Basic " + token}):
        response = client.post("/api/judgments", json={"task_id": task["task_id"], "choice": "left"}, headers=headers)
        assert response.status_code == 401
        form = {"task_id": task["task_id"], "choice": "left"}
        assert client.post("/judge", data=form, headers={**headers, **SAME}).status_code == 401
    assert count_judgments(db) == 0


def test_login_opens_a_session_in_a_strict_http_only_cookie_and_the_page_escapes_model_text(db):
    token = annotator(db, "ann")
    client = TestClient(create_app(db))
    response = client.post("/login", data={"token": token}, headers=SAME, follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == "/"
    cookie = response.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie
    assert token.lower() not in cookie  # the cookie holds a session id, never the bearer token
    page = client.get("/")
    assert page.status_code == 200
    assert "<script>alert" not in page.text and "<img src=x" not in page.text and '<a href="javascript' not in page.text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text and "onerror=&#34;alert(2)&#34;" in page.text
    assert "line one\nline two" in page.text  # the raw view keeps the line breaks (white-space: pre-wrap)
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'nonce-" in csp
    assert 'done <span id="done">0</span> · remaining <span id="remaining">5</span>' in page.text


def test_api_flow_records_order_choice_reason_and_progress(db):
    token = annotator(db, "ann")
    client = TestClient(create_app(db, annotators_per_task=1), headers={"Authorization": f"Bearer {token}"})
    body = client.get("/api/next").json()
    assert body["progress"] == {"done": 0, "remaining": 5}
    task = body["task"]
    judged = {"task_id": task["task_id"], "choice": "left", "seconds": 1.5, "reason": " clearer "}
    posted = client.post("/api/judgments", json=judged)
    assert posted.status_code == 201 and posted.json()["created"] is True
    again = client.post("/api/judgments", json={"task_id": task["task_id"], "choice": "left"})
    assert again.status_code == 200 and again.json() == {"judgment_id": posted.json()["judgment_id"], "created": False}
    assert client.post("/api/judgments", json={"task_id": task["task_id"], "choice": "right"}).status_code == 409
    assert client.get("/api/progress").json() == {"done": 1, "remaining": 4}
    with Store(db) as store:
        (judgment,) = store.judgments()
        stored = store.task(task["task_id"])
    shown_left = stored.response_a if judgment.a_on_left else stored.response_b
    assert shown_left == task["left"] and judgment.preferred == ("a" if judgment.a_on_left else "b")
    assert judgment.seconds == 1.5 and judgment.annotator == "ann" and judgment.reason == "clearer"


def test_a_task_of_another_annotator_is_refused(db):
    alice, bob = annotator(db, "alice"), annotator(db, "bob")
    app = create_app(db, annotators_per_task=1)
    alice_client = TestClient(app, headers={"Authorization": f"Bearer {alice}"})
    bob_api = TestClient(app, headers={"Authorization": f"Bearer {bob}"})
    alices_task = alice_client.get("/api/next").json()["task"]["task_id"]
    assert bob_api.post("/api/judgments", json={"task_id": alices_task, "choice": "left"}).status_code == 403
    bob_page = TestClient(app)
    csrf = login(bob_page, bob)
    refused = bob_page.post("/judge", data={"task_id": alices_task, "choice": "left", "csrf": csrf}, headers=SAME)
    assert refused.status_code == 403 and "not yours" in refused.text
    assert count_judgments(db) == 0


def test_injection_strings_in_request_fields_are_inert(db):
    token = annotator(db, INJECTION)
    client = TestClient(create_app(db), headers={"Authorization": f"Bearer {token}"})
    task = client.get("/api/next").json()["task"]["task_id"]
    assert client.post("/api/judgments", json={"task_id": INJECTION, "choice": "left"}).status_code == 403
    assert client.post("/api/judgments", json={"task_id": task, "choice": INJECTION}).status_code == 422
    assert client.post("/api/judgments", json={"task_id": task, "choice": "tie"}).status_code == 201
    with Store(db) as store:
        assert [j.annotator for j in store.judgments()] == [INJECTION] and store.count_tasks() == 5


def test_form_flow_redirects_to_the_next_task_and_logout_ends_the_session(db):
    token = annotator(db, "ann")
    client = TestClient(create_app(db))
    csrf = login(client, token)
    task_id = task_of(client.get("/").text)
    form = {"task_id": task_id, "choice": "skip", "seconds": "0.8", "csrf": csrf}
    response = client.post("/judge", data=form, headers=SAME, follow_redirects=False)
    assert response.status_code == 303
    assert 'id="done">1<' in client.get("/").text
    session = client.cookies.get(COOKIE)
    assert client.post("/logout", data={"csrf": csrf}, headers=SAME, follow_redirects=False).status_code == 303
    stale = TestClient(create_app(db))
    stale.cookies.set(COOKIE, session)  # the old cookie, kept by an attacker or a shared machine
    assert stale.get("/").status_code == 401


# -- cross-site requests, sessions, revocation, size limits -------------------------------------------


def test_login_csrf_from_another_origin_is_refused_and_opens_no_session(db):
    """A page elsewhere (another site, or another port of the same host: same site, other origin) posts an
    attacker's token to /login: refused, so the victim's labels are never credited to the attacker."""
    attacker = annotator(db, "attacker")
    client = TestClient(create_app(db))
    for headers in (
        {"Origin": "http://evil.example"},
        {"Origin": "http://testserver:9999"},  # same host, another port
        {"Origin": "null"},  # a sandboxed frame
        {"Referer": "http://evil.example/page"},
        {},  # no Origin and no Referer: no browser page sends that
    ):
        response = client.post("/login", data={"token": attacker}, headers=headers, follow_redirects=False)
        assert response.status_code == 403 and COOKIE not in response.headers.get("set-cookie", ""), headers
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM sessions").fetchone()[0] == 0
    ok = client.post("/login", data={"token": attacker}, headers={"Referer": "http://testserver/login"})
    assert ok.status_code == 200  # a Referer of this server's own page will do where Origin is missing


def test_judge_csrf_from_another_origin_or_without_the_token_records_nothing(db):
    token = annotator(db, "ann")
    client = TestClient(create_app(db))
    csrf = login(client, token)
    task_id = task_of(client.get("/").text)
    form = {"task_id": task_id, "choice": "left", "csrf": csrf}
    for headers in ({"Origin": "http://127.0.0.1:9999"}, {"Origin": "http://testserver:8001"}, {}):
        assert client.post("/judge", data=form, headers=headers).status_code == 403, headers
    without = {k: v for k, v in form.items() if k != "csrf"}
    assert client.post("/judge", data=without, headers=SAME).status_code == 403
    assert client.post("/judge", data={**form, "csrf": "guess"}, headers=SAME).status_code == 403
    assert client.post("/logout", data={}, headers=SAME).status_code == 403  # no forced logout either
    assert count_judgments(db) == 0
    assert client.post("/judge", data=form, headers=SAME, follow_redirects=False).status_code == 303
    assert count_judgments(db) == 1


def test_revoke_and_rotate_end_tokens_and_sessions_and_keep_labels(db):
    token = annotator(db, "ann")
    app = create_app(db)
    page, api = TestClient(app), TestClient(app, headers={"Authorization": f"Bearer {token}"})
    login(page, token)
    task = api.get("/api/next").json()["task"]["task_id"]
    assert api.post("/api/judgments", json={"task_id": task, "choice": "tie"}).status_code == 201
    with Store(db) as store:
        new = store.rotate("ann")
    assert page.get("/").status_code == 401 and api.get("/api/progress").status_code == 401
    fresh = TestClient(app, headers={"Authorization": f"Bearer {new}"})
    assert fresh.get("/api/progress").json()["done"] == 1
    login(page, new)
    with Store(db) as store:
        revoked = store.revoke("ann")
        assert revoked.revoked and not revoked.can_log_in
        assert [j.annotator for j in store.judgments()] == ["ann"]  # the labels stay
    assert page.get("/").status_code == 401 and fresh.get("/api/progress").status_code == 401
    assert page.post("/login", data={"token": new}, headers=SAME).status_code == 401


def test_bodies_are_capped_and_errors_echo_little(db):
    token = annotator(db, "ann")
    client = TestClient(create_app(db), headers={"Authorization": f"Bearer {token}"})
    client.get("/api/next")
    huge = "x" * (10 * 2**20)  # 10 MB task_id
    response = client.post("/api/judgments", json={"task_id": huge, "choice": "left"})
    assert response.status_code == 413 and len(response.content) < 200
    long_id = "y" * 5000  # under the cap: refused as not assigned, echoing at most 80 characters of it
    response = client.post("/api/judgments", json={"task_id": long_id, "choice": "left"})
    assert response.status_code == 403 and len(response.text) < 300
    response = client.post("/api/judgments", json={"task_id": 123, "choice": ["y" * 5000]})
    assert response.status_code == 422 and "yyyy" not in response.text  # validation errors name, never echo
    page = TestClient(create_app(db))
    assert page.post("/login", content=b"token=" + b"z" * (2 * 2**20), headers={**SAME, "Content-Type":
                     "application/x-www-form-urlencoded"}).status_code == 413  # fmt: skip


def test_model_text_is_isolated_rendered_as_safe_markdown_and_kept_raw(tmp_path):
    path = tmp_path / "fb.sqlite"
    rtl = "\u202eevil reversed\u202c"
    markdown = "Steps:\n\n1. one\n2. two\n\n```\ncode <b>\n```\n\n[click](javascript:alert(1)) ![x](http://track/x.png)"
    with Store(path) as store:
        store.add_tasks([NewTask("prompt " + rtl, markdown, rtl)])
        token = store.add_annotator("ann")[1]
    client = TestClient(create_app(path, guidelines="# Rules\n\nPrefer **helpful** answers."))
    login(client, token)
    text = client.get("/").text
    assert "unicode-bidi: isolate" in text and text.count('dir="auto"') == 3  # prompt and both responses
    assert "<ol>" in text and "<pre><code>code &lt;b&gt;" in text  # a list and a code block, escaped
    assert 'href="javascript' not in text and "<img" not in text  # no link, no image: shown as text
    assert "<h1>Rules</h1>" in text and "<strong>helpful</strong>" in text  # the guidelines, rendered
    assert "[click](javascript:alert(1))" in text  # the raw view keeps the text as written


def test_undo_takes_back_the_last_judgment_and_keeps_it_on_record(db):
    token = annotator(db, "ann")
    client = TestClient(create_app(db, annotators_per_task=1))
    csrf = login(client, token)
    first = task_of(client.get("/").text)
    client.post("/judge", data={"task_id": first, "choice": "left", "csrf": csrf}, headers=SAME)
    assert task_of(client.get("/").text) != first
    assert client.post("/undo", data={"csrf": csrf}, headers=SAME, follow_redirects=False).status_code == 303
    assert task_of(client.get("/").text) == first  # the same task again, first in the queue
    client.post("/judge", data={"task_id": first, "choice": "right", "csrf": csrf}, headers=SAME)
    with Store(db) as store:
        (judgment,) = store.judgments()
        (undone,) = store.undone()
    assert judgment.choice == "right" and undone["choice"] == "left" and undone["task_id"] == first
    api = TestClient(create_app(db), headers={"Authorization": f"Bearer {token}"})
    assert api.post("/api/undo").json() == {"task_id": first}
    assert api.post("/api/undo").status_code == 409  # nothing of theirs left to take back


def test_the_admin_view_is_for_leads(db):
    with Store(db) as store:
        lead = store.add_annotator("lead", role="lead")[1]
        ann = store.add_annotator("ann")[1]
    app = create_app(db, annotators_per_task=1)
    worker = TestClient(app, headers={"Authorization": f"Bearer {ann}"})
    for _ in range(3):
        task = worker.get("/api/next").json()["task"]["task_id"]
        worker.post("/api/judgments", json={"task_id": task, "choice": "left", "seconds": 2.0})
    assert worker.get("/api/admin").status_code == 403
    page = TestClient(app)
    page.post("/login", data={"token": ann}, headers=SAME)
    assert page.get("/admin").status_code == 403
    lead_page = TestClient(app)
    response = lead_page.post("/login", data={"token": lead}, headers=SAME, follow_redirects=False)
    assert response.headers["location"] == "/admin"
    admin = lead_page.get("/admin")
    assert admin.status_code == 200 and "chose left" in admin.text and "<bdi>ann</bdi>" in admin.text
    assert "built-in method" not in admin.text and "over 0 tasks with ≥ 2 labels" in admin.text
    stats = TestClient(app, headers={"Authorization": f"Bearer {lead}"}).get("/api/admin").json()
    row = next(r for r in stats["annotators"] if r["name"] == "ann")
    assert row["judgments"] == 3 and row["position_bias"]["rate"] == 1.0 and row["median_seconds"] == 2.0


# -- load and durability: a real server process on 127.0.0.1 ---------------------------------------
CLIENTS, JUDGMENTS, PER_TASK = 50, 2000, 3


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(db: Path, port: int) -> subprocess.Popen:
    src = str(Path(__file__).resolve().parents[2] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tuneoff.cli.label",
            "label",
            "serve",
            "--db",
            str(db),
            "--port",
            str(port),
            "--annotators-per-task",
            str(PER_TASK),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/login", timeout=1).status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.05)
        if process.poll() is not None:
            raise RuntimeError(process.stderr.read().decode())
    process.kill()
    raise RuntimeError("server did not start")


class RawClient:
    """A minimal HTTP/1.1 keep-alive JSON client. httpx spends ~3 ms of CPU per request, which on two
    shared cores would measure the client more than the server."""

    def __init__(self, port: int, token: str):
        self.port, self.token, self.reader, self.writer = port, token, None, None

    async def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        try:
            return await asyncio.wait_for(self._request(method, path, body), timeout=30)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError):
            if self.writer is not None:
                self.writer.close()
            self.reader = self.writer = None
            raise ConnectionError(f"{method} {path} failed") from None

    async def _request(self, method, path, body):
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        data = b"" if body is None else json.dumps(body).encode()
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {self.token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
        )
        self.writer.write(head.encode() + data)
        await self.writer.drain()
        lines = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        headers = dict(line.lower().split(": ", 1) for line in lines[1:] if ": " in line)
        payload = await self.reader.readexactly(int(headers["content-length"]))
        return int(lines[0].split()[1]), json.loads(payload)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def retry(request):
    for _ in range(600):
        try:
            return await request()
        except ConnectionError:
            await asyncio.sleep(0.05)  # the server is down (killed) or restarting
    raise RuntimeError("server unreachable")


def test_concurrent_load_and_a_killed_server_lose_no_acknowledged_judgment(tmp_path):
    db = tmp_path / "load.sqlite"
    with Store(db) as store:
        store.add_tasks(NewTask(f"p{i}", f"a{i}", f"b{i}") for i in range(JUDGMENTS // PER_TASK + 10))
        tokens = [store.add_annotator(f"load{i}")[1] for i in range(CLIENTS)]
    port = free_port()
    server = {"process": start_server(db, port)}
    acked: list[tuple[str, str, str]] = []  # (annotator token, task id, choice) answered 200/201
    at_kill: dict = {}

    async def client(token: str, count: int) -> None:
        http = RawClient(port, token)
        for n in range(count):
            status, body = await retry(lambda: http.request("GET", "/api/next"))
            assert status == 200, body
            judgment = {"task_id": body["task"]["task_id"], "choice": ("left", "right", "tie")[n % 3]}
            # a POST cut off by the kill is repeated: a judgment is idempotent per annotator and task
            status, body = await retry(lambda judgment=judgment: http.request("POST", "/api/judgments", judgment))
            assert status in (200, 201), body
            acked.append((token, judgment["task_id"], judgment["choice"]))
            if len(acked) == JUDGMENTS // 2 and not at_kill:
                at_kill["acked"] = list(acked)
                server["process"].send_signal(signal.SIGKILL)
                server["process"].wait()
                at_kill["stored"] = count_judgments(db)
                server["process"] = await asyncio.to_thread(start_server, db, port)
        http.close()

    async def main():
        await asyncio.gather(*(client(token, JUDGMENTS // CLIENTS) for token in tokens))

    started = time.monotonic()
    try:
        asyncio.run(main())
    finally:
        server["process"].send_signal(signal.SIGTERM)
        server["process"].wait(timeout=30)
    elapsed = time.monotonic() - started
    assert at_kill, "the server was never killed"
    assert at_kill["stored"] >= len(at_kill["acked"])  # everything acknowledged before the kill was on disk
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT a.token_sha256, j.task_id, j.choice FROM judgments j JOIN annotators a ON a.id = j.annotator_id"
        ).fetchall()
        per_task = conn.execute("SELECT MAX(n) FROM (SELECT COUNT(*) AS n FROM judgments GROUP BY task_id)").fetchone()[
            0
        ]
    expected = sorted((hash_token(token), task, choice) for token, task, choice in acked)
    assert len(acked) == JUDGMENTS and sorted(rows) == expected  # each acknowledged judgment once; nothing else
    assert per_task <= PER_TASK
    print(f"\n{JUDGMENTS} judgments by {CLIENTS} clients with one kill and restart in {elapsed:.1f} s")


def test_odd_form_values_are_refused_not_crashes(db):
    """A non-ASCII CSRF token, ranks that are not plain small numbers: 403 or 422, never a 500."""
    token = annotator(db, "ann")
    client = TestClient(create_app(db), raise_server_exceptions=False)
    csrf = login(client, token)
    task_id = task_of(client.get("/").text)
    assert (
        client.post("/judge", data={"task_id": task_id, "choice": "left", "csrf": "é"}, headers=SAME).status_code == 403
    )
    for ranks in ({"rank-0": "²"}, {"rank-" + "9" * 5000: "1"}, {"rank-0": "1", "rank-1": "1"}):
        form = {"task_id": task_id, "choice": "rank", "csrf": csrf, **ranks}
        assert client.post("/judge", data=form, headers=SAME).status_code == 422, ranks
    assert count_judgments(db) == 0


def test_a_login_racing_a_rotation_opens_no_session(db):
    token = annotator(db, "ann")
    with Store(db) as store:
        ann = store.annotator_by_token(token)
        store.rotate("ann")  # between the login's token check and its session
        assert store.open_session(ann.id, token=token) is None
        assert store.open_session(ann.id) is not None  # without a token to check (tests, scripts)
