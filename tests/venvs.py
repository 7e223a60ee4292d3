"""Throwaway virtual environments for tests that need another package set, built once and reused: kept in the
user's cache folder (not the temporary folder, which the suite empties), so a second run of the suite is as fast.

A cached environment is used under an exclusive lock: two test suites on one machine (or two sessions' CI)
take turns with it, so one never sees what the other installed into it for a moment."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

READY = ".ready"


def venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def venv_root() -> Path:
    """$DREAMBOOTH_TEST_VENVS, else `dreambooth_ext/test-venvs` in the user's cache folder (XDG_CACHE_HOME, ~/.cache)
    beside the engine's own cache: reused from run to run, deleted like any cache."""
    if os.environ.get("DREAMBOOTH_TEST_VENVS"):
        return Path(os.environ["DREAMBOOTH_TEST_VENVS"])
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "dreambooth_ext" / "test-venvs"


@contextlib.contextmanager
def exclusive(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `lock_path` (released when the holder exits, also when it is killed)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+b") as handle:
        if os.name == "nt":
            import msvcrt

            msvcrt.locking(handle.fileno(), msvcrt.LK_LOCK, 1)
        else:
            import fcntl

            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        yield


@contextlib.contextmanager
def cached_venv(name: str, key_material: bytes, build: Callable[[Path], None],
                create: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """A venv keyed by `key_material` under venv_root() (default ~/.cache/dreambooth_ext/test-venvs), held under
    its lock for the `with` block: built by `build(python)` the first time (CI pays once per machine), then
    reused. `create(path)` makes the empty environment (default: `python -m venv`)."""
    key = hashlib.sha256(key_material).hexdigest()[:12]
    venv = venv_root() / f"{name}-{key}"
    with exclusive(venv.with_name(venv.name + ".lock")):
        if not (venv / READY).is_file():
            shutil.rmtree(venv, ignore_errors=True)  # a build that was interrupted
            if create is not None:
                create(venv)
            else:
                subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
            build(venv_python(venv))
            (venv / READY).write_text("")
        yield venv
