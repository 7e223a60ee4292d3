"""What prior preservation does, measured side by side on the small built-in model (CPU, about 10 minutes).

A random model knows no class to preserve, so the bench first teaches the small model one: a world of 12
toys (ellipses, boxes and triangles in many colours, never the subject's red ball with a yellow band),
every one captioned "photo of toy", until it knows them by heart. That model is the base, and those toys
are its class images: a fixed regularization folder, JoePenna's way. (Class images rendered by the small
model, Dreambooth's other way, are not used here: its VAE is random, so its renders decode to noise.)

Then two Dreambooth runs from that base on the demo subject ("photo of ohwx toy"), same images, same
steps, same seed: one with prior preservation, one without. For each, on fixed noise and timesteps:
  - instance loss: denoising error on the training images with the instance prompt (should fall clearly);
  - class loss: denoising error on the class images with the class prompt (prior preservation should
    keep it near the base's);
  - class drift: mean squared difference between the trained and the base model's predictions on the
    class images with the class prompt (what prior preservation is meant to keep small).

    python bench/prior_preservation.py [--steps 200] [--lr 1e-4] [--base-steps 2000] [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dreambooth_ext.config import from_dict  # noqa: E402
from dreambooth_ext.data.dataset import collect_class_examples, collect_instance_examples  # noqa: E402
from dreambooth_ext.data.images import prepare_image  # noqa: E402
from dreambooth_ext.demo import make_demo_images  # noqa: E402
from dreambooth_ext.hosts.files import FolderHost  # noqa: E402
from dreambooth_ext.models.bundle import load_bundle_from_file  # noqa: E402
from dreambooth_ext.models.tiny import save_tiny_checkpoint  # noqa: E402
from dreambooth_ext.train.loss import per_sample_mse, training_target  # noqa: E402
from dreambooth_ext.train.run import TrainingRun  # noqa: E402

EVAL_TIMESTEPS = (50, 150, 300, 500)


def make_toy_world(folder: Path, count: int, seed: int, size: int = 64) -> Path:
    """Varied toys: ellipses, boxes and triangles in many colours on many backgrounds."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    rng = torch.Generator().manual_seed(seed)

    def rand(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi, (1,), generator=rng))

    for i in range(count):
        image = Image.new("RGB", (size, size), (rand(0, 256), rand(0, 256), rand(0, 256)))
        draw = ImageDraw.Draw(image)
        colour = (rand(0, 120), rand(60, 256), rand(60, 256))
        x0, y0 = rand(4, size // 3), rand(4, size // 3)
        x1, y1 = rand(2 * size // 3, size - 4), rand(2 * size // 3, size - 4)
        shape = i % 3
        if shape == 0:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        elif shape == 1:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        else:
            draw.polygon([(x0, y1), ((x0 + x1) // 2, y0), (x1, y1)], fill=colour)
        image.save(folder / f"toy_{i:03d}.png")
    return folder


def pretrain_base(root: Path, world: Path, steps: int) -> Path:
    """Teach the random small model what "photo of toy" looks like (reusing a base taught before in root)."""
    name = f"toy_base_{len(list(world.glob('*.png')))}"
    taught = FolderHost(root / "models").checkpoint_path(name, steps)
    if taught.exists():
        return taught
    random_base = save_tiny_checkpoint(root / "random.safetensors", family="sd1", seed=0)
    config = from_dict({"project_name": name, "base_model": str(random_base), "resolution": 64,
                        "max_train_steps": steps, "learning_rate": 5e-4, "lr_scheduler": "cosine",
                        "train_batch_size": 4, "prior_preservation": False, "save_precision": "fp32", "seed": 3,
                        "concepts": [{"instance_dir": str(world), "token": "", "class_word": "toy",
                                      "instance_prompt": "photo of {class}"}]})
    return TrainingRun(config, FolderHost(root / "models")).run().checkpoints[-1]


@torch.no_grad()
def predictions(bundle, examples) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's predictions and targets on every example at fixed timesteps and noise."""
    preds, targets = [], []
    generator = torch.Generator().manual_seed(1234)
    for example in examples:
        pixels = prepare_image(example.path, example.size, "center", False)[None]
        latents = bundle.vae.encode(pixels).latent_dist.mean * bundle.vae.config.scaling_factor
        conditioning = bundle.encode([example.caption])
        for t in EVAL_TIMESTEPS:
            timestep = torch.tensor([t])
            noise = torch.randn(latents.shape, generator=generator)
            noisy = bundle.noise_scheduler.add_noise(latents, noise, timestep)
            preds.append(bundle.unet(noisy, timestep, **conditioning.unet_kwargs()).sample)
            targets.append(training_target(bundle.noise_scheduler, latents, noise, timestep))
    return torch.cat(preds), torch.cat(targets)


def measure(model_path: Path, sets: dict[str, list], base_preds: dict[str, torch.Tensor] | None):
    """Loss on each set of examples, and drift of the predictions from the base model's."""
    bundle = load_bundle_from_file(model_path)
    losses, drifts, preds = {}, {}, {}
    for name, examples in sets.items():
        pred, target = predictions(bundle, examples)
        preds[name] = pred
        losses[name] = per_sample_mse(pred, target).mean().item()
        drifts[name] = per_sample_mse(pred, base_preds[name]).mean().item() if base_preds else 0.0
    return losses, drifts, preds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200, help="Dreambooth steps")
    parser.add_argument("--lr", type=float, default=1e-4, help="Dreambooth learning rate (20 warmup steps)")
    parser.add_argument("--seed", type=int, default=7, help="seed of the Dreambooth runs")
    parser.add_argument("--world-size", type=int, default=12, help="toys the base model is taught (its class)")
    parser.add_argument("--base-steps", type=int, default=2000, help="steps teaching the base model the class")
    parser.add_argument("--out", type=Path, default=None, help="work folder (default: a new temporary one)")
    args = parser.parse_args()
    root = args.out or Path(tempfile.mkdtemp(prefix="bench_prior_"))
    started = time.perf_counter()
    world = make_toy_world(root / "toy_world", args.world_size, seed=1)
    base = pretrain_base(root, world, args.base_steps)
    base_seconds = time.perf_counter() - started
    images = make_demo_images(root / "images", size=64)
    common = {"base_model": str(base), "resolution": 64, "max_train_steps": args.steps, "learning_rate": args.lr,
              "lr_scheduler": "constant_with_warmup", "lr_warmup_steps": min(20, args.steps // 5),
              "save_precision": "fp32", "seed": args.seed}
    # The whole world is the class folder, so nothing is generated.
    concept = {"instance_dir": str(images), "token": "ohwx", "class_word": "toy",
               "num_class_images": args.world_size, "class_dir": str(world)}
    runs = {}
    for name, prior in (("with prior preservation", True), ("without prior preservation", False)):
        config = from_dict({**common, "project_name": "pp" if prior else "nopp", "prior_preservation": prior,
                            "concepts": [concept]})
        runs[name] = TrainingRun(config, FolderHost(root / "models")).run().checkpoints[-1]
    eval_config = from_dict({**common, "prior_preservation": True, "concepts": [concept]})
    sets = {"instance": collect_instance_examples(eval_config),
            "class": collect_class_examples(eval_config, [world])}
    before, _, base_preds = measure(base, sets, None)
    print(f"\n{len(sets['instance'])} training images ({sets['instance'][0].caption!r}), {len(sets['class'])} class "
          f"images ({sets['class'][0].caption!r}), the base taught for {args.base_steps} steps; Dreambooth "
          f"{args.steps} steps at lr {args.lr:g}; loss = denoising MSE at timesteps {EVAL_TIMESTEPS} on fixed noise")
    print(f"{'':28s}{'instance loss':>22s}{'class loss':>22s}{'class drift':>14s}")
    print(f"{'base':28s}{before['instance']:22.4f}{before['class']:22.4f}{0:14.4f}")
    after = {}
    for run_name, path in runs.items():
        losses, drifts, _ = measure(path, sets, base_preds)
        after[run_name] = (losses, drifts)
        print(f"{run_name:28s}" + "".join(f"{losses[n]:13.4f} ({losses[n] - before[n]:+.4f})" for n in sets)
              + f"{drifts['class']:14.4f}")
    (with_loss, with_drift), (without_loss, without_drift) = after.values()
    change_with = with_loss["class"] - before["class"]
    change_without = without_loss["class"] - before["class"]
    print(f"instance loss: {with_loss['instance'] / before['instance']:.2f}x of the base's with prior "
          f"preservation, {without_loss['instance'] / before['instance']:.2f}x without")
    print(f"class loss: moves {change_with:+.4f} with prior preservation, {change_without:+.4f} without "
          f"({abs(change_without) / max(abs(change_with), 1e-12):.1f}x as much without)")
    print(f"class drift: {without_drift['class'] / max(with_drift['class'], 1e-12):.1f}x larger without prior "
          f"preservation")
    print(f"time: {base_seconds:.0f} s teaching the base, {time.perf_counter() - started - base_seconds:.0f} s "
          f"for the two runs and the measurements; files in {root}")


if __name__ == "__main__":
    main()
