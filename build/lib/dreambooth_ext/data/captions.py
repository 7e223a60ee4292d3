"""Captions of training images, following JoePenna's file and folder conventions.

- a sidecar `<stem>.txt` next to the image holds its caption;
- otherwise the text after the first `@` in the file name (`img-001@a photo of S.jpg`);
- folders below the instance folder: level 1 = subject (the token), level 2 = class word,
  deeper levels = a caption prefix (`effy/person/a picture of/img.jpg` -> `a picture of effy person`);
- in any caption, the standalone words `S` and `C`, and `{token}`, `<token>`, `{class}`, mean the token and
  the class word.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from pathlib import Path

from ..config import Concept, fill_prompt

logger = logging.getLogger(__name__)

# `S`/`C` count only as whole words: not inside words, not in "U.S." or "S-shaped", but "S's" and "S," do.
_PLACEHOLDER = re.compile(r"\{token\}|<token>|\{class\}|(?<![\w.\-])[SC](?![\w\-])")


def caption_for_image(path: str | os.PathLike, root: str | os.PathLike, concept: Concept) -> str:
    """Caption of an instance image from its sidecar, its file name, its folders or the concept's template."""
    path = Path(path)
    subject, class_word, prefix = _folder_levels(path, Path(root))
    local = dataclasses.replace(concept,
                                token=subject if subject is not None else concept.token,
                                class_word=class_word if class_word is not None else concept.class_word)
    own = own_caption(path)
    if own is not None:
        return substitute(own, local)
    if prefix:
        return substitute(f"{prefix} {{token}} {{class}}", local)
    return fill_prompt(local.instance_prompt, local)


def class_caption(path: str | os.PathLike, concept: Concept) -> str:
    """Caption of a class (regularization) image: its own caption if it has one, else the class prompt."""
    own = own_caption(Path(path))
    if own is not None:
        return substitute(own, concept)
    return fill_prompt(concept.class_prompt, concept)


def own_caption(path: Path) -> str | None:
    """The caption a file carries itself: its sidecar .txt, else the text after `@` in its name; or None."""
    sidecar = path.with_suffix(".txt")
    if sidecar.is_file():
        text = sidecar.read_text(encoding="utf-8", errors="replace").strip()
        if text:
            return text
        logger.warning("Caption file %s is empty; using the file name or the template instead", sidecar)
    stem = path.stem
    if "@" in stem:
        # The part before `@` is only an id (e.g. "002-DUPLICATE"); the caption is what follows.
        text = stem.split("@", 1)[1].strip()
        if text:
            return text
    return None


def substitute(caption: str, concept: Concept) -> str:
    """Replace S / {token} / <token> by the token and C / {class} by the class word (dropped if token_only)."""
    class_word = "" if concept.token_only else concept.class_word

    def replace(match: re.Match) -> str:
        text = match.group(0)
        return concept.token if text in ("S", "{token}", "<token>") else class_word

    # One pass, so a token that itself contains `C` or `{class}` is never substituted again.
    return " ".join(_PLACEHOLDER.sub(replace, caption).split())


def _folder_levels(path: Path, root: Path) -> tuple[str | None, str | None, str]:
    """(subject, class word, prefix) from the folders between `root` and the image; None where absent."""
    parts = _relative_parts(path.parent, root)
    subject = parts[0] if len(parts) >= 1 else None
    class_word = parts[1] if len(parts) >= 2 else None
    return subject, class_word, " ".join(parts[2:])


def _relative_parts(folder: Path, root: Path) -> tuple[str, ...]:
    for a, b in ((folder, root), (folder.resolve(), root.resolve())):
        try:
            return a.relative_to(b).parts
        except ValueError:
            continue
    # An image outside its concept folder (possible only through a caller's mistake) has no folder levels.
    return ()
