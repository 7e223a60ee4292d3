"""The tab and the API under Forge's stack (gradio 4.40.0, fastapi 0.104.1, pydantic 2.8.2), in a second
environment that takes torch and the rest from this one and adds Forge's pins on top."""

from __future__ import annotations

import os
import site
import subprocess
from pathlib import Path

from venvs import cached_venv, venv_python

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
FORGE_PINS = ["torch==2.13.0", "gradio==4.40.0", "fastapi==0.104.1", "pydantic==2.8.2"]


def _forge_venv():
    main_site = site.getsitepackages()[0]

    def build(python: Path) -> None:
        own_site = subprocess.run([str(python), "-c", "import site; print(site.getsitepackages()[0])"],
                                  capture_output=True, text=True, check=True).stdout.strip()
        # Packages missing here (torch, diffusers, transformers...) come from the main environment.
        Path(own_site, "main_env.pth").write_text(main_site + "\n")
        constraints = python.parent.parent / "forge-constraints.txt"
        constraints.write_text("\n".join(FORGE_PINS) + "\n")
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                        "-c", str(constraints), "gradio==4.40.0"], check=True, timeout=1200)

    return cached_venv("forge-gradio4", (main_site + "\n".join(FORGE_PINS)).encode(), build)


def test_tab_and_api_work_under_gradio_4(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)])}
    with _forge_venv() as venv:
        result = subprocess.run([str(venv_python(venv)), str(TESTS / "gradio4_smoke.py"), str(tmp_path)],
                                capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "FAIL" not in result.stdout
