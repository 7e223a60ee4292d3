"""Optimizer and learning-rate schedule of a run."""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
from diffusers.optimization import get_scheduler

from ..config import Config
from .devices import require_8bit_adam

log = logging.getLogger(__name__)


def param_groups(config: Config, unet: torch.nn.Module,
                 text_encoders: tuple[torch.nn.Module, ...] = ()) -> list[dict]:
    """The UNet's trained weights, and the trained text encoders' (all of them) with their own learning rate and
    weight decay."""
    names = group_options(config)
    groups = [{"params": [p for p in unet.parameters() if p.requires_grad], "name": "unet",
               **{key: getattr(config, option) for key, option in names["unet"].items()}}]
    if text_encoders:
        groups.append({"params": [p for e in text_encoders for p in e.parameters() if p.requires_grad],
                       "name": "text_encoder",
                       **{key: getattr(config, option) for key, option in names["text_encoder"].items()}})
    return groups


def make_optimizer(config: Config, groups: list[dict], device: torch.device) -> torch.optim.Optimizer:
    # The optimizer's own default rate is the first group's (the UNet's): schedules read it (diffusers' polynomial
    # decays from `optimizer.defaults["lr"]`), so it must be the run's rate, not the class's default.
    lr = groups[0]["lr"]
    if config.optimizer == "adafactor":
        from .adafactor import MatrixAdafactor

        # A fixed learning rate (the run's schedule drives it), no first moment: factored second moments only.
        return MatrixAdafactor(groups, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False,
                               beta1=None)
    kwargs = {"lr": lr, "betas": (config.adam_beta1, config.adam_beta2), "eps": config.adam_epsilon}
    if config.optimizer == "adamw_8bit":
        require_8bit_adam(device)
        import bitsandbytes as bnb  # only importable where require_8bit_adam passed

        return bnb.optim.AdamW8bit(groups, **kwargs)
    # torch's fused AdamW kernel: several times faster than the per-weight loop, same maths.
    return torch.optim.AdamW(groups, fused=fused_adamw_runs(device), **kwargs)


@functools.cache
def fused_adamw_runs(device: torch.device) -> bool:
    """Whether torch's fused AdamW kernel runs on this device: CUDA, and the CPU from torch 2.4 (the WebUI's
    2.1 accepts the option there and fails at the first step), found by one step on one weight there."""
    if device.type not in ("cpu", "cuda"):
        return False
    try:
        weight = torch.zeros(1, device=device, requires_grad=True)
        weight.grad = torch.zeros(1, device=device)
        torch.optim.AdamW([weight], fused=True).step()
        return True
    except (RuntimeError, NotImplementedError):
        log.info("torch %s has no fused AdamW for the %s: using its default one", torch.__version__, device.type)
        return False


def make_lr_scheduler(config: Config, optimizer: torch.optim.Optimizer, total_steps: int):
    return get_scheduler(config.lr_scheduler, optimizer=optimizer, num_warmup_steps=config.lr_warmup_steps,
                         num_training_steps=total_steps, num_cycles=config.lr_num_cycles, power=config.lr_power)


def group_options(config: Config) -> dict[str, dict[str, str]]:
    """What each group's settings are called in the config: group name -> {optimizer key: config field}."""
    lora = config.train_mode == "lora"
    return {"unet": {"lr": "lora_learning_rate" if lora else "learning_rate", "weight_decay": "weight_decay"},
            "text_encoder": {"lr": "lora_text_encoder_lr" if lora else "text_encoder_lr",
                             "weight_decay": "text_encoder_weight_decay"}}


def apply_changed_options(config: Config, optimizer: torch.optim.Optimizer, scheduler: Any) -> list[str]:
    """After a resume: the options of this run, not the saved ones, drive the optimizer from here on.

    The saved optimizer state brings its own learning rates, weight decay, betas and epsilon; a user who changed
    them for the resumed run means the new ones. Returns "name: old -> new" for each change."""
    changes: dict[str, str] = {}
    options = group_options(config)
    for index, group in enumerate(optimizer.param_groups):
        names = options.get(group.get("name", "unet"), options["unet"])
        wanted_lr = getattr(config, names["lr"])
        if scheduler.base_lrs[index] != wanted_lr:
            changes[names["lr"]] = f"{scheduler.base_lrs[index]:g} -> {wanted_lr:g}"
            scheduler.base_lrs[index] = group["initial_lr"] = wanted_lr
            group["lr"] = wanted_lr * scheduler.lr_lambdas[index](scheduler.last_epoch)
        wanted = {"weight_decay": (names["weight_decay"], getattr(config, names["weight_decay"]))}
        if config.optimizer.startswith("adamw"):
            wanted.update({"betas": ("adam_beta1, adam_beta2", (config.adam_beta1, config.adam_beta2)),
                           "eps": ("adam_epsilon", config.adam_epsilon)})
        for key, (label, value) in wanted.items():
            if key in group and _as_tuple(group[key]) != _as_tuple(value):
                changes[label] = f"{group[key]} -> {value}"
                group[key] = value
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    return [f"{name}: {change}" for name, change in changes.items()]


def _as_tuple(value: Any) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)
