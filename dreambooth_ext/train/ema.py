"""Exponential moving average of the trainable weights, optionally kept in CPU memory."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def warmed_up_decay(decay: float, updates: int) -> float:
    """The decay of update number `updates` (1-based), as diffusers' EMAModel has it: the first update copies the
    weights, then (1+t)/(10+t) until that reaches `decay`. Without the warm-up a 0.9999 average of a 1000-step
    run would still be about 90 % the base model."""
    t = updates - 1
    return 0.0 if t <= 0 else min(decay, (1 + t) / (10 + t))


class EMA:
    def __init__(self, module: torch.nn.Module, decay: float, device: torch.device | str = "cpu"):
        self.decay = decay
        self.device = torch.device(device)
        self.updates = 0
        self.shadow = {name: p.detach().to(self.device, torch.float32, copy=True)
                       for name, p in module.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, module: torch.nn.Module, parts: dict[int, tuple[int, torch.Tensor]] | None = None) -> None:
        """One step of the average. `parts` (DeepSpeed computing with bf16/fp16 copies of the weights): this
        process's parts of the fp32 weights, id(weight) -> (offset in the flattened weight, values), averaged
        instead of the copies; the rest of each average is left to the process holding it (made_whole)."""
        self.updates += 1
        keep = warmed_up_decay(self.decay, self.updates)
        for name, param in module.named_parameters():
            shadow = self.shadow.get(name)
            if shadow is None:
                continue
            if parts is None:
                shadow.mul_(keep).add_(param.detach().to(self.device, torch.float32), alpha=1.0 - keep)
            elif id(param) in parts:
                start, values = parts[id(param)]
                piece = shadow.view(-1).narrow(0, start, values.numel())
                piece.mul_(keep).add_(values.to(self.device, torch.float32), alpha=1.0 - keep)

    @torch.no_grad()
    def made_whole(self, module: torch.nn.Module, parts: dict[int, tuple[int, torch.Tensor]],
                   device: torch.device) -> None:
        """After updates from `parts` on several processes: each average put together from the parts every
        process holds (all of them call it together), so that every process has all of it."""
        for name, param in module.named_parameters():
            shadow = self.shadow.get(name)
            if shadow is None:
                continue
            whole = torch.zeros(shadow.numel(), dtype=torch.float32, device=device)
            if id(param) in parts:
                start, values = parts[id(param)]
                whole.narrow(0, start, values.numel()).copy_(shadow.view(-1).narrow(0, start, values.numel()))
            torch.distributed.all_reduce(whole)
            shadow.view(-1).copy_(whole)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = self.shadow.keys() - state.keys()
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} weights, e.g. {sorted(missing)[:3]}")
        for name in self.shadow:
            self.shadow[name].copy_(state[name])

    @contextlib.contextmanager
    def applied_to(self, module: torch.nn.Module) -> Iterator[None]:
        """The averaged weights in the module for the block (e.g. to render samples), the trained ones after."""
        params = {name: p for name, p in module.named_parameters() if name in self.shadow}
        kept = {name: p.detach().clone() for name, p in params.items()}
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(self.shadow[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, param in params.items():
                    param.copy_(kept[name])

    def weights_for_export(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The module's state dict with the averaged weights in place of the trained ones."""
        state = {k: v.detach() for k, v in module.state_dict().items()}
        state.update(self.shadow)
        return state
