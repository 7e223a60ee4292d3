"""`demo`: an end-to-end run that needs nothing but this package: a small built-in SD1-architecture model,
a handful of generated pictures of one subject, class images rendered by the model, prior preservation on."""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from .config import from_dict
from .models.checkpoint import read_checkpoint
from .models.tiny import save_tiny_checkpoint

log = logging.getLogger(__name__)

DEMO_TOKEN = "ohwx"
DEMO_CLASS = "toy"


def make_demo_images(folder: Path, count: int = 6, size: int = 96) -> Path:
    """Pictures of one made-up subject (a red ball with a yellow band) in different places and lights."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        path = folder / f"demo_{i:02d}.png"
        if path.exists():
            continue
        shade = 60 + 30 * i
        image = Image.new("RGB", (size, size), (shade // 2, shade // 2 + 40, 200 - shade // 3))
        draw = ImageDraw.Draw(image)
        radius = size // 4 + (i % 3) * 4
        cx = size // 2 + int(12 * math.cos(i))
        cy = size // 2 + int(12 * math.sin(i))
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=(210, 30, 40))
        draw.rectangle((cx - radius + 4, cy - 4, cx + radius - 4, cy + 4), fill=(250, 220, 40))
        image.save(path)
    return folder


def demo_config(args: argparse.Namespace, work: Path) -> object:
    small = not args.model
    if small:
        base = work / "base" / "small_sd1.safetensors"
        if not base.exists():
            log.info("Building the small built-in model (SD1 architecture, made for 64 px): %s", base)
            save_tiny_checkpoint(base, family="sd1", seed=0)
    else:
        base = Path(args.model)
    if not args.images:
        log.info("Drawing the demo subject's pictures in %s", work / "images")
    images = Path(args.images) if args.images else make_demo_images(work / "images")
    steps = args.steps or (150 if small else 400)
    return from_dict({
        "project_name": "demo",
        "base_model": str(base),
        "resolution": 64 if small else 512,
        "max_train_steps": steps,
        # The small random model needs a large rate to move visibly in a few minutes; real models use ~2e-6.
        "learning_rate": 1e-4 if small else 2e-6,
        "prior_preservation": True,
        "save_precision": "fp32" if small else "fp16",
        "concepts": [{
            "instance_dir": str(images), "token": DEMO_TOKEN, "class_word": DEMO_CLASS,
            "num_class_images": 6 if small else 50,
            "class_dir": str(work / "class_images"),
        }],
    })


def run_demo(args: argparse.Namespace):
    from .cli import folder_host, run_training
    from .train.resuming import STATE_FOLDER, earlier_results, forget_state
    from .train.trained import result_folders

    work = Path(args.work_dir or Path(args.models_dir) / "dreambooth") / "demo"
    config = demo_config(args, work)
    # The demo starts over each time: a stopped one is not resumed, and the last one's results are replaced.
    forget_state(work / STATE_FOLDER)
    for path in earlier_results(config.project_name, result_folders(folder_host(args), config)):
        path.unlink()
        path.with_suffix(".yaml").unlink(missing_ok=True)
    result = run_training(config, args)
    if result.status == "finished":
        _summarize(config, result)
    return result


def _summarize(config, result) -> None:
    trained = read_checkpoint(result.checkpoints[-1])
    base = read_checkpoint(config.base_model)
    unet_keys = [k for k in base if k.startswith("model.diffusion_model.")]
    changed = sum(not torch.equal(trained[k].float(), base[k].float()) for k in unet_keys)
    losses = [loss for _, loss in result.losses]
    window = max(1, min(20, len(losses) // 4))
    first, last = sum(losses[:window]) / window, sum(losses[-window:]) / window
    print(f"Demo finished: {len(trained)} tensors in the WebUI layout, {changed} of {len(unet_keys)} UNet "
          f"tensors changed from the base. Mean loss of the first {window} steps {first:.4f}, last {window} "
          f"steps {last:.4f}.")
