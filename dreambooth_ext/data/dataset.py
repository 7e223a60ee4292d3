"""Training examples (path, caption, size) and a stateless, resumable plan of which go in each batch."""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from ..config import Config, uses_class_images
from ..errors import DreamboothError
from ..inputs import IMAGE_EXTENSIONS, check_instance_folders, image_files
from .buckets import make_buckets, nearest_bucket
from .captions import caption_for_image, class_caption

logger = logging.getLogger(__name__)

_EXIF_ORIENTATION = 0x0112
_ROTATED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that turn the picture a quarter: width <-> height


@dataclass(frozen=True)
class Example:
    """One image to train on."""

    path: Path
    caption: str
    concept: int
    is_class: bool
    size: tuple[int, int]  # (width, height) to train at


# ----------------------------------------------------------------------------------------------------------
# Finding and checking images


def find_images(folder: str | os.PathLike) -> list[Path]:
    """Image files under `folder`, recursively, sorted; hidden files and folders are skipped."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DreamboothError(f"folder {str(folder)!r} does not exist or is not a folder; check the path")
    return image_files(folder)


def read_image_size(path: Path) -> tuple[int, int]:
    """(width, height) as the picture will be shown (EXIF orientation applied), checking the file decodes.

    Cheap enough to run over a whole folder before any model loads: JPEGs are decoded at 1/8 scale and
    other formats only verified (PNG checksums), never fully decoded. Raises whatever PIL raises.
    """
    with Image.open(path) as image:
        width, height = image.size
        # The base getexif reads only the already-parsed header; PNG's override would decode the whole image
        # and leave it unable to verify().
        if Image.Image.getexif(image).get(_EXIF_ORIENTATION) in _ROTATED_ORIENTATIONS:
            width, height = height, width
        if image.format == "JPEG":
            image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()  # a truncated JPEG fails here, since PIL does not load truncated images by default
        else:
            image.verify()
    if width < 1 or height < 1:
        raise ValueError(f"empty image ({width}x{height})")
    return width, height


def _usable_images(paths: list[Path], limit: int | None = None) -> list[tuple[Path, tuple[int, int]]]:
    """(path, size) of the files that open, up to `limit`; one warning names every skipped file."""
    usable, skipped = [], []
    for path in paths:
        if limit is not None and len(usable) >= limit:
            break
        try:
            usable.append((path, read_image_size(path)))
        # PIL's decoders raise many error types on corrupt data; each just means "skip this file".
        except Exception as exc:  # noqa: BLE001
            skipped.append(f"{path} ({type(exc).__name__}: {exc})")
    if skipped:
        logger.warning("Skipping %d unreadable image(s); re-save or delete them:\n  %s",
                       len(skipped), "\n  ".join(skipped))
    return usable


def _train_size(config: Config, image_size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    if config.aspect_ratio_buckets:
        return nearest_bucket(image_size[0], image_size[1], buckets)
    return config.resolution, config.resolution


def _buckets(config: Config) -> list[tuple[int, int]]:
    return make_buckets(config.resolution) if config.aspect_ratio_buckets else []


# ----------------------------------------------------------------------------------------------------------
# Examples


HOLD_OUT_EVERY = 8  # hold_out_photos: one photo in this many, of a concept with at least this many


def collect_instance_examples(config: Config) -> list[Example]:
    """Every readable training image of every concept, with its caption and training size; without the photos
    that hold_out_photos keeps out of training."""
    return collect_examples(config)[0]


def collect_examples(config: Config) -> tuple[list[Example], list[Example]]:
    """The training images (as collect_instance_examples) and the held-out ones the learning monitor measures
    on: the photos hold_out_photos keeps out, then those of validation_dir."""
    everything = _every_instance_example(config)
    held = held_out_photos(everything) if config.hold_out_photos else []
    kept_out = {(e.concept, e.path) for e in held}
    training = [e for e in everything if (e.concept, e.path) not in kept_out]
    return training, held + _validation_examples(config)


def held_out_photos(examples: list[Example]) -> list[Example]:
    """One photo in HOLD_OUT_EVERY of each concept that has at least that many: its 8th, 16th, ... (in the
    order of its folder, sorted by path)."""
    held = []
    for concept in sorted({e.concept for e in examples}):
        own = [e for e in examples if e.concept == concept]
        held.extend(own[HOLD_OUT_EVERY - 1::HOLD_OUT_EVERY] if len(own) >= HOLD_OUT_EVERY else [])
    return held


def _validation_examples(config: Config) -> list[Example]:
    """The photos of validation_dir, captioned by the first concept's rules (as its training images are)."""
    if not config.validation_dir or not config.concepts:
        return []
    folder = Path(config.validation_dir).expanduser()
    usable = _usable_images(find_images(folder))
    if not usable:
        raise DreamboothError(f"validation_dir = {config.validation_dir!r} holds no readable image; put a few "
                              "photos of the subject that are not among the training images there, or leave it "
                              "empty")
    buckets, concept = _buckets(config), config.concepts[0]
    return [Example(path=path, caption=caption_for_image(path, folder, concept), concept=0, is_class=False,
                    size=_train_size(config, size, buckets)) for path, size in usable]


def _every_instance_example(config: Config) -> list[Example]:
    buckets = _buckets(config)
    examples: list[Example] = []
    folders = []
    check_instance_folders(config)
    for i, concept in enumerate(config.concepts):
        folder = Path(concept.instance_dir)
        folders.append(str(folder))
        usable = _usable_images(find_images(folder))
        if not usable:
            logger.warning("concepts[%d] has no usable images in %s; it will not be trained", i, folder)
        for path, size in usable:
            examples.append(Example(path=path, caption=caption_for_image(path, folder, concept), concept=i,
                                    is_class=False, size=_train_size(config, size, buckets)))
    if not examples:
        raise DreamboothError(
            f"no usable training images in {', '.join(repr(f) for f in folders) or 'any folder'} "
            f"(searched recursively for {', '.join(sorted(IMAGE_EXTENSIONS))}); add images to the concept "
            "folder(s) or fix instance_dir")
    return examples


def collect_class_examples(config: Config, class_dirs: list[Path],
                           trained: Collection[int] | None = None) -> list[Example]:
    """Class images of the concepts that use prior preservation (of those `trained`, the concepts that have
    training images; all when None): the first num_class_images readable ones."""
    if len(class_dirs) != len(config.concepts):
        raise ValueError(f"got {len(class_dirs)} class folders for {len(config.concepts)} concepts")
    if not config.prior_preservation:
        return []
    buckets = _buckets(config)
    examples: list[Example] = []
    for i, (concept, folder) in enumerate(zip(config.concepts, class_dirs, strict=True)):
        if not uses_class_images(config, concept) or (trained is not None and i not in trained):
            continue
        folder = Path(folder)
        if not folder.is_dir():
            raise DreamboothError(f"concepts[{i}] class folder {str(folder)!r} does not exist; set class_dir to "
                                  "a folder of class images, or leave it empty to generate them")
        usable = _usable_images(find_images(folder), limit=concept.num_class_images)
        if len(usable) < concept.num_class_images:
            logger.warning("concepts[%d] uses %d class image(s) from %s, fewer than num_class_images = %d",
                           i, len(usable), folder, concept.num_class_images)
        for path, size in usable:
            examples.append(Example(path=path, caption=class_caption(path, concept), concept=i, is_class=True,
                                    size=_train_size(config, size, buckets)))
    return examples


def tag_frequency(examples: list[Example]) -> dict[str, dict[str, int]]:
    """How often each comma-separated caption tag occurs, per concept folder (kohya's ss_tag_frequency)."""
    table: dict[str, dict[str, int]] = {}
    for example in examples:
        counts = table.setdefault(f"{example.concept + 1}_{example.path.parent.name}", {})
        for tag in (t.strip() for t in example.caption.split(",")):
            if tag:
                counts[tag] = counts.get(tag, 0) + 1
    return table


# ----------------------------------------------------------------------------------------------------------
# Deterministic randomness: everything is a pure function of (seed, what), so a resumed run repeats exactly.


def _derive_seed(*parts: object) -> int:
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)  # torch seeds must fit a signed 64-bit int


def flip_decision(seed: int, index: int, example: int, flip_p: float) -> bool:
    """Whether example `example` of batch `index` is mirrored; probability flip_p, same answer every time."""
    if flip_p <= 0:
        return False
    if flip_p >= 1:
        return True
    return _derive_seed("flip", seed, index, example) / 2**63 < flip_p


class BatchPlan:
    """Which examples form micro-batch number `index`: same-size batches, shuffled anew each epoch.

    `batch(index)` depends only on the constructor arguments and `index`, so resuming at any step gives
    exactly the batches an uninterrupted run would have seen.
    """

    _CACHED_EPOCHS = 2  # the current epoch and the next are all a training loop ever asks for

    def __init__(self, sizes: list[tuple[int, int]], batch_size: int, seed: int):
        if not sizes:
            raise ValueError("BatchPlan needs at least one example")
        if batch_size < 1:
            raise ValueError(f"batch_size = {batch_size}: must be at least 1")
        self.batch_size = batch_size
        self.seed = seed
        groups: dict[tuple[int, int], list[int]] = {}
        for i, size in enumerate(sizes):
            groups.setdefault(tuple(size), []).append(i)
        # Sorted by size so the plan does not depend on dict order or on which size came first.
        self._groups = [groups[size] for size in sorted(groups)]
        self.steps_per_epoch = sum(math.ceil(len(g) / batch_size) for g in self._groups)
        self._epochs: dict[int, list[list[int]]] = {}

    def batch(self, index: int) -> list[int]:
        """Example indices of micro-batch `index` (0-based, counted over all epochs)."""
        if index < 0:
            raise ValueError(f"batch index {index}: must be 0 or more")
        epoch, position = divmod(index, self.steps_per_epoch)
        return list(self._epoch_plan(epoch)[position])

    def _epoch_plan(self, epoch: int) -> list[list[int]]:
        plan = self._epochs.get(epoch)
        if plan is None:
            plan = self._make_epoch(epoch)
            if len(self._epochs) >= self._CACHED_EPOCHS:
                self._epochs.pop(min(self._epochs))
            self._epochs[epoch] = plan
        return plan

    def _make_epoch(self, epoch: int) -> list[list[int]]:
        generator = torch.Generator().manual_seed(_derive_seed(self.seed, epoch))
        batches = []
        for group in self._groups:
            # Shuffle inside each size group too, so batches are not the same companions every epoch.
            order = [group[j] for j in torch.randperm(len(group), generator=generator).tolist()]
            batches.extend(order[k:k + self.batch_size] for k in range(0, len(order), self.batch_size))
        return [batches[j] for j in torch.randperm(len(batches), generator=generator).tolist()]
