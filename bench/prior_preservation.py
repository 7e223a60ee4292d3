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

EVAL_TIMESTEPS = (100, 300, 500, 700, 900)


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


def pretrain_base(root: Path, steps: int) -> Path:
    """Teach the random small model what "photo of toy" looks like."""
    random_base = save_tiny_checkpoint(root / "random.safetensors", family="sd1", seed=0)
    world = make_toy_world(root / "toy_world", 48, seed=1)
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


def measure(model_path: Path, instances, classes, base_class_preds: torch.Tensor | None):
    bundle = load_bundle_from_file(model_path)
    inst_pred, inst_target = predictions(bundle, instances)
    cls_pred, cls_target = predictions(bundle, classes)
    drift = per_sample_mse(cls_pred, base_class_preds).mean().item() if base_class_preds is not None else 0.0
    return {"instance": per_sample_mse(inst_pred, inst_target).mean().item(),
            "class": per_sample_mse(cls_pred, cls_target).mean().item(), "drift": drift}, cls_pred


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150, help="Dreambooth steps")
    parser.add_argument("--lr", type=float, default=5e-4, help="Dreambooth learning rate")
    parser.add_argument("--base-steps", type=int, default=400, help="steps teaching the base model the class")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    root = args.out or Path(tempfile.mkdtemp(prefix="bench_prior_"))
    base = pretrain_base(root, args.base_steps)
    images = make_demo_images(root / "images", size=64)
    held_out = make_toy_world(root / "held_out_toys", 12, seed=2)
    common = {"base_model": str(base), "resolution": 64, "max_train_steps": args.steps, "learning_rate": args.lr,
              "save_precision": "fp32", "seed": 7}
    concept = {"instance_dir": str(images), "token": "ohwx", "class_word": "toy", "num_class_images": 12,
               "class_dir": str(root / "class_images")}
    runs = {}
    for name, prior in (("with prior preservation", True), ("without prior preservation", False)):
        config = from_dict({**common, "project_name": "pp" if prior else "nopp", "prior_preservation": prior,
                            "concepts": [concept]})
        # The class images are generated by the first run and reused by the second.
        runs[name] = TrainingRun(config, FolderHost(root / "models")).run().checkpoints[-1]
    eval_config = from_dict({**common, "prior_preservation": True,
                             "concepts": [{**concept, "class_dir": str(held_out)}]})
    instances = collect_instance_examples(eval_config)
    classes = collect_class_examples(eval_config, [held_out])

    before, base_class_preds = measure(base, instances, classes, None)
    print(f"{len(instances)} training images, {concept['num_class_images']} class images, {len(classes)} held-out "
          f"toys, {args.steps} steps, lr {args.lr:g}, timesteps {EVAL_TIMESTEPS}")
    print(f"{'':28s} {'instance loss':>22s} {'class loss':>22s} {'class drift':>12s}")
    changes = {}
    for name, path in runs.items():
        after, _ = measure(path, instances, classes, base_class_preds)
        changes[name] = after
        print(f"{name:28s} {before['instance']:9.4f} -> {after['instance']:8.4f} "
              f"{before['class']:9.4f} -> {after['class']:8.4f} {after['drift']:12.5f}")
    with_pp, without_pp = changes["with prior preservation"], changes["without prior preservation"]
    print(f"instance loss falls to {with_pp['instance'] / before['instance']:.2f}x (with) and "
          f"{without_pp['instance'] / before['instance']:.2f}x (without) of the base")
    print(f"class-prompt drift from the base: {without_pp['drift'] / max(with_pp['drift'], 1e-12):.1f}x larger "
          "without prior preservation")
    print(f"|class loss change|: with {abs(with_pp['class'] - before['class']):.4f}, "
          f"without {abs(without_pp['class'] - before['class']):.4f}")


if __name__ == "__main__":
    main()
