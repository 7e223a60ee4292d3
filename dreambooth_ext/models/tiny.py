"""A tiny random Stable Diffusion checkpoint in the full WebUI layout, for the demo command and the tests.

It is built from small diffusers/transformers modules mapped with our reverse maps, so it has exactly the key
structure of a real SD1/SD2 file (4-level VAE with its x8 downscale, 77-token CLIP, schedule buffers).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import torch

from .convert import make_text_encoder_config, make_unet_config, make_vae_config, unet_to_ldm, vae_to_ldm
from .family import SD2_TEXT_PREFIX, family_named

logger = logging.getLogger(__name__)

TINY_WIDTH = 32  # every channel count is a multiple of 32, the GroupNorm group count
TINY_RESOLUTION = 64


def schedule_buffers(num_steps: int = 1000, beta_start: float = 0.00085,
                     beta_end: float = 0.012) -> dict[str, torch.Tensor]:
    """The ldm `scaled_linear` noise schedule buffers a LatentDiffusion checkpoint carries (fp32)."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_steps, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    return {"betas": betas.float(), "alphas_cumprod": alphas_cumprod.float(),
            "alphas_cumprod_prev": alphas_cumprod_prev.float()}


def _perturb(module: torch.nn.Module) -> None:
    # Default inits leave biases zero and norms one; distinct values make mix-ups in the key maps visible.
    with torch.no_grad():
        for param in module.parameters():
            param.add_(torch.randn_like(param) * 0.02)


def tiny_modules(name: str = "sd1") -> tuple:
    """Fresh tiny (unet, vae, text_encoder) modules of the family, from the current torch RNG state."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    family = family_named(name)
    unet = UNet2DConditionModel(**make_unet_config(
        family=family, block_out_channels=(TINY_WIDTH, 2 * TINY_WIDTH), layers_per_block=1,
        attention_levels=(True, True), cross_attention_dim=TINY_WIDTH))
    vae = AutoencoderKL(**make_vae_config(family=family, block_out_channels=(TINY_WIDTH,) * 4, layers_per_block=1,
                                          latent_channels=4))
    # SD2 checkpoints carry one OpenCLIP block more than the text encoder uses (the penultimate-layer rule).
    open_clip = name == "sd2"
    text_encoder = CLIPTextModel(make_text_encoder_config(
        vocab_size=49408, hidden_size=TINY_WIDTH, max_position_embeddings=77, intermediate_size=2 * TINY_WIDTH,
        num_hidden_layers=3 if open_clip else 2, hidden_act="gelu" if open_clip else "quick_gelu"))
    for module in (unet, vae, text_encoder):
        _perturb(module)
    _calibrate_vae(vae)
    return unet, vae, text_encoder


def _calibrate_vae(vae: torch.nn.Module) -> None:
    """Give the random VAE the latent scale of a real one, measured on a random probe picture."""
    size = 8 * 2 ** (len(vae.config.block_out_channels) - 1)
    probe = torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    set_latent_scale(vae, torch.nn.functional.interpolate(probe, size=size, mode="nearest"))


@torch.no_grad()
def set_latent_scale(vae: torch.nn.Module, pixels: torch.Tensor, posterior_std: float = 0.05) -> None:
    """Give a small VAE the latent scale of a real one, measured on `pixels`.

    A random encoder's means are small (scaled std about 0.05) next to its posterior noise (log-variance
    about 0, so std 1): a latent sampled from it is mostly noise, and training on it learns little about the
    images. SD's VAE gives scaled latents of about unit variance and a posterior std far below that. The
    latent interface is rescaled to match: quant_conv's mean rows by k, a small constant posterior std, and
    post_quant_conv's input by 1/k, so decoding a mean latent is unchanged."""
    channels = vae.config.latent_channels
    scale = 1.0 / (vae.encode(pixels).latent_dist.mean.std().item() * vae.config.scaling_factor)
    vae.quant_conv.weight[:channels] *= scale
    vae.quant_conv.bias[:channels] *= scale
    vae.quant_conv.weight[channels:] = 0.0
    vae.quant_conv.bias[channels:] = 2.0 * math.log(posterior_std)
    vae.post_quant_conv.weight /= scale


def tiny_checkpoint(family: str = "sd1", seed: int = 0) -> dict[str, torch.Tensor]:
    """A small random model in the WebUI layout; the same seed always gives the same tensors."""
    home = family_named(family)
    if family == "sdxl":
        return _own_storage(_tiny_sdxl(home, seed))
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream untouched
        torch.manual_seed(seed)
        unet, vae, text_encoder = tiny_modules(family)
        extra = {}
        if family == "sd2":
            extra[SD2_TEXT_PREFIX + "text_projection"] = torch.randn(TINY_WIDTH, TINY_WIDTH) * 0.02
            extra[SD2_TEXT_PREFIX + "logit_scale"] = torch.tensor(4.6052)
    sd: dict[str, torch.Tensor] = {}
    sd.update(unet_to_ldm(unet.state_dict(), dict(unet.config)))
    sd.update(vae_to_ldm(vae.state_dict(), dict(vae.config)))
    sd.update(home.text_encoders_to_ldm((text_encoder.state_dict(),)))
    sd.update(extra)
    sd.update(schedule_buffers())
    return _own_storage(sd)


def _own_storage(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Own, contiguous storage: the modules are dropped and the dict may be saved with safetensors.
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


def _tiny_sdxl(family: Any, seed: int) -> dict[str, torch.Tensor]:
    """A small SDXL in the WebUI's layout, of the sizes of the small SDXL the WebUI's own sgm classes write
    (tests/host_layouts/tiny-sdxl.json): UNet levels of 32/64/128 channels with 0/2/3 transformer blocks, a
    64-wide CLIP ViT-L and a 128-wide OpenCLIP with its projection (context 64 + 128 = 192), a 4-level VAE."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from .family import SDXL_CLIP_PREFIX, SDXL_OPEN_CLIP_PREFIX

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**make_unet_config(
            family=family, block_out_channels=(32, 64, 128), layers_per_block=2, attention_levels=(False, True, True),
            cross_attention_dim=192, transformer_layers_per_block=(1, 2, 3),
            added_input_dim=128 + 6 * family.size_embedding_dim))
        vae = AutoencoderKL(**make_vae_config(family=family, block_out_channels=(32, 64, 128, 128), layers_per_block=2,
                                              latent_channels=4))
        clip = CLIPTextModel(make_text_encoder_config(vocab_size=49408, hidden_size=64, max_position_embeddings=77,
                                                      intermediate_size=128, num_hidden_layers=2,
                                                      hidden_act="quick_gelu"))
        big_config = make_text_encoder_config(vocab_size=49408, hidden_size=128, max_position_embeddings=77,
                                              intermediate_size=512, num_hidden_layers=2, hidden_act="gelu")
        big_config.projection_dim = 128
        big = CLIPTextModelWithProjection(big_config)
        for module in (unet, vae, clip, big):
            _perturb(module)
        sd: dict[str, torch.Tensor] = {}
        sd.update(unet_to_ldm(unet.state_dict(), dict(unet.config)))
        sd.update(vae_to_ldm(vae.state_dict(), dict(vae.config)))
        sd.update(family.text_encoders_to_ldm((clip.state_dict(), big.state_dict())))
        sd[SDXL_CLIP_PREFIX + "text_model.embeddings.position_ids"] = torch.arange(77)[None]
        sd[SDXL_OPEN_CLIP_PREFIX + "logit_scale"] = torch.tensor(4.6052)
        alphas_cumprod = schedule_buffers()["alphas_cumprod"].double()
        sd["denoiser.sigmas"] = ((1 - alphas_cumprod) / alphas_cumprod).sqrt().float()
    return sd


def save_tiny_checkpoint(path: str | os.PathLike, family: str = "sd1", seed: int = 0) -> Path:
    """Write `tiny_checkpoint(family, seed)` as .safetensors and return the path."""
    import safetensors.torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Made to be trained at 64 px (the demo's size); saying so spares it the "made for 512 px" warning.
    metadata = {"modelspec.resolution": f"{TINY_RESOLUTION}x{TINY_RESOLUTION}"}
    safetensors.torch.save_file(tiny_checkpoint(family, seed), str(path), metadata=metadata)
    return path
