#!/usr/bin/env python3
"""Run the Dreambooth engine outside the WebUI, setting up its own virtual environment first.

    python3 standalone.py demo                      train the built-in small model (CPU, a few minutes)
    python3 standalone.py train --config my.json    train per a project file (see README)
    python3 standalone.py ui                        the Dreambooth tab in a browser page, without the WebUI
    python3 standalone.py test                      run the test suite (installs Debian's chromium for the
                                                    browser test when missing and run as root)

The environment (.venv beside this file) gets what the command needs, at the WebUI v1.10.1 versions pinned in
constraints.txt: the engine (requirements.txt) for demo and train, gradio too for ui
(requirements-ui.txt), the test tools too for test (requirements-test.txt, and DeepSpeed built against the
venv's torch). It is set up again only when those change.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("DREAMBOOTH_VENV", ROOT / ".venv"))
# What each command installs (each list includes the ones before it).
NEEDS = {"engine": ("requirements.txt",), "ui": ("requirements.txt", "requirements-ui.txt"),
         "test": ("requirements.txt", "requirements-ui.txt", "requirements-test.txt")}
COMMAND_NEEDS = {"test": "test", "ui": "ui"}  # every other command: the engine alone
# Built against the venv's torch (their build imports it, so no isolated build that could fetch another torch);
# their own dependencies are in the requirement files. DeepSpeed: the tests of its ZeRO launch.
BUILT_HERE = {"test": ("deepspeed==0.14.4",)}


def venv_python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def pip(*args: str) -> None:
    # Every install passes the constraints file, so nothing can resolve an unpinned torch.
    command = [str(venv_python()), "-m", "pip", "install", "--disable-pip-version-check",
               "-c", str(ROOT / "constraints.txt"), *args]
    print("+", " ".join(command[3:]), flush=True)
    subprocess.run(command, check=True)


def ensure_environment(kind: str) -> None:
    """The venv with what `kind` needs; a set installed before (and unchanged since) is not installed again."""
    stamp = VENV / ".dreambooth-stamp.json"
    files = NEEDS[kind]
    built = BUILT_HERE.get(kind, ())
    digest = hashlib.sha256(b"".join((ROOT / f).read_bytes() for f in ("constraints.txt", *files))
                            + " ".join(built).encode()).hexdigest()
    done = json.loads(stamp.read_text()) if stamp.is_file() else {}
    if done.get(kind) == digest and venv_python().exists():
        return
    print(f"Setting up {VENV} for `{kind}` (the first time takes a few minutes: torch, diffusers, transformers"
          + (", gradio" if kind != "engine" else "") + (", the test tools" if kind == "test" else "") + ")",
          flush=True)
    if not venv_python().exists():
        venv.EnvBuilder(with_pip=True).create(VENV)
    pip(*[arg for f in files for arg in ("-r", str(ROOT / f))])
    if built:
        pip("--no-build-isolation", "--no-deps", *built)
    done[kind] = digest
    stamp.write_text(json.dumps(done))


def ensure_chromium() -> None:
    """The browser test drives Debian's Chromium; install it when missing and this user can (as on CI)."""
    if shutil.which("chromium") or os.environ.get("DREAMBOOTH_CHROMIUM"):
        return
    if os.name == "posix" and os.geteuid() == 0 and shutil.which("apt-get"):
        print("Installing Chromium for the browser test (apt-get install chromium)", flush=True)
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], check=True,
                       env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
    else:
        print("Chromium is missing: the browser test will fail. Install it with: sudo apt-get install chromium "
              "(or set DREAMBOOTH_CHROMIUM to a Chromium binary).", flush=True)


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    ensure_environment(COMMAND_NEEDS.get(argv[0], "engine"))
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               DREAMBOOTH_PROG=f"python3 {Path(sys.argv[0]).name}")
    if argv[0] == "test":
        ensure_chromium()
        command, cwd = [str(venv_python()), "-m", "pytest", *argv[1:]], ROOT
    else:
        # The user's own folder: relative paths they give (photos, cfg.json, the default ./models) mean theirs.
        command, cwd = [str(venv_python()), "-m", "dreambooth_ext", *argv], Path.cwd()
    if os.name == "nt":
        return subprocess.run(command, cwd=cwd, env=env).returncode
    # Become the venv's Python: Ctrl+C, signals and the exit code are the engine's own, with no wrapper between.
    sys.stdout.flush()
    sys.stderr.flush()
    os.chdir(cwd)
    os.execve(command[0], command, env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
