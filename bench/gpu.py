"""Training throughput and memory on one GPU (H100/H200 class), SD1.5 and SDXL shapes, random weights.

For each model: the engine's training step (its Stepper: fused AdamW with fp32 master weights, bf16 autocast, the
UNet's loss as the engine computes it, gradient checkpointing) at batch 1 and at the largest batch that fits
(doubling until out of memory), printing it/s, images/s, peak VRAM, the FLOPs one step actually executes (counted
with torch's FlopCounterMode, recomputation included), achieved TFLOP/s and its share of the chip's bf16 dense
peak. Then the peak VRAM at batch 1 of the memory-lean combinations (bf16 weights with stochastic rounding +
Adafactor + fused backward; LoRA rank 16) against the goals. Latents and text embeddings are random tensors of the
real shapes (as the engine's caches hold them), so the VAE and text encoders are not in memory. Last, the learning
monitor's cost (bench/monitor_cost.py): whole runs of the engine at SD1.5's real size and 512 px with the monitor off
and at its defaults, and its share of a default-length run.

    python bench/gpu.py                 # about 10 minutes on one H100/H200
    python bench/gpu.py --device cpu --tiny   # a smoke run of the script itself on small shapes
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dreambooth_ext.config import from_dict  # noqa: E402
from dreambooth_ext.data.images import Fit  # noqa: E402
from dreambooth_ext.models.family import family_named  # noqa: E402
from dreambooth_ext.models.lora import LoRASettings, add_adapters, freeze_base, unet_targets  # noqa: E402
from dreambooth_ext.train.devices import Precision  # noqa: E402
from dreambooth_ext.train.loss import per_sample_mse  # noqa: E402
from dreambooth_ext.train.optim import param_groups  # noqa: E402
from dreambooth_ext.train.stepper import Stepper  # noqa: E402

GB = 1e9  # the goals are in GB
# Dense bf16 tensor-core peaks, TFLOP/s.
PEAKS = {"H200": 989.0, "H100 80GB HBM3": 989.0, "H100 SXM": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0,
         "A100": 312.0}
REFERENCE_TFLOP = {"sd15": (2.41, 3.2)}  # per 512-px image forward+backward: without / with checkpointing
GOALS_GB = {("sd15", "defaults"): 8.0, ("sdxl", "lean"): 12.0, ("sdxl", "lora"): 8.0}
SETUPS = {
    "defaults": {},
    "lean": {"weights_dtype": "bf16", "optimizer": "adafactor", "fused_backward": True, "max_grad_norm": 0.0},
    "lora": {"train_mode": "lora", "lora_rank": 16},
}


def build_unet(model: str, tiny: bool):
    from models import sd15_modules, sdxl_unet

    if model == "sd15":
        return sd15_modules(shrink=8 if tiny else 1)[0]
    if tiny:
        from diffusers import UNet2DConditionModel

        from dreambooth_ext.models.convert import make_unet_config

        family = family_named("sdxl")
        return UNet2DConditionModel(**make_unet_config(
            family=family, block_out_channels=(32, 64, 128), layers_per_block=2,
            attention_levels=(False, True, True), cross_attention_dim=256, transformer_layers_per_block=(1, 2, 2),
            added_input_dim=128 + 6 * family.size_embedding_dim))
    return sdxl_unet()


class Run:
    """One model on the device with one setup: a step function over random cached-latent batches."""

    def __init__(self, model: str, setup: str, device: torch.device, tiny: bool, *, fp32: bool = False,
                 latent: int | None = None):
        """`fp32`: compute and keep every weight in fp32 (a CPU without bf16 arithmetic: bench/memory.py);
        `latent`: the latent size (default: the model's own resolution / 8)."""
        self.model, self.device = model, device
        self.family = family_named("sdxl" if model == "sdxl" else "sd1")
        options = {"learning_rate": 1e-6, "mixed_precision": "bf16", "gradient_checkpointing": True,
                   "lora_learning_rate": 1e-4, **SETUPS[setup]}
        if fp32:
            options.update(mixed_precision="no", weights_dtype="fp32")
        self.config = from_dict(options)
        self.compute = torch.float32 if fp32 else torch.bfloat16
        precision = Precision(None if fp32 else torch.bfloat16, self.compute, False)
        unet = build_unet(model, tiny)
        if self.config.train_mode == "lora":
            unet.to(device, self.compute)
            add_adapters(unet, unet_targets(unet, conv=False),
                         LoRASettings(rank=self.config.lora_rank, alpha=self.config.lora_rank))
            unet.to(device)
            for name, param in unet.named_parameters():
                if ".down." in name or ".up." in name:
                    param.data = param.data.float()
            freeze_base(unet)
        else:
            dtype = torch.bfloat16 if self.config.weights_dtype == "bf16" else torch.float32
            unet.to(device, dtype).requires_grad_(True)
        unet.train()
        unet.enable_gradient_checkpointing()
        self.unet = unet
        self.stepper = Stepper(self.config, param_groups(self.config, unet), device, precision, 1000)
        self.latent = latent or ((32 if tiny else 128) if model == "sdxl" else (16 if tiny else 64))
        self.context = unet.config.cross_attention_dim

    def batch(self, size: int) -> dict:
        shape = (size, 4, self.latent, self.latent)
        kwargs = {"encoder_hidden_states": torch.randn(size, 77, self.context, device=self.device)}
        if self.model == "sdxl":
            pooled = self.unet.config.projection_class_embeddings_input_dim - 6 * 256
            fit = Fit.whole(8 * self.latent, 8 * self.latent)
            kwargs["added_cond_kwargs"] = {
                "text_embeds": torch.randn(size, pooled, device=self.device),
                "time_ids": self.family.size_conditioning([fit] * size)["time_ids"].to(self.device)}
        return {"latents": torch.randn(shape, device=self.device), "kwargs": kwargs,
                "timesteps": torch.randint(0, 1000, (size,), device=self.device)}

    def step(self, batch: dict) -> torch.Tensor:
        noise = torch.randn_like(batch["latents"])
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.compute == torch.bfloat16):
            prediction = self.unet(batch["latents"] + noise, batch["timesteps"], **batch["kwargs"]).sample
        loss = per_sample_mse(prediction, noise).mean()
        self.stepper.backward(loss, last=True)
        self.stepper.step()
        return loss.detach()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / GB if device.type == "cuda" else float("nan")


def count_flops(run: Run) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    batch = run.batch(1)
    with FlopCounterMode(display=False) as counter:
        run.step(batch)
    return counter.get_total_flops()


def measure(run: Run, size: int, steps: int) -> dict:
    _reset_memory(run.device)
    batch = run.batch(size)
    for _ in range(2):
        run.step(batch)
    _sync(run.device)
    start = time.perf_counter()
    for _ in range(steps):
        loss = run.step(batch)
    loss.item()
    _sync(run.device)
    seconds = (time.perf_counter() - start) / steps
    return {"batch": size, "it_s": 1 / seconds, "images_s": size / seconds, "peak_gb": _peak(run.device)}


def largest_batch(run: Run, steps: int, limit: int, seconds_limit: float) -> dict | None:
    best = None
    size = 2
    while size <= limit:
        try:
            result = measure(run, size, steps)
        except torch.cuda.OutOfMemoryError:
            break
        best = result
        if 1 / result["it_s"] > seconds_limit:
            break
        size *= 2
    _reset_memory(run.device)
    return best


def chip_peak(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((value for key, value in PEAKS.items() if key in name), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="small shapes: check the script itself (e.g. on a CPU)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--peak-tflops", type=float, help="the chip's dense bf16 peak, if not recognised")
    parser.add_argument("--monitor-steps", type=int, default=40,
                        help="steps of the learning monitor's cost runs (0: not measured)")
    args = parser.parse_args()
    device = torch.device(args.device)
    peak = chip_peak(device, args.peak_tflops)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{name}; bf16 peak {peak or 'unknown'} TFLOP/s; torch {torch.__version__}")
    print(f"{'model':6} {'setup':9} {'batch':>5} {'it/s':>7} {'img/s':>7} {'peak GB':>9} {'TFLOP/img':>9} "
          f"{'TFLOP/s':>8} {'of peak':>8}  goal")
    for model in ("sd15", "sdxl"):
        run = Run(model, "defaults", device, args.tiny)
        flops = count_flops(run) / 1e12
        rows = [measure(run, 1, args.steps)]
        bigger = largest_batch(run, args.steps, args.max_batch, 10.0)
        if bigger:
            rows.append(bigger)
        for row in rows:
            _print(model, "defaults", row, flops, peak)
        del run
        _reset_memory(device)
        for setup in ("lean", "lora"):
            run = Run(model, setup, device, args.tiny)
            _print(model, setup, measure(run, 1, args.steps), count_flops(run) / 1e12, peak)
            del run
            _reset_memory(device)
    reference = REFERENCE_TFLOP["sd15"]
    print(f"(SD1.5 at 512 px: {reference[0]} TFLOP per image forward+backward, about {reference[1]} with "
          "gradient checkpointing; the TFLOP/img column is what the step executed, optimizer included)")
    if args.monitor_steps:
        print("\n".join(monitor_cost_figures(args)))


def monitor_cost_figures(args) -> list[str]:
    """The learning monitor's cost on this device: bench/monitor_cost.py at SD1.5's real size (small with --tiny)."""
    import monitor_cost

    size = ["--shrink", "8", "--resolution", "128"] if args.tiny else ["--shrink", "1", "--resolution", "512"]
    return monitor_cost.figures(monitor_cost.parser().parse_args(
        [*size, "--steps", str(args.monitor_steps), "--repeats", "1", "--device", args.device]))


def _print(model: str, setup: str, row: dict, tflop_per_image: float, peak: float | None) -> None:
    achieved = row["images_s"] * tflop_per_image
    share = f"{achieved / peak:8.1%}" if peak else f"{'n/a':>8}"
    goal = GOALS_GB.get((model, setup)) if row["batch"] == 1 else None
    verdict = ""
    if goal and row["peak_gb"] == row["peak_gb"]:  # not NaN: measured on a GPU
        verdict = f"<= {goal} GB: {'met' if row['peak_gb'] <= goal else 'NOT met'}"
    print(f"{model:6} {setup:9} {row['batch']:5d} {row['it_s']:7.2f} {row['images_s']:7.2f} {row['peak_gb']:9.2f} "
          f"{tflop_per_image:9.2f} {achieved:8.2f} {share}  {verdict}")


if __name__ == "__main__":
    main()
