"""Checks of the user's input that need no model and no torch: the files and folders a config names.

The command line runs them before importing anything heavy, so a typo is reported in a fraction of a second;
the engine runs the same checks when a run starts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import DreamboothError

if TYPE_CHECKING:
    from .config import Config

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth")
SAFETENSORS_SUFFIX = ".safetensors"
IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})


def image_files(folder: str | os.PathLike) -> list[Path]:
    """Image files under `folder` (recursively, sorted by path; hidden files and folders skipped); [] when the
    folder does not exist."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [Path(dirpath, name) for name in filenames
                  if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS]
    return sorted(found)


def checkpoint_suffix(path: str | Path) -> str:
    """The file's lower-case suffix, once it is known to be an existing checkpoint file."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (SAFETENSORS_SUFFIX, *PICKLE_SUFFIXES):
        raise DreamboothError(f"{str(path)!r} has the extension {suffix or '(none)'!r}, which is not a checkpoint; "
                              "use a .safetensors (preferred) or .ckpt file")
    if not path.is_file():
        raise DreamboothError(f"Checkpoint {str(path)!r} does not exist; check the path")
    return suffix


def check_instance_folders(config: Config) -> None:
    for i, concept in enumerate(config.concepts):
        if not concept.instance_dir or not Path(concept.instance_dir).is_dir():
            raise DreamboothError(f"concepts[{i}].instance_dir = {concept.instance_dir!r}: the folder does not "
                                  "exist or is not a folder; give the folder of your training images")


def check_inputs(config: Config) -> None:
    """The base model file (when one is named) and every concept's image folder exist."""
    if config.base_model:
        checkpoint_suffix(config.base_model)
    check_instance_folders(config)
