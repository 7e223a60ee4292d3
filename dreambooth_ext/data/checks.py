"""Checks of a dataset before training: the mistakes that make Dreambooth results disappointing, found before any
model loads, each said once with what to do.

Warnings, not errors, except where training cannot work at all. CLIP's tokenizer (every family's text encoders
share its vocabulary) judges tokens and caption lengths.
"""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import Config, fill_prompt, uses_class_images
from ..errors import DreamboothError
from .dataset import HOLD_OUT_EVERY, Example, collect_examples, find_images, read_image_size

log = logging.getLogger(__name__)

MIN_IMAGES = 3
MAX_TOKEN_PIECES = 3
CAPTION_TOKENS = 75  # the text encoder's window: 77 positions less the start and end tokens
COMMON_TOKEN_ID = 20000  # whole-word tokens below this id are frequent words (the vocabulary is merge-ordered)
SMALL_IMAGE = 0.75  # an image whose short side is under this share of the resolution is upscaled noticeably


@dataclass
class DatasetReport:
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def raise_errors(self) -> None:
        if self.errors:
            raise DreamboothError("The dataset cannot be trained:\n" + "\n".join(f"  - {e}" for e in self.errors))


def check_dataset(config: Config, instances: list[Example] | None = None, tokenizer: Any = None, *,
                  held_out: list[Example] | None = None) -> DatasetReport:
    """Everything below, for every concept. `instances` (the training images), `held_out` (the photos the
    learning monitor holds out) and `tokenizer` are computed when not given."""
    report = DatasetReport()
    if instances is None:
        try:
            instances, held_out = collect_examples(config)
        except DreamboothError as exc:
            report.errors.append(str(exc))
            return report
    if tokenizer is None:
        from ..models.tokenizer import load_tokenizer

        tokenizer = load_tokenizer()
    for index, concept in enumerate(config.concepts):
        own = [e for e in instances if e.concept == index]
        label = f"concept {index + 1}" if len(config.concepts) > 1 else "the concept"
        if not own:
            report.warnings.append(
                f"{label}: no usable images in {concept.instance_dir!r}, so it will not be trained (and no class "
                "images are made for it). Add its photos to that folder, or remove the concept.")
            continue
        _check_token(report, label, concept, tokenizer)
        _check_image_count(report, label, own)
        _check_class_images(report, config, label, index, own)
        if config.hold_out_photos and held_out is not None and not any(e.concept == index for e in held_out):
            report.warnings.append(
                f"{label}: hold_out_photos is on but it has {len(own)} photos, fewer than {HOLD_OUT_EVERY}, so none "
                f"is held out (all are trained on). Add photos, or give held-out ones in validation_dir.")
    _check_captions(report, config, instances, tokenizer)
    _check_sizes(report, config, instances)
    _check_duplicates(report, instances)
    return report


def _pieces(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def _check_token(report: DatasetReport, label: str, concept: Any, tokenizer: Any) -> None:
    token = concept.token.strip()
    if not token:
        return
    if not concept.token_only and token.lower() == concept.class_word.strip().lower():
        report.warnings.append(
            f"{label}: the token {token!r} is the class word itself, so the model cannot tell your subject from "
            f"every other {concept.class_word}. Use a rare token such as 'ohwx' and keep {concept.class_word!r} as "
            "the class word.")
        return
    ids = _pieces(tokenizer, token)
    if len(ids) == 1 and ids[0] < COMMON_TOKEN_ID:
        report.warnings.append(
            f"{label}: the token {token!r} is a common word the text encoder already knows; training has to "
            "overwrite what it means, and it leaks into prompts that use the word. Use a rare token such as 'ohwx'.")
    elif len(ids) > MAX_TOKEN_PIECES:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        report.warnings.append(
            f"{label}: the token {token!r} splits into {len(ids)} pieces ({' '.join(pieces)}), which the model "
            "learns as several words. Use a short rare token that is one or two pieces, such as 'ohwx'.")


def _check_image_count(report: DatasetReport, label: str, own: list[Example]) -> None:
    if 0 < len(own) < MIN_IMAGES:
        report.warnings.append(
            f"{label}: only {len(own)} training image(s). Dreambooth needs a few views to separate your subject "
            f"from the photo it is in: use at least {MIN_IMAGES}, ideally 5-20 (different angles, light and "
            "backgrounds).")


def _check_class_images(report: DatasetReport, config: Config, label: str, index: int, own: list[Example]) -> None:
    concept = config.concepts[index]
    if not uses_class_images(config, concept):
        return
    class_prompt = fill_prompt(concept.class_prompt, concept)
    if concept.class_word.strip() and concept.class_word.lower() not in class_prompt.lower():
        report.warnings.append(
            f"{label}: the class prompt {class_prompt!r} does not name the class word {concept.class_word!r}; the "
            "class images should show the class your subject belongs to.")
    available = concept.num_class_images
    if not concept.generate_class_images and concept.class_dir:  # only what the folder holds
        folder = Path(concept.class_dir)
        available = min(available, len(find_images(folder)) if folder.is_dir() else 0)
        if not available:
            report.errors.append(
                f"{label}: class_dir {str(folder)!r} holds no images (or does not exist), and it is used as it is "
                "(generate_class_images off). Point it at your regularization images, turn generate_class_images "
                "on, or turn prior_preservation off.")
            return
    if available < len(own):
        report.warnings.append(
            f"{label}: {available} class image(s) for {len(own)} training images. Prior preservation needs at "
            "least as many class images as training images (100-200 is usual): raise num_class_images"
            + (" or add images to class_dir." if not concept.generate_class_images else "."))


def _check_captions(report: DatasetReport, config: Config, instances: list[Example], tokenizer: Any) -> None:
    long = []
    lacking = []
    for example in instances:
        ids = _pieces(tokenizer, example.caption)
        if len(ids) > CAPTION_TOKENS:
            cut = tokenizer.decode(ids[CAPTION_TOKENS:]).strip()
            long.append(f"{example.path.name} ({len(ids)} tokens; cut: {cut[:60]!r})")
        concept = config.concepts[example.concept]
        if not concept.token_only and concept.class_word and concept.class_word.lower() not in example.caption.lower():
            lacking.append(example.path.name)
    if long:
        report.warnings.append(
            f"{len(long)} caption(s) are longer than the text encoder's {CAPTION_TOKENS} tokens and are cut: "
            f"{'; '.join(long[:5])}{' ...' if len(long) > 5 else ''}. Shorten them.")
    if lacking:
        report.warnings.append(
            f"{len(lacking)} training image(s) have captions without the class word (e.g. {lacking[0]}): the model "
            "then ties your subject to the token alone, and prompts need exactly that caption. Caption them "
            "'photo of <token> <class>' (the default instance prompt does).")


def _check_sizes(report: DatasetReport, config: Config, instances: list[Example]) -> None:
    small = []
    for example in instances:
        width, height = read_image_size(example.path)
        if min(width, height) < SMALL_IMAGE * config.resolution:
            small.append(f"{example.path.name} ({width}x{height})")
    if small:
        report.warnings.append(
            f"{len(small)} image(s) are much smaller than the training resolution {config.resolution}: "
            f"{', '.join(small[:5])}{' ...' if len(small) > 5 else ''}. Upscaling blurs them and the model learns "
            "the blur: use larger photos, or a lower resolution.")


def _check_duplicates(report: DatasetReport, instances: list[Example]) -> None:
    by_digest: dict[str, list[Path]] = defaultdict(list)
    for example in instances:
        by_digest[hashlib.sha256(example.path.read_bytes()).hexdigest()].append(example.path)
    groups = [paths for paths in by_digest.values() if len(paths) > 1]
    if groups:
        shown = "; ".join(" = ".join(p.name for p in paths) for paths in groups[:5])
        report.warnings.append(
            f"{len(groups)} image(s) appear more than once ({shown}): duplicates weigh that photo double. Remove "
            "the copies.")
