"""The benchmarks run (small shapes, on the CPU), so they work the day a GPU or a long run measures with them."""

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
    in_flight = memory.tensors_in_flight(run.unet, memory._optimizers(run.stepper), lambda: run.step(batch))
    assert sum(saved.values()) > 1e6 and in_flight >= sum(saved.values())


def test_the_memory_bench_measures_a_training_run(tmp_path):
    """The SD1.5 rows' run (here on the tiny model): the run's own weights and optimizer, its resident peak, and
    the tensors of one more step under the tracker."""
    from argparse import Namespace

    import memory
    from PIL import Image

    from dreambooth_ext.models.tiny import save_tiny_checkpoint

    base = save_tiny_checkpoint(tmp_path / "tiny.safetensors", "sd1", seed=0)
    for name, color in (("images", (200, 40, 40)), ("classes", (40, 120, 200))):
        (tmp_path / name).mkdir()
        Image.new("RGB", (64, 64), color).save(tmp_path / name / "a.png")
    args = Namespace(base=str(base), images=str(tmp_path / "images"), classes=str(tmp_path / "classes"),
                     resolution=64, steps=2)
    figures = memory.run_one(args, memory.COMBINATIONS[memory.FUSED])
    assert figures["fused"] and figures["weights"] > figures["largest_weight"] > 0 and figures["optimizer"] > 0
    assert figures["in_flight"] > figures["largest_weight"] and "transient" in figures
    assert all(f > 0 for f in memory._estimates(figures))


def test_the_speed_bench_reads_the_engines_peak_at_its_last_step_not_after_its_save(tmp_path, monkeypatch):
    """The reference loop saves nothing: the engine's figure must not count the final save's memory either."""
    from argparse import Namespace

    import speed
    from PIL import Image

    from dreambooth_ext.models.tiny import save_tiny_checkpoint
    from dreambooth_ext.train import run

    base = save_tiny_checkpoint(tmp_path / "tiny.safetensors", "sd1", seed=0)
    for name, color in (("images", (200, 40, 40)), ("classes", (40, 120, 200))):
        (tmp_path / name).mkdir()
        for i in range(2):
            Image.new("RGB", (64, 64), color).save(tmp_path / name / f"{i}.png")
    save = run._Loop._save_model

    def save_holding_a_gigabyte(self, step):
        held = torch.ones(256 * 2**20)  # 1 GiB, touched
        save(self, step)
        del held

    monkeypatch.setattr(run._Loop, "_save_model", save_holding_a_gigabyte)
    args = Namespace(base=str(base), images=str(tmp_path / "images"), classes=str(tmp_path / "classes"),
                     resolution=64, steps=4)
    figures = speed.run_engine(args, {})
    assert figures["step_s"] > 0 and figures["peak_mib"] < speed._peak_mib() - 900


@pytest.fixture(scope="module")
def small_sd15(tmp_path_factory):
    """The start bench's checkpoint at SD1.5's architecture with every width / 8, and its diffusers configs."""
    import start
    from models import save_sd15

    folder = tmp_path_factory.mktemp("start")
    path = save_sd15(folder / "sd15.safetensors", shrink=8, dtype=torch.float16)
    return path, start.write_diffusers_configs(path, folder / "configs")


def test_the_start_bench_competitors_load_the_same_model_offline(small_sd15, monkeypatch):
    """diffusers' from_single_file, given the bench's config folder instead of the hub, builds the same UNet, VAE
    and text encoder as the engine (the comparison is between two loaders of one model), and so does its
    save_pretrained + from_pretrained round trip."""
    import start

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path, configs = small_sd15
    loaded = {}
    for name, (imports, load) in start.PATHS.items():
        imports()
        loaded[name] = {part: module.state_dict() for part, module in load(str(path), str(configs)).items()}
    engine = loaded.pop("engine")
    assert engine["unet"]["conv_in.weight"].dtype == torch.float32  # the engine trains the UNet in fp32
    for name, parts in loaded.items():
        for part, state in parts.items():
            mine = engine[part]
            assert state.keys() >= {k for k in mine if not k.endswith("position_ids")}, (name, part)
            for key, tensor in mine.items():
                assert torch.equal(tensor.to(state[key].dtype), state[key]), (name, part, key)


def test_the_start_bench_measures_interleaved_and_says_where(small_sd15, monkeypatch):
    import start

    from dreambooth_ext.train import devices

    path, configs = small_sd15
    results = start.measure(path, configs, repeats=1, names=["engine", "diffusers single-file"])
    assert all(len(runs) == 1 and runs[0]["from_start"] > runs[0]["seconds"] > 0 and runs[0]["peak_mib"] > 0
               for runs in results.values())
    lines = start.report(results, repeats=1)
    assert lines[-1].startswith("engine / diffusers single-file: load ") and "peak" in lines[-1]

    monkeypatch.setattr(devices, "cpu_computes_bf16", lambda: True)
    header = start.header(2.1, repeats=3)
    assert f"with {torch.get_num_threads()} threads" in header and start.cpu_name() in header
    assert "computes bf16 natively" in header
    monkeypatch.setattr(devices, "cpu_computes_bf16", lambda: False)
    assert "no native bf16" in start.header(2.1, repeats=3)


def test_the_monitor_cost_bench_times_each_point_and_extrapolates_to_a_default_run(tmp_path):
    from argparse import Namespace

    import monitor_cost
    from PIL import Image

    from dreambooth_ext.models.tiny import save_tiny_checkpoint

    base = save_tiny_checkpoint(tmp_path / "tiny.safetensors", "sd1", seed=0)
    for name, color in (("images", (200, 40, 40)), ("classes", (40, 120, 200))):
        (tmp_path / name).mkdir()
        for i in range(2):
            Image.new("RGB", (64, 64), (color[0], color[1] + 20 * i, color[2])).save(tmp_path / name / f"{i}.png")
    args = Namespace(base=str(base), images=str(tmp_path / "images"), classes=str(tmp_path / "classes"),
                     resolution=64, steps=4, device="cpu", shrink=8, repeats=1)
    results = {"off": [monitor_cost.run_one(args, False)], "on": [monitor_cost.run_one(args, True)]}
    assert results["off"][0]["points"] == []
    points = results["on"][0]["points"]
    assert [p["step"] for p in points] == [0, 1, 2, 3, 4]
    assert [p["render"] for p in points] == [True, False, False, False, True]
    assert all(p["seconds"] > 0 for p in points)
    costs = monitor_cost.point_costs(points)
    default = monitor_cost.share(costs, 0.5, 1000, 0, False)
    assert (default["points"], default["renders"]) == (11, 2)
    assert monitor_cost.share(costs, 0.5, 1000, 250, False)["renders"] == 5  # the base, 250, 500, 750, 1000
    assert monitor_cost.share(costs, 0.5, 1000, 0, True)["renders"] == 11
    assert default["seconds"] == pytest.approx(costs["base"] + costs["render"] + 9 * costs["plain"])
    assert default["share"] == pytest.approx(default["seconds"] / (default["seconds"] + 500))
    lines = monitor_cost.report(results, args, pictures=2)
    assert any("default run: 1000 steps" in line and "of the run" in line for line in lines)
    assert lines[-1].startswith("Kept between points: base predictions 4 KiB")


def test_the_gpu_bench_measures_the_monitor_cost_at_sd15s_real_size_on_its_device(monkeypatch):
    from argparse import Namespace

    import gpu
    import monitor_cost

    asked = []
    monkeypatch.setattr(monitor_cost, "figures", lambda args: asked.append(args) or ["figures"])
    assert gpu.monitor_cost_figures(Namespace(tiny=False, monitor_steps=40, device="cuda")) == ["figures"]
    assert (asked[0].shrink, asked[0].resolution, asked[0].steps, asked[0].device) == (1, 512, 40, "cuda")
    gpu.monitor_cost_figures(Namespace(tiny=True, monitor_steps=4, device="cpu"))
    assert (asked[1].shrink, asked[1].resolution, asked[1].device) == (8, 128, "cpu")
