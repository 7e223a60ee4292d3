"""Saved projects: `<projects dir>/<name>/project.json`, with names that can never leave that folder; a project
whose run was stopped is listed too, with that run's options (what Resume needs after a restart)."""

from __future__ import annotations

from pathlib import Path

from .. import config as schema
from ..errors import DreamboothError
from ..train.guard import NAME_MAX, project_name_problem
from ..train.resuming import STATE_FOLDER, find_state, saved_state_meta

PROJECT_FILE = "project.json"


def check_project_name(name: str) -> str:
    """The name itself when it is a plain folder name; raises DreamboothError saying why not."""
    if not isinstance(name, str) or not name.strip():
        raise DreamboothError("The project name is empty: give a name such as 'anna_v1'.")
    if name != name.strip():
        raise DreamboothError(f"Project name {name!r} starts or ends with a space; remove it.")
    if name in (".", "..") or ".." in name:
        raise DreamboothError(f"Project name {name!r} contains '..'; use letters, digits, spaces, '-', '_' or '.'.")
    if any(sep in name for sep in ("/", "\\", ":")) or Path(name).is_absolute():
        raise DreamboothError(f"Project name {name!r} is a path; use a plain name (letters, digits, spaces, "
                              "'-', '_' or '.'), it becomes a folder inside the projects folder.")
    if not all(ch.isalnum() or ch in " -_." for ch in name):
        raise DreamboothError(f"Project name {name!r} has characters that cannot be in a folder name; use "
                              "letters, digits, spaces, '-', '_' or '.'.")
    if len(name.encode("utf-8")) > NAME_MAX:
        raise DreamboothError(f"Project name {name[:30]!r}... has {len(name)} characters: it becomes a folder name, "
                              f"and folder names can have at most {NAME_MAX} bytes. Use a shorter name.")
    return name


def project_file(projects_dir: Path, name: str) -> Path:
    return Path(projects_dir) / check_project_name(name) / PROJECT_FILE


def list_projects(projects_dir: Path) -> list[str]:
    """Names of the saved projects and of those with a stopped run, sorted."""
    root = Path(projects_dir)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir()
                  if (p / PROJECT_FILE).is_file() or find_state(p / STATE_FOLDER) is not None)


def stopped_run(projects_dir: Path, name: str) -> dict | None:
    """The project's stopped run as its saved state describes it (step, total_steps, config), or None."""
    return saved_state_meta(Path(projects_dir) / check_project_name(name) / STATE_FOLDER)


def project_info(projects_dir: Path, name: str) -> dict:
    folder = Path(projects_dir) / check_project_name(name)
    stopped = stopped_run(projects_dir, name)
    return {"name": name, "path": str(folder / PROJECT_FILE), "resumable": stopped is not None,
            "stopped_at": stopped.get("step") if stopped else None}


def save_project(projects_dir: Path, config: schema.Config) -> Path:
    """Save the project; refused when its name is too long for the results a run of it writes (saved, it could
    never be trained)."""
    path = project_file(projects_dir, config.project_name)
    problem = project_name_problem(config)
    if problem:
        raise DreamboothError(f"Not saved: {problem}.")
    return schema.save_json(config, path)


def load_project(projects_dir: Path, name: str) -> schema.Config:
    """The options of the project's stopped run when it has one (Resume continues with them), else its saved
    project.json."""
    stopped = stopped_run(projects_dir, name)
    if stopped is not None and isinstance(stopped.get("config"), dict):
        return schema.from_dict(stopped["config"])
    path = project_file(projects_dir, name)
    if not path.is_file():
        raise DreamboothError(f"There is no saved project {name!r} (looked for {path}); save it first or pick "
                              "one from the list.")
    return schema.load_json(path)
