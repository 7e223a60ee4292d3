"""What keeps a run from losing work: one run per project at a time, and output folders known to be writable
before any model loads."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from ..errors import DreamboothError

LOCK_NAME = ".run.lock"


def write_errors() -> tuple[type[BaseException], ...]:
    """What a failed write raises: OSError, or safetensors' own error wrapping one (e.g. 'No space left')."""
    from safetensors import SafetensorError

    return (OSError, SafetensorError)


def _lock(handle) -> bool:
    """Try to take an exclusive lock on an open file; False when someone holds it. The system drops it when the
    holding process ends, however it ends, so a crashed run never leaves a stale lock behind."""
    try:
        if os.name == "nt":
            import msvcrt

            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
        else:
            import fcntl

            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        started = time.strftime("%Y-%m-%d %H:%M", time.localtime(info["started"]))
        return f"process {info['pid']} on {info['host']}, started {started}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


@contextlib.contextmanager
def project_lock(work_dir: Path, project: str) -> Iterator[None]:
    """Hold the project's lock for a run; a second run of the same project (another process, or the tab and the
    command line at once) is refused with a message naming the first."""
    work_dir.mkdir(parents=True, exist_ok=True)
    path = work_dir / LOCK_NAME
    handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held open for the whole run
    try:
        if not _lock(handle):
            raise DreamboothError(f"Project {project!r} is being trained already ({_holder(path)}). Wait for that "
                                  "run to finish or cancel it, or train under another project name.")
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}))
        handle.flush()
        try:
            yield
        finally:
            # Gone before the lock is let go: another run never takes a lock on a file about to disappear (and
            # one that opens the path afterwards makes a new file and locks that).
            path.unlink(missing_ok=True)
    finally:
        handle.close()  # releases the lock


def check_writable(folder: Path, what: str, fix: str) -> None:
    """Create `folder` if needed and write a test file in it, so a run fails now and not after hours."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise DreamboothError(f"Cannot write {what} to {folder} ({exc.strerror or exc}). {fix}") from exc


class SaveFailed(DreamboothError):
    """A write that failed (disk full, a folder gone read-only), with nothing half-written left behind. The message
    ends with what to do next, which depends on what the run could keep (see `TrainingRun`)."""

    def __init__(self, what: str, path: Path, reason: str, next_step: str = ""):
        self.what, self.path, self.reason = what, Path(path), reason
        super().__init__(f"Could not save {what} to {path}: {reason}. Nothing half-written was left behind."
                         + (f" {next_step}" if next_step else ""))

    def then(self, next_step: str) -> SaveFailed:
        """The same failure, with what to do next."""
        return SaveFailed(self.what, self.path, self.reason, next_step)


def output_error(exc: BaseException, what: str, path: Path) -> SaveFailed:
    """The user's message for a failed write (disk full, a folder gone read-only...)."""
    reason = getattr(exc, "strerror", None) or str(exc).replace("Error while serializing: ", "")
    return SaveFailed(what, path, reason)
