"""Text encoding and DDIM image generation with the run's own modules (no diffusers pipelines: their
classes do not import with the WebUI's transformers)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from diffusers import DDIMScheduler
from PIL import Image

from ..data.images import Fit, tensor_to_image
from ..models.family import Conditioning


@contextlib.contextmanager
def placed(modules: list[torch.nn.Module], device: torch.device, dtype: torch.dtype | None = None) -> Iterator[None]:
    """Use modules on a device (and in a dtype) for a while, then give each its own tensors back.

    Nothing is copied back: casting back would leave the modules rounded (bf16 or fp16) copies of their weights,
    a second copy beside the originals that the base checkpoint (or the host's model) still holds. The modules
    must not change while placed (they are frozen, or used only to render)."""
    kept = [_tensors_of(module) for module in modules]
    for module in modules:
        module.to(device=device, dtype=dtype or next(module.parameters()).dtype)
    try:
        yield
    finally:
        for tensors in kept:
            _give_back(tensors)


def _tensors_of(module: torch.nn.Module) -> list[tuple]:
    """(holder, name, parameter, its data) for every parameter, (holder, name, None, buffer) for every buffer."""
    found = []
    for holder in module.modules():
        found += [(holder, name, p, p.data) for name, p in holder._parameters.items() if p is not None]
        found += [(holder, name, None, b) for name, b in holder._buffers.items() if b is not None]
    return found


def _give_back(tensors: list[tuple]) -> None:
    for holder, name, parameter, data in tensors:
        if parameter is None:
            holder._buffers[name] = data
        else:
            parameter.data = data
            holder._parameters[name] = parameter


@torch.no_grad()
def generate_images(bundle, prompts: list[str], *, negative_prompt: str = "", steps: int = 30,
                    guidance: float = 7.5, seed: int = 0, width: int = 512, height: int = 512,
                    autocast_dtype: torch.dtype | None = None,
                    on_step: Callable[[int, int], None] | None = None) -> list[Image.Image]:
    """Render one image per prompt with DDIM and classifier-free guidance; modules must be placed already."""
    unet, vae = bundle.unet, bundle.vae
    device = next(unet.parameters()).device
    scheduler = DDIMScheduler.from_config(bundle.noise_scheduler.config, clip_sample=False, set_alpha_to_one=False,
                                          steps_offset=1, **_spacing(bundle.noise_scheduler))
    scheduler.set_timesteps(steps, device=device)
    autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype
                else contextlib.nullcontext())
    was_training = unet.training
    unet.eval()
    try:
        with autocast:
            conditioning = _guided_conditioning(bundle, prompts, negative_prompt, width, height).to(device)
            generator = torch.Generator("cpu").manual_seed(seed)
            shape = (len(prompts), unet.config.in_channels, height // 8, width // 8)
            latents = torch.randn(shape, generator=generator).to(device) * scheduler.init_noise_sigma
            for i, t in enumerate(scheduler.timesteps):
                model_input = scheduler.scale_model_input(torch.cat([latents, latents]), t)
                pred = unet(model_input, t, **conditioning.unet_kwargs(unet.dtype)).sample
                pred_uncond, pred_cond = pred.float().chunk(2)
                pred = pred_uncond + guidance * (pred_cond - pred_uncond)
                latents = scheduler.step(pred, t, latents).prev_sample
                if on_step:
                    on_step(i + 1, len(scheduler.timesteps))
    finally:
        unet.train(was_training)
    # Outside autocast: the VAE decodes in the dtype it was placed in (fp32 for one that overflows in fp16).
    vae_dtype = next(vae.parameters()).dtype
    decoded = vae.decode((latents / vae.config.scaling_factor).to(vae_dtype)).sample
    return [tensor_to_image(image.float().cpu()) for image in decoded]


def _spacing(noise_scheduler) -> dict:
    """A zero-terminal-SNR schedule is sampled from its last step (pure noise): "trailing" timesteps."""
    return {"timestep_spacing": "trailing"} if noise_scheduler.config.get("rescale_betas_zero_snr") else {}


def _guided_conditioning(bundle, prompts: list[str], negative_prompt: str, width: int,
                         height: int) -> Conditioning:
    """Unconditional then conditional rows, with the size conditioning of a picture made at width x height."""
    negative = bundle.encode([negative_prompt] * len(prompts))
    if not negative_prompt and bundle.family.zero_empty_negative:
        negative = negative.zeros_like()
    both = Conditioning.cat([negative, bundle.encode(prompts)])
    return both.with_added(bundle.family.size_conditioning([Fit.whole(width, height)] * (2 * len(prompts))))
