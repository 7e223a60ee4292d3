"""Optimizer and learning-rate schedule of a run."""

from __future__ import annotations

import torch
from diffusers.optimization import get_scheduler

from ..config import Config
from .devices import require_8bit_adam


def param_groups(config: Config, unet: torch.nn.Module, text_encoder: torch.nn.Module | None) -> list[dict]:
    """The UNet's weights, and the text encoder's with its own learning rate and weight decay."""
    groups = [{"params": [p for p in unet.parameters() if p.requires_grad],
               "lr": config.learning_rate, "weight_decay": config.weight_decay, "name": "unet"}]
    if text_encoder is not None:
        groups.append({"params": [p for p in text_encoder.parameters() if p.requires_grad],
                       "lr": config.text_encoder_lr, "weight_decay": config.text_encoder_weight_decay,
                       "name": "text_encoder"})
    return groups


def make_optimizer(config: Config, groups: list[dict], device: torch.device) -> torch.optim.Optimizer:
    kwargs = {"betas": (config.adam_beta1, config.adam_beta2), "eps": config.adam_epsilon}
    if config.optimizer == "adamw_8bit":
        require_8bit_adam(device)
        import bitsandbytes as bnb  # only importable where require_8bit_adam passed

        return bnb.optim.AdamW8bit(groups, **kwargs)
    # foreach=False keeps CPU runs bit-reproducible across a resume (the fused/foreach kernels are too, but
    # the plain loop is the reference everywhere).
    return torch.optim.AdamW(groups, foreach=device.type == "cuda", **kwargs)


def make_lr_scheduler(config: Config, optimizer: torch.optim.Optimizer, total_steps: int):
    return get_scheduler(config.lr_scheduler, optimizer=optimizer,
                         num_warmup_steps=config.lr_warmup_steps, num_training_steps=total_steps)
