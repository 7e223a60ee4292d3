"""The learning monitor: at points of a run, signals of what the model has learned, a verdict in plain words with
JoePenna's remedy, and the best step among the saved results.

Every signal is measured on fixed noise, timesteps and seeds drawn from the monitor's own generators (seeded from
the run's seed), so points compare along a run and between runs, and the global RNG is never touched:

- fit: the denoising loss on (up to FIT_PICTURES of) the training pictures with their captions at the noise levels
  FIT_LEVELS, computed as the training loss is (v-prediction aware);
- memorization: RENDERS few-step renders of the instance prompt, as latents, against the training latents: their
  median distance to the nearest training picture relative to the training pictures' median distance to their own
  nearest neighbour (copies of a training photo drive it to 0). Rendering is the costliest signal: it is measured at
  the base, at every save and at the end only (where the best step is chosen; at every point with
  stop_when_memorizing); None at the other points;
- held-out gap (with held-out photos: validation_dir, hold_out_photos): the same fit on (up to FIT_PICTURES of) the
  photos of the subject never trained on, over the training pictures' fit, a ratio (the held-out fit is in the
  point too): near the base's value while the model learns the subject, growing while it learns the training photos
  themselves; None without held-out photos;
- class drift: how far the predictions on (up to CLASS_PICTURES of) the class pictures with their class prompt have
  moved from the base model's, relative to the size of the base's (None without class pictures);
- prompt response: how much each context of `monitor_prompts` added to the captions changes the prediction on the
  training pictures, relative to how much it changed the base model's (None without contexts).

The base model's predictions it needs are computed once, at step 0, before any trained weights load (a resumed run
computes them again from the base, before its weights are restored) and kept: their size is CLASS_PICTURES latents
(256 KB at 512 px, 1 MB at 1024 px) and one number. It also keeps the latents of the training pictures (the
memorization compares renders with all of them) and of up to FIT_PICTURES held-out ones: 64 KB each at 512 px,
256 KB at 1024 px.

The verdict rules and their thresholds are below; the README says what bench/quality.py found of them.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDIMScheduler

from ..config import fill_prompt
from ..data.dataset import Example
from ..data.images import Fit, prepare_picture
from ..models.family import Conditioning
from .batches import LatentCache, TextConditioning, generator_for, posterior
from .loss import per_sample_mse, training_target
from .sampling import _guided_conditioning, _spacing

MONITOR_FILE = "monitor.json"
POINTS_PER_RUN = 10  # monitor_every_n_steps 0: at least this many points per run (and one at every save)
FIT_PICTURES = 4
FIT_LEVELS = (0.25, 0.5, 0.75)  # noise levels, as fractions of the schedule's timesteps
PROBE_LEVEL = 0.5  # the noise level of the class drift and prompt response
CLASS_PICTURES = 4
PROMPT_PICTURES = 2
RENDER_STEPS = 8
RENDERS = 4  # renders per measure of memorization (their median distance is kept)

# Thresholds: see the README's "Learning monitor" for what bench/quality.py found (copying, ignoring prompts and
# learned are set by it; forgetting is still provisional).
COPYING_BELOW = 1.0  # memorization: renders nearer a training picture than the pictures are to each other
FORGETTING_ABOVE = 0.35  # class drift: the class predictions moved by over 35 % of their size
IGNORING_BELOW = 0.35  # prompt response: a context changes the prediction less than 35 % as much as it did
LEARNED_BELOW = 1.25  # memorization: renders within 1.25 x the pictures' spacing of a training picture

STILL_LEARNING, LEARNED, COPYING, FORGETTING, IGNORING = (
    "still learning", "learned", "copying the photos", "forgetting the class", "ignoring prompts")
REMEDIES = {
    STILL_LEARNING: "It does not look like the subject yet: train longer (or use better training images), and "
                    "prompt with the token AND the class word ('ohwx person', not 'ohwx').",
    LEARNED: "It has learned the subject: this step is a good one to keep.",
    COPYING: "Renders look like the training photos themselves: keep an earlier saved step or train fewer steps, "
             "use more varied photos, and put the style first in the prompt and the token later.",
    FORGETTING: "The class itself is changing (any picture of the class looks like the subject): keep an earlier "
                "saved step, lower the learning rate, or turn on prior preservation (or raise its weight).",
    IGNORING: "It looks like the subject but no longer follows the prompt's setting or style: keep an earlier saved "
              "step or train fewer steps, use more varied photos, and repeat the token in the prompt "
              "('ohwx person in a watercolor painting, ohwx person').",
}


@dataclass
class Picture:
    """One picture the monitor measures on: its latents (scaled, on the CPU), caption and fit."""

    latents: torch.Tensor
    caption: str
    fit: Fit


def is_point(config, step: int, total_steps: int) -> bool:
    """Whether the monitor measures at `step`: never with monitor_every_n_steps -1; else at step 0 (the base), at
    the end, at every save, and every monitor_every_n_steps (0: every tenth of the run)."""
    every = config.monitor_every_n_steps
    if every < 0:
        return False
    if step in (0, total_steps) or is_save(config, step, total_steps):
        return True
    return step % (every or max(1, math.ceil(total_steps / POINTS_PER_RUN))) == 0


def is_save(config, step: int, total_steps: int) -> bool:
    every = config.save_every_n_steps
    return step == total_steps or bool(every and 0 < step < total_steps and step % every == 0)


def verdict(point: dict, learned_fit: float | None) -> str:
    """The first rule that holds: copying (memorization < COPYING_BELOW), forgetting (class drift >
    FORGETTING_ABOVE), ignoring prompts (prompt response < IGNORING_BELOW), learned, else still learning. Learned:
    the renders came within LEARNED_BELOW of the training pictures (memorization); at a point without renders, the fit
    is as low as `learned_fit`, the highest fit at which this run's renders had come that near (None: not yet). A
    signal that was not measured holds no rule."""
    memorization = point.get("memorization")
    if _below(memorization, COPYING_BELOW):
        return COPYING
    drift = point.get("class_drift")
    if drift is not None and drift > FORGETTING_ABOVE:
        return FORGETTING
    if _below(point.get("prompt_response"), IGNORING_BELOW):
        return IGNORING
    if _below(memorization, LEARNED_BELOW):
        return LEARNED
    if memorization is None and learned_fit is not None and point["fit"] <= learned_fit:
        return LEARNED
    return STILL_LEARNING


def learned_fit(points: list[dict]) -> float | None:
    """The highest fit among the trained points whose renders came within LEARNED_BELOW of the training pictures:
    where the run has shown it learns the subject (None before any such point)."""
    near = [p["fit"] for p in points if p["step"] > 0 and _below(p.get("memorization"), LEARNED_BELOW)]
    return max(near) if near else None


def _below(value: float | None, limit: float) -> bool:
    return value is not None and value < limit


def best_step(points: list[dict]) -> int | None:
    """Among the saved points: the one called 'learned' with the lowest fit; with none, the latest one still
    learning (the most trained that has not failed); with neither, the earliest saved (the least over-trained)."""
    saved = [p for p in points if p.get("saved")]
    learned = [p for p in saved if p["verdict"] == LEARNED]
    if learned:
        return min(learned, key=lambda p: (p["fit"], p["step"]))["step"]
    learning = [p for p in saved if p["verdict"] == STILL_LEARNING]
    if learning:
        return learning[-1]["step"]
    return saved[0]["step"] if saved else None


def describe(point: dict, base_fit: float | None) -> str:
    """One line for the log: the point's signals and its verdict."""
    parts = [f"fit {point['fit']:.4f}" + (f" ({point['fit'] / base_fit:.2f} of the base)" if base_fit else "")]
    for key, name in (("memorization", "memorization"), ("class_drift", "class drift"),
                      ("prompt_response", "prompt response"), ("held_out_gap", "held-out gap")):
        if point.get(key) is not None:
            parts.append(f"{name} {point[key]:.2f}")
    return f"Monitor at step {point['step']}: {', '.join(parts)}: {point['verdict']}. {REMEDIES[point['verdict']]}"


class Monitor:
    """Created by the run with its pictures; `measure(step)` at each point (the modules on their device, the weights
    to judge in place). The base predictions come from `start()`, called before any trained weights load."""

    def __init__(self, *, config, bundle, instances: list[Picture], classes: list[Picture], device: torch.device,
                 autocast: Callable[[], contextlib.AbstractContextManager], text_trained: bool,
                 text_placed: Callable[[], contextlib.AbstractContextManager], work_dir: Path, total_steps: int,
                 held_out: list[Picture] | None = None):
        self.config, self.bundle, self.device, self.autocast = config, bundle, device, autocast
        self.text_trained, self.work_dir, self.total_steps = text_trained, work_dir, total_steps
        self.contexts = [line.strip() for line in config.monitor_prompts.splitlines() if line.strip()]
        self.instances = instances
        self.fit_pictures = _pick(instances, FIT_PICTURES, config.seed, "instance")
        self.prompt_pictures = self.fit_pictures[:PROMPT_PICTURES]
        self.class_pictures = _pick(classes, CLASS_PICTURES, config.seed, "class")
        self.held_out_pictures = _pick(held_out or [], FIT_PICTURES, config.seed, "held out")
        self.render_prompt = _render_prompt(config)
        self.points: list[dict] = []
        self.base_class: list[torch.Tensor] = []  # the base model's class predictions (CPU, fp32)
        self.base_change: float | None = None  # how much the contexts changed the base model's predictions
        self._plain: list[torch.Tensor] = []  # the fit's predictions at PROBE_LEVEL, for the prompt response
        self.text = None if text_trained else self._precompute(text_placed)

    # -- setup ------------------------------------------------------------------------------------------

    def _captions(self) -> list[str]:
        prompts = [p.caption for p in self.fit_pictures + self.class_pictures + self.held_out_pictures]
        return prompts + [_with_context(p.caption, c) for p in self.prompt_pictures for c in self.contexts]

    def _precompute(self, text_placed) -> tuple[TextConditioning, Conditioning]:
        """The frozen text encoders' conditioning of every caption the monitor uses, and of its render."""
        with text_placed(), torch.no_grad():
            table = TextConditioning.precompute(self.bundle, self._captions())
            render = self._render_conditioning().to("cpu", torch.float32)
        return table, render

    def _render_conditioning(self) -> Conditioning:
        size = self.config.resolution
        return _guided_conditioning(self.bundle, [self.render_prompt], "", size, size)

    def start(self, resumed_at: int | None) -> dict | None:
        """The base model's point (step 0), and its predictions kept. A resumed run continues the series of
        monitor.json up to the step it resumes at; returns the new point to report, None when resumed."""
        point = self.measure(0, base=True)
        if resumed_at is not None:
            earlier = [p for p in self._read() if p["step"] <= resumed_at]
            if earlier and earlier[0]["step"] == 0:
                self.points = earlier
                self._write()
                return None
        self.points = [point]
        self._write()
        return point

    # -- measuring --------------------------------------------------------------------------------------

    @torch.no_grad()
    def measure(self, step: int, *, base: bool = False) -> dict:
        """The signals at `step` with the weights in place now, its verdict, added to the series. Memorization
        (a render: the costliest signal) only at the base, at saves and at the end: where the best step is chosen."""
        unet = self.bundle.unet
        was_training = unet.training
        unet.eval()
        render = base or is_save(self.config, step, self.total_steps) or self.config.stop_when_memorizing
        try:
            with self.autocast():
                point = {"step": step, "fit": self._fit(), "memorization": self._memorization() if render else None,
                         "class_drift": self._class_drift(base), "prompt_response": self._prompt_response(base),
                         "held_out_fit": self._held_out_fit()}
        finally:
            unet.train(was_training)
        point["held_out_gap"] = (point["held_out_fit"] / max(point["fit"], 1e-12)
                                 if point["held_out_fit"] is not None else None)
        point["saved"] = False
        point["verdict"] = verdict(point, None if base else learned_fit(self.points + [point]))
        if not base:
            self.points.append(point)
            self._write()
        return point

    @property
    def base_fit(self) -> float | None:
        return self.points[0]["fit"] if self.points and self.points[0]["step"] == 0 else None

    def _predict(self, pictures: list[Picture], captions: list[str], level: float, kind: str,
                 indices: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """The UNet's predictions on noised `pictures` with `captions`, and the latents and noise used (each in the
        pictures' order), and the timestep. Pictures of one size go through the UNet together. The noise of each
        picture is fixed by (kind, index, level)."""
        scheduler = self.bundle.noise_scheduler
        t = torch.tensor([int(level * (scheduler.config.num_train_timesteps - 1))], device=self.device)
        latents = [p.latents[None].to(self.device) for p in pictures]
        noises = [torch.randn(p.latents.shape, generator=generator_for(self.config.seed, "monitor noise", kind, index,
                                                                        level))[None].to(self.device)
                  for p, index in zip(pictures, indices, strict=True)]
        predictions: list[torch.Tensor | None] = [None] * len(pictures)
        shapes: dict[tuple, list[int]] = {}
        for i, picture in enumerate(pictures):
            shapes.setdefault(tuple(picture.latents.shape), []).append(i)
        for members in shapes.values():
            x0, noise = torch.cat([latents[i] for i in members]), torch.cat([noises[i] for i in members])
            noisy = scheduler.add_noise(x0, noise, t.expand(len(members)))
            conditioning = self._conditioning([captions[i] for i in members])
            sizes = self.bundle.family.size_conditioning([pictures[i].fit for i in members])
            conditioning = conditioning.with_added(sizes and {k: v.to(self.device) for k, v in sizes.items()})
            out = self.bundle.unet(noisy, t.expand(len(members)), **conditioning.unet_kwargs()).sample.float()
            for i, prediction in zip(members, out, strict=True):
                predictions[i] = prediction[None]
        return predictions, latents, noises, t

    def _conditioning(self, captions: list[str]) -> Conditioning:
        if self.text is None:
            return self.bundle.encode(captions).to(self.device)
        return self.text[0].encode(captions, self.device, grad=False)

    def _fit(self) -> float:
        """The mean denoising loss over the fit pictures and FIT_LEVELS (the predictions at PROBE_LEVEL are kept:
        the prompt response starts from them)."""
        return self._fit_of(self.fit_pictures, "instance")

    def _held_out_fit(self) -> float | None:
        """The same fit on the held-out pictures (their own fixed noise); None without held-out pictures."""
        return self._fit_of(self.held_out_pictures, "held out") if self.held_out_pictures else None

    def _fit_of(self, pictures: list[Picture], kind: str) -> float:
        scheduler, errors = self.bundle.noise_scheduler, []
        indices = list(range(len(pictures)))
        captions = [p.caption for p in pictures]
        for level in FIT_LEVELS:
            predictions, latents, noises, t = self._predict(pictures, captions, level, kind, indices)
            if level == PROBE_LEVEL and kind == "instance":
                self._plain = predictions[:PROMPT_PICTURES]
            for prediction, x0, noise in zip(predictions, latents, noises, strict=True):
                errors.append(per_sample_mse(prediction, training_target(scheduler, x0, noise, t)).item())
        return sum(errors) / len(errors)

    def _class_drift(self, base: bool) -> float | None:
        if not self.class_pictures:
            return None
        pictures = self.class_pictures
        predictions = self._predict(pictures, [p.caption for p in pictures], PROBE_LEVEL, "class",
                                    list(range(len(pictures))))[0]
        predictions = [p.cpu() for p in predictions]
        if base:
            self.base_class = predictions
        moved = sum((p - b).norm().item() for p, b in zip(predictions, self.base_class, strict=True))
        size = sum(b.norm().item() for b in self.base_class)
        return moved / max(size, 1e-12)

    def _prompt_response(self, base: bool) -> float | None:
        if not self.contexts or not self.prompt_pictures:
            return None
        pictures = self.prompt_pictures
        plain = self._plain * len(self.contexts)  # the fit's predictions at this level, with the same noise
        captions = [_with_context(p.caption, context) for context in self.contexts for p in pictures]
        moved = self._predict(pictures * len(self.contexts), captions, PROBE_LEVEL, "instance",
                              list(range(len(pictures))) * len(self.contexts))[0]
        changes = [(m - p).norm().item() for m, p in zip(moved, plain, strict=True)]
        change = sum(changes) / len(changes)
        if base:
            self.base_change = change
        return change / max(self.base_change or 0.0, 1e-12)

    def _memorization(self) -> float | None:
        """The renders' median distance to their nearest training latents over the training latents' median distance
        to their own nearest neighbour (both per element); None with fewer than two training pictures of its size."""
        renders = self._render().cpu()
        same = [p.latents for p in self.instances if p.latents.shape == renders.shape[1:]]
        if len(same) < 2:
            return None
        stacked = torch.stack(same).flatten(1)
        nearest = torch.cdist(renders.flatten(1), stacked).min(dim=1).values.median().item()
        mutual = torch.cdist(stacked, stacked)
        mutual.fill_diagonal_(float("inf"))
        reference = mutual.min(dim=1).values.median().item()
        return nearest / max(reference, 1e-12)

    def _render(self) -> torch.Tensor:
        """RENDERS renders of the instance prompt in one batch, RENDER_STEPS DDIM steps each (classifier-free guidance
        at sample_guidance), from noise fixed by the monitor's generator, as latents (not decoded)."""
        bundle, unet, size = self.bundle, self.bundle.unet, self.config.resolution
        scheduler = DDIMScheduler.from_config(bundle.noise_scheduler.config, clip_sample=False, set_alpha_to_one=False,
                                              steps_offset=1, **_spacing(bundle.noise_scheduler))
        scheduler.set_timesteps(RENDER_STEPS, device=self.device)
        uncond, cond = (self._render_conditioning() if self.text is None else self.text[1]).rows()
        conditioning = Conditioning.stack([uncond] * RENDERS + [cond] * RENDERS).to(self.device)
        shape = (RENDERS, unet.config.in_channels, size // 8, size // 8)
        latents = torch.randn(shape, generator=generator_for(self.config.seed, "monitor render")).to(self.device)
        latents = latents * scheduler.init_noise_sigma
        guidance = self.config.sample_guidance
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(torch.cat([latents, latents]), t)
            uncond, cond = unet(model_input, t, **conditioning.unet_kwargs(unet.dtype)).sample.float().chunk(2)
            latents = scheduler.step(uncond + guidance * (cond - uncond), t, latents).prev_sample
        return latents.float()

    # -- saved results, the series ----------------------------------------------------------------------

    def mark_saved(self, step: int) -> None:
        for point in self.points:
            if point["step"] == step:
                point["saved"] = True
        self._write()

    @property
    def best_step(self) -> int | None:
        return best_step(self.points)

    def summary(self) -> dict:
        """What the status, the API and the tab show: the series, the last verdict and its remedy, the best step."""
        last = self.points[-1] if self.points else None
        return {"points": [dict(p) for p in self.points], "verdict": last and last["verdict"],
                "remedy": last and REMEDIES[last["verdict"]], "best_step": self.best_step,
                "base_fit": self.base_fit, "held_out_gap": last and last.get("held_out_gap")}

    def metadata(self) -> dict[str, str]:
        """The last point and the best step, for a saved result's metadata."""
        last = self.points[-1] if self.points else {}
        return {"dreambooth.monitor": json.dumps(last), "dreambooth.monitor_best_step": str(self.best_step)}

    def line(self) -> str:
        return describe(self.points[-1], self.base_fit)

    def _read(self) -> list[dict]:
        try:
            return list(json.loads((self.work_dir / MONITOR_FILE).read_text(encoding="utf-8"))["points"])
        except (OSError, ValueError, KeyError, TypeError):
            return []

    def _write(self) -> None:
        """monitor.json, replaced whole (a reader never sees half of it)."""
        path = self.work_dir / MONITOR_FILE
        partial = path.with_name(f".{MONITOR_FILE}.partial")
        partial.write_text(json.dumps({"version": 1, **self.summary()}, indent=1), encoding="utf-8")
        os.replace(partial, path)


def _pick(pictures: list, count: int, seed: int, kind: str) -> list:
    """`count` of the pictures, chosen by the monitor's own generator (the same ones at every point)."""
    order = torch.randperm(len(pictures), generator=generator_for(seed, "monitor pictures", kind)).tolist()
    return [pictures[i] for i in sorted(order[:count])]


@torch.no_grad()
def monitor_pictures(examples: list[Example], *, is_class: bool, cache: LatentCache | None, vae, crop: str,
                     seed: int, count: int | None = None) -> list[Picture]:
    """The pictures the monitor measures on (`count` of them, picked by its generator; all without a count):
    unflipped, their posterior mean (no draw), from the latent cache or encoded now by the VAE (on its device; a
    random crop is replaced by the center one, so every point sees the same picture)."""
    indexed = list(enumerate(examples))
    if count is not None:
        indexed = _pick(indexed, count, seed, "class" if is_class else "instance")
    pictures = []
    for index, example in indexed:
        if cache is not None:
            stats = cache.get(is_class, index, False)
        else:
            pixels, fit = prepare_picture(example.path, example.size, "center" if crop == "random" else crop)
            param = next(vae.parameters())
            stats = posterior(vae, pixels[None].to(param.device, param.dtype), example, fit)
        pictures.append(Picture(stats.mean * vae.config.scaling_factor, example.caption, stats.fit))
    return pictures


def _with_context(caption: str, context: str) -> str:
    return f"{caption} {context}"


def _render_prompt(config) -> str:
    concept = config.concepts[0]
    return fill_prompt(concept.instance_prompt, concept)
