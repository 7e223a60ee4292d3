"""A small captioned world of toys for the small built-in model (64 px), its taught base, and the judge that scores
renders in it the way DreamBench scores them.

The world: three classes of objects (ball, box, cone), six colours, five places (a sky over a ground: grass, sand,
snow, night, a room), every picture captioned with what it shows ("photo of blue cone on sand", or part of it:
"photo of cone", "photo of blue cone", "photo of cone on sand"). The subject is one object the taught world never
shows: a red ball with a yellow band ("photo of ohwx ball"), always photographed in the room.

The base: the small random model with its VAE taught to encode and decode pictures of the world (with and without
the band), then its UNet taught the captioned world (10000 steps). Its random text encoder is kept (taught at the
UNet's rate it collapsed every caption to nearly one embedding, and the UNet learned to ignore them). The judge: a
small network taught on the VAE's round trips of new pictures to tell their shape, colour, band and place.

Teaching them takes about 25 minutes on 2 idle cores, so they come packed: bench/data/world.safetensors (FIXTURE:
the UNet and VAE in fp16, the judge, the world key of the code and parameters that made them), written by
`python bench/world.py --fresh`. `taught_base` unpacks it (a second) when its key is this code's, else teaches them;
either way they are cached in ~/.cache/dreambooth_ext/quality/<world key> (or $DREAMBOOTH_QUALITY_CACHE).

The scores (`Scorer`), on renders decoded by the base's VAE:
- subject fidelity: the judge's probability that a render of the instance prompt shows the subject's marks;
- prompt fidelity: its probability that a render shows the place its prompt asked for (CLIP-T analogue);
- class preservation: renders of the class prompt still show a ball, and not the subject;
- copying: renders' pixel distance to the nearest subject photo, relative to the photos' own.
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
from dreambooth_ext.data.images import image_to_tensor, tensor_to_image  # noqa: E402
from dreambooth_ext.hosts.files import FolderHost  # noqa: E402
from dreambooth_ext.models.bundle import load_bundle_from_file  # noqa: E402
from dreambooth_ext.models.tiny import set_latent_scale, tiny_checkpoint  # noqa: E402
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
KINDS = {"shape": len(SHAPES), "colour": len(COLOURS), "band": 2, "place": len(PLACES)}
TOKEN = "ohwx"
CLASS_WORD = "ball"
BASE = {"pictures_per_kind": 2, "steps": 10000, "batch": 8, "learning_rate": 1e-3, "seed": 3, "text_encoder": False,
        "vae_steps": 3000, "vae_batch": 16, "vae_crop": 32, "vae_learning_rate": 2e-3}
CACHE_ENV = "DREAMBOOTH_QUALITY_CACHE"
FIXTURE = Path(__file__).resolve().parent / "data" / "world.safetensors"  # the committed pack (see `pack`)
PACK_FILE = "world.safetensors"
JUDGE_FILE = "judge.safetensors"
PACKED = ("model.", "first_stage_model.")  # what the world changes in the small random model: its UNet and VAE


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


def make_subject(folder: Path, count: int, seed: int = 11, *, captioned: bool = False,
                 places: tuple[str, ...] = (ROOM,)) -> Path:
    """The subject's photos: the red ball with a yellow band, in the room (or in each of `places` in turn).
    Captioned by the run's template, or with `captioned` each by a sidecar naming its place too ("photo of ohwx ball
    in a room")."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = torch.Generator().manual_seed(seed)
    for i in range(count):
        place = places[i % len(places)]
        draw(SUBJECT["shape"], SUBJECT["colour"], place, rng, band=True).save(folder / f"s{i:02d}.png")
        if captioned:
            caption = _caption(f"{TOKEN} {CLASS_WORD}", SUBJECT["colour"], place, 3)  # shape and place
            (folder / f"s{i:02d}.txt").write_text(caption, encoding="utf-8")
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
    sources = (draw, _caption, make_world, random_pictures, with_taught_vae, teach_vae, set_latent_scale,
               image_to_tensor, teach_base, encode, decode, round_trip, Judge, teach_judge, vary)
    digest = hashlib.sha256("".join(inspect.getsource(f) for f in sources).encode())
    digest.update(json.dumps([SHAPES, COLOURS, PLACES, params], sort_keys=True).encode())
    return digest.hexdigest()[:16]


def taught_base(log=print, params: dict | None = None, fresh: bool = False) -> Path:
    """The base model taught the world, with its judge beside it (JUDGE_FILE): from the cache; else from the
    committed pack (FIXTURE) when it was made by this code with these parameters; else (or `fresh`) taught now
    (about 25 minutes on 2 idle cores) and cached with its pack (PACK_FILE)."""
    params = params or BASE
    key = world_key(params)
    folder = cache_root() / key
    base = folder / "base.safetensors"
    if not fresh and base.exists() and (folder / JUDGE_FILE).exists():
        return base
    if not fresh and pack_key(FIXTURE) == key:
        return unpack(FIXTURE, folder)
    log(f"Teaching the small model the world (its VAE {params['vae_steps']} steps, its UNet {params['steps']} "
        f"steps, then the judge); cached in {folder}")
    work = folder.with_name(folder.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    return finish(teach_base(work, params, log), key, work, folder, params, log)


def finish(taught: Path, key: str, work: Path, folder: Path, params: dict, log=print) -> Path:
    """The judge taught on a taught base's VAE; both packed, and cached unpacked in `folder`."""
    vae = load_bundle_from_file(taught).vae
    judge, accuracy = teach_judge(vae, params["seed"])
    log(f"  the judge's accuracy on new pictures: {accuracy}")
    pack(taught, judge, accuracy, key, work / PACK_FILE)
    unpack(work / PACK_FILE, folder)
    os.replace(work / PACK_FILE, folder / PACK_FILE)
    shutil.rmtree(work, ignore_errors=True)
    return folder / "base.safetensors"


def teach_base(work: Path, params: dict, log=print) -> Path:
    """The small random model with its VAE taught the world's pictures, then its UNet taught the captioned world."""
    world = make_world(work / "world", params["pictures_per_kind"], seed=1)
    random_base = with_taught_vae(work / "random.safetensors", params, log)
    config = from_dict({"project_name": "world", "base_model": str(random_base), "resolution": SIZE,
                        "max_train_steps": params["steps"], "learning_rate": params["learning_rate"],
                        "lr_scheduler": "cosine", "lr_warmup_steps": params["steps"] // 20,
                        "train_batch_size": params["batch"], "train_text_encoder": params["text_encoder"],
                        "text_encoder_lr": params["learning_rate"], "prior_preservation": False,
                        "save_precision": "fp32", "seed": params["seed"], "monitor_every_n_steps": -1,
                        "concepts": [{"instance_dir": str(world), "token": "", "class_word": "toy",
                                      "instance_prompt": "photo of {class}"}]})
    return TrainingRun(config, FolderHost(work / "models"), on_progress=_every_tenth(log)).run().checkpoints[-1]


# -- the pack: the taught UNet and VAE (fp16) and the judge, in one small file -------------------------------------

def pack(base: Path, judge: Judge, accuracy: dict, key: str, path: Path) -> Path:
    """What the world adds to the small random model (its UNet and VAE, in fp16: 3 MB) and the judge."""
    import safetensors.torch

    from dreambooth_ext.models.checkpoint import read_checkpoint

    tensors = {k: v.half().contiguous() for k, v in read_checkpoint(base).items() if k.startswith(PACKED)}
    tensors.update({f"judge.{k}": v.contiguous() for k, v in judge.state_dict().items()})
    safetensors.torch.save_file(tensors, str(path), metadata={"world_key": key, "accuracy": json.dumps(accuracy)})
    return path


def pack_key(path: Path) -> str | None:
    """The world key a pack was made for (None: no pack)."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as file:
        return (file.metadata() or {}).get("world_key")


def unpack(path: Path, folder: Path) -> Path:
    """The base checkpoint (the small random model with the pack's UNet and VAE) and the judge, into `folder`."""
    import safetensors.torch
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as file:
        accuracy = (file.metadata() or {})["accuracy"]
        tensors = {k: file.get_tensor(k) for k in file.keys()}
    base = tiny_checkpoint("sd1", seed=0)
    base.update({k: v.float() for k, v in tensors.items() if k.startswith(PACKED)})
    judge = {k[len("judge."):]: v for k, v in tensors.items() if k.startswith("judge.")}
    folder.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(judge, str(folder / ".judge.partial"), metadata={"accuracy": accuracy})
    safetensors.torch.save_file(base, str(folder / ".base.partial"),
                                metadata={"modelspec.resolution": f"{SIZE}x{SIZE}"})
    os.replace(folder / ".judge.partial", folder / JUDGE_FILE)
    os.replace(folder / ".base.partial", folder / "base.safetensors")
    return folder / "base.safetensors"


def load_judge(base: Path) -> tuple[Judge, dict]:
    """The judge cached beside a taught base, and its accuracy on new pictures."""
    import safetensors.torch
    from safetensors import safe_open

    path = base.with_name(JUDGE_FILE)
    with safe_open(str(path), framework="pt") as file:
        accuracy = json.loads(file.metadata()["accuracy"])
    judge = Judge()
    judge.load_state_dict(safetensors.torch.load_file(str(path)))
    return judge.eval(), accuracy


def random_pictures(count: int, seed: int) -> tuple[list[Image.Image], torch.Tensor]:
    """`count` new pictures of the world (any object, with or without the band, in any place) and what each shows:
    rows of (shape, colour, band, place) indices."""
    rng = torch.Generator().manual_seed(seed)
    images, truth = [], []
    for _ in range(count):
        shape, colour, band, place = (int(torch.randint(n, (1,), generator=rng)) for n in KINDS.values())
        images.append(draw(SHAPES[shape], list(COLOURS)[colour], list(PLACES)[place], rng, band=bool(band)))
        truth.append((shape, colour, band, place))
    return images, torch.tensor(truth)


def with_taught_vae(path: Path, params: dict, log=print) -> Path:
    """The small random model, its VAE taught to encode and decode the world's pictures (with and without the band),
    written to `path`."""
    import safetensors.torch

    from dreambooth_ext.models.convert import vae_to_ldm
    state_dict = tiny_checkpoint("sd1", seed=0)
    safetensors.torch.save_file(state_dict, str(path))
    vae = load_bundle_from_file(path).vae.float()
    teach_vae(vae, params, log)
    state_dict.update({k: v.contiguous() for k, v in vae_to_ldm(vae.state_dict(), dict(vae.config)).items()})
    safetensors.torch.save_file(state_dict, str(path), metadata={"modelspec.resolution": f"{SIZE}x{SIZE}"})
    return path


def teach_vae(vae, params: dict, log=print) -> None:
    """An autoencoder on the posterior mean (pixel MSE and a small latent penalty), then its latent scale set to a
    real VAE's (scaled latents of unit spread) with a small constant posterior spread."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(params["seed"])
        images, _ = random_pictures(params["vae_steps"] * params["vae_batch"] // 4, params["seed"] + 100)
        pixels = torch.stack([image_to_tensor(image) for image in images])
        optimizer = torch.optim.AdamW(vae.parameters(), lr=params["vae_learning_rate"], weight_decay=0.0)
        rng = torch.Generator().manual_seed(params["seed"])
        vae.train()
        for step in range(params["vae_steps"]):
            batch = pixels[torch.randint(len(pixels), (params["vae_batch"],), generator=rng)]
            if params.get("vae_crop"):  # a random square of the pictures: the same convolutions, cheaper
                top, left = (int(v) for v in torch.randint(SIZE - params["vae_crop"] + 1, (2,), generator=rng))
                batch = batch[:, :, top:top + params["vae_crop"], left:left + params["vae_crop"]]
            mean = vae.encode(batch).latent_dist.mean
            loss = torch.nn.functional.mse_loss(vae.decode(mean).sample, batch) + 1e-4 * mean.pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if (step + 1) % max(1, params["vae_steps"] // 5) == 0:
                log(f"  VAE step {step + 1}/{params['vae_steps']}, reconstruction loss {loss.item():.4f}")
        vae.eval()
        set_latent_scale(vae, pixels[:256])


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
    pixels = torch.stack([image_to_tensor(image) for image in images])
    return vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor


# -- the scorer --------------------------------------------------------------------------------------------------

class Judge(torch.nn.Module):
    """Pictures (3 x 64 x 64) to what they show: the shape, colour, band and place, one head each."""

    def __init__(self, width: int = 128):
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.AvgPool2d(2), torch.nn.Conv2d(3, 32, 3, 1, 1), torch.nn.GELU(), torch.nn.Conv2d(32, 64, 3, 2, 1),
            torch.nn.GELU(), torch.nn.Conv2d(64, 64, 3, 2, 1), torch.nn.GELU(), torch.nn.Conv2d(64, 64, 3, 2, 1),
            torch.nn.GELU(), torch.nn.Flatten(), torch.nn.Linear(64 * 4 * 4, width), torch.nn.GELU())
        self.heads = torch.nn.ModuleDict({kind: torch.nn.Linear(width, count) for kind, count in KINDS.items()})

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.body(pixels)
        return {kind: head(features) for kind, head in self.heads.items()}


@torch.no_grad()
def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents to pixels in [-1, 1]."""
    return torch.cat([vae.decode(latents[i:i + 32] / vae.config.scaling_factor).sample.clamp(-1, 1)
                      for i in range(0, len(latents), 32)])


def round_trip(vae, images: list[Image.Image]) -> torch.Tensor:
    """Pictures as the VAE gives them back (encoded and decoded): what the judge is taught on."""
    return torch.cat([decode(vae, encode(vae, images[i:i + 64])) for i in range(0, len(images), 64)])


def vary(pixels: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    """Pictures varied at random as renders differ from the pictures: softened, mirrored, their contrast and colour
    shifted, a little noise (a judge taught on clean round trips alone missed the band on renders that show it)."""
    count = len(pixels)

    def some() -> torch.Tensor:
        return torch.rand(count, 1, 1, 1, generator=rng) < 0.5

    pixels = torch.where(some(), torch.nn.functional.avg_pool2d(pixels, 3, 1, 1), pixels)
    pixels = torch.where(some(), pixels.flip(3), pixels)
    mean = pixels.mean((1, 2, 3), keepdim=True)
    gain = 1 + 0.3 * (torch.rand(count, 1, 1, 1, generator=rng) - 0.5)
    pixels = (pixels - mean) * gain + mean + 0.2 * (torch.rand(count, 3, 1, 1, generator=rng) - 0.5)
    noise = 0.08 * torch.rand(count, 1, 1, 1, generator=rng) * torch.randn(pixels.shape, generator=rng)
    return (pixels + noise).clamp(-1, 1)


def teach_judge(vae, seed: int, samples: int = 2400, steps: int = 1500) -> tuple[Judge, dict]:
    """The judge taught on the VAE's round trips of new pictures of the world (varied as renders vary: see `vary`),
    and its accuracy per kind on round trips of pictures it was not taught."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        judge = Judge()
    images, truth = random_pictures(samples, seed + 200)
    pixels = round_trip(vae, images)
    optimizer = torch.optim.AdamW(judge.parameters(), lr=2e-3, weight_decay=1e-2)
    rng = torch.Generator().manual_seed(seed)
    judge.train()
    for _ in range(steps):
        batch = torch.randint(len(pixels), (64,), generator=rng)
        answers = judge(vary(pixels[batch], rng))
        loss = sum(torch.nn.functional.cross_entropy(answers[kind], truth[batch, i]) for i, kind in enumerate(KINDS))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    judge.eval()
    test, test_truth = random_pictures(400, seed + 201)
    with torch.no_grad():
        answers = judge(round_trip(vae, test))
    return judge, {kind: round((answers[kind].argmax(1) == test_truth[:, i]).float().mean().item(), 3)
                   for i, kind in enumerate(KINDS)}


@dataclass
class Scores:
    subject: float  # subject fidelity
    prompt: float  # prompt fidelity
    class_kept: float  # class preservation: class renders that show a ball, and not the subject
    class_subject: float  # class renders that show the subject
    copying: float  # instance renders' distance to the nearest subject photo, relative to the photos' own

    def as_dict(self) -> dict:
        return {"subject": round(self.subject, 4), "prompt": round(self.prompt, 4),
                "class": round(self.class_kept, 4), "class_subject": round(self.class_subject, 4),
                "copying": round(self.copying, 4)}


class Scorer:
    """Scores a model's renders in the world (fixed prompts and seeds, decoded by the base's taught VAE) with a judge
    network taught here on the VAE's round trips of new pictures of the world:

    - subject fidelity: the judge's probability that a render of the instance prompt (alone and with each place but
      the photos' own) shows the subject's marks, red with the band (DINO / CLIP-I analogue: in this world they
      are the subject's identity; the taught world shows no banded object);
    - prompt fidelity: its probability that a render with a place shows the asked place (CLIP-T analogue);
    - class preservation: its probability that renders of the class prompt show a ball that is not the subject, and
      how often they show the subject;
    - copying: the instance renders' pixel distance to the nearest subject photo over the photos' median distance to
      their own nearest one (0: copies).
    `accuracy`: the judge's on round trips of pictures it was not taught, per kind."""

    # 6 renders per prompt and 12 of the class: with half as many, the scores of neighbouring steps swung by 0.2-0.4
    SEEDS = 6

    def __init__(self, vae, judge: Judge, accuracy: dict, subject_photos: list[Image.Image], *,
                 photo_places: tuple[str, ...] = (ROOM,), seeds: int = SEEDS):
        """`photo_places`: where the subject's photos were taken (the contexts asked are the other places);
        `seeds`: renders per prompt (twice as many of the class)."""
        self.vae, self.judge, self.accuracy = vae, judge, accuracy
        self.contexts = [p for p in PLACES if p not in photo_places]
        self.seeds, self.class_seeds = tuple(range(101, 101 + seeds)), tuple(range(201, 201 + 2 * seeds))
        self.photos = round_trip(vae, subject_photos).flatten(1)
        nearest = torch.cdist(self.photos, self.photos).fill_diagonal_(float("inf")).min(1).values
        self.photo_spacing = nearest.median().item()

    def is_subject(self, answers: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per picture: the probability it shows the subject's marks, its colour and its band (the judge tells
        those better than shapes; the renders of its prompt are of its class anyway)."""
        probability = {kind: answers[kind].softmax(1) for kind in answers}
        return probability["colour"][:, list(COLOURS).index(SUBJECT["colour"])] * probability["band"][:, 1]

    @torch.no_grad()
    def renders(self, bundle) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoded renders: the instance prompt alone and with each context (`seeds` each), then the class prompt."""
        instance = f"photo of {TOKEN} {CLASS_WORD}"
        prompts = [instance] + [f"{instance} {c}" for c in self.contexts]
        latents = render_latents(bundle, [p for p in prompts for _ in self.seeds],
                                 [s for _ in prompts for s in self.seeds])
        classes = render_latents(bundle, [f"photo of {CLASS_WORD}"] * len(self.class_seeds), list(self.class_seeds))
        return decode(self.vae, latents), decode(self.vae, classes)

    @torch.no_grad()
    def score(self, bundle) -> tuple[Scores, torch.Tensor]:
        """The scores, and the decoded renders they were taken on (instance, then class)."""
        instance, classes = self.renders(bundle)
        answers = self.judge(instance)
        asked = torch.tensor([list(PLACES).index(c) for c in self.contexts for _ in self.seeds])
        place = answers["place"][len(self.seeds):].softmax(1)
        prompt = place.gather(1, asked[:, None]).mean().item()
        class_answers = self.judge(classes)
        class_subject = self.is_subject(class_answers)
        is_ball = class_answers["shape"].softmax(1)[:, SHAPES.index(CLASS_WORD)]
        nearest = torch.cdist(instance.flatten(1), self.photos).min(1).values
        scores = Scores(self.is_subject(answers).mean().item(), prompt,
                        (is_ball * (1 - class_subject)).mean().item(), class_subject.mean().item(),
                        (nearest.median() / self.photo_spacing).item())
        return scores, torch.cat([instance, classes])


def sheet(rows: list[torch.Tensor], path: Path) -> Path:
    """Rows of decoded renders as one picture (each row one scored step)."""
    tensor_to_image(torch.cat([torch.cat(list(row), 2) for row in rows], 1)).save(path)
    return path


def load(path: Path):
    return load_bundle_from_file(path)


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Teach the small model the world and its judge (taken from the cache "
                                                 "when there), and write the pack the tests use, " + str(FIXTURE))
    parser.add_argument("--fresh", action="store_true", help="teach them again, even when cached")
    args = parser.parse_args()
    base = taught_base(fresh=args.fresh)
    packed = base.with_name(PACK_FILE)
    if not packed.exists():
        raise SystemExit(f"{base.parent} holds no pack (it was unpacked from {FIXTURE}); run with --fresh")
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(packed, FIXTURE)
    print(f"{FIXTURE}: {FIXTURE.stat().st_size / 2 ** 20:.1f} MiB, world key {pack_key(FIXTURE)}")


if __name__ == "__main__":
    main()
