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
