"""Exactness: the seed decides every random draw of a run, a resumed run is bit for bit an uninterrupted one (bf16
weights, the Lowest memory preset, LoRA with dropout), the schedules start from the run's own rates, and the loss
the page shows is each step's own."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import instance_dir, make_config, tiny_sd1, train  # noqa: F401 (fixtures)

from dreambooth_ext.config import LOWEST_MEMORY
from dreambooth_ext.hosts.files import FolderHost
from dreambooth_ext.models.checkpoint import read_checkpoint
from dreambooth_ext.train.optim import make_lr_scheduler, make_optimizer
from dreambooth_ext.train.run import Progress, TrainingRun

LORA_DROPOUT = {"train_mode": "lora", "lora_rank": 4, "lora_dropout": 0.1, "lora_learning_rate": 1e-2}
BF16_WEIGHTS = {"mixed_precision": "bf16", "weights_dtype": "bf16"}
SETUPS = {
    "bf16 weights, fused AdamW": BF16_WEIGHTS,
    "Lowest memory": {**LOWEST_MEMORY, "ema_on_cpu": False},
    "LoRA with dropout": LORA_DROPOUT,
    "LoRA with dropout, checkpointed": {**LORA_DROPOUT, "gradient_checkpointing": "on"},
}


def result_tensors(result) -> dict[str, torch.Tensor]:
    if result.loras:
        return load_file(result.loras[-1])
    return read_checkpoint(result.checkpoints[-1])


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [key for key in a if not torch.equal(a[key], b[key])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def run_stopped_at(config, root: Path, stop: int):
    holder = {}

    def cancel_at(p: Progress) -> None:
        if p.phase == "training" and p.step == stop:
            holder["run"].cancel()

    run = holder["run"] = TrainingRun(config, FolderHost(root / "models"), on_progress=cancel_at)
    return run.run()


@pytest.mark.parametrize("setup", SETUPS)
def test_a_resumed_run_is_bit_for_bit_an_uninterrupted_one(setup, tiny_sd1, instance_dir, tmp_path):  # noqa: F811
    config = make_config(tiny_sd1, instance_dir, max_train_steps=4, **SETUPS[setup])
    straight = train(config, tmp_path / "straight")[1]
    assert run_stopped_at(config, tmp_path / "stopped", 2).status == "cancelled"
    resumed = train(config, tmp_path / "stopped", resume=True)[1]
    assert resumed.status == "finished" and resumed.step == 4
    assert [loss for _, loss in resumed.losses] == [loss for step, loss in straight.losses if step > 2]
    assert_identical(result_tensors(resumed), result_tensors(straight))


@pytest.mark.parametrize("setup", ["bf16 weights, fused AdamW", "LoRA with dropout"])
def test_the_seed_alone_decides_a_run_and_the_hosts_generator_is_left_as_it_was(setup, tiny_sd1,  # noqa: F811
                                                                                 instance_dir, tmp_path):  # noqa: F811
    config = make_config(tiny_sd1, instance_dir, max_train_steps=2, **SETUPS[setup])
    results = []
    for host_seed in (1, 2):
        torch.manual_seed(host_seed)
        before = torch.random.get_rng_state()
        results.append(result_tensors(train(config, tmp_path / str(host_seed))[1]))
        assert torch.equal(torch.random.get_rng_state(), before)
    assert_identical(*results)
    other_seed = result_tensors(train(make_config(tiny_sd1, instance_dir, max_train_steps=2, seed=6,
                                                  **SETUPS[setup]), tmp_path / "other")[1])
    assert any(not torch.equal(results[0][key], other_seed[key]) for key in other_seed)


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_the_polynomial_schedule_decays_from_the_runs_own_rate(optimizer):
    """diffusers' polynomial schedule decays from `optimizer.defaults["lr"]` to 1e-7: the optimizer must carry the
    run's rate there (Adafactor had none: every run died; AdamW had its 1e-3)."""
    config = make_config(Path("base.safetensors"), Path("photos"), optimizer=optimizer, learning_rate=2e-4,
                         lr_scheduler="polynomial", lr_power=2.0)
    weight = torch.nn.Parameter(torch.zeros(4, 4))
    built = make_optimizer(config, [{"params": [weight], "lr": config.learning_rate, "weight_decay": 0.0}],
                           torch.device("cpu"))
    schedule = make_lr_scheduler(config, built, 10)
    rates = []
    for _ in range(10):
        rates.append(schedule.get_last_lr()[0])
        weight.grad = torch.ones_like(weight)
        built.step()
        schedule.step()
    lr_end = 1e-7
    assert rates == pytest.approx([(2e-4 - lr_end) * (1 - t / 10) ** 2 + lr_end for t in range(10)], rel=1e-6)


def test_each_progress_report_of_a_short_run_shows_its_own_steps_loss(tiny_sd1, instance_dir, tmp_path):  # noqa: F811
    shown = []
    result = train(make_config(tiny_sd1, instance_dir, max_train_steps=8), tmp_path,
                   on_progress=lambda p: p.phase == "training" and p.loss is not None and shown.append(p.loss))[1]
    smoothed, expected = None, []
    for _, value in result.losses:
        smoothed = value if smoothed is None else 0.9 * smoothed + 0.1 * value
        expected.append(smoothed)
    assert shown == pytest.approx(expected)
