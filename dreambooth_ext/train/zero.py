"""DeepSpeed ZeRO (stage 1 or 2, the optimizer's state and step optionally on the CPU) for cards too small for a
full fine-tune: started by `accelerate launch` with a DeepSpeed configuration (dreambooth_ext/configs/ ships
one).

Each process keeps the whole model, but the optimizer's state and its fp32 copy of the weights are split between
the processes (and with `offload_optimizer_device: cpu` kept in system RAM, where the optimizer steps). The engine
builds DeepSpeed's configuration from its own options (precision, accumulation, clipping, the optimizer and its
schedule), so those mean the same as without DeepSpeed; from the launcher it takes only the ZeRO stage and the
offload device. A saved state holds each process's part of the optimizer: it resumes on the same number of
processes (with DeepSpeed).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import Config, zero_problems
from ..errors import DreamboothError
from .devices import Precision, deepspeed_installed
from .optim import apply_changed_options, make_lr_scheduler, make_optimizer
from .parallel import SingleProcess, samples_per_batch

log = logging.getLogger(__name__)

# The accelerate configuration the engine launches with (deepspeed_offload) and documents for launching by hand.
ZERO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "accelerate_deepspeed_zero2_offload.yaml"
INSTALL = "pip install \"deepspeed>=0.12,<0.15\" (the versions that work with the WebUI's pydantic 1)"


@dataclass(frozen=True)
class ZeroSettings:
    stage: int
    offload_optimizer: str  # "cpu" or "none"


def zero_launch() -> ZeroSettings | None:
    """The ZeRO settings of an `accelerate launch` with DeepSpeed (None without one)."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() != "true":
        return None
    if os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none").lower() not in ("", "none"):
        raise DreamboothError("accelerate launch was given a DeepSpeed config file; the engine builds DeepSpeed's "
                              "configuration from its own options. Launch with --zero_stage and "
                              "--offload_optimizer_device (or --config_file "
                              "dreambooth_ext/configs/accelerate_deepspeed_zero2_offload.yaml) instead.")
    try:
        stage = int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"))
    except ValueError:
        stage = -1
    offload = os.environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none").lower()
    param_offload = os.environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "none").lower()
    problems = []
    if stage not in (1, 2):
        problems.append(f"ZeRO stage {os.environ.get('ACCELERATE_DEEPSPEED_ZERO_STAGE')} is not supported: stage 3 "
                        "splits the weights themselves, which samples and saves read whole; use --zero_stage 2")
    if offload not in ("cpu", "none"):
        problems.append(f"offload_optimizer_device {offload} is not supported: use cpu or none")
    if param_offload not in ("none", ""):
        problems.append("offload_param_device needs ZeRO stage 3: use none")
    if problems:
        raise DreamboothError("Cannot train with this DeepSpeed launch: " + "; ".join(problems) + ".")
    return ZeroSettings(stage, offload)


def require_deepspeed() -> None:
    if not deepspeed_installed():
        raise DreamboothError(f"DeepSpeed is not installed: {INSTALL}.")


def check_zero(config: Config, processes: SingleProcess) -> None:
    """What cannot run through DeepSpeed, refused with its fix before any model loads."""
    require_deepspeed()
    problems = zero_problems(config)
    samples = samples_per_batch(config)
    if samples < processes.count:
        problems.append(f"each step has {samples} sample(s) for {processes.count} processes, and every process "
                        "must have one: raise train_batch_size or use fewer processes")
    if problems:
        raise DreamboothError("Cannot train through DeepSpeed: " + "; ".join(problems) + ".")


def check_zero_resume(saved_optimizer: Any, processes: SingleProcess) -> None:
    """A state saved through DeepSpeed resumes on as many DeepSpeed processes as saved it, and only there."""
    parts = saved_optimizer.get("zero_parts") if isinstance(saved_optimizer, dict) else None
    now = processes.count if zero_launch() is not None else None
    saved = len(parts) if parts is not None else None
    if saved == now:
        return
    if saved is None:
        raise DreamboothError("The saved training state was made without DeepSpeed; resume it without DeepSpeed "
                              "(one process, or accelerate launch --multi_gpu), or start again without resume.")
    raise DreamboothError(f"The saved training state was made by {saved} DeepSpeed process(es), each holding its "
                          "part of the optimizer; resume it through the same DeepSpeed launch with --num_processes "
                          f"{saved}, or start again without resume.")


def deepspeed_config(config: Config, precision: Precision, settings: ZeroSettings, device: torch.device,
                     processes: SingleProcess) -> dict[str, Any]:
    """DeepSpeed's configuration, from the run's own options."""
    samples = samples_per_batch(config)
    offload = {"device": settings.offload_optimizer, "pin_memory": device.type == "cuda"}
    return {
        "train_micro_batch_size_per_gpu": max(1, math.ceil(samples / processes.count)),
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "gradient_clipping": config.max_grad_norm,
        "zero_optimization": {"stage": settings.stage, "offload_optimizer": offload},
        "bf16": {"enabled": precision.autocast_dtype == torch.bfloat16},
        "fp16": {"enabled": precision.autocast_dtype == torch.float16, "loss_scale": 0},
        "zero_allow_untested_optimizer": True,  # the run's own optimizer steps DeepSpeed's pieces
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2 ** 31 - 1,
        "wall_clock_breakdown": False,
    }


class ZeroStepper:
    """The Stepper's interface over a DeepSpeed engine: DeepSpeed does the loss scaling, the accumulation, the
    averaging between processes, the clipping and the optimizer step; the run's schedule sets the learning rate."""

    def __init__(self, config: Config, groups: list[dict], modules: dict[str, torch.nn.Module],
                 device: torch.device, precision: Precision, total_steps: int, processes: SingleProcess,
                 settings: ZeroSettings):
        import deepspeed

        self.config, self.processes = config, processes
        self.params = [p for group in groups for p in group["params"]]
        # In bf16/fp16 DeepSpeed computes with copies of the weights in that format, and keeps fp32 ones in its
        # optimizer; it would make those from the low-precision copies, losing the model's own low bits.
        self.lowered = precision.autocast_dtype is not None
        own = [_kept(p) for p in self.params] if self.lowered else []
        self.base = make_optimizer(config, groups, device)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=torch.nn.ModuleDict(modules), optimizer=self.base,
            config=deepspeed_config(config, precision, settings, device, processes))
        if own:
            from deepspeed.utils import safe_set_full_fp32_param

            for param, value in zip(self.params, own, strict=True):
                safe_set_full_fp32_param(param, value)  # this process's part of it
        self._parts = self._own_parts() if self.lowered else None
        self.lr_scheduler = make_lr_scheduler(config, self.base, total_steps)
        log.info("Training through DeepSpeed ZeRO stage %d on %d process(es), the optimizer on the %s",
                 settings.stage, processes.count, "CPU" if settings.offload_optimizer == "cpu" else "device")

    def backward(self, loss: torch.Tensor, *, last: bool, every_process: bool = False) -> None:
        """Backward of one micro-batch's loss, already divided by the accumulation steps; DeepSpeed steps the
        optimizer after the step's last one (it counts them)."""
        self.engine.backward(loss, scale_wrt_gas=False)
        self.engine.step()

    def step(self) -> None:
        self.lr_scheduler.step()

    @property
    def learning_rate(self) -> float:
        return self.lr_scheduler.get_last_lr()[0]

    def state_dict(self) -> tuple[Any, dict[str, Any], None]:
        """(every process's part of the optimizer, the schedule, None); all processes must call it together; the
        parts reach the main process only."""
        part = _on_cpu({"optimizer": self.base.state_dict(),
                        "fp32": list(self.optimizer.single_partition_of_fp32_groups)})
        parts: list | None = [None] * self.processes.count if self.processes.is_main else None
        if self.processes.count > 1:
            torch.distributed.gather_object(part, parts, dst=0)
        else:
            parts = [part]
        return {"zero_parts": parts}, self.lr_scheduler.state_dict(), None

    def load_state_dict(self, optimizer: dict, lr_scheduler: dict, scaler: dict | None) -> list[str]:
        part = optimizer["zero_parts"][self.processes.index]  # check_zero_resume has seen they match
        self.base.load_state_dict(part["optimizer"])
        with torch.no_grad():
            for own, saved in zip(self.optimizer.single_partition_of_fp32_groups, part["fp32"], strict=True):
                own.copy_(saved.to(own.device, own.dtype))
        self.lr_scheduler.load_state_dict(lr_scheduler)
        return apply_changed_options(self.config, self.base, self.lr_scheduler)

    def fp32_parts(self) -> dict[int, tuple[int, torch.Tensor]] | None:
        """When DeepSpeed computes with bf16/fp16 copies of the weights: this process's parts of its fp32 weights,
        id(weight) -> (offset in the flattened weight, values: a view DeepSpeed updates in place); None when the
        weights themselves are fp32."""
        return self._parts

    def _own_parts(self) -> dict[int, tuple[int, torch.Tensor]]:
        parts = {}
        for param in self.params:
            mapping = getattr(param, "_hp_mapping", None)  # DeepSpeed's link from a weight to its fp32 part
            if mapping is not None:
                parts[id(param)] = (mapping.lp_fragment_address.start, mapping.hp_fragment)
        return parts

    @contextlib.contextmanager
    def exact_weights(self):
        """While it lasts, the trained modules of the main process hold DeepSpeed's fp32 weights (on the CPU), not
        the bf16/fp16 copies it computes with: what an export must write. Every process enters it together (each
        weight is gathered from the processes' parts)."""
        if not self.lowered:
            yield
            return
        from deepspeed.utils import safe_get_full_fp32_param

        swapped = []
        try:
            for param in self.params:
                full = safe_get_full_fp32_param(param)
                if self.processes.is_main:
                    swapped.append((param, param.data))
                    param.data = full.cpu()
            yield
        finally:
            for param, data in swapped:
                param.data = data

    def close(self) -> None:
        pass


def _kept(param: torch.Tensor) -> torch.Tensor:
    """A copy of a weight's values in system RAM, in fp16 where that holds them exactly (a model loaded from an
    fp16 file: most are), else in fp32."""
    value = param.detach()
    half = value.to(torch.float16)
    return half.cpu() if torch.equal(half.float(), value) else value.to("cpu", copy=True)


def _on_cpu(value: Any) -> Any:
    """A copy of nested dicts and lists with their tensors on the CPU (a process's part travels to the main one)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _on_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_on_cpu(v) for v in value)
    return value
