"""Exponential moving average of the trainable weights, optionally kept in CPU memory."""

from __future__ import annotations

import torch


class EMA:
    def __init__(self, module: torch.nn.Module, decay: float, device: torch.device | str = "cpu"):
        self.decay = decay
        self.device = torch.device(device)
        self.shadow = {name: p.detach().to(self.device, torch.float32, copy=True)
                       for name, p in module.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        keep = self.decay
        for name, param in module.named_parameters():
            shadow = self.shadow.get(name)
            if shadow is not None:
                shadow.mul_(keep).add_(param.detach().to(self.device, torch.float32), alpha=1.0 - keep)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = self.shadow.keys() - state.keys()
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} weights, e.g. {sorted(missing)[:3]}")
        for name in self.shadow:
            self.shadow[name].copy_(state[name])

    def weights_for_export(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The module's state dict with the averaged weights in place of the trained ones."""
        state = {k: v.detach() for k, v in module.state_dict().items()}
        state.update(self.shadow)
        return state
