"""SD-shaped random checkpoints for the benchmarks, in the WebUI's layout: SD1.5's architecture at its real size
or with every width divided by `shrink` (channel counts stay multiples of 32), and SDXL's."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dreambooth_ext.models.convert import (  # noqa: E402
    make_text_encoder_config,
    make_unet_config,
    make_vae_config,
    unet_to_ldm,
    vae_to_ldm,
)
from dreambooth_ext.models.family import family_named  # noqa: E402
from dreambooth_ext.models.tiny import schedule_buffers  # noqa: E402

SD15_UNET = (320, 640, 1280, 1280)
SD15_VAE = (128, 256, 512, 512)


def _width(value: int, shrink: int) -> int:
    return max(32, value // shrink // 32 * 32)


def sd15_modules(shrink: int = 1, text_layers: int = 12) -> tuple:
    """(unet, vae, text_encoder) of SD1.5's architecture, widths divided by `shrink`, random weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    family = family_named("sd1")
    text_width = _width(768, shrink) if shrink > 1 else 768
    unet = UNet2DConditionModel(**make_unet_config(
        family=family, block_out_channels=tuple(_width(c, shrink) for c in SD15_UNET), layers_per_block=2,
        attention_levels=(True, True, True, False), cross_attention_dim=text_width))
    vae = AutoencoderKL(**make_vae_config(family=family, block_out_channels=tuple(_width(c, shrink) for c in SD15_VAE),
                                          layers_per_block=2, latent_channels=4))
    text_encoder = CLIPTextModel(make_text_encoder_config(
        vocab_size=49408, hidden_size=text_width, max_position_embeddings=77, intermediate_size=4 * text_width,
        num_hidden_layers=text_layers if shrink == 1 else 4, hidden_act="quick_gelu"))
    return unet, vae, text_encoder


def sdxl_unet():
    """SDXL's UNet (2.6 billion weights), random."""
    from diffusers import UNet2DConditionModel

    family = family_named("sdxl")
    return UNet2DConditionModel(**make_unet_config(
        family=family, block_out_channels=(320, 640, 1280), layers_per_block=2,
        attention_levels=(False, True, True), cross_attention_dim=2048, transformer_layers_per_block=(1, 2, 10),
        added_input_dim=1280 + 6 * family.size_embedding_dim))


def save_sd15(path: Path, shrink: int = 1, dtype: torch.dtype = torch.float32, seed: int = 0) -> Path:
    """An SD1.5-shaped checkpoint file in the WebUI's layout."""
    import safetensors.torch

    torch.manual_seed(seed)
    unet, vae, text_encoder = sd15_modules(shrink)
    family = family_named("sd1")
    sd = {}
    sd.update(unet_to_ldm(unet.state_dict(), dict(unet.config)))
    sd.update(vae_to_ldm(vae.state_dict(), dict(vae.config)))
    sd.update(family.text_encoders_to_ldm((text_encoder.state_dict(),)))
    sd = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in sd.items()}
    sd.update(schedule_buffers())
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(sd, str(path))
    return path
