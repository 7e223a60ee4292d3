"""Adafactor whose factored second moments see every weight as a matrix: (first dimension, all the others).

transformers' Adafactor factors a weight over its last two dimensions. For a 3x3 convolution (out, in, 3, 3) that
keeps statistics of shape (out, in, 3) twice: two thirds of the weight's size. SD1.5's UNet holds 589M weights in
convolutions, so its state is 1.8 GB where 6 MB would do. Here a convolution is factored as the (out, in*3*3)
matrix it is in the maths: one statistic per output channel and one per input position. Weights of two dimensions
are factored exactly as transformers does, and the rest of the algorithm is its own (this class is its subclass).
A state saved by transformers' Adafactor (factored over the last two dimensions) is continued as it was saved.
"""

from __future__ import annotations

import math

import torch
from transformers.optimization import Adafactor


def matrix_shape(shape: torch.Size) -> torch.Size:
    """The shape a weight is factored as: (first dimension, the product of the others); 1-D weights as they are."""
    return shape if len(shape) <= 2 else torch.Size((shape[0], shape[1:].numel()))


class MatrixAdafactor(Adafactor):
    """transformers' Adafactor, with every weight of two or more dimensions factored as a matrix."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self._update(param, group)
        return loss

    def _update(self, param: torch.Tensor, group: dict) -> None:
        grad = param.grad.float()
        state = self.state[param]
        shape = self._factored_shape(grad.shape, state)
        grad = grad.reshape(shape)
        weights = param.float() if param.dtype in (torch.float16, torch.bfloat16) else param
        if not state:
            self._init_state(state, grad, group)
        state["step"] += 1
        if group["scale_parameter"]:
            state["RMS"] = self._rms(weights)
        lr = self._get_lr(group, state)
        beta2t = 1.0 - math.pow(state["step"], group["decay_rate"])
        squared = grad.square().add_(group["eps"][0])
        if len(shape) >= 2:
            row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
            row.mul_(beta2t).add_(squared.mean(dim=-1), alpha=1.0 - beta2t)
            col.mul_(beta2t).add_(squared.mean(dim=-2), alpha=1.0 - beta2t)
            update = self._approx_sq_grad(row, col).mul_(grad)
        else:
            state["exp_avg_sq"].mul_(beta2t).add_(squared, alpha=1.0 - beta2t)
            update = state["exp_avg_sq"].rsqrt().mul_(grad)
        update.div_((self._rms(update) / group["clip_threshold"]).clamp_(min=1.0)).mul_(lr)
        if group["beta1"] is not None:
            update = state["exp_avg"].mul_(group["beta1"]).add_(update, alpha=1 - group["beta1"])
        if group["weight_decay"] != 0:
            weights.add_(weights, alpha=-group["weight_decay"] * lr)
        weights.add_(-update.view(param.shape))
        if weights is not param:
            param.copy_(weights)

    @staticmethod
    def _factored_shape(shape: torch.Size, state: dict) -> torch.Size:
        """The matrix shape, or the weight's own shape where a saved state was factored over its last two."""
        row = state.get("exp_avg_sq_row")
        if row is not None and len(shape) > 2 and row.shape == shape[:-1]:
            return shape
        return matrix_shape(shape)

    @staticmethod
    def _init_state(state: dict, grad: torch.Tensor, group: dict) -> None:
        state["step"] = 0
        state["RMS"] = 0
        if group["beta1"] is not None:
            state["exp_avg"] = torch.zeros_like(grad)
        if grad.dim() >= 2:
            state["exp_avg_sq_row"] = grad.new_zeros(grad.shape[:-1])
            state["exp_avg_sq_col"] = grad.new_zeros(grad.shape[:-2] + grad.shape[-1:])
        else:
            state["exp_avg_sq"] = torch.zeros_like(grad)
