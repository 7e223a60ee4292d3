"""Step time and peak memory of the engine against the reference algorithm, measured side by side (CPU).

The reference is a loop of our own that follows diffusers' examples/dreambooth/train_dreambooth.py (0.31) step by
step, with prior preservation at batch 1, on the same modules loaded the same way:
  1. each step loads and preprocesses the instance and the class image (resize, center crop, normalise) and
     tokenizes both prompts (its Dataset's __getitem__);
  2. concatenates instance and class into one batch of 2;
  3. encodes the pixels with the VAE (latent_dist.sample() * scaling_factor) and the prompts with the text
     encoder, every step;
  4. noise, random timesteps, add_noise, UNet forward, MSE against the noise, split into instance and prior
     halves, loss = instance + prior_loss_weight * prior;
  5. backward, clip_grad_norm_(1.0), torch's default AdamW (lr 5e-6, weight decay 1e-2), lr_scheduler.step(),
     optimizer.zero_grad(set_to_none=False) (its default), no gradient checkpointing, fp32 (no GPU).
The engine runs TrainingRun with its defaults on the same data, in a process set up as `python -m dreambooth_ext`
sets up its own (dreambooth_ext/process.py); variants change one option, or leave the process as a host's (the
WebUI's) is. Each run is its own process (so peak memory is its own); runs are interleaved and repeated; step time
is the median of the steady steps, peak memory the high-water mark of the process's resident memory during those
steps.

    python bench/speed.py [--shrink 4] [--resolution 256] [--steps 10] [--repeats 2]
    python bench/speed.py --shrink 1 --repeats 1 --steps 6   # SD1.5's real widths: about 25 minutes, 16 GB of RAM
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

VARIANTS = {
    "reference": None,
    "engine (defaults)": {},  # gradient checkpointing auto: off on a CPU; mixed_precision auto: see the header
    "engine (defaults), in a host's process": {},  # glibc's malloc left as it is (the WebUI's process)
    "engine, fp32 (mixed_precision no)": {"mixed_precision": "no"},
    "engine, caching off (same algorithm)": {"cache_latents": False, "precompute_text_embeddings": False},
    "engine, gradient checkpointing on": {"gradient_checkpointing": "on"},  # the default on a GPU
    "engine, fused backward, no clipping": {"fused_backward": True, "max_grad_norm": 0.0},
}
IN_A_HOST = {"engine (defaults), in a host's process"}  # the others run as `python -m dreambooth_ext` does
GOALS = {"engine (defaults)": (0.6, 0.9)}  # step time, peak memory: at most these ratios to the reference
WARMUP = 2


def _reset_peak() -> None:
    """Linux: start a new resident-memory high-water mark (VmHWM) from here."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


# ----------------------------------------------------------------------------------------------------------
# One run (in its own process)


def run_reference(args) -> dict:
    import torch.nn.functional as F
    from diffusers.optimization import get_scheduler

    from dreambooth_ext.data.dataset import find_images
    from dreambooth_ext.data.images import prepare_image
    from dreambooth_ext.models.bundle import load_bundle_from_file

    torch.manual_seed(0)
    bundle = load_bundle_from_file(args.base)
    unet, vae, text_encoder, tokenizer = bundle.unet, bundle.vae, bundle.text_encoders[0], bundle.tokenizers[0]
    scheduler = bundle.noise_scheduler
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    unet.train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=5e-6, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer)
    instances, classes = find_images(args.images), find_images(args.classes)
    size = (args.resolution, args.resolution)
    times, unet_times = [], []
    for step in range(args.steps):
        if step == WARMUP:
            _reset_peak()
        start = time.perf_counter()
        pixels = torch.stack([prepare_image(instances[step % len(instances)], size),
                              prepare_image(classes[step % len(classes)], size)])
        ids = tokenizer(["photo of ohwx toy", "photo of toy"], padding="max_length", truncation=True,
                        max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
            context = text_encoder(ids)[0]
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (2,))
        noisy = scheduler.add_noise(latents, noise, timesteps)
        unet_start = time.perf_counter()
        prediction = unet(noisy, timesteps, context).sample
        prediction, prediction_prior = prediction.chunk(2)
        target, target_prior = noise.chunk(2)
        loss = F.mse_loss(prediction.float(), target.float())
        loss = loss + F.mse_loss(prediction_prior.float(), target_prior.float())
        loss.backward()
        unet_times.append(time.perf_counter() - unet_start)
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=False)
        loss.item()  # its progress bar shows the loss every step
        times.append(time.perf_counter() - start)
    return {"step_s": statistics.median(times[WARMUP:]), "peak_mib": _peak_mib(),
            "unet_s": statistics.median(unet_times[WARMUP:])}


def run_engine(args, overrides: dict) -> dict:
    from dreambooth_ext.config import from_dict
    from dreambooth_ext.hosts.files import FolderHost
    from dreambooth_ext.train.run import TrainingRun

    data = {"project_name": "bench", "base_model": args.base, "resolution": args.resolution,
            "max_train_steps": args.steps, "learning_rate": 5e-6, "prior_preservation": True, "seed": 0,
            "sample_every_n_steps": 0, "save_precision": "fp16",
            "concepts": [{"instance_dir": args.images, "class_dir": args.classes, "token": "ohwx",
                          "class_word": "toy", "num_class_images": len(os.listdir(args.classes)),
                          "generate_class_images": False}]}
    data.update(overrides)
    stamps: list[float] = []
    peaks: list[float] = []

    def on_progress(progress) -> None:
        if progress.phase == "training":
            stamps.append(time.perf_counter())
            if progress.step == WARMUP:
                _reset_peak()
            peaks.append(_peak_mib())  # the last one: the high-water mark at the last step (the save is no step)

    with tempfile.TemporaryDirectory() as out:
        TrainingRun(from_dict(data), FolderHost(out), on_progress=on_progress).run()
    steps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)][WARMUP - 1:]
    return {"step_s": statistics.median(steps), "peak_mib": peaks[-1]}


# ----------------------------------------------------------------------------------------------------------
# The comparison


def prepare(folder: Path, shrink: int, resolution: int) -> dict[str, str]:
    from models import save_sd15
    from PIL import Image

    from dreambooth_ext.demo import make_demo_images

    base = save_sd15(folder / "sd15_shaped.safetensors", shrink=shrink)
    images = folder / "instance"
    make_demo_images(images, count=4, size=resolution)
    classes = folder / "class"
    classes.mkdir()
    for i in range(4):
        Image.new("RGB", (resolution, resolution), (40 * i, 120, 200 - 40 * i)).save(classes / f"c{i}.png")
    return {"base": str(base), "images": str(images), "classes": str(classes)}


def run_apart(script: str, run: str, paths: dict[str, str], args, *extra: str) -> dict:
    """One run of a bench `script` in a process of its own (its hidden --run options), with the model and pictures
    of `prepare`; its figures are the JSON of its last line of output."""
    command = [sys.executable, script, "--run", run, "--base", paths["base"], "--images", paths["images"],
               "--classes", paths["classes"], "--resolution", str(args.resolution), "--steps", str(args.steps), *extra]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def add_run_options(parser: argparse.ArgumentParser, steps: int) -> None:
    """The options of a bench that measures each run with `run_apart`: its shapes, and the run's own (hidden)."""
    parser.add_argument("--shrink", type=int, default=4, help="SD1.5's widths divided by this (1: real size)")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--run", help=argparse.SUPPRESS)
    for name in ("--base", "--images", "--classes"):
        parser.add_argument(name, help=argparse.SUPPRESS)


def measure(variant: str, paths: dict[str, str], args) -> dict:
    return run_apart(__file__, variant, paths, args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_options(parser, steps=10)
    parser.add_argument("--variants", help="names of the runs to measure, separated by ; (default: all)")
    args = parser.parse_args()
    if args.run:
        overrides = VARIANTS[args.run]
        if overrides is not None and args.run not in IN_A_HOST:
            from dreambooth_ext.process import keep_freed_memory

            keep_freed_memory()
        result = run_reference(args) if overrides is None else run_engine(args, overrides)
        print(json.dumps(result))
        return
    chosen = [name.strip() for name in args.variants.split(";")] if args.variants else list(VARIANTS)
    unknown = [name for name in chosen if name not in VARIANTS]
    if unknown or "reference" not in chosen:
        parser.error(f"--variants: {unknown or 'reference is needed'}; the runs are: {', '.join(VARIANTS)}")
    torch.set_num_threads(torch.get_num_threads())
    with tempfile.TemporaryDirectory() as tmp:
        paths = prepare(Path(tmp), args.shrink, args.resolution)
        results: dict[str, list[dict]] = {name: [] for name in chosen}
        for _ in range(args.repeats):  # interleaved: A B C ... A B C
            for name in chosen:
                results[name].append(measure(name, paths, args))
                print(f"  {name}: {results[name][-1]}", file=sys.stderr)
    report(results, args)


def report(results: dict[str, list[dict]], args) -> None:
    from dreambooth_ext.train.devices import resolve_precision

    best = {name: {k: min(r[k] for r in runs) for k in ("step_s", "peak_mib")} for name, runs in results.items()}
    ref = best["reference"]
    auto = resolve_precision("auto", torch.device("cpu")).name
    print(f"SD1.5-shaped model (widths / {args.shrink}), {args.resolution} px, batch 1 + 1 class image, "
          f"{torch.get_num_threads()} CPU threads, best of {args.repeats} interleaved runs; mixed_precision auto "
          f"is {auto} on this CPU ({'it computes bf16 natively' if auto == 'bf16' else 'no native bf16'})")
    print(f"{'run':40} {'step s':>8} {'ratio':>6} {'peak MiB':>9} {'ratio':>6}  goal")
    for name, figures in best.items():
        time_ratio, memory_ratio = figures["step_s"] / ref["step_s"], figures["peak_mib"] / ref["peak_mib"]
        goal = GOALS.get(name)
        verdict = ""
        if goal:
            met = time_ratio <= goal[0] and memory_ratio <= goal[1]
            verdict = f"time <= {goal[0]}, memory <= {goal[1]}: {'met' if met else 'NOT met'}"
        print(f"{name:40} {figures['step_s']:8.3f} {time_ratio:6.2f} {figures['peak_mib']:9.0f} "
              f"{memory_ratio:6.2f}  {verdict}")
    floor = min(r["unet_s"] for r in results["reference"])
    print(f"The reference's UNet forward + backward alone: {floor:.3f} s ({floor / ref['step_s']:.2f} of its step), "
          "the floor of any trainer running the same UNet pass on this machine.")


if __name__ == "__main__":
    main()
