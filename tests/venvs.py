"""Throwaway virtual environments for tests that need another package set, built once and reused."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

READY = ".ready"


def venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def cached_venv(name: str, key_material: bytes, build: Callable[[Path], None]) -> Path:
    """A venv keyed by `key_material` under $DREAMBOOTH_TEST_VENVS (default /tmp/dreambooth-venvs): built by
    `build(python)` the first time (CI pays once per machine), then reused."""
    key = hashlib.sha256(key_material).hexdigest()[:12]
    root = Path(os.environ.get("DREAMBOOTH_TEST_VENVS", Path(os.environ.get("TMPDIR", "/tmp")) / "dreambooth-venvs"))
    venv = root / f"{name}-{key}"
    if (venv / READY).is_file():
        return venv
    building = root / f"building-{name}-{key}-{os.getpid()}"
    shutil.rmtree(building, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(building)], check=True, timeout=300)
    build(venv_python(building))
    (building / READY).write_text("")
    try:
        building.rename(venv)
    except OSError:  # another run finished first
        shutil.rmtree(building, ignore_errors=True)
    return venv
