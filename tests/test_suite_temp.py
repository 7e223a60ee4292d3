"""The suite leaves nothing in the temporary folder: its own folder goes at the end, and a test (or the engine)
that leaves a file there fails the run, naming it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

LEAVES_A_FILE = """
import tempfile
from pathlib import Path

def test_writes(tmp_path):
    (tmp_path / "big.bin").write_bytes(bytes(1000))  # pytest's own folder: removed per its retention policy
    Path(tempfile.gettempdir(), "forgotten.txt").write_text("")
"""

CLEAN = """
import tempfile

def test_writes(tmp_path):
    (tmp_path / "big.bin").write_bytes(bytes(1000))
    with tempfile.TemporaryDirectory() as folder:  # removed by whoever made it
        assert folder.startswith(tempfile.gettempdir())
"""


def run_suite(tmp_path: Path, test: str) -> tuple[subprocess.CompletedProcess, Path]:
    """pytest with the project's settings (pyproject.toml) and suite_temp, in a system temporary folder of its own."""
    system_temp = tmp_path / "system-temp"
    system_temp.mkdir(exist_ok=True)
    (tmp_path / "test_one.py").write_text(test)
    env = {**os.environ, "TMPDIR": str(system_temp), "PYTHONPATH": str(TESTS)}
    done = subprocess.run([sys.executable, "-m", "pytest", "-c", str(ROOT / "pyproject.toml"), "-p", "suite_temp",
                           "-p", "no:cacheprovider", "-q", str(tmp_path / "test_one.py")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    return done, system_temp


def test_a_passing_run_leaves_nothing_in_the_temporary_folder(tmp_path):
    done, system_temp = run_suite(tmp_path, CLEAN)
    assert done.returncode == 0, done.stdout + done.stderr
    assert list(system_temp.iterdir()) == []  # pytest's folders included


def test_a_file_left_in_the_temporary_folder_fails_the_run_and_is_named(tmp_path):
    done, system_temp = run_suite(tmp_path, LEAVES_A_FILE)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "1 passed" in done.stdout and "forgotten.txt" in done.stdout
    kept = list(system_temp.iterdir())  # kept for a look, and said where
    assert len(kept) == 1 and str(kept[0]) in done.stdout
    assert not list(kept[0].rglob("big.bin"))  # the passing test's own folder is gone all the same
    # The next run removes what the ended one kept.
    done, system_temp = run_suite(tmp_path, CLEAN)
    assert done.returncode == 0, done.stdout + done.stderr
    assert list(system_temp.iterdir()) == []
