"""Resumable training state: trained weights, optimizer, LR schedule, loss scaler, EMA and the step.

Randomness (data order, flips, crops, noise, timesteps) is derived from (seed, step), so the step number is
all the data-order and RNG state a resume needs.

Nothing here goes through pickle: tensors are written as safetensors and everything else as JSON. The optimizer's
state dict (nested dicts and lists of tensors and numbers) is flattened into tensors named by their path plus a
JSON skeleton that says where each tensor goes. So a resume never calls `torch.load`, which hosts may replace
(the WebUI's safe unpickler refuses recent `torch.save` files and returns None).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .. import __version__
from ..errors import DreamboothError
from .resuming import beside, find_state

STATE_FORMAT = 2
TENSOR, TUPLE, ITEMS = "__tensor__", "__tuple__", "__items__"


@dataclass
class TrainingState:
    step: int
    weights: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor] | None
    optimizer: dict
    lr_scheduler: dict
    scaler: dict | None
    meta: dict


def trainable_weights(modules: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """fp32 copies of every trainable parameter, keyed '<module>.<parameter>'."""
    return {f"{prefix}.{name}": p.detach().float().cpu().contiguous()
            for prefix, module in modules.items() for name, p in module.named_parameters() if p.requires_grad}


# ----------------------------------------------------------------------------------------------------------
# Nested state dicts <-> (JSON skeleton, flat tensors)


def flatten(value: Any, tensors: dict[str, torch.Tensor], path: str = "") -> Any:
    """A JSON-able copy of `value` whose tensors are moved into `tensors` under their path."""
    if isinstance(value, torch.Tensor):
        tensors[path] = value.detach().cpu().contiguous()
        return {TENSOR: path}
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {k: flatten(v, tensors, f"{path}/{k}") for k, v in value.items()}
        # Optimizer state is keyed by parameter index: keep the keys' types.
        return {ITEMS: [[k, flatten(v, tensors, f"{path}/{k}")] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {TUPLE: [flatten(v, tensors, f"{path}/{i}") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [flatten(v, tensors, f"{path}/{i}") for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise DreamboothError(f"Cannot store {type(value).__name__} at {path or '/'} in the training state.")


def unflatten(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of `flatten`."""
    if isinstance(value, dict):
        if set(value) == {TENSOR}:
            return tensors[value[TENSOR]]
        if set(value) == {TUPLE}:
            return tuple(unflatten(v, tensors) for v in value[TUPLE])
        if set(value) == {ITEMS}:
            return {k: unflatten(v, tensors) for k, v in value[ITEMS]}
        return {k: unflatten(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [unflatten(v, tensors) for v in value]
    return value


# ----------------------------------------------------------------------------------------------------------
# Saving and loading


def save_state(folder: Path, state: TrainingState) -> Path:
    """Write the state to `folder`, replacing an older one only once the new one is complete."""
    folder = Path(folder)
    partial = beside(folder, "partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        _write_state(partial, state)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)  # e.g. the disk filled up: the complete state stays
        raise
    old = beside(folder, "old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        os.replace(folder, old)
    os.replace(partial, folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def _write_state(partial: Path, state: TrainingState) -> None:
    partial.mkdir(parents=True)
    save_file(state.weights, str(partial / "weights.safetensors"))
    if state.ema is not None:
        save_file({k: v.contiguous() for k, v in state.ema.items()}, str(partial / "ema.safetensors"))
    tensors: dict[str, torch.Tensor] = {}
    skeleton = flatten({"optimizer": state.optimizer, "lr_scheduler": state.lr_scheduler,
                        "scaler": state.scaler}, tensors)
    save_file(tensors, str(partial / "optimizer.safetensors"))
    meta = {**state.meta, "step": state.step, "format": STATE_FORMAT, "engine_version": __version__,
            "optimization": skeleton}
    (partial / "state.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")


def load_state(folder: Path) -> TrainingState:
    found = find_state(folder)
    if found is None:
        raise DreamboothError(f"No saved training state in {folder}: there is nothing to resume. Start the run "
                              "without resume.")
    meta = json.loads((found / "state.json").read_text(encoding="utf-8"))
    if meta.get("format") != STATE_FORMAT:
        raise DreamboothError(
            f"The training state in {found} was saved by an older version of this extension (format "
            f"{meta.get('format')!r}, with a pickled optimizer.pt this version no longer reads; it reads format "
            f"{STATE_FORMAT}). Start the run again without resume: delete {found} or train under a new "
            "project name.")
    skeleton = meta.pop("optimization")
    extra = unflatten(skeleton, load_file(str(found / "optimizer.safetensors")))
    ema_file = found / "ema.safetensors"
    return TrainingState(
        step=int(meta["step"]),
        weights=load_file(str(found / "weights.safetensors")),
        ema=load_file(str(ema_file)) if ema_file.is_file() else None,
        optimizer=extra["optimizer"], lr_scheduler=extra["lr_scheduler"], scaler=extra["scaler"], meta=meta)


def restore_weights(modules: dict[str, torch.nn.Module], weights: dict[str, torch.Tensor]) -> None:
    expected = trainable_weights(modules).keys()
    missing = expected - weights.keys()
    if missing:
        raise DreamboothError(f"The saved training state lacks {len(missing)} trained weights (e.g. "
                              f"{sorted(missing)[0]}): it belongs to a different model or options. Start the run "
                              "again without resume.")
    with torch.no_grad():
        for prefix, module in modules.items():
            for name, param in module.named_parameters():
                if param.requires_grad:
                    param.copy_(weights[f"{prefix}.{name}"].to(param.device, param.dtype))
