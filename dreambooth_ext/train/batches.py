"""Turning a micro-batch number into latents and text conditioning, with optional caches.

Every random choice is drawn from generators seeded by (seed, micro-batch number), so a resumed run sees
exactly the batches, flips, crops, noise, timesteps and dropout of an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from ..data.dataset import Example, flip_decision
from ..data.images import Fit, prepare_picture
from ..errors import DreamboothError
from ..models.family import Conditioning


def derive_seed(*parts: object) -> int:
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def generator_for(*parts: object) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(derive_seed(*parts))


@contextlib.contextmanager
def seeded_global_generators(device: torch.device, *parts: object) -> Iterator[None]:
    """While it lasts, torch's global generators (the CPU's, and the device's) are seeded by `parts`; afterwards
    they are as they were, so the host's randomness is untouched. For what draws from them inside a model's forward
    pass (LoRA's dropout), which gradient checkpointing replays from the same state in the backward pass."""
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    seed = derive_seed(*parts)
    with torch.random.fork_rng(devices=devices):
        torch.random.default_generator.manual_seed(seed)
        for index in devices:
            torch.cuda.default_generators[index].manual_seed(seed)
        yield


@dataclass
class LatentStats:
    """The VAE posterior of one picture, and how the picture was fitted to its training size."""

    mean: torch.Tensor
    std: torch.Tensor
    fit: Fit


@dataclass
class Samples:
    """One group of a micro-batch: latents (scaled), and each sample's caption and fit."""

    latents: torch.Tensor
    captions: list[str]
    fits: list[Fit]


def posterior(vae, pixels: torch.Tensor, example: Example, fit: Fit) -> LatentStats:
    """The VAE posterior of one picture on the CPU in fp32; a non-finite one stops the run, naming the picture
    (a VAE that overflows in half precision would otherwise train on NaNs without a word)."""
    dist = vae.encode(pixels).latent_dist
    stats = LatentStats(dist.mean[0].float().cpu(), dist.std[0].float().cpu(), fit)
    if not (torch.isfinite(stats.mean).all() and torch.isfinite(stats.std).all()):
        raise DreamboothError(
            f"The VAE turned {example.path.name} into NaN/inf latents, usually an overflow of a VAE run in half "
            "precision. Set mixed_precision to no (or bf16), or use a VAE that is safe in fp16.")
    return stats


class LatentCache:
    """VAE posterior (mean, std) of every example, once per flip state used. Kept on the CPU."""

    def __init__(self):
        self.stats: dict[tuple[bool, int], LatentStats] = {}

    @torch.no_grad()
    def fill(self, vae, examples: list[Example], *, is_class: bool, flip_p: float, crop: str,
             on_item: Callable[[], None] | None = None) -> None:
        device, dtype = next(vae.parameters()).device, next(vae.parameters()).dtype
        flips = (False, True) if flip_p > 0 else (False,)
        for index, example in enumerate(examples):
            for flip in flips:
                pixels, fit = prepare_picture(example.path, example.size, crop, flip)
                self.stats[(is_class, index, flip)] = posterior(vae, pixels[None].to(device, dtype), example, fit)
            if on_item:
                on_item()

    def get(self, is_class: bool, index: int, flip: bool) -> LatentStats:
        return self.stats[(is_class, index, flip)]


class Feeder:
    """Latents and captions of micro-batches, from the cache or by encoding images each step. Without a cache,
    `prefetch` reads and crops the pictures of a coming micro-batch in a thread of its own while the current
    step trains; they are exactly the pictures that step would read itself."""

    def __init__(self, vae, examples: list[Example], *, is_class: bool, seed: int, flip_p: float, crop: str,
                 cache: LatentCache | None):
        self.vae = vae
        self.examples = examples
        self.is_class = is_class
        self.seed = seed
        self.flip_p = flip_p
        self.crop = crop
        self.cache = cache
        self._reader: ThreadPoolExecutor | None = None
        self._coming: dict[tuple[int, int], Future] = {}

    def prefetch(self, indices: list[int], micro: int) -> None:
        """Start reading the pictures of micro-batch `micro` (nothing to do with a cache)."""
        if self.cache is not None:
            return
        if self._reader is None:
            self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dreambooth-pictures")
        for index in indices:
            if (micro, index) not in self._coming:
                self._coming[(micro, index)] = self._reader.submit(self._picture, index, micro)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.shutdown(wait=True, cancel_futures=True)
            self._reader = None
        self._coming.clear()

    def latents(self, indices: list[int], positions: list[int], micro: int, device: torch.device) -> Samples:
        """The examples `indices`, at `positions` in the micro-batch (each sample's draw from its posterior
        depends on its position, not on which other samples this process holds)."""
        stats = [self._stats(i, micro) for i in indices]
        mean = torch.stack([s.mean for s in stats])
        std = torch.stack([s.std for s in stats])
        noise = torch.stack([torch.randn(s.mean.shape, generator=generator_for(self.seed, "latent", self.is_class,
                                                                                micro, position))
                             for s, position in zip(stats, positions, strict=True)])
        latents = (mean + std * noise) * self.vae.config.scaling_factor
        return Samples(latents.to(device), [self.examples[i].caption for i in indices], [s.fit for s in stats])

    def _flip(self, index: int, micro: int) -> bool:
        kind = "class" if self.is_class else "instance"
        return flip_decision(derive_seed(self.seed, kind), micro, index, self.flip_p)

    def _picture(self, index: int, micro: int) -> tuple[torch.Tensor, Fit]:
        """The example's pixels as micro-batch `micro` sees them (its flip and, with random crops, its crop)."""
        kind = "class" if self.is_class else "instance"
        generator = generator_for(self.seed, "crop", kind, micro, index) if self.crop == "random" else None
        example = self.examples[index]
        return prepare_picture(example.path, example.size, self.crop, self._flip(index, micro), generator)

    def _stats(self, index: int, micro: int) -> LatentStats:
        if self.cache is not None:
            return self.cache.get(self.is_class, index, self._flip(index, micro))
        coming = self._coming.pop((micro, index), None)
        pixels, fit = coming.result() if coming is not None else self._picture(index, micro)
        for key in [key for key in self._coming if key[0] < micro]:  # read for a step that never came
            self._coming.pop(key).cancel()
        vae_param = next(self.vae.parameters())
        with torch.no_grad():
            return posterior(self.vae, pixels[None].to(vae_param.device, vae_param.dtype), self.examples[index], fit)


class TextConditioning:
    """The UNet's conditioning for captions: precomputed once when the text encoders are frozen."""

    def __init__(self, bundle, precomputed: dict[str, Conditioning] | None = None):
        self.bundle = bundle
        self.precomputed = precomputed

    @classmethod
    @torch.no_grad()
    def precompute(cls, bundle, captions: list[str], batch_size: int = 16) -> TextConditioning:
        unique = sorted(set(captions))
        table: dict[str, Conditioning] = {}
        for start in range(0, len(unique), batch_size):
            chunk = unique[start:start + batch_size]
            rows = bundle.encode(chunk).to("cpu", torch.float32).rows()
            table.update(zip(chunk, rows, strict=True))
        return cls(bundle, table)

    def encode(self, captions: list[str], device: torch.device, *, grad: bool) -> Conditioning:
        if self.precomputed is not None:
            return Conditioning.stack([self.precomputed[c] for c in captions]).to(device)
        with torch.set_grad_enabled(grad):
            return self.bundle.encode(captions)
