"""The cached test environments: two suites on one machine take turns with one, and a half-built one is rebuilt."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from venvs import cached_venv, venv_root

TESTS = Path(__file__).resolve().parent

HOLDER = """
import sys, time
sys.path.insert(0, {tests!r})
from pathlib import Path
from venvs import cached_venv
with cached_venv("locktest", b"k", lambda python: None, create=lambda path: path.mkdir(parents=True)) as venv:
    (venv / "in-use").write_text("")
    print("holding", flush=True)
    time.sleep(2)
    (venv / "in-use").unlink()
"""


def test_a_second_user_waits_until_the_first_is_done(tmp_path, monkeypatch):
    monkeypatch.setenv("DREAMBOOTH_TEST_VENVS", str(tmp_path))
    holder = subprocess.Popen([sys.executable, "-c", HOLDER.format(tests=str(TESTS))], stdout=subprocess.PIPE,
                              text=True, env={"DREAMBOOTH_TEST_VENVS": str(tmp_path)})
    try:
        assert holder.stdout.readline().strip() == "holding"
        started = time.monotonic()
        with cached_venv("locktest", b"k", lambda python: None, create=lambda path: path.mkdir()) as venv:
            waited = time.monotonic() - started
            assert not (venv / "in-use").exists()  # the other suite had finished with it
        assert waited > 0.5
    finally:
        holder.wait(30)


def test_an_interrupted_build_is_built_again(tmp_path, monkeypatch):
    monkeypatch.setenv("DREAMBOOTH_TEST_VENVS", str(tmp_path))
    builds = []

    def build(python):
        builds.append(python)
        if len(builds) == 1:
            raise KeyboardInterrupt  # killed half-way

    try:
        with cached_venv("half", b"k", build, create=lambda path: path.mkdir()):
            pass
    except KeyboardInterrupt:
        pass
    with cached_venv("half", b"k", build, create=lambda path: path.mkdir()) as venv:
        assert (venv / ".ready").is_file()
    with cached_venv("half", b"k", build, create=lambda path: path.mkdir()):
        pass
    assert len(builds) == 2


def test_the_environments_are_kept_in_the_users_cache_not_the_temporary_folder(tmp_path, monkeypatch):
    """The suite empties its temporary folder at the end: environments kept there would be built again every run
    (minutes each) and, before, were left there (gigabytes)."""
    monkeypatch.delenv("DREAMBOOTH_TEST_VENVS", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert venv_root() == tmp_path / "cache" / "dreambooth_ext" / "test-venvs"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert venv_root() == tmp_path / "home" / ".cache" / "dreambooth_ext" / "test-venvs"
    monkeypatch.setenv("DREAMBOOTH_TEST_VENVS", str(tmp_path / "mine"))
    assert venv_root() == tmp_path / "mine"
