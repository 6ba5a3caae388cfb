"""The labelling web app: FastAPI with server-rendered pages (jinja2), no front-end build step.

Routes (every one but ``/login`` answers 401 without a valid session or token):
- ``GET /login``, ``POST /login`` (form field ``token``): opens a server-side session; the HttpOnly,
  SameSite=Strict cookie holds the session id, never the annotator's token. ``POST /logout`` ends the session.
- ``GET /``: the next comparison (with the task guidelines, if ``serve`` was given them); ``POST /judge`` (form:
  ``task_id``, ``choice``, ``seconds``, ``reason``; a ranking task: ``choice=rank`` and ``rank-0`` ... ``rank-K-1``,
  the rank 1..K given to each response in the order shown) records it and redirects back (Post/Redirect/Get);
  ``POST /undo`` takes back the annotator's last judgment. ``GET /guidelines``.
- ``GET /admin``: for leads, live progress per annotator, agreement so far, position and length bias.
- ``GET /api/next``, ``POST /api/judgments`` (JSON ``{"task_id","choice","seconds"?,"reason"?}``),
  ``POST /api/undo``, ``GET /api/progress`` (and ``GET /api/admin`` for leads): the same with ``Authorization:
  Bearer TOKEN``, for scripts and load tests.

Cross-site requests: the page's forms are refused (403, nothing recorded) unless the request's ``Origin`` (or,
without one, its ``Referer``) names this server's own host and port: SameSite alone would let a page on another
port of the same host post (same site, other origin). Every form of a session also carries that session's CSRF
token. The API never reads the cookie and the pages never read the bearer header, so ambient credentials reach
neither from another site. Bodies over ``MAX_BODY`` bytes are refused (413) before any parsing, and error
messages echo at most 80 characters of what a client sent.

Model text is untrusted: jinja2 autoescapes every variable, the Markdown view renders it with raw HTML, links and
images off (markdown-it), every text box isolates its direction (an RTL override inside cannot reorder the page),
and a per-response CSP nonce keeps any script not written by us from running even if escaping were ever bypassed.
"""

from __future__ import annotations

import hmac
import secrets
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader
from markupsafe import Markup
from pydantic import BaseModel

from tuneoff.errors import TuneoffError
from tuneoff.feedback.store import CHOICES, ConflictingJudgment, NotAssigned, NothingToUndo, Store

COOKIE = "tuneoff_session"
TEMPLATES = Path(__file__).resolve().parent / "templates"
PUBLIC_PATHS = {"/login"}
MAX_BODY = 64 * 1024
"""Bytes of a request body (a form or a judgment is well under 10 kB; a reason at most 2,000 characters)."""


class JudgmentIn(BaseModel):
    task_id: str
    choice: str
    ranking: list[int] | None = None
    """With choice "rank": the positions in the order shown (0 = first shown), best first."""
    seconds: float | None = None
    reason: str | None = None


def markdown_renderers():
    """(model text, guidelines) -> HTML. Model text: CommonMark with raw HTML, links and images off (a link in
    model output is shown as text, an image never loads) and every line break kept, as chat interfaces show it.
    Guidelines, written by the lead: links kept."""
    from markdown_it import MarkdownIt

    model_text = MarkdownIt("commonmark", {"html": False, "breaks": True}).disable(["image", "link", "autolink"])
    guidelines = MarkdownIt("commonmark", {"html": False}).disable("image")
    return model_text.render, guidelines.render


def create_app(
    db_path: str | Path,
    *,
    annotators_per_task: int = 3,
    lease_seconds: float = 1800.0,
    guidelines: str | None = None,
) -> FastAPI:
    """The app over one feedback database; each task is given to ``annotators_per_task`` distinct people;
    ``guidelines`` (Markdown) are shown above every comparison."""
    if annotators_per_task < 1:
        raise TuneoffError("--annotators-per-task must be at least 1")
    store = Store(db_path, create=False)
    render_text, render_guidelines = markdown_renderers()
    templates = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=True)  # every variable escaped
    templates.filters["markdown"] = lambda text: Markup(render_text(text or ""))
    guidelines_html = Markup(render_guidelines(guidelines)) if guidelines else None

    @asynccontextmanager
    async def lifespan(_app):
        yield
        store.close()

    app = FastAPI(title="tuneoff labelling", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.store = store
    limits = dict(annotators_per_task=annotators_per_task, lease_seconds=lease_seconds)

    def page(name: str, status: int = 200, **context) -> HTMLResponse:
        nonce = secrets.token_urlsafe(16)
        response = HTMLResponse(templates.get_template(name).render(nonce=nonce, **context), status_code=status)
        response.headers["Content-Security-Policy"] = (
            f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
            "form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
        )
        return response

    def message(status: int, title: str, text: str, link=("/", "Back")) -> HTMLResponse:
        return page("message.html", status, title=title, message=text, link=link)

    def deny(path: str) -> Response:
        if path.startswith("/api/"):
            return JSONResponse(
                {"detail": "missing or invalid token"}, status_code=401, headers={"WWW-Authenticate": "Bearer"}
            )
        return message(401, "Please log in", "This page needs an annotator token.", ("/login", "Log in"))

    def refuse(path: str, why: str) -> Response:
        if path.startswith("/api/"):
            return JSONResponse({"detail": why}, status_code=403)
        return message(403, "Refused", why)

    app.add_middleware(Guard, store=store, deny=deny, refuse=refuse)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError):
        """FastAPI's default echoes the whole input back; say what is wrong, never what was sent."""
        problems = [f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', 'invalid')}" for e in error.errors()]
        return JSONResponse({"detail": problems[:5]}, status_code=422)

    def csrf_ok(request: Request, form) -> bool:
        sent = str(form.get("csrf", "")).encode("utf-8")  # bytes: compare_digest refuses non-ASCII text
        return hmac.compare_digest(sent, request.state.session.csrf.encode("utf-8"))

    @app.get("/login")
    def login_form():
        return page("login.html")

    @app.post("/login")
    async def login(request: Request):
        token = str((await request.form()).get("token", "")).strip()
        annotator = store.annotator_by_token(token)
        if annotator is None:
            return page("login.html", 401, error="That token is not valid.")
        session_id = await _run_sync(store.open_session, annotator.id, token=token)
        if session_id is None:  # the token was rotated or revoked between the check and now
            return page("login.html", 401, error="That token is not valid.")
        response = RedirectResponse("/admin" if annotator.role == "lead" else "/", status_code=303)
        response.set_cookie(
            COOKIE, session_id, httponly=True, samesite="strict", path="/", secure=request.url.scheme == "https"
        )
        return response

    @app.post("/logout")
    async def logout(request: Request):
        if not csrf_ok(request, await request.form()):
            return message(403, "Refused", "This form is out of date: reload the page and try again.")
        await _run_sync(store.end_session, request.cookies.get(COOKIE))
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE, path="/")
        return response

    @app.get("/")
    def label_page(request: Request):
        me = request.state.annotator
        assignment = store.next_task(me.id, **limits)
        progress = store.progress(me.id, annotators_per_task=annotators_per_task)
        return page(
            "label.html",
            annotator=me,
            assignment=assignment,
            progress=progress,
            csrf=request.state.session.csrf,
            guidelines=guidelines_html,
            can_undo=progress.done > 0,
        )

    @app.get("/guidelines")
    def guidelines_page(request: Request):
        return page("guidelines.html", annotator=request.state.annotator, guidelines=guidelines_html)

    @app.post("/judge")
    async def judge_form(request: Request):
        form = await request.form()
        if not csrf_ok(request, form):
            return message(403, "Refused", "This form is out of date: reload the page and try again.")
        choice = str(form.get("choice", ""))
        try:
            await _run_sync(
                store.record_judgment,
                request.state.annotator.id,
                str(form.get("task_id", "")),
                choice,
                ranking=ranking_from_form(form) if choice == "rank" else None,
                seconds=_float_or_none(form.get("seconds")),
                reason=str(form.get("reason", "")),
            )
        except NotAssigned:
            return message(403, "Refused", "That task is not yours to judge.")
        except ConflictingJudgment:
            return message(409, "Already judged", "You judged this task already; your first answer stands.")
        except TuneoffError as error:
            return message(422, "Not recorded", str(error))
        return RedirectResponse("/", status_code=303)

    @app.post("/undo")
    async def undo_form(request: Request):
        if not csrf_ok(request, await request.form()):
            return message(403, "Refused", "This form is out of date: reload the page and try again.")
        try:
            await _run_sync(store.undo_last, request.state.annotator.id)
        except NothingToUndo as error:
            return message(409, "Nothing to undo", str(error))
        return RedirectResponse("/", status_code=303)

    @app.get("/admin")
    def admin_page(request: Request):
        if request.state.annotator.role != "lead":
            return message(403, "Refused", "This page is for leads.")
        return page(
            "admin.html", annotator=request.state.annotator, csrf=request.state.session.csrf, **admin_view(store)
        )

    @app.get("/api/next")
    def api_next(request: Request):
        me = request.state.annotator
        assignment = store.next_task(me.id, **limits)
        progress = store.progress(me.id, annotators_per_task=annotators_per_task)
        body = {"task": None, "progress": {"done": progress.done, "remaining": progress.remaining}}
        if assignment is not None and assignment.order is not None:
            body["task"] = {
                "task_id": assignment.task.id,
                "kind": "ranking",
                "prompt": assignment.task.prompt,
                "responses": assignment.shown,
                "choices": ["rank", "skip"],
            }
        elif assignment is not None:
            body["task"] = {
                "task_id": assignment.task.id,
                "kind": "pair",
                "prompt": assignment.task.prompt,
                "left": assignment.left,
                "right": assignment.right,
                "choices": list(CHOICES),
            }
        return body

    @app.post("/api/judgments")
    def api_judgment(request: Request, judgment: JudgmentIn):
        try:
            judgment_id, created = store.record_judgment(
                request.state.annotator.id,
                judgment.task_id,
                judgment.choice,
                ranking=judgment.ranking,
                seconds=judgment.seconds,
                reason=judgment.reason,
            )
        except NotAssigned as error:
            return JSONResponse({"detail": str(error)}, status_code=403)
        except ConflictingJudgment as error:
            return JSONResponse({"detail": str(error)}, status_code=409)
        except TuneoffError as error:
            return JSONResponse({"detail": str(error)}, status_code=422)
        return JSONResponse({"judgment_id": judgment_id, "created": created}, status_code=201 if created else 200)

    @app.post("/api/undo")
    def api_undo(request: Request):
        try:
            return {"task_id": store.undo_last(request.state.annotator.id)}
        except NothingToUndo as error:
            return JSONResponse({"detail": str(error)}, status_code=409)

    @app.get("/api/progress")
    def api_progress(request: Request):
        progress = store.progress(request.state.annotator.id, annotators_per_task=annotators_per_task)
        return {"done": progress.done, "remaining": progress.remaining}

    @app.get("/api/admin")
    def api_admin(request: Request):
        if request.state.annotator.role != "lead":
            return JSONResponse({"detail": "for leads only"}, status_code=403)
        from tuneoff.feedback.agreement import finite

        return finite(admin_view(store))  # NaN (undefined so far) as null, as `label stats --json` writes it

    return app


def ranking_from_form(form) -> list[int]:
    """The positions shown, best first, from the form's ``rank-P`` fields (rank 1..K for the response shown at
    position P); TuneoffError unless the ranks are 1..K, each once."""
    ranks = {}
    for key, value in form.items():
        if not key.startswith("rank-"):
            continue
        position, rank = key[5:], str(value)
        if not (_small_number(position) and _small_number(rank)):
            raise TuneoffError("give every response a rank")
        ranks[int(position)] = int(rank)
    if sorted(ranks.values()) != list(range(1, len(ranks) + 1)) or sorted(ranks) != list(range(len(ranks))):
        raise TuneoffError(f"give the {len(ranks)} responses the ranks 1 to {len(ranks)}, each once")
    return sorted(ranks, key=ranks.get)


def _small_number(text: str) -> bool:
    """ASCII digits, at most 6 of them (isdigit alone accepts ² and numbers int() refuses to read)."""
    return 0 < len(text) <= 6 and text.isascii() and text.isdecimal()


def admin_view(store: Store) -> dict:
    """What a lead watches: per annotator (judgments, skips, ties, median seconds, agreement with the others'
    majority, position bias: share of left choices, length bias: share of longer choices, last judgment, access),
    and the overall agreement so far (Fleiss' kappa, Krippendorff's alpha)."""
    from tuneoff.feedback.agreement import summarize

    judgments = store.judgments()
    summary = summarize(judgments)
    rows = []
    for annotator in store.annotators():
        mine = [j for j in judgments if j.annotator == annotator.name]
        timed = sorted(j.seconds for j in mine if j.seconds is not None)
        rows.append(
            {
                "name": annotator.name,
                "role": annotator.role,
                "access": "revoked" if annotator.revoked else ("token" if annotator.can_log_in else "imported"),
                "judgments": len(mine),
                "skips": sum(j.choice == "skip" for j in mine),
                "ties": sum(j.preferred == "tie" for j in mine),
                "median_seconds": timed[len(timed) // 2] if timed else None,
                "agreement_with_majority": summary["agreement_with_majority"].get(annotator.name),
                "position_bias": summary["position_bias"]["per_annotator"].get(annotator.name),
                "length_bias": summary["length_bias"]["per_annotator"].get(annotator.name),
                "last": max((j.created_at for j in mine), default=None),
            }
        )
    return {
        "annotators": rows,
        "tasks": store.count_tasks(),
        "fleiss_kappa": summary["fleiss_kappa"],
        "krippendorff_alpha": summary["krippendorff_alpha"],
        "position_bias": summary["position_bias"]["overall"],
        "length_bias": summary["length_bias"]["overall"],
    }


class Guard:
    """ASGI middleware in front of every route: the body-size cap, the cross-site check of the page's forms, and
    authentication (the annotator behind the request, or 401 on all but /login).

    The API reads ``Authorization: Bearer``, the pages the session cookie. Plain ASGI rather than
    ``@app.middleware``: the latter costs a task group and memory streams per request.
    """

    def __init__(self, app, store: Store, deny, refuse):
        self.app, self.store, self.deny, self.refuse = app, store, deny, refuse

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + SECURITY_HEADERS
            await send(message)

        path, request = scope["path"], Request(scope)
        if scope["method"] not in ("GET", "HEAD", "OPTIONS"):
            body = await read_capped(request, receive)
            if body is DISCONNECTED:  # the client went away mid-body: nothing of a half-sent form is recorded
                return None
            if body is None:
                too_large = JSONResponse({"detail": f"request body over {MAX_BODY} bytes"}, status_code=413)
                return await too_large(scope, receive, send_with_headers)
            receive = replay(body)
            if not path.startswith("/api/") and not same_origin(request):
                why = "Cross-site request refused: this form was not sent from this labelling page."
                return await self.refuse(path, why)(scope, receive, send_with_headers)
        if path not in PUBLIC_PATHS:
            state = scope.setdefault("state", {})
            if path.startswith("/api/"):
                scheme, _, token = request.headers.get("authorization", "").partition(" ")
                annotator = self.store.annotator_by_token(token.strip() if scheme.lower() == "bearer" else None)
            else:
                session = self.store.session(request.cookies.get(COOKIE))
                annotator = session.annotator if session else None
                state["session"] = session
            if annotator is None:
                return await self.deny(path)(scope, receive, send_with_headers)
            state["annotator"] = annotator
        await self.app(scope, receive, send_with_headers)


DISCONNECTED = object()
"""What :func:`read_capped` returns when the client disconnected before its body ended."""


async def read_capped(request: Request, receive):
    """The whole request body; None once it passes MAX_BODY (declared or streamed); DISCONNECTED when the client
    went away first."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY:
        return None
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return DISCONNECTED
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def replay(body: bytes):
    """A receive callable that hands the app the body already read."""
    sent = False

    async def receive():
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


def same_origin(request: Request) -> bool:
    """Whether a form post comes from this server's own pages: its Origin (or, without one, its Referer) names
    the host and port the request was sent to. Browsers send Origin with every POST; a request with neither
    header is refused too (no browser page sends one without them)."""
    host = request.headers.get("host", "")
    source = request.headers.get("origin") or request.headers.get("referer")
    if not source or source == "null" or not host:
        return False
    return urlsplit(source).netloc.lower() == host.lower()


SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    # same-origin, not no-referrer: with no-referrer a browser sends `Origin: null` on form posts, which the
    # cross-site check could not tell from an attacker's sandboxed page
    (b"referrer-policy", b"same-origin"),
    (b"cache-control", b"no-store"),
]


async def _run_sync(function, *args, **kwargs):
    """Run a blocking store call off the event loop (SQLite may wait for the write lock)."""
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(function, *args, **kwargs)


def _float_or_none(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def serve(
    db_path: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    annotators_per_task: int = 3,
    lease_seconds: float = 1800.0,
    guidelines: str | None = None,
    log_level: str = "info",
) -> None:
    """Run the labelling server until interrupted."""
    import uvicorn

    app = create_app(
        db_path, annotators_per_task=annotators_per_task, lease_seconds=lease_seconds, guidelines=guidelines
    )
    uvicorn.run(app, host=host, port=port, log_level=log_level)
