"""A small captioned world of toys for the small built-in model (64 px), its taught base (cached), and the scores
of renders in it, the way DreamBench scores them.

The world: three classes of objects (ball, box, cone), six colours, five places (a sky over a ground: grass, sand,
snow, night, a room), every picture captioned with what it shows ("photo of blue cone on sand", or part of it:
"photo of cone", "photo of blue cone", "photo of cone on sand"). The subject is one object the world never shows:
a red ball with a yellow band ("photo of ohwx ball"), always photographed in the room.

The base: the small model's UNet taught that world from random weights. Its random text encoder is kept (taught
at the UNet's rate it collapsed every caption to nearly one embedding, and the UNet learned to ignore them); its
VAE stays the random, calibrated one, so renders are scored as latents through the VAE's encoder, not decoded. The
base is cached in ~/.cache/dreambooth_ext/quality/<hash of the world's code and the parameters> (or
$DREAMBOOTH_QUALITY_CACHE) and taught there when absent.

The scores (`Scorer`), on latents (a network taught here on new pictures of the world tells their place; the
random VAE keeps too little of the objects' shape and colour for one to tell those on new pictures):
- subject fidelity: cosine similarity of renders to the subject photos (DINO / CLIP-I analogue);
- prompt fidelity: a small network's probability that a render shows the place its prompt asked for (CLIP-T);
- class preservation: renders of the class prompt still as varied as the base model's, and not the subject.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dreambooth_ext.config import from_dict  # noqa: E402
from dreambooth_ext.data.images import prepare_image  # noqa: E402
from dreambooth_ext.hosts.files import FolderHost  # noqa: E402
from dreambooth_ext.models.bundle import load_bundle_from_file  # noqa: E402
from dreambooth_ext.models.tiny import save_tiny_checkpoint  # noqa: E402
from dreambooth_ext.train.run import TrainingRun  # noqa: E402
from dreambooth_ext.train.sampling import _guided_conditioning, _spacing  # noqa: E402

SIZE = 64
SHAPES = ("ball", "box", "cone")
COLOURS = {"red": (210, 40, 40), "green": (40, 160, 60), "blue": (40, 70, 210), "yellow": (235, 205, 40),
           "purple": (140, 50, 170), "orange": (240, 130, 30)}
PLACES = {"on grass": ((120, 180, 240), (60, 140, 50)), "on sand": ((130, 190, 250), (225, 195, 135)),
          "in snow": ((200, 205, 215), (250, 250, 255)), "at night": ((10, 15, 50), (40, 40, 60)),
          "in a room": ((190, 180, 165), (120, 80, 50))}
ROOM = "in a room"
SUBJECT = {"shape": "ball", "colour": "red", "place": ROOM, "band": True}
TOKEN = "ohwx"
CLASS_WORD = "ball"
BASE = {"pictures_per_kind": 2, "steps": 10000, "batch": 8, "learning_rate": 1e-3, "seed": 3, "text_encoder": False}
CACHE_ENV = "DREAMBOOTH_QUALITY_CACHE"


def draw(shape: str, colour: str, place: str, rng: torch.Generator, band: bool = False) -> Image.Image:
    """One picture: the place's sky and ground (a jittered horizon), the object at a jittered place and size."""
    def rand(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi + 1, (1,), generator=rng))

    def jitter(rgb: tuple) -> tuple:
        return tuple(max(0, min(255, c + rand(-12, 12))) for c in rgb)

    sky, ground = PLACES[place]
    image = Image.new("RGB", (SIZE, SIZE), jitter(sky))
    canvas = ImageDraw.Draw(image)
    canvas.rectangle((0, rand(24, 36), SIZE, SIZE), fill=jitter(ground))
    half = rand(11, 18)
    cx, cy = rand(20, 44), rand(24, 42)
    box = (cx - half, cy - half, cx + half, cy + half)
    fill = jitter(COLOURS[colour])
    if shape == "ball":
        canvas.ellipse(box, fill=fill)
    elif shape == "box":
        canvas.rectangle(box, fill=fill)
    else:
        canvas.polygon([(box[0], box[3]), (cx, box[1]), (box[2], box[3])], fill=fill)
    if band:
        canvas.rectangle((cx - half + 3, cy - 3, cx + half - 3, cy + 3), fill=(250, 220, 40))
    return image


def _caption(shape: str, colour: str, place: str, form: int) -> str:
    """Form 0: all it shows; 1: the shape; 2: colour and shape; 3: shape and place."""
    return ["photo of {c} {s} {p}", "photo of {s}", "photo of {c} {s}", "photo of {s} {p}"][form].format(
        c=colour, s=shape, p=place)


def make_world(folder: Path, per_kind: int, seed: int) -> Path:
    """Every (shape, colour, place) `per_kind` times, each with a caption sidecar (all it shows, or part of it)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = torch.Generator().manual_seed(seed)
    index = 0
    for shape in SHAPES:
        for colour in COLOURS:
            for place in PLACES:
                for copy in range(per_kind):
                    form = 0 if copy == 0 else int(torch.randint(1, 4, (1,), generator=rng))
                    draw(shape, colour, place, rng).save(folder / f"w{index:04d}.png")
                    (folder / f"w{index:04d}.txt").write_text(_caption(shape, colour, place, form), encoding="utf-8")
                    index += 1
    return folder


def make_subject(folder: Path, count: int, seed: int = 11) -> Path:
    """The subject's photos: the red ball with a yellow band, in the room (captioned by the run's template)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = torch.Generator().manual_seed(seed)
    for i in range(count):
        draw(SUBJECT["shape"], SUBJECT["colour"], SUBJECT["place"], rng, band=True).save(folder / f"s{i:02d}.png")
    return folder


def make_class_pictures(folder: Path, count: int, seed: int = 12) -> Path:
    """Regularization pictures of the class (balls of every colour but the subject's, in every place)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = torch.Generator().manual_seed(seed)
    colours = [c for c in COLOURS if c != SUBJECT["colour"]]
    places = list(PLACES)
    for i in range(count):
        draw(CLASS_WORD, colours[i % len(colours)], places[i % len(places)], rng).save(folder / f"c{i:02d}.png")
    return folder


# -- the base, cached --------------------------------------------------------------------------------------------

def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "dreambooth_ext" / "quality")


def world_key(params: dict) -> str:
    """What the base depends on: the world's pictures and captions, and the base's parameters."""
    digest = hashlib.sha256("".join(inspect.getsource(f) for f in (draw, _caption, make_world)).encode())
    digest.update(json.dumps([SHAPES, COLOURS, PLACES, params], sort_keys=True).encode())
    return digest.hexdigest()[:16]


def taught_base(log=print, params: dict | None = None) -> Path:
    """The base model taught the world: from the cache, or taught now (about a minute on 2 cores) and cached."""
    params = params or BASE
    folder = cache_root() / world_key(params)
    base = folder / "base.safetensors"
    if base.exists():
        return base
    log(f"Teaching the small model the world ({params['steps']} steps); cached in {folder}")
    work = folder.with_name(folder.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    world = make_world(work / "world", params["pictures_per_kind"], seed=1)
    random_base = save_tiny_checkpoint(work / "random.safetensors", family="sd1", seed=0)
    config = from_dict({"project_name": "world", "base_model": str(random_base), "resolution": SIZE,
                        "max_train_steps": params["steps"], "learning_rate": params["learning_rate"],
                        "lr_scheduler": "cosine", "lr_warmup_steps": params["steps"] // 20,
                        "train_batch_size": params["batch"], "train_text_encoder": params["text_encoder"],
                        "text_encoder_lr": params["learning_rate"], "prior_preservation": False,
                        "save_precision": "fp32", "seed": params["seed"], "monitor_every_n_steps": -1,
                        "concepts": [{"instance_dir": str(world), "token": "", "class_word": "toy",
                                      "instance_prompt": "photo of {class}"}]})
    taught = TrainingRun(config, FolderHost(work / "models"), on_progress=_every_tenth(log)).run().checkpoints[-1]
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(taught, folder / ".base.partial")
    os.replace(folder / ".base.partial", base)
    shutil.rmtree(work, ignore_errors=True)
    return base


def _every_tenth(log):
    def report(progress) -> None:
        if progress.phase == "training" and progress.total_steps and progress.step % max(
                1, progress.total_steps // 10) == 0:
            log(f"  step {progress.step}/{progress.total_steps}, loss {progress.loss or 0:.4f}, "
                f"{progress.it_per_s or 0:.1f} it/s")
    return report


@torch.no_grad()
def caption_response(bundle) -> float:
    """How much the UNet's prediction changes between captions of different places (same noise, same picture),
    relative to its size: near 0, the model ignores its captions."""
    noise = torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(0))
    prompts = [f"photo of {CLASS_WORD} {place}" for place in PLACES]
    conditioning = bundle.encode(prompts)
    out = bundle.unet(noise.expand(len(prompts), -1, -1, -1), torch.tensor([500] * len(prompts)),
                      **conditioning.unet_kwargs()).sample.flatten(1)
    return (torch.pdist(out).mean() / out.norm(dim=1).mean()).item()


# -- renders -----------------------------------------------------------------------------------------------------

@torch.no_grad()
def render_latents(bundle, prompts: list[str], seeds: list[int], steps: int = 20,
                   guidance: float = 7.5) -> torch.Tensor:
    """DDIM renders with classifier-free guidance, as the engine samples (its conditioning and timestep spacing),
    each prompt from the noise of its seed; returned as latents (the small model's VAE is not taught to decode)."""
    from diffusers import DDIMScheduler

    unet = bundle.unet.eval()
    scheduler = DDIMScheduler.from_config(bundle.noise_scheduler.config, clip_sample=False, set_alpha_to_one=False,
                                          steps_offset=1, **_spacing(bundle.noise_scheduler))
    scheduler.set_timesteps(steps)
    conditioning = _guided_conditioning(bundle, prompts, "", SIZE, SIZE)
    latents = torch.cat([torch.randn(1, unet.config.in_channels, SIZE // 8, SIZE // 8,
                                     generator=torch.Generator().manual_seed(seed)) for seed in seeds])
    latents = latents * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(torch.cat([latents, latents]), t)
        uncond, cond = unet(model_input, t, **conditioning.unet_kwargs()).sample.float().chunk(2)
        latents = scheduler.step(uncond + guidance * (cond - uncond), t, latents).prev_sample
    return latents


@torch.no_grad()
def encode(vae, images: list[Image.Image]) -> torch.Tensor:
    """Pictures as the scaled latents the model is trained on (the posterior mean)."""
    pixels = torch.stack([_pixels(image) for image in images])
    return vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor


def _pixels(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(__import__("numpy").asarray(image, dtype="float32")).permute(2, 0, 1) / 127.5 - 1.0


def encode_files(vae, paths: list[Path]) -> torch.Tensor:
    pixels = torch.stack([prepare_image(p, (SIZE, SIZE), "center", False) for p in paths])
    with torch.no_grad():
        return vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor


# -- the scorer --------------------------------------------------------------------------------------------------

class PlaceJudge(torch.nn.Module):
    """Latents (4 x 8 x 8) to the place they show."""

    def __init__(self, width: int = 64):
        super().__init__()
        self.layers = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4 * 8 * 8, width), torch.nn.GELU(),
                                          torch.nn.Linear(width, len(PLACES)))

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.layers(latents)


def _places(vae, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` new pictures of the world (any object, with or without a band, in any place), as latents, and the
    index of their place."""
    rng = torch.Generator().manual_seed(seed)
    images, places = [], []
    for _ in range(count):
        place = int(torch.randint(len(PLACES), (1,), generator=rng))
        shape = SHAPES[int(torch.randint(len(SHAPES), (1,), generator=rng))]
        colour = list(COLOURS)[int(torch.randint(len(COLOURS), (1,), generator=rng))]
        band = bool(torch.randint(2, (1,), generator=rng))
        images.append(draw(shape, colour, list(PLACES)[place], rng, band=band))
        places.append(place)
    return torch.cat([encode(vae, images[i:i + 64]) for i in range(0, count, 64)]), torch.tensor(places)


@dataclass
class Scores:
    subject: float  # subject fidelity
    prompt: float  # prompt fidelity
    class_kept: float  # class preservation: the class renders' variety relative to the base's, capped at 1
    class_subject: float  # how much the class renders look like the subject (subject fidelity of the class prompt)

    def as_dict(self) -> dict:
        return {"subject": round(self.subject, 4), "prompt": round(self.prompt, 4),
                "class": round(self.class_kept, 4), "class_subject": round(self.class_subject, 4)}


class Scorer:
    """Scores a model's renders in the world (fixed prompts and seeds), as latents through the base VAE's encoder:

    - subject fidelity: cosine similarity of each render to the subject photos' mean, both centred on the world's
      mean latent (the VAE encoder as the embedding: the DINO / CLIP-I analogue);
    - prompt fidelity: the probability a network taught here on new pictures of the world gives the asked place
      (CLIP-T analogue), over renders of the instance prompt with each place but the photos' room;
    - class preservation: the variety (mean pairwise distance) of renders of the class prompt relative to the base
      model's, capped at 1, and their subject fidelity (the class turning into the subject).
    `accuracy`: the place network's on pictures it was not taught."""

    CONTEXTS = [p for p in PLACES if p != ROOM]
    SEEDS = (101, 102)
    CLASS_SEEDS = (201, 202, 203, 204, 205, 206)

    def __init__(self, vae, subject_latents: torch.Tensor, samples: int = 600, steps: int = 400, seed: int = 5):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.judge = PlaceJudge()
        latents, places = _places(vae, samples, seed)
        self.centre = latents.mean(0)
        self._teach(latents, places, steps, seed)
        test, test_places = _places(vae, 200, seed + 1)
        with torch.no_grad():
            self.accuracy = (self.judge(test).argmax(1) == test_places).float().mean().item()
        self.subject = self._embed(subject_latents).mean(0)
        self.base_variety: float | None = None

    def _teach(self, latents: torch.Tensor, places: torch.Tensor, steps: int, seed: int) -> None:
        optimizer = torch.optim.AdamW(self.judge.parameters(), lr=3e-3, weight_decay=1e-2)
        rng = torch.Generator().manual_seed(seed)
        self.judge.train()
        for _ in range(steps):
            batch = torch.randint(len(latents), (64,), generator=rng)
            noisy = latents[batch] + 0.1 * torch.randn(latents[batch].shape, generator=rng)
            loss = torch.nn.functional.cross_entropy(self.judge(noisy), places[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        self.judge.eval()

    def _embed(self, latents: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize((latents - self.centre).flatten(1), dim=1)

    @torch.no_grad()
    def score(self, bundle) -> Scores:
        instance = f"photo of {TOKEN} {CLASS_WORD}"
        prompts = [instance] + [f"{instance} {c}" for c in self.CONTEXTS]
        renders = render_latents(bundle, [p for p in prompts for _ in self.SEEDS],
                                 [s for _ in prompts for s in self.SEEDS])
        subject = (self._embed(renders) @ self.subject).mean().item()
        asked = torch.tensor([list(PLACES).index(c) for c in self.CONTEXTS for _ in self.SEEDS])
        place = self.judge(renders[len(self.SEEDS):]).softmax(1)
        prompt = place.gather(1, asked[:, None]).mean().item()
        classes = render_latents(bundle, [f"photo of {CLASS_WORD}"] * len(self.CLASS_SEEDS), list(self.CLASS_SEEDS))
        embedded = self._embed(classes)
        variety = torch.pdist(embedded).mean().item()
        if self.base_variety is None:
            self.base_variety = variety
        return Scores(subject, prompt, min(1.0, variety / max(self.base_variety, 1e-12)),
                      (embedded @ self.subject).mean().item())


def load(path: Path):
    return load_bundle_from_file(path)
