"""The tiny checkpoint the stand-in host serves, cached per session."""

from __future__ import annotations

import functools
from pathlib import Path

import torch


@functools.lru_cache(maxsize=4)
def _tiny(family: str, seed: int) -> dict[str, torch.Tensor]:
    from dreambooth_ext.models.tiny import tiny_checkpoint

    return tiny_checkpoint(family, seed)


def tiny_state_dict(family: str = "sd1", seed: int = 0) -> dict[str, torch.Tensor]:
    """The tiny checkpoint (file layout, fp32), cached per session; a fresh dict with the shared tensors."""
    return dict(_tiny(family, seed))


def save_tiny(path: Path, family: str = "sd1", seed: int = 0, metadata: dict | None = None) -> Path:
    import safetensors.torch

    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(tiny_state_dict(family, seed), str(path), metadata=metadata)
    return path
