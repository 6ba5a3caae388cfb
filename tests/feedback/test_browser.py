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


class AttackerPage:
    """A page on another port of 127.0.0.1 (same site, another origin) that auto-submits a form to the labelling
    server: what SameSite=Strict alone does not stop."""

    def __init__(self, action: str, fields: dict):
        import http.server
        from html import escape

        inputs = "".join(f'<input type="hidden" name="{escape(k)}" value="{escape(v)}">' for k, v in fields.items())
        body = (f'<html><body><form id="f" method="post" action="{escape(action)}">{inputs}</form>'
                '<script>document.getElementById("f").submit()</script></body></html>').encode()  # fmt: skip

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


def test_a_persons_flow_guidelines_keyboard_undo_logout_and_cross_site_forms(tmp_path, browser):
    """Log in, read the guidelines, judge with the keyboard, undo, judge again, rank three responses, log out: the
    old cookie no longer works. Forms auto-submitted by a page on another port of 127.0.0.1 (same site, other
    origin) to /judge and /login are refused (403) and record nothing."""
    db = tmp_path / "fb.sqlite"
    ranking = NewTask("Rank these", "response one", "response two", more=("response three",))
    with Store(db) as store:
        store.add_tasks([NewTask("Prompt 0", "- item a0\n- more", "answer b0"), ranking])
        store.add_tasks(NewTask(f"Prompt {i}", f"- item a{i}\n- more", f"answer b{i}") for i in range(1, 4))
        token = store.add_annotator("alice")[1]
        attacker = store.add_annotator("mallory")[1]
    guidelines = "# How to judge\n\nPrefer the **more helpful** answer; press *3* for a tie."
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    page = context.new_page()
    with LiveServer(db, annotators_per_task=1, guidelines=guidelines) as server:
        log_in(page, server.url, token)
        assert page.inner_text("#guidelines h1") == "How to judge"  # shown, open, before the first judgment
        assert page.locator("#guidelines strong").inner_text() == "more helpful"
        listed = "#left" if "item a0" in page.inner_text("#left") else "#right"  # the sides are drawn at random
        assert page.locator(f"{listed} li").count() == 2  # model text rendered as Markdown: a list
        page.keyboard.press("r")  # the raw view shows the text as written
        assert page.inner_text(listed).startswith("- item a0")
        page.keyboard.press("r")
        assert page.locator(f"{listed} li").count() == 2
        first = page.input_value("#task_id")
        with page.expect_navigation():
            page.keyboard.press("1")
        assert page.inner_text("#done") == "1" and page.input_value("#task_id") != first
        with page.expect_navigation():
            page.keyboard.press("u")  # undo: the same task comes back first
        assert page.inner_text("#done") == "0" and page.input_value("#task_id") == first
        page.fill("#reason", "the list is clearer")
        with page.expect_navigation():
            page.click("button[value=right]")
        assert page.input_value("#task_id") == ranking.id  # three responses, in an order drawn for alice
        shown = [page.inner_text(f"#response-{p}") for p in range(3)]
        assert sorted(shown) == ["response one", "response three", "response two"]
        best_first = ["response three", "response one", "response two"]
        for position, text in enumerate(shown):
            page.select_option(f"#rank-{position}", str(best_first.index(text) + 1))
        with page.expect_navigation():
            page.click("#submit-ranking")
        second = page.input_value("#task_id")

        for action, fields in (
            (f"{server.url}/judge", {"task_id": second, "choice": "left"}),
            (f"{server.url}/login", {"token": attacker}),
        ):
            evil = AttackerPage(action, fields)
            other = context.new_page()  # the same browser: alice's cookie would go along (same site)
            with other.expect_navigation(url=action):
                other.goto(evil.url)
            assert "Cross-site request refused" in other.content(), action
            other.close()
            evil.close()
        assert page.reload().status == 200 and page.inner_text("#annotator") == "alice"  # still alice

        cookie = next(c for c in context.cookies() if c["name"] == "tuneoff_session")
        with page.expect_navigation():
            page.click("#logout button")
        assert page.url == f"{server.url}/login"
        stale = browser.new_context()
        stale.add_cookies([cookie])
        assert stale.new_page().goto(f"{server.url}/").status == 401  # logout ended the session itself
        stale.close()

        narrow = browser.new_context(viewport={"width": 400, "height": 800}).new_page()
        log_in(narrow, server.url, token)
        left, right = (narrow.locator(f"#{side}").bounding_box() for side in ("left", "right"))
        assert right["y"] > left["y"] + left["height"] - 1  # stacked on a narrow screen, not side by side
        narrow.context.close()
    context.close()
    with Store(db) as store:
        judgment, ranked = store.judgments()
        (undone,) = store.undone()
    assert (judgment.task_id, judgment.choice, judgment.reason) == (first, "right", "the list is clearer")
    assert (undone["task_id"], undone["choice"]) == (first, "left") and judgment.annotator == "alice"
    assert ranked.task_id == ranking.id and ranked.ranking == (2, 0, 1) and sorted(ranked.order_shown) == [0, 1, 2]
