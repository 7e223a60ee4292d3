"""The CLIP tokenizer, built offline.

SD1 and SD2 share OpenAI's CLIP BPE vocabulary, one gzipped merges file that this package carries
(clip_vocab/, MIT-licensed by OpenAI; the same file open-clip-torch ships). We derive transformers'
vocab.json/merges.txt from it once and cache them, so no model hub access is ever needed and a plain
`pip install .` gives a working engine.
"""

from __future__ import annotations

import gzip
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from ..errors import DreamboothError

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
VOCAB_SIZE = 49408
MAX_LENGTH = 77
START_TOKEN, END_TOKEN = "<|startoftext|>", "<|endoftext|>"
# CLIP uses the first 49152 - 256 - 2 merges of the file; 256 byte symbols (twice) and 2 specials complete it.
_NUM_MERGES = 49152 - 256 - 2
_CACHE_VERSION = "clip-bpe-v1"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table (the byte-level BPE alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


BPE_PATH = Path(__file__).resolve().parent / "clip_vocab" / BPE_FILE


def build_vocab(bpe_path: Path) -> tuple[dict[str, int], list[str]]:
    """CLIP's token -> id table and merge list from open_clip's BPE file."""
    with gzip.open(bpe_path, "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    merges = lines[1:_NUM_MERGES + 1]
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges] + [START_TOKEN, END_TOKEN]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise DreamboothError(f"{str(bpe_path)!r} gives {len(vocab)} tokens instead of {VOCAB_SIZE}; the file is "
                              "damaged: reinstall the extension")
    return vocab, merges


def cache_dir() -> Path:
    """Where derived tokenizer files live (XDG cache, ~/.cache otherwise)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dreambooth_ext" / _CACHE_VERSION


def _write_atomic(path: Path, text: str) -> None:
    # Several processes may build the cache at once: each writes its own temp file and renames it into place.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _tokenizer_files(bpe_path: Path, folder: Path | None = None) -> tuple[Path, Path]:
    folder = folder or cache_dir()
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    if vocab_file.is_file() and merges_file.is_file():
        return vocab_file, merges_file
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab(bpe_path)
    # CLIPTokenizer skips the first line of merges.txt as a header.
    _write_atomic(merges_file, "#version: 0.2\n" + "\n".join(merges) + "\n")
    _write_atomic(vocab_file, json.dumps(vocab, ensure_ascii=False))
    return vocab_file, merges_file


def load_tokenizer(pad: str = END_TOKEN) -> Any:
    """A CLIPTokenizer of CLIP's vocabulary, built offline: 77 tokens, padded with `pad` (OpenAI CLIP pads with
    <|endoftext|>, the WebUI's OpenCLIP path with id 0, the token "!")."""
    from transformers import CLIPTokenizer

    vocab_file, merges_file = _tokenizer_files(BPE_PATH)
    return CLIPTokenizer(str(vocab_file), str(merges_file), pad_token=pad, model_max_length=MAX_LENGTH)
