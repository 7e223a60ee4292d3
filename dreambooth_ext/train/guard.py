"""What keeps a run from losing work: one run per project at a time, and output folders known to be writable
before any model loads, with every path the run writes within the file system's limits and outside the training
images."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import contains, resolved, uses_class_images
from ..errors import DreamboothError
from .resuming import STATE_FOLDER, beside

if TYPE_CHECKING:
    from ..config import Concept, Config
    from ..hosts.base import Host

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


# ----------------------------------------------------------------------------------------------------------
# Where a run writes: every name and path within the file system's limits, no image into a training folder

NAME_MAX = 255  # bytes per name on ext4, XFS, btrfs and APFS (NTFS: 255 characters), where pathconf cannot tell
PATH_MAX = 4096  # bytes per path on Linux, its closing NUL included, where pathconf cannot tell
WINDOWS_MAX_PATH = 260  # characters per path on Windows, the NUL included, unless long paths are enabled
WINDOWS_LONG_PATH = 32767
TEMP_RANDOM = "XXXXXXXX"  # the 8 random characters tempfile.mkstemp puts in a name
STATE_FILE = "optimizer.safetensors"  # the longest name in a saved state (train/state.py)


def temp_name(name: str) -> str:
    """The hidden name a result is written under before it is renamed (models/export.py `_temp_path`): the
    longest name a save makes."""
    return f".{name}.{TEMP_RANDOM}.partial"


def last_step(config: Config, images: int) -> int:
    """The highest step a result is saved at (its name is the longest): max_train_steps, else at most one step per
    image and epoch."""
    if config.max_train_steps:
        return config.max_train_steps
    return max(1, math.ceil(config.num_train_epochs * max(images, 1) / config.gradient_accumulation_steps))


def project_name_problem(config: Config) -> str | None:
    """project_name's problem when the longest name a run writes with it is over NAME_MAX bytes, the limit of the
    usual file systems (a run checks its own folders' limits, and the paths, before it starts). Without the
    images, an epoch counts as one step."""
    project = config.project_name
    name = temp_name(f"{project}_{last_step(config, 1)}.safetensors")
    if _size(name) <= NAME_MAX:
        return None
    fit = NAME_MAX - (_size(name) - _size(project))
    return (f"project_name = {_short(project)!r} ({len(project)} characters): too long; a run writes its result "
            f"first as {name.replace(project, '<project>')!r} ({_size(name)} bytes with this name), and file "
            f"names can have at most {NAME_MAX} bytes: use a project name of at most {fit} {_units(project)}")


def written_paths(config: Config, host: Host, step: int) -> list[Path]:
    """The longest path the run writes in each folder it writes to, with its results saved at `step` (the last).
    The shorter ones (the yaml beside a checkpoint, .write-test-* files, the lock, project.json, launch files) fit
    where these do."""
    project, work = config.project_name, host.work_dir(config.project_name)
    results = [host.lora_path(project, step)] if config.train_mode == "lora" else []
    if config.train_mode != "lora" or config.lora_save_merged:
        results.append(host.checkpoint_path(project, step))
    paths = [result.parent / temp_name(result.name) for result in results]
    paths.append(beside(work / STATE_FOLDER, "partial") / STATE_FILE)
    if config.sample_every_n_steps:  # at most one sample per prompt line and concept (train/run.py sample_prompts)
        count = len(config.sample_prompts.splitlines()) * len(config.concepts)
        paths.append(work / "samples" / f"step{step:06d}_{max(count - 1, 0)}.png")
    for folder, concept in _class_folders(config, work):
        paths.append(folder / f".class_{concept.num_class_images:05d}.png.partial")  # data/class_images.py
    return paths


def _class_folders(config: Config, work: Path) -> list[tuple[Path, Concept]]:
    from ..data.class_images import class_folder  # brings torch: only a run, which has it already, asks

    return [(class_folder(concept, index, work), concept) for index, concept in enumerate(config.concepts)
            if uses_class_images(config, concept)]


def check_where_it_writes(config: Config, host: Host, images: int) -> None:
    """Before the project's lock and the model: every path the run will write fits the file system's limits, and
    no image it generates lands in a training images folder. Raises DreamboothError naming the limit and the fix."""
    _check_images_apart(config, host)
    step = last_step(config, images)
    problem = _first_path_problem(config, host, step)
    if problem is None:
        return
    fit = _longest_fitting_project(config, host, step)
    if fit:
        fix = (f"Use a shorter project name: at most {fit} {_units(config.project_name)} here "
               "(project_name, --project_name).")
    else:
        fix = ("Even a one-letter project name would not fit: use folders with shorter names and paths (--models-dir "
               "and --work-dir on the command line; in the WebUI --ckpt-dir, --lora-dir, --dreambooth-dir).")
    raise DreamboothError(f"{problem} {fix}")


def _first_path_problem(config: Config, host: Host, step: int) -> str | None:
    for path in written_paths(config, host, step):
        problem = path_problem(path, config.project_name)
        if problem:
            return problem
    return None


def _longest_fitting_project(config: Config, host: Host, step: int) -> int:
    """The longest project name (in ASCII characters) whose paths all fit; 0 when none does. Found by trying
    names, so it holds whatever way the host builds its paths."""
    low, high = 0, len(config.project_name.encode("utf-8"))
    while low < high:
        length = (low + high + 1) // 2
        if _first_path_problem(dataclasses.replace(config, project_name="x" * length), host, step) is None:
            low = length
        else:
            high = length - 1
    return low


def path_problem(path: Path, project: str = "") -> str | None:
    """Why `path` cannot be written for its length (a name over the file system's limit, or the whole path over
    the system's), or None. `project` is shown as <project> in the message when it is long."""
    full = Path(os.path.abspath(path))
    existing = _existing_folder(full)
    name_max, path_max = limits(existing)
    shown = _short(str(_shown(full, project)), 160)
    for name in full.relative_to(existing).parts:
        if _size(name) > name_max:
            return (f"The run would write {shown}, and the name {_shown(Path(name), project).name!r} has "
                    f"{_size(name)} bytes: this file system takes names of at most {name_max} bytes.")
    if _size(str(full)) >= path_max:  # path_max counts the closing NUL
        return (f"The run would write {shown}, a path of {_size(str(full))} bytes: this system takes paths of at "
                f"most {path_max - 1} bytes.")
    return None


def limits(folder: Path) -> tuple[int, int]:
    """(longest name, longest path with its closing NUL) that the file system holding `folder` takes."""
    if os.name == "nt":
        return NAME_MAX, WINDOWS_LONG_PATH if _windows_long_paths() else WINDOWS_MAX_PATH
    return _pathconf(folder, "PC_NAME_MAX", NAME_MAX), _pathconf(folder, "PC_PATH_MAX", PATH_MAX)


def _pathconf(folder: Path, key: str, default: int) -> int:
    try:
        value = os.pathconf(folder, key)
    except (OSError, ValueError, AttributeError):
        return default
    return value if value > 0 else default  # -1: the system states no limit; the usual one still applies


def _windows_long_paths() -> bool:
    """Whether Windows takes paths over 260 characters (LongPathsEnabled; Python itself is long-path aware)."""
    try:
        import winreg

        with winreg.OpenKey(winreg.HKEY_LOCAL_MACHINE, r"SYSTEM\CurrentControlSet\Control\FileSystem") as key:
            return winreg.QueryValueEx(key, "LongPathsEnabled")[0] == 1
    except (ImportError, OSError):
        return False


def _existing_folder(path: Path) -> Path:
    """The deepest folder of `path` that exists (the file system the rest will be created on)."""
    for folder in path.parents:
        if folder.is_dir():
            return folder
    return Path(path.anchor)


def _size(text: str) -> int:
    """A name's or path's length as the file system counts it: UTF-16 units on Windows, bytes elsewhere."""
    return len(text.encode("utf-16-le")) // 2 if os.name == "nt" else len(os.fsencode(text))


def _units(project: str) -> str:
    return "characters" if project.isascii() else "bytes (in UTF-8, a letter outside ASCII takes 2 to 4)"


def _short(text: str, most: int = 40) -> str:
    """`text`, its middle left out when it is longer than `most` characters."""
    head = most // 3  # the end says more: the file's name
    return text if len(text) <= most else f"{text[:head]}...{text[-(most - head - 3):]}"


def _shown(path: Path, project: str) -> Path:
    """`path` with a long project name shown as <project>, so the message stays readable."""
    return Path(str(path).replace(project, "<project>")) if len(project) > 20 else path


def _check_images_apart(config: Config, host: Host) -> None:
    """Generated class images and samples go to the project's work folder (class_dir empty): that folder must not
    be inside a training images folder, or the next run trains on them as the subject, nor inside validation_dir,
    or the monitor measures them as held-out photos."""
    work = host.work_dir(config.project_name)
    written = [folder for folder, concept in _class_folders(config, work) if not concept.class_dir]
    if config.sample_every_n_steps:
        written.append(work / "samples")
    readers = [("validation_dir", config.validation_dir, "measured as held-out photos of your subject",
                "Give validation_dir a folder of its own")]
    readers += [(f"concepts[{index}].instance_dir", concept.instance_dir, "trained as your subject next time",
                 "Move the training images out of it") for index, concept in enumerate(config.concepts)]
    for folder in written:
        for name, value, fate, fix in readers:
            if value and contains(resolved(value), resolved(folder)):
                raise DreamboothError(
                    f"{name} = {value!r} holds the project's work folder {work}, where the run writes images "
                    f"({folder}): they would be {fate}. {fix}, or give a work folder elsewhere (--work-dir; in "
                    "the WebUI --dreambooth-dir).")
