"""The HTTP API: start / status / cancel a run, load its result, list and read saved projects.

Routes added to the WebUI's app get no authentication from the host, so they check the `--api-auth`
credentials themselves (HTTP basic, like the host's own /sdapi routes). Handlers are plain `def`s: FastAPI runs
them in its thread pool, and training itself runs in the JobManager's background thread.
"""

from __future__ import annotations

import secrets
from typing import Any

from fastapi import Depends, FastAPI, HTTPException
from fastapi.security import HTTPBasic, HTTPBasicCredentials

from .. import config as schema
from ..errors import ConfigError, DreamboothError
from . import projects
from .adapter import HostAdapter
from .jobs import JobManager, error_message

PREFIX = "/dreambooth/v1"


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


def _unprocessable(problems: list[str], message: str) -> HTTPException:
    return HTTPException(status_code=422, detail={"message": message, "problems": problems})


def register_api(app: FastAPI, jobs: JobManager, host_adapter: HostAdapter, auth: str | None) -> None:
    """Add the routes to `app` (again on a new app after the host reloads; once per app)."""
    if any(getattr(route, "path", "").startswith(PREFIX) for route in app.routes):
        return
    credentials = parse_credentials(auth)
    dependencies = [Depends(_auth_dependency(credentials))] if credentials else []

    def start(body: dict[str, Any], resume: bool = False, checkpoint: str | None = None) -> dict:
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

    def load(body: dict[str, Any]) -> dict:
        """Body: {"checkpoint": a path from status()["checkpoints"] or a title from the host's list}. Loads it and
        makes it the host's selected checkpoint, so the next generation uses it."""
        wanted = body.get("checkpoint") if isinstance(body, dict) else None
        if not isinstance(wanted, str) or not wanted.strip():
            raise _unprocessable(['Give the checkpoint to load: {"checkpoint": "<path or title>"}'],
                                 "Nothing to load")
        if jobs.active is not None:
            raise HTTPException(status_code=409, detail={"message": "A training run is active; load the model when "
                                                         "it has finished (or cancel it)."})
        try:
            title = host_adapter.queued(host_adapter.load_checkpoint)(wanted.strip())
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

