"""What prior preservation does, measured side by side on the small built-in model (CPU, a few minutes).

A random model knows no class to preserve, so the bench first teaches the small model a class: a world of
varied toys (shapes and colours) captioned "photo of toy". That model is the base. Its own renders of
"photo of toy" are the class images, as in real Dreambooth. Then two runs from that base, same images,
same steps, same seed: one with prior preservation, one without. For each, on fixed noise and timesteps:
  - instance loss: denoising error on the training images with the instance prompt (should fall clearly);
  - class loss: denoising error on held-out toys (never trained on) with the class prompt;
  - class drift: mean squared difference between the trained and the base model's predictions on those
    held-out toys with the class prompt (what prior preservation is meant to keep small).

    python bench/prior_preservation.py [--steps 150] [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
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
from dreambooth_ext.train.sampling import encode_prompts  # noqa: E402

EVAL_TIMESTEPS = (50, 150, 300, 500)


def make_toy_world(folder: Path, count: int, seed: int, size: int = 64) -> Path:
    """Varied toys: ellipses, boxes and triangles in many colours on many backgrounds (never the subject's
    red ball with a yellow band)."""
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


def pretrain_base(root: Path, steps: int, world_size: int) -> Path:
    """Teach the random small model what "photo of toy" looks like."""
    random_base = save_tiny_checkpoint(root / "random.safetensors", family="sd1", seed=0)
    world = make_toy_world(root / "toy_world", world_size, seed=1)
    config = from_dict({"project_name": "toy_base", "base_model": str(random_base), "resolution": 64,
                        "max_train_steps": steps, "learning_rate": 5e-4, "train_batch_size": 4,
                        "prior_preservation": False, "save_precision": "fp32", "seed": 3,
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
        context = encode_prompts(bundle.tokenizer, bundle.text_encoder, [example.caption])
        for t in EVAL_TIMESTEPS:
            timestep = torch.tensor([t])
            noise = torch.randn(latents.shape, generator=generator)
            noisy = bundle.noise_scheduler.add_noise(latents, noise, timestep)
            preds.append(bundle.unet(noisy, timestep, encoder_hidden_states=context).sample)
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
    parser.add_argument("--steps", type=int, default=150, help="Dreambooth steps")
    parser.add_argument("--lr", type=float, default=5e-4, help="Dreambooth learning rate")
    parser.add_argument("--class-images", choices=("generated", "world"), default="generated",
                        help="class images rendered by the base (Dreambooth's way) or 12 of the toys the base "
                             "was taught on (a fixed regularization folder, JoePenna's way)")
    parser.add_argument("--world-size", type=int, default=48, help="toys the base model is taught on")
    parser.add_argument("--base-steps", type=int, default=400, help="steps teaching the base model the class")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    root = args.out or Path(tempfile.mkdtemp(prefix="bench_prior_"))
    base = pretrain_base(root, args.base_steps, args.world_size)
    images = make_demo_images(root / "images", size=64)
    held_out = make_toy_world(root / "held_out_toys", 12, seed=2)
    common = {"base_model": str(base), "resolution": 64, "max_train_steps": args.steps, "learning_rate": args.lr,
              "save_precision": "fp32", "seed": 7}
    class_dir = root / "class_images"
    if args.class_images == "world":
        class_dir.mkdir(parents=True, exist_ok=True)
        for source in sorted((root / "toy_world").glob("*.png"))[:12]:
            (class_dir / source.name).write_bytes(source.read_bytes())
    concept = {"instance_dir": str(images), "token": "ohwx", "class_word": "toy", "num_class_images": 12,
               "class_dir": str(class_dir)}
    runs = {}
    for name, prior in (("with prior preservation", True), ("without prior preservation", False)):
        config = from_dict({**common, "project_name": "pp" if prior else "nopp", "prior_preservation": prior,
                            "concepts": [concept]})
        # The class images are generated by the first run and reused by the second.
        runs[name] = TrainingRun(config, FolderHost(root / "models")).run().checkpoints[-1]
    eval_config = from_dict({**common, "prior_preservation": True,
                             "concepts": [{**concept, "class_dir": str(held_out)}]})
    sets = {"instance": collect_instance_examples(eval_config),
            "class images": collect_class_examples(eval_config, [Path(concept["class_dir"])]),
            "held-out toys": collect_class_examples(eval_config, [held_out])}
    before, _, base_preds = measure(base, sets, None)
    source = "rendered by the base" if args.class_images == "generated" else "from the base's training set"
    print(f"{len(sets['instance'])} training images, {len(sets['class images'])} class images {source}, "
          f"{len(sets['held-out toys'])} held-out toys; {args.steps} steps at lr {args.lr:g}; "
          f"loss = denoising MSE at timesteps {EVAL_TIMESTEPS} on fixed noise")
    print(f"{'':28s}" + "".join(f"{name + ' loss':>24s}" for name in sets) + "".join(
        f"{name + ' drift':>22s}" for name in list(sets)[1:]))
    after = {}
    for run_name, path in runs.items():
        losses, drifts, _ = measure(path, sets, base_preds)
        after[run_name] = (losses, drifts)
        print(f"{run_name:28s}" + "".join(f"{before[n]:11.4f} -> {losses[n]:8.4f}" for n in sets)
              + "".join(f"{drifts[n]:22.5f}" for n in list(sets)[1:]))
    (with_loss, with_drift), (without_loss, without_drift) = after.values()
    print(f"instance loss: {with_loss['instance'] / before['instance']:.2f}x of the base with prior preservation, "
          f"{without_loss['instance'] / before['instance']:.2f}x without")
    for name in list(sets)[1:]:
        change_with = abs(with_loss[name] - before[name])
        change_without = abs(without_loss[name] - before[name])
        print(f"{name}: loss change {change_with:.4f} with vs {change_without:.4f} without "
              f"({change_without / max(change_with, 1e-12):.1f}x); prediction drift "
              f"{without_drift[name] / max(with_drift[name], 1e-12):.1f}x larger without")


if __name__ == "__main__":
    main()
