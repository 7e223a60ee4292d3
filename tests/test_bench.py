"""The GPU benchmark's step runs (small shapes, on the CPU), so it works the day a GPU runs it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


@pytest.mark.parametrize("model, setup", [("sd15", "defaults"), ("sdxl", "lean"), ("sdxl", "lora")])
def test_the_gpu_bench_step_trains_what_it_says(model, setup):
    import gpu

    run = gpu.Run(model, setup, torch.device("cpu"), tiny=True)
    trained = [name for name, p in run.unet.named_parameters() if p.requires_grad]
    before = {name: p.detach().clone() for name, p in run.unet.named_parameters() if p.requires_grad}
    loss = run.step(run.batch(1))
    assert torch.isfinite(loss)
    if setup == "lora":
        assert trained and all(".down." in n or ".up." in n for n in trained)
    moved = [n for n, p in run.unet.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert moved
    assert gpu.count_flops(run) > 0


def test_the_memory_bench_counts_at_least_what_autograd_keeps_for_backward():
    import gpu
    import memory

    # LoRA: its frozen weights must take no gradient hooks (torch's tracker would fail on them).
    run = gpu.Run("sdxl", "lora", torch.device("cpu"), tiny=True, fp32=True, latent=8)
    run.unet.disable_gradient_checkpointing()
    batch = run.batch(2)
    run.step(batch)  # the optimizer's state exists from here on, as in the bench
    weights = {p.untyped_storage().data_ptr() for p in run.unet.parameters()}
    saved: dict[int, int] = {}

    def keep(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        run.unet(batch["latents"], batch["timesteps"], **batch["kwargs"])
    in_flight = memory.tensors_in_flight(run, batch)
    assert sum(saved.values()) > 1e6 and in_flight >= sum(saved.values())
