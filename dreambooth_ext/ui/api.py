"""The HTTP API: start / status / cancel a run, load its result, list and read saved projects.

Routes added to the WebUI's app get no authentication from the host, so they check the `--api-auth`
credentials themselves (HTTP basic, like the host's own /sdapi routes). Handlers are plain `def`s: FastAPI runs
them in its thread pool, and training itself runs in the JobManager's background thread.

A body FastAPI parses for a handler's parameter is read, whole, before any dependency runs (the credentials
check included): anyone who could reach the port could make the server hold what they sent. So the handlers take
their JSON from `json_object`, a dependency solved after the credentials check, which reads at most
MAX_BODY_BYTES. Both servers (the WebUI's app and the standalone one) get the routes, and so this, from
`register_api`. The standalone server, all of whose routes are ours, also caps gradio's own (`limit_every_body`).
"""

from __future__ import annotations

import json
import secrets
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBasic, HTTPBasicCredentials

from .. import config as schema
from ..errors import ConfigError, DreamboothError
from . import projects
from .adapter import HostAdapter
from .jobs import JobManager, error_message

PREFIX = "/dreambooth/v1"
MAX_BODY_BYTES = 1024 * 1024  # a project JSON is a few KB
JSON_KINDS = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "true or false"}


def parse_credentials(auth: str | None) -> dict[str, str]:
    """`user:pass,user2:pass2` (the WebUI's --api-auth) -> {user: pass}; a malformed entry is an error."""
    credentials = {}
    for entry in (auth or "").split(","):
        entry = entry.strip()
        if not entry:
            continue
        user, sep, password = entry.partition(":")
        if not sep:
            raise DreamboothError("--api-auth entries must look like user:password (several separated by commas); "
                                  f"got an entry without ':' ({user[:2]}...).")
        credentials[user] = password
    return credentials


def _auth_dependency(credentials: dict[str, str]):
    basic = Depends(HTTPBasic())

    def check(given: HTTPBasicCredentials = basic) -> None:
        ok = False
        for user, password in credentials.items():
            # Compare every entry in full, so timing says nothing about which part was wrong.
            ok |= (secrets.compare_digest(given.username.encode(), user.encode())
                   & secrets.compare_digest(given.password.encode(), password.encode()))
        if not ok:
            raise HTTPException(status_code=401, detail="Incorrect username or password",
                                headers={"WWW-Authenticate": "Basic"})

    return check


def _too_large() -> HTTPException:
    return HTTPException(status_code=413, detail={
        "message": f"The request body is over {MAX_BODY_BYTES // (1024 * 1024)} MB ({MAX_BODY_BYTES} bytes), the "
                   "most this API reads. Send the project's JSON only (a project is a few KB); image folders are "
                   "given as paths, not sent."})


async def read_capped_body(request: Request) -> bytes:
    """The body, refused (413) as soon as it is known to be over MAX_BODY_BYTES: by its Content-Length before a
    byte is read, else once one more byte than the limit has arrived (the rest is never read)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise _too_large()
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise _too_large()
    return bytes(body)


class BodyLimit:
    """ASGI middleware refusing (413) every request body over MAX_BODY_BYTES, for a whole app this extension owns:
    the standalone server, whose gradio routes (/run/predict...) read a body before their login check. Never on the
    WebUI's app: its routes are the host's; ours carry their own cap (`json_object`)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(PREFIX):  # ours check credentials first
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            return await self._refuse(scope, receive, send)
        received = 0
        started = False

        async def counted_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > MAX_BODY_BYTES:
                raise _too_large()  # FastAPI passes an HTTPException from a body read through as the answer
            return message

        async def watched_send(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, watched_send)
        except HTTPException as exc:  # a route that did not turn it into an answer
            if exc.status_code != 413 or started:
                raise
            await self._refuse(scope, receive, send)

    @staticmethod
    async def _refuse(scope, receive, send) -> None:
        await JSONResponse({"detail": _too_large().detail}, status_code=413)(scope, receive, send)


def limit_every_body(app: FastAPI) -> None:
    """Put BodyLimit in front of all of `app`, once, also after it has served (gradio's launch already made
    requests): the stack is built again at the next request, as the WebUI does for its own middleware."""
    if any(middleware.cls is BodyLimit for middleware in app.user_middleware):
        return
    app.middleware_stack = None
    app.add_middleware(BodyLimit)


async def json_object(request: Request) -> dict[str, Any]:
    """The body as a JSON object. A route dependency, so it runs after the credentials check."""
    body = await read_capped_body(request)
    try:
        data = json.loads(body) if body.strip() else None
    except ValueError as exc:  # bad UTF-8 too
        raise _unprocessable([f"The body is not JSON: {exc}"], "The request body cannot be read") from None
    if not isinstance(data, dict):
        got = "an empty body" if data is None else JSON_KINDS.get(type(data), "another JSON value")
        raise _unprocessable([f"The body must be a JSON object ({{...}}); got {got}."],
                             "The request body cannot be read")
    return data


def _unprocessable(problems: list[str], message: str) -> HTTPException:
    return HTTPException(status_code=422, detail={"message": message, "problems": problems})


def load_target(body: dict[str, Any]) -> str | int:
    """What `POST /load` is asked for: the "checkpoint" (a path or title, stripped) or the "step" ("best" or a
    number); 422 naming the problem for anything else."""
    usage = 'Give the checkpoint to load: {"checkpoint": "<path or title>"} or {"step": "best"} or {"step": <number>}'
    if "checkpoint" in body and "step" in body:
        raise _unprocessable([f'Give "checkpoint" or "step", not both. {usage}'], "Nothing to load")
    if "step" in body:
        step = body["step"]
        if step == "best" or (isinstance(step, int) and not isinstance(step, bool) and step >= 0):
            return step
        raise _unprocessable([f'"step" must be "best" or a step number (0 or more); got {json.dumps(step)}.'],
                             "Nothing to load")
    wanted = body.get("checkpoint")
    if not isinstance(wanted, str) or not wanted.strip():
        raise _unprocessable([usage], "Nothing to load")
    return wanted.strip()


def register_api(app: FastAPI, jobs: JobManager, host_adapter: HostAdapter, auth: str | None) -> None:
    """Add the routes to `app` (again on a new app after the host reloads; once per app)."""
    if any(getattr(route, "path", "").startswith(PREFIX) for route in app.routes):
        return
    credentials = parse_credentials(auth)
    dependencies = [Depends(_auth_dependency(credentials))] if credentials else []

    body = Depends(json_object)  # solved after `dependencies`: FastAPI puts a route's own dependencies first

    def start(body: dict[str, Any] = body, resume: bool = False, checkpoint: str | None = None) -> dict:
        """Body: a project config as JSON (as in project.json). `checkpoint`: a checkpoint title to train instead
        of base_model / the loaded model. `resume`: continue the project's saved state."""
        try:
            config = schema.validate(schema.from_dict(body))
            projects.check_project_name(config.project_name)
        except ConfigError as exc:
            raise _unprocessable(exc.problems, "The configuration is invalid") from None
        except DreamboothError as exc:
            raise _unprocessable([str(exc)], "The configuration is invalid") from None

        try:
            jobs.check_free()
        except DreamboothError as exc:
            raise HTTPException(status_code=409, detail={"message": error_message(exc)}) from None
        try:  # refusals that need no weights (unknown checkpoint, another family, fp8) come now, as a 422
            prepared_config, host = host_adapter.prepare_checked(config, checkpoint, resume=resume)
        except DreamboothError as exc:
            raise _unprocessable([error_message(exc)], "The run cannot start") from None
        try:
            jobs.start_background(prepared_config, host, resume=resume, wrap=host_adapter.background)
        except DreamboothError as exc:
            raise HTTPException(status_code=409, detail={"message": error_message(exc)}) from None
        return {"started": True, "status": jobs.status()}

    def status() -> dict:
        return jobs.status()

    def load(body: dict[str, Any] = body) -> dict:
        """Body: {"checkpoint": a path from status()["checkpoints"] or a title from the host's list}, or
        {"step": a step the last run saved, or "best": the learning monitor's best saved step}. Loads it and makes
        it the host's selected checkpoint, so the next generation uses it."""
        wanted = load_target(body)
        if jobs.active is not None:
            raise HTTPException(status_code=409, detail={"message": "A training run is active; load the model when "
                                                         "it has finished (or cancel it)."})
        try:
            if "step" in body:
                wanted = str(jobs.saved_model(wanted))
            title = host_adapter.queued(host_adapter.load_checkpoint)(wanted)
        except DreamboothError as exc:
            raise _unprocessable([error_message(exc)], "Cannot load that checkpoint") from None
        return {"loaded": title}

    def cancel() -> dict:
        return {"cancelling": jobs.cancel(), "status": jobs.status()}

    def list_projects() -> dict:
        root = host_adapter.projects_dir()
        return {"projects": [projects.project_info(root, name) for name in projects.list_projects(root)]}

    def read_project(name: str) -> dict:
        """A saved project's options, or those of its stopped run when it has one (what Resume continues)."""
        try:
            projects.check_project_name(name)
        except DreamboothError as exc:
            raise _unprocessable([error_message(exc)], "Invalid project name") from None
        root = host_adapter.projects_dir()
        if name not in projects.list_projects(root):
            raise HTTPException(status_code=404, detail={"message": f"There is no saved project {name!r}"})
        try:
            config = projects.load_project(root, name)
        except ConfigError as exc:
            raise _unprocessable(exc.problems, f"Project {name!r} cannot be read") from None
        return schema.to_dict(config)

    def add(path: str, endpoint, methods: list[str]) -> None:
        app.add_api_route(PREFIX + path, endpoint, methods=methods, dependencies=dependencies)

    add("/start", start, ["POST"])
    add("/status", status, ["GET"])
    add("/cancel", cancel, ["POST"])
    if host_adapter.load_checkpoint is not None:  # a host with a loaded model to replace
        add("/load", load, ["POST"])
    add("/projects", list_projects, ["GET"])
    add("/projects/{name}", read_project, ["GET"])

