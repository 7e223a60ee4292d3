"""Mixed precision that keeps no half-precision copy of the trained weights between the forward and backward pass.

Under torch.autocast, each layer computes with a bf16 (or fp16) cast of its fp32 weight, and autograd keeps that
cast until the backward pass needs it: 2 bytes per trained weight held through the whole pass (SD1.5's UNet:
1.7 GB; SDXL's: 5.1 GB), on top of the fp32 weights, their gradients and the optimizer's state. Here the backward
pass casts the weight again from the fp32 weight instead (the same values, so the same gradients), and the copy
made for the forward pass is freed as soon as autocast lets it go.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def autocast(device_type: str, dtype: torch.dtype | None, *, recast: bool = True) -> Iterator[None]:
    """torch.autocast to `dtype` (nothing when None); with `recast`, the casts of trained weights that autograd
    would keep for the backward pass are made again there instead."""
    if dtype is None:
        yield
        return
    hooks = torch.autograd.graph.saved_tensors_hooks(_pack, _unpack) if recast else contextlib.nullcontext()
    with torch.autocast(device_type, dtype=dtype), hooks:
        yield


def _weight_cast_from(tensor: torch.Tensor) -> torch.Tensor | None:
    """The trained fp32 weight that `tensor` is a lower-precision cast of (or a view of one), else None."""
    base = tensor if tensor._base is None else tensor._base
    step = base.grad_fn
    if step is None or type(step).__name__ != "ToCopyBackward0":
        return None
    weight = getattr(step.next_functions[0][0], "variable", None)  # AccumulateGrad of a leaf weight
    if weight is None or weight.dtype == tensor.dtype or weight.shape != base.shape:
        return None
    return weight


def _pack(tensor: torch.Tensor):
    weight = _weight_cast_from(tensor)
    if weight is None:
        return tensor
    return weight, tensor.dtype, tensor.size(), tensor.stride(), tensor.storage_offset()


def _unpack(packed) -> torch.Tensor:
    if isinstance(packed, torch.Tensor):
        return packed
    weight, dtype, size, stride, offset = packed
    return weight.detach().to(dtype).as_strided(size, stride, offset)
