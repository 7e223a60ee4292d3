"""The test suite's own temporary folder, and the check that nothing is left in it.

Imported (by conftest.py) before anything imports torch: from then on the suite's process and every process it
starts write their temporary files under one folder of their own, `dreambooth-tests-<pid>-*` in the system's
temporary folder, instead of the system's folder itself. When the session ends:

- anything in it besides pytest's own folder (`pytest-of-<user>`, emptied by its `tmp_path_retention_policy`) and
  the caches the suite points there on purpose (KNOWN) is a leftover: a test, or the engine, wrote a temporary file
  and did not remove it. The run fails and names each one, so a new source of litter is caught when it appears.
- the folder is removed when the run passed. A failed run keeps it (pytest's folders of the failed tests are in
  it) and says where; the next run removes it, as it removes any such folder whose process has ended.

Used on the command line as a plugin too (`-p suite_temp`, with tests/ on the import path).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

PREFIX = "dreambooth-tests-"
# What may be in the suite's folder at the end, by the start of its name: caches the suite sends there on purpose
# (a user's runs keep them in the system's temporary folder), and Python's own, removed when the process exits.
KNOWN = {
    "torchinductor": "torch's inductor cache (compile_unet): TORCHINDUCTOR_CACHE_DIR",
    "gradio": "gradio's folder of the files a page shows or receives (the tab, `ui`): GRADIO_TEMP_DIR",
    "pymp-": "multiprocessing's folder of this process, removed when it exits",
}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def remove_ended_runs(system_temp: Path) -> None:
    """Folders of earlier runs whose process has ended: a failed run's (kept for a look) or a killed one's."""
    if os.name != "posix":  # os.kill(pid, 0) would end the process on Windows
        return
    for folder in system_temp.glob(f"{PREFIX}*"):
        pid = folder.name[len(PREFIX):].partition("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def start() -> Path:
    """The suite's temporary folder, made the temporary folder of this process and of every process it starts."""
    system_temp = Path(tempfile.gettempdir())
    remove_ended_runs(system_temp)
    folder = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=system_temp))
    os.environ["TMPDIR"] = str(folder)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder / "torchinductor")
    os.environ["GRADIO_TEMP_DIR"] = str(folder / "gradio")
    tempfile.tempdir = None  # gettempdir() reads TMPDIR again
    return folder


def leftovers(folder: Path) -> list[str]:
    """What is in the suite's folder that nobody removed: everything but pytest's own folder and KNOWN."""
    return sorted(path.name for path in folder.iterdir() if not path.name.startswith(("pytest-of-", *KNOWN)))


SUITE_TEMP = start()


@pytest.hookimpl(trylast=True)  # after pytest's own finish, which removes its folder per the retention policy
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    found = leftovers(SUITE_TEMP) if SUITE_TEMP.is_dir() else []
    if found:
        _say(session, f"Left in the temporary folder ({SUITE_TEMP}) by the tests or the engine: {', '.join(found)}. "
                      "Whatever writes them must remove them (or write inside the test's tmp_path).")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    if session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        shutil.rmtree(SUITE_TEMP, ignore_errors=True)
    elif SUITE_TEMP.is_dir():
        _say(session, f"The run's temporary files are kept in {SUITE_TEMP} (the next run removes them).")


def _say(session: pytest.Session, line: str) -> None:
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.ensure_newline()  # not on the line of the progress dots
        reporter.write_line(line)
    else:
        print(line)
