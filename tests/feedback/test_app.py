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


def test_every_route_but_login_answers_401_without_a_valid_token(db):
    token = annotator(db, "ann")
    client = TestClient(create_app(db))
    for method, path in [
        ("GET", "/"),
        ("POST", "/judge"),
        ("POST", "/logout"),
        ("GET", "/api/next"),
        ("POST", "/api/judgments"),
        ("GET", "/api/progress"),
        ("GET", "/docs"),
        ("GET", "/openapi.json"),
        ("GET", "/no/such/page"),
    ]:
        assert client.request(method, path).status_code == 401, path
        assert client.request(method, path, headers={"Authorization": "Bearer wrong"}).status_code == 401, path
    # the API takes the bearer header only, the page the cookie only
    cookie_client = TestClient(create_app(db))
    cookie_client.cookies.set(COOKIE, token)
    assert cookie_client.get("/api/next").status_code == 401 and cookie_client.get("/").status_code == 200
    assert client.get("/", headers={"Authorization": f"Bearer {token}"}).status_code == 401
    assert client.get("/login").status_code == 200
    assert client.post("/login", data={"token": "wrong"}).status_code == 401


def test_unauthenticated_posts_record_nothing(db):
    token = annotator(db, "ann")
    client = TestClient(create_app(db))
    task = client.get("/api/next", headers={"Authorization": f"Bearer {token}"}).json()["task"]
    for headers in ({}, {"Authorization": "Bearer " + token[:-1]}, {"Authorization": "Basic " + token}):
        response = client.post("/api/judgments", json={"task_id": task["task_id"], "choice": "left"}, headers=headers)
        assert response.status_code == 401
        assert (
            client.post("/judge", data={"task_id": task["task_id"], "choice": "left"}, headers=headers).status_code
            == 401
        )
    assert count_judgments(db) == 0


def test_login_sets_a_strict_http_only_cookie_and_the_page_escapes_model_text(db):
    token = annotator(db, "ann")
    client = TestClient(create_app(db))
    response = client.post("/login", data={"token": token}, follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == "/"
    cookie = response.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie
    page = client.get("/")
    assert page.status_code == 200
    assert "<script>alert" not in page.text and "<img src=x" not in page.text and '<a href="javascript' not in page.text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text and "onerror=&#34;alert(2)&#34;" in page.text
    assert "line one\nline two" in page.text  # line breaks reach the page (shown by white-space: pre-wrap)
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'nonce-" in csp
    assert 'done <span id="done">0</span> · remaining <span id="remaining">5</span>' in page.text


def test_api_flow_records_order_choice_and_progress(db):
    token = annotator(db, "ann")
    client = TestClient(create_app(db, annotators_per_task=1), headers={"Authorization": f"Bearer {token}"})
    body = client.get("/api/next").json()
    assert body["progress"] == {"done": 0, "remaining": 5}
    task = body["task"]
    posted = client.post("/api/judgments", json={"task_id": task["task_id"], "choice": "left", "seconds": 1.5})
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
    assert judgment.seconds == 1.5 and judgment.annotator == "ann"


def test_a_task_of_another_annotator_is_refused(db):
    alice, bob = annotator(db, "alice"), annotator(db, "bob")
    app = create_app(db, annotators_per_task=1)
    alice_client = TestClient(app, headers={"Authorization": f"Bearer {alice}"})
    bob_api = TestClient(app, headers={"Authorization": f"Bearer {bob}"})
    alices_task = alice_client.get("/api/next").json()["task"]["task_id"]
    assert bob_api.post("/api/judgments", json={"task_id": alices_task, "choice": "left"}).status_code == 403
    bob_page = TestClient(app)
    bob_page.post("/login", data={"token": bob})
    refused = bob_page.post("/judge", data={"task_id": alices_task, "choice": "left"})
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


def test_form_flow_redirects_to_the_next_task(db):
    token = annotator(db, "ann")
    client = TestClient(create_app(db))
    client.post("/login", data={"token": token})
    first = client.get("/")
    task_id = first.text.split('name="task_id" id="task_id" value="')[1].split('"')[0]
    response = client.post(
        "/judge", data={"task_id": task_id, "choice": "skip", "seconds": "0.8"}, follow_redirects=False
    )
    assert response.status_code == 303
    assert 'id="done">1<' in client.get("/").text
    assert client.post("/logout", follow_redirects=False).status_code == 303


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
