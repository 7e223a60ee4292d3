"""From micro-batch losses to optimizer steps: loss scaling, gradient accumulation, clipping, the optimizer and
its learning-rate schedule, the averaging of gradients between processes, and the memory-saving ways of stepping.
The engine's precision and accumulation code lives here and nowhere else.

- The plain way: backward on every micro-batch, then unscale, clip, step, schedule, zero the gradients.
- Fused backward (`fused_backward`): each weight is updated by its own optimizer the moment its gradient is
  complete (a post-accumulate-grad hook), and its gradient is freed at once, so no full set of gradients ever
  exists. Clipping needs all gradients together and fp16 loss scaling needs to see them all before any step, so
  neither goes with it (bf16 or fp32 do).
- bf16 weights (`weights_dtype = bf16`): the trained weights are stored in bf16 (half the memory of fp32) and
  every update is computed in fp32 and rounded to bf16 stochastically (up or down with the probability of its
  distance), so small updates are not all rounded away: unbiased on average. The rounding's random bits come from
  the run's seed, the step and the weight's number, so a run is repeatable and a resumed run exact (and every
  process rounds alike). The optimizer's state stays fp32 whatever the weights' precision, also on resume.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from ..config import Config
from .batches import derive_seed
from .devices import Precision
from .optim import apply_changed_options, make_lr_scheduler, make_optimizer
from .parallel import SingleProcess
from .zero import ZeroStepper, zero_launch


def stochastic_round_to_bf16(values: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """fp32 -> bf16, rounding each value up or down with probability proportional to its distance (random low
    bits added, then truncated: bf16 is the top half of an fp32)."""
    bits = values.detach().float().contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=bits.device, generator=generator)
    rounded = (bits + noise) & -65536  # clears the low 16 bits: exactly representable in bf16
    return rounded.view(torch.float32).to(torch.bfloat16)


def grad_scaler():
    """fp16's loss scaler on CUDA: torch.amp's (torch 2.3 and later), else torch.cuda.amp's (the WebUI's 2.1)."""
    scaler = getattr(torch.amp, "GradScaler", None)
    return scaler("cuda") if scaler is not None else torch.cuda.amp.GradScaler()


class _Rounding:
    """The random bits of stochastic rounding: one generator per device, seeded by (seed, step, weight number) for
    each weight, so the result depends on neither the order the weights are stepped in nor the global generator."""

    def __init__(self, seed: int):
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def generator(self, step: int, index: int, device: torch.device) -> torch.Generator:
        generator = self._generators.get(device)
        if generator is None:
            generator = self._generators[device] = torch.Generator(device)
        return generator.manual_seed(derive_seed(self.seed, "rounding", step, index))


class _Masters:
    """fp32 working copies of bf16 weights for the duration of an optimizer step, rounded back stochastically."""

    def __init__(self, params: list[tuple[int, torch.nn.Parameter]]):
        """`params`: (the weight's number in the run, the weight)."""
        self.kept = []
        for index, param in params:
            if param.dtype == torch.bfloat16 and param.grad is not None:
                self.kept.append((index, param, param.data))
                param.data = param.data.float()
                param.grad = param.grad.float()

    def round_back(self, rounding: _Rounding, step: int) -> None:
        for index, param, storage in self.kept:
            storage.copy_(stochastic_round_to_bf16(param.data, rounding.generator(step, index, storage.device)))
            param.data = storage
            param.grad = None


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """`optimizer.load_state_dict`, keeping each saved tensor's precision: torch casts the state to the weights'
    dtype, so bf16 weights would get bf16 moments (fused AdamW then refuses them; Adafactor would go on with them)."""
    optimizer.load_state_dict(saved)
    params = [param for group in optimizer.param_groups for param in group["params"]]
    numbers = [number for group in saved["param_groups"] for number in group["params"]]
    for param, number in zip(params, numbers, strict=True):
        for key, value in saved["state"].get(number, {}).items():
            if key != "step" and torch.is_tensor(value) and value.is_floating_point() and value.dtype != param.dtype:
                optimizer.state[param][key] = value.to(param.device)


def make_stepper(config: Config, groups: list[dict], modules: dict[str, torch.nn.Module], device: torch.device,
                 precision: Precision, total_steps: int, processes: SingleProcess) -> Stepper | ZeroStepper:
    """The run's Stepper: DeepSpeed's under an `accelerate launch` with DeepSpeed, else the engine's own."""
    settings = zero_launch()
    if settings is not None:
        return ZeroStepper(config, groups, modules, device, precision, total_steps, processes, settings)
    return Stepper(config, groups, device, precision, total_steps, processes)


class Stepper:
    """Optimizer steps for the trained weights in `groups` (the optimizer's parameter groups)."""

    def __init__(self, config: Config, groups: list[dict], device: torch.device, precision: Precision,
                 total_steps: int, processes: SingleProcess | None = None):
        self.config = config
        self.processes = processes or SingleProcess()
        self.params = [p for group in groups for p in group["params"]]
        self.scaler = grad_scaler() if precision.use_grad_scaler else None
        self.rounding = _Rounding(config.seed)
        self.fused = config.fused_backward
        if self.fused:
            # One optimizer per weight, stepped from its hook; the schedule runs on an optimizer of the same kind
            # holding only placeholders, and its learning rates are handed to the weights' optimizers.
            self._per_param = []
            placeholders = []
            for group in groups:
                settings = {k: v for k, v in group.items() if k != "params"}
                placeholders.append({**settings, "params": [torch.zeros(1, requires_grad=True, device=device)]})
                for param in group["params"]:
                    self._per_param.append(make_optimizer(config, [{**settings, "params": [param]}], device))
            self.optimizer = make_optimizer(config, placeholders, device)
            self._group_of = [i for i, group in enumerate(groups) for _ in group["params"]]
            self._stepping = False
            self._hooks = [param.register_post_accumulate_grad_hook(self._hook(i))
                           for i, param in enumerate(self.params)]
        else:
            self.optimizer = make_optimizer(config, groups, device)
            self._hooks = self.processes.watch([group["params"] for group in groups])
        self.lr_scheduler = make_lr_scheduler(config, self.optimizer, total_steps)
        self._sync_learning_rates()

    # -- the step -----------------------------------------------------------------------------------------

    def backward(self, loss: torch.Tensor, *, last: bool, every_process: bool = False) -> None:
        """Backward of one micro-batch's loss (already divided by the accumulation steps); `last`: the step's
        final micro-batch, after which a fused backward updates the weights; `every_process`: every process runs
        this pass (each had samples), so on several the gradients are exchanged while it runs."""
        if self.fused:
            self._stepping = last
        exchange = self.processes.exchanging() if last and every_process else contextlib.nullcontext()
        with exchange:
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
            else:
                loss.backward()

    def step(self) -> None:
        """The optimizer step after the last micro-batch (done already, weight by weight, with fused backward)."""
        if not self.fused:
            self.processes.average_gradients(self.params)  # several processes: before anything reads them
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            if self.config.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
            masters = _Masters(list(enumerate(self.params)))
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            masters.round_back(self.rounding, self.steps_done)
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.optimizer.step()  # the schedule's placeholders: nothing to update, but the schedule may advance
        self.lr_scheduler.step()
        self._sync_learning_rates()

    def _hook(self, index: int):
        def step_this_weight(param: torch.Tensor) -> None:
            if not self._stepping:
                return  # an earlier micro-batch: keep accumulating
            optimizer = self._per_param[index]
            masters = _Masters([(index, param)])
            optimizer.step()
            masters.round_back(self.rounding, self.steps_done)
            param.grad = None  # freed now, not at the end of the backward pass
        return step_this_weight

    def _sync_learning_rates(self) -> None:
        if self.fused:
            rates = [group["lr"] for group in self.optimizer.param_groups]
            for optimizer, group in zip(self._per_param, self._group_of, strict=True):
                optimizer.param_groups[0]["lr"] = rates[group]

    @property
    def steps_done(self) -> int:
        """Optimizer steps taken so far in the run (the schedule counts them, and a resume restores it)."""
        return self.lr_scheduler.last_epoch

    @property
    def learning_rate(self) -> float:
        return self.lr_scheduler.get_last_lr()[0]

    # -- resume ---------------------------------------------------------------------------------------------

    def state_dict(self) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]:
        """(optimizer, schedule, loss scaler) states."""
        optimizer = self.optimizer.state_dict()
        if self.fused:
            optimizer = {"schedule": optimizer, "weights": [o.state_dict() for o in self._per_param]}
        return optimizer, self.lr_scheduler.state_dict(), self.scaler.state_dict() if self.scaler else None

    def load_state_dict(self, optimizer: dict, lr_scheduler: dict, scaler: dict | None) -> list[str]:
        """Restore a saved state; returns the options that changed since (the new ones are used from here on)."""
        if self.fused:
            if "weights" not in optimizer or len(optimizer["weights"]) != len(self._per_param):
                raise ValueError("the saved optimizer state was not made with fused_backward")
            load_optimizer_state(self.optimizer, optimizer["schedule"])
            for own, saved in zip(self._per_param, optimizer["weights"], strict=True):
                load_optimizer_state(own, saved)
        else:
            load_optimizer_state(self.optimizer, optimizer)
        self.lr_scheduler.load_state_dict(lr_scheduler)
        changed = apply_changed_options(self.config, self.optimizer, self.lr_scheduler)
        if self.fused:
            for own, group in zip(self._per_param, self._group_of, strict=True):
                settings = self.optimizer.param_groups[group]
                own.param_groups[0].update({k: v for k, v in settings.items() if k not in ("params", "lr")})
        self._sync_learning_rates()
        if self.scaler is not None and scaler:
            self.scaler.load_state_dict(scaler)
        return changed

    def fp32_parts(self) -> None:
        """The weights' fp32 parts when the modules hold lower-precision copies (never here: see ZeroStepper)."""
        return None

    def exact_weights(self) -> contextlib.AbstractContextManager:
        """While it lasts, the trained modules hold the weights to export (here they always do)."""
        return contextlib.nullcontext()

    def close(self) -> None:
        for hook in getattr(self, "_hooks", ()):
            hook.remove()
