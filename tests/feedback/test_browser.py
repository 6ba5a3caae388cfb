"""End to end in a real browser: headless Chromium (Debian's) driven by Playwright against a live server."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip("needs Debian's Chromium at /usr/bin/chromium (apt-get install -y chromium)", allow_module_level=True)

import uvicorn  # noqa: E402
from playwright.sync_api import sync_playwright  # noqa: E402

from tuneoff.feedback.app import create_app  # noqa: E402
from tuneoff.feedback.store import NewTask, Store, export_preferences  # noqa: E402

# Debian's Chromium run as root in a closed network (see the machine notes): no sandbox, no GPU, and no
# background connections, which would otherwise be refused by the dozen at every start.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
HOSTILE = (
    '<script>alert("script")</script>\n<img src=x onerror="alert(\'img\')">\n'
    "<a href=\"javascript:alert('link')\">click me</a>"
)
KEYS = {"1": "left", "2": "right", "3": "tie", "s": "skip"}


class LiveServer:
    """The app under uvicorn in a thread, on a free port of 127.0.0.1."""

    def __init__(self, db: Path, **options):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        config = uvicorn.Config(create_app(db, **options), host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def log_in(page, url: str, token: str) -> None:
    page.goto(f"{url}/login")
    page.fill("#token", token)
    with page.expect_navigation():
        page.click("button[type=submit]")
    assert page.url == f"{url}/"


def test_judge_five_tasks_with_the_keyboard(tmp_path, browser):
    db = tmp_path / "fb.sqlite"
    with Store(db) as store:
        store.add_tasks(NewTask(f"Prompt {i}\nsecond line", f"answer a{i}\nmore", f"answer b{i}") for i in range(8))
        token = store.add_annotator("alice")[1]
    page = browser.new_page()
    with LiveServer(db, annotators_per_task=2) as server:
        assert page.goto(f"{server.url}/").status == 401  # not logged in
        log_in(page, server.url, token)
        assert (page.inner_text("#done"), page.inner_text("#remaining")) == ("0", "8")
        assert page.eval_on_selector("#left", "e => getComputedStyle(e).whiteSpace") == "pre-wrap"
        assert "\n" in page.inner_text("#prompt")  # line breaks shown as line breaks
        judged = []
        for n, key in enumerate(["1", "2", "3", "s", "1"], start=1):
            task_id = page.input_value("#task_id")
            left = page.inner_text("#left")
            with page.expect_navigation():
                page.keyboard.press(key)
            judged.append((task_id, KEYS[key], left))
            assert (page.inner_text("#done"), page.inner_text("#remaining")) == (str(n), str(8 - n))
        assert len({task_id for task_id, _, _ in judged}) == 5  # a new task each time
    page.close()

    with Store(db) as store:
        judgments = store.judgments()
        tasks = {t.id: t for t in store.tasks()}
        assert sorted((j.task_id, j.choice) for j in judgments) == sorted((t, c) for t, c, _ in judged)
        for judgment, (task_id, _choice, left) in zip(judgments, judged):
            shown_left = tasks[task_id].response_a if judgment.a_on_left else tasks[task_id].response_b
            assert judgment.annotator == "alice" and shown_left == left and judgment.seconds is not None
        out = tmp_path / "prefs.jsonl"
        export_preferences(store, out, mode="per-annotator", ties="keep")
    records = [json.loads(line) for line in out.read_text().splitlines()]
    labelled = [(t, c, left) for t, c, left in judged if c != "skip"]  # a skip is no preference
    assert sorted(r["task_id"] for r in records) == sorted(t for t, _, _ in labelled)
    for task_id, choice, left in labelled:
        (record,) = [r for r in records if r["task_id"] == task_id]
        assert record["annotator"] == "alice" and record["tie"] == (choice == "tie")
        if choice == "left":
            assert record["chosen"] == left
        if choice == "right":
            assert record["rejected"] == left


def test_hostile_model_text_is_shown_as_text_and_runs_nothing(tmp_path, browser):
    db = tmp_path / "fb.sqlite"
    with Store(db) as store:
        store.add_tasks([NewTask(HOSTILE, HOSTILE, "plain\n" + HOSTILE), NewTask("second", "x", "y")])
        token = store.add_annotator("mallory")[1]
    page = browser.new_page()
    dialogs, errors, requests = [], [], []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("request", lambda request: requests.append(request.url))
    with LiveServer(db, annotators_per_task=1) as server:
        log_in(page, server.url, token)
        assert page.inner_text("#prompt") == HOSTILE
        assert HOSTILE in page.inner_text("#left") and HOSTILE in page.inner_text("#right")
        assert page.locator(".text script, .text img, .text a").count() == 0  # no element made of model text
        page.mouse.click(10, 10)
        with page.expect_navigation():
            page.keyboard.press("3")
        page.wait_for_timeout(200)
    page.close()
    assert dialogs == [] and errors == []
    assert not [url for url in requests if url.endswith("/x")]  # the <img src=x> was never fetched
