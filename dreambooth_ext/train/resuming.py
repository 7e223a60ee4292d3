"""Which projects have a stopped run or earlier results, and the checks that keep Start and Resume from losing
either (no torch here: they run before anything heavy loads)."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterable
from pathlib import Path

from ..errors import DreamboothError

STATE_FOLDER = "state"  # inside the project's work folder


def beside(folder: Path, kind: str) -> Path:
    """Where `save_state` writes a new state ("partial") and keeps the one it replaces ("old") until it is done."""
    folder = Path(folder)
    return folder.with_name(f"{folder.name}.{kind}")


def find_state(folder: Path) -> Path | None:
    """The saved state, also after a crash between the two renames of `save_state`."""
    for candidate in (Path(folder), beside(folder, "old")):
        if (candidate / "state.json").is_file():
            return candidate
    return None


def remove_partial_state(folder: Path) -> None:
    """Forget a state whose save was killed half-way (the complete one, if any, is kept)."""
    shutil.rmtree(beside(folder, "partial"), ignore_errors=True)


def forget_state(folder: Path) -> None:
    """Remove a finished run's state, with what a crash during its last save may have left beside it."""
    for path in (Path(folder), beside(folder, "old"), beside(folder, "partial")):
        shutil.rmtree(path, ignore_errors=True)


def saved_state_meta(folder: Path) -> dict | None:
    """What a saved state says of itself (step, total_steps, config, base), without reading its tensors; None when
    there is no saved state (or it cannot be read)."""
    found = find_state(folder)
    if found is None:
        return None
    try:
        meta = json.loads((found / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def check_run_choice(project: str, work_dir: Path, *, resume: bool) -> None:
    """Start on a project whose run was stopped would train from step 0 and replace its saved state; Resume on one
    with no stopped run has nothing to continue. Both are refused, saying what to do instead."""
    folder = Path(work_dir) / STATE_FOLDER
    found = find_state(folder)
    if resume:
        if found is None:
            raise DreamboothError(f"Project {project!r} has no stopped run to resume (no saved training state in "
                                  f"{folder}). Start trains it from step 0.")
        return
    if found is None:
        return
    meta = saved_state_meta(folder)
    where = f"step {meta.get('step')} of {meta.get('total_steps')}" if meta else "a saved step"
    raise DreamboothError(f"Project {project!r} has a run stopped at {where}, saved in {found}. Resume continues "
                          "it. To train this project from step 0 instead, delete that folder first, or give the new "
                          "run another project name.")


def check_same_base(project: str, saved: dict | None, name: str, sha256: str) -> None:
    """A stopped run continues only on the model it was trained on (`saved`: the state's record of it)."""
    if not saved:
        return  # a state saved before the base model was recorded
    was_hash, was_name = saved.get("sha256") or "", saved.get("name") or ""
    same = was_hash == sha256 if (was_hash and sha256) else was_name == name
    if same:
        return
    was = f"{was_name} [{was_hash[:10]}]" if was_hash else was_name
    now = f"{name} [{sha256[:10]}]" if sha256 else name
    raise DreamboothError(f"Project {project!r} was stopped while training {was}; the model to train now is {now}. "
                          f"A resumed run continues on the same model: load (or pick) {was_name} and resume "
                          "again. To train the other model, give the run another project name.")


def earlier_results(project: str, folders: Iterable[Path]) -> list[Path]:
    """The result files (`<project>_<step>.safetensors`) an earlier run of the project left in these folders."""
    name = re.compile(re.escape(project) + r"_\d+\.safetensors")
    return sorted(path for folder in map(Path, folders) if folder.is_dir() for path in folder.iterdir()
                  if name.fullmatch(path.name))


def check_no_earlier_results(project: str, folders: Iterable[Path]) -> None:
    """Start writes `<project>_<step>.safetensors`: over an earlier run's results (one of them may be the model
    being trained, or the one the WebUI has loaded) it would replace them. Refused, saying what to do instead."""
    found = earlier_results(project, folders)
    if not found:
        return
    names = ", ".join(path.name for path in found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
    raise DreamboothError(f"Project {project!r} has the results of an earlier run in {found[0].parent} ({names}); "
                          "a new run would write over them. Give it another project name (to train further from "
                          "one of them, pick or load it and use a new name), or move those files elsewhere first.")
