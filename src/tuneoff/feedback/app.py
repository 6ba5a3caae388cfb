"""The labelling web app: FastAPI with server-rendered pages (jinja2), no front-end build step.

Routes (every one but ``/login`` answers 401 without a valid token):
- ``GET /login``, ``POST /login`` (form field ``token``): sets an HttpOnly, SameSite=Strict cookie.
- ``GET /``: the next comparison for this annotator; ``POST /judge`` (form: ``task_id``, ``choice``,
  ``seconds``) records it and redirects back (Post/Redirect/Get). ``POST /logout``.
- ``GET /api/next``, ``POST /api/judgments`` (JSON ``{"task_id","choice","seconds"?}``),
  ``GET /api/progress``: the same with ``Authorization: Bearer TOKEN``, for scripts and load tests.

The page and the API authenticate differently on purpose: the cookie is never accepted by the API, and
the bearer header never by the page, so a cross-site form can reach neither with stolen ambient
credentials. Model text is untrusted: jinja2 autoescapes every variable, and a per-response CSP nonce
keeps any script that was not written by us from running even if escaping were ever bypassed.
"""

from __future__ import annotations

import secrets
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader
from pydantic import BaseModel

from tuneoff.errors import TuneoffError
from tuneoff.feedback.store import CHOICES, ConflictingJudgment, NotAssigned, Store

COOKIE = "tuneoff_token"
TEMPLATES = Path(__file__).resolve().parent / "templates"
PUBLIC_PATHS = {"/login"}


class JudgmentIn(BaseModel):
    task_id: str
    choice: str
    seconds: float | None = None


def create_app(db_path: str | Path, *, annotators_per_task: int = 3, lease_seconds: float = 1800.0) -> FastAPI:
    """The app over one feedback database; each task is given to ``annotators_per_task`` distinct people."""
    if annotators_per_task < 1:
        raise TuneoffError("--annotators-per-task must be at least 1")
    store = Store(db_path, create=False)
    templates = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=True)  # every variable escaped

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

    def deny(path: str) -> Response:
        if path.startswith("/api/"):
            return JSONResponse(
                {"detail": "missing or invalid token"}, status_code=401, headers={"WWW-Authenticate": "Bearer"}
            )
        return page(
            "message.html",
            401,
            title="Please log in",
            message="This page needs an annotator token.",
            link=("/login", "Log in"),
        )

    app.add_middleware(Authenticate, store=store, deny=deny)

    @app.get("/login")
    def login_form():
        return page("login.html")

    @app.post("/login")
    async def login(request: Request):
        token = str((await request.form()).get("token", "")).strip()
        if store.annotator_by_token(token) is None:
            return page("login.html", 401, error="That token is not valid.")
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(
            COOKIE, token, httponly=True, samesite="strict", path="/", secure=request.url.scheme == "https"
        )
        return response

    @app.post("/logout")
    def logout():
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE, path="/")
        return response

    @app.get("/")
    def label_page(request: Request):
        me = request.state.annotator
        assignment = store.next_task(me.id, **limits)
        progress = store.progress(me.id, annotators_per_task=annotators_per_task)
        return page("label.html", annotator=me.name, assignment=assignment, progress=progress)

    @app.post("/judge")
    async def judge_form(request: Request):
        form = await request.form()
        seconds = _float_or_none(form.get("seconds"))
        try:
            await _run_sync(
                store.record_judgment,
                request.state.annotator.id,
                str(form.get("task_id", "")),
                str(form.get("choice", "")),
                seconds=seconds,
            )
        except NotAssigned:
            return page(
                "message.html", 403, title="Refused", message="That task is not yours to judge.", link=("/", "Back")
            )
        except ConflictingJudgment:
            return page(
                "message.html",
                409,
                title="Already judged",
                message="You judged this task already; your first answer stands.",
                link=("/", "Next task"),
            )
        except TuneoffError as error:
            return page("message.html", 422, title="Not recorded", message=str(error), link=("/", "Back"))
        return RedirectResponse("/", status_code=303)

    @app.get("/api/next")
    def api_next(request: Request):
        me = request.state.annotator
        assignment = store.next_task(me.id, **limits)
        progress = store.progress(me.id, annotators_per_task=annotators_per_task)
        body = {"task": None, "progress": {"done": progress.done, "remaining": progress.remaining}}
        if assignment is not None:
            body["task"] = {
                "task_id": assignment.task.id,
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
                request.state.annotator.id, judgment.task_id, judgment.choice, seconds=judgment.seconds
            )
        except NotAssigned as error:
            return JSONResponse({"detail": str(error)}, status_code=403)
        except ConflictingJudgment as error:
            return JSONResponse({"detail": str(error)}, status_code=409)
        except TuneoffError as error:
            return JSONResponse({"detail": str(error)}, status_code=422)
        return JSONResponse({"judgment_id": judgment_id, "created": created}, status_code=201 if created else 200)

    @app.get("/api/progress")
    def api_progress(request: Request):
        progress = store.progress(request.state.annotator.id, annotators_per_task=annotators_per_task)
        return {"done": progress.done, "remaining": progress.remaining}

    return app


class Authenticate:
    """ASGI middleware: find the annotator behind the request's token, or answer 401 (all but /login).

    The API reads ``Authorization: Bearer``, the pages read the login cookie. Plain ASGI rather than
    ``@app.middleware``: the latter costs a task group and memory streams per request.
    """

    def __init__(self, app, store: Store, deny):
        self.app, self.store, self.deny = app, store, deny

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + SECURITY_HEADERS
            await send(message)

        path = scope["path"]
        if path not in PUBLIC_PATHS:
            request = Request(scope)
            if path.startswith("/api/"):
                scheme, _, token = request.headers.get("authorization", "").partition(" ")
                token = token.strip() if scheme.lower() == "bearer" else None
            else:
                token = request.cookies.get(COOKIE)
            annotator = self.store.annotator_by_token(token)
            if annotator is None:
                return await self.deny(path)(scope, receive, send_with_headers)
            scope.setdefault("state", {})["annotator"] = annotator
        await self.app(scope, receive, send_with_headers)


SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
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
    log_level: str = "info",
) -> None:
    """Run the labelling server until interrupted."""
    import uvicorn

    app = create_app(db_path, annotators_per_task=annotators_per_task, lease_seconds=lease_seconds)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
