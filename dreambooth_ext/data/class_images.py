"""Class (regularization) images for prior preservation: use what the folder has, generate the rest with
the base model and save them there for the next run."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

from ..config import Concept, Config, fill_prompt, uses_class_images
from .dataset import find_images

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClassImageJob:
    """Images one concept still needs."""

    concept: int
    folder: Path
    prompt: str
    existing: int
    missing: int




def class_folder(concept: Concept, index: int, work_dir: Path) -> Path:
    """The concept's class folder, or one named after its class prompt in the project's work folder."""
    if concept.class_dir:
        return Path(concept.class_dir)
    slug = re.sub(r"[^A-Za-z0-9]+", "_", fill_prompt(concept.class_prompt, concept)).strip("_")[:60] or "class"
    return work_dir / "class_images" / f"{index}_{slug}"


def plan_class_images(config: Config, work_dir: Path,
                      trained: Collection[int] | None = None) -> tuple[list[Path], list[ClassImageJob]]:
    """Class folders of every concept, and what is missing in each of those `trained` (the concepts that have
    training images; all when None): a concept that is not trained needs no class images."""
    folders, jobs = [], []
    for index, concept in enumerate(config.concepts):
        folder = class_folder(concept, index, work_dir)
        folders.append(folder)
        if not uses_class_images(config, concept) or (trained is not None and index not in trained):
            continue
        existing = len(find_images(folder)) if folder.is_dir() else 0
        missing = max(0, concept.num_class_images - existing) if concept.generate_class_images else 0
        jobs.append(ClassImageJob(index, folder, fill_prompt(concept.class_prompt, concept), existing, missing))
    return folders, jobs


def generate_class_images(jobs: list[ClassImageJob], render: Callable[[str, int], object], *,
                          on_image: Callable[[int, int], None] | None = None,
                          should_stop: Callable[[], bool] | None = None) -> int:
    """Render each missing image with `render(prompt, seed) -> PIL image` and save it atomically.

    Returns how many were made. A stop request ends between images; what was saved is kept for next time.
    """
    total = sum(job.missing for job in jobs)
    made = 0
    for job in jobs:
        if not job.missing:
            continue
        job.folder.mkdir(parents=True, exist_ok=True)
        log.info("Generating %d class images for concept %d (%r) in %s", job.missing, job.concept, job.prompt,
                 job.folder)
        n = job.existing
        for _ in range(job.missing):
            if should_stop and should_stop():
                return made
            while (job.folder / f"class_{n:05d}.png").exists():
                n += 1
            image = render(job.prompt, n)
            _save_png(image, job.folder / f"class_{n:05d}.png")
            n += 1
            made += 1
            if on_image:
                on_image(made, total)
    return made


def _save_png(image, path: Path) -> None:
    # A half-written file must never count as a class image: write a hidden temp name, then rename.
    tmp = path.with_name(f".{path.name}.partial")
    with open(tmp, "wb") as handle:
        image.save(handle, format="PNG")
    os.replace(tmp, path)
