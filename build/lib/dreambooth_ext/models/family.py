"""Which Stable Diffusion generation a state dict is, from its keys."""

from __future__ import annotations

import logging

import torch

from ..errors import DreamboothError

logger = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
SD1_TEXT_PREFIX = "cond_stage_model.transformer."
SD2_TEXT_PREFIX = "cond_stage_model.model."
FAMILIES = ("sd1", "sd2")

# The WebUI's loaded model wraps its text encoder (FrozenCLIPEmbedderWithCustomWords), so a state dict taken
# from the live model has one extra level that files on disk do not.
_WRAPPED = "cond_stage_model.wrapped."
_TOKEN_EMBEDDING_WRAPPED = ".token_embedding.wrapped."


def normalize_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Return a new dict in the on-disk layout (same tensor objects).

    The WebUI's live model carries its prompt hijack's extra levels: `cond_stage_model.wrapped.` and the token
    embedding's `token_embedding.wrapped.`; both lose `wrapped.`.
    """
    out = {}
    for key, value in sd.items():
        if key.startswith(_WRAPPED):
            key = "cond_stage_model." + key[len(_WRAPPED):]
        out[key.replace(_TOKEN_EMBEDDING_WRAPPED, ".token_embedding.")] = value
    return out


def detect_family(sd: dict[str, torch.Tensor]) -> str:
    """"sd1" (CLIP ViT-L text encoder) or "sd2" (OpenCLIP ViT-H); anything else is refused with the reason."""
    keys = sd.keys()
    if any(k.startswith("conditioner.embedders.") for k in keys):
        raise DreamboothError("This is an SDXL checkpoint (it has conditioner.embedders.* keys). SDXL is not "
                              "supported yet; pick a Stable Diffusion 1.x or 2.x checkpoint")
    has_unet = any(k.startswith(UNET_PREFIX) for k in keys)
    if has_unet and any(k.startswith(SD1_TEXT_PREFIX + "text_model.") for k in keys):
        return "sd1"
    if has_unet and any(k.startswith(SD2_TEXT_PREFIX + "transformer.resblocks.") for k in keys):
        return "sd2"
    raise DreamboothError(f"This file is not a full Stable Diffusion 1.x/2.x checkpoint: it contains "
                          f"{_describe(sd)}. Pick a full SD 1.x or 2.x checkpoint (UNet, VAE and text encoder "
                          "in one file), not a LoRA, embedding or VAE file")


def _describe(sd: dict[str, torch.Tensor]) -> str:
    if any("lora_" in k for k in sd):
        return f"LoRA weights ({len(sd)} tensors)"
    if any(k.startswith(("encoder.", "decoder.", "first_stage_model.")) for k in sd) and not any(
            k.startswith(UNET_PREFIX) for k in sd):
        return f"only VAE weights ({len(sd)} tensors)"
    if not any(k.startswith(UNET_PREFIX) for k in sd):
        return f"no UNet (no model.diffusion_model.* keys; {len(sd)} tensors, e.g. {sorted(sd)[:3]})"
    return f"a UNet but no text encoder it knows ({len(sd)} tensors, e.g. {sorted(sd)[:3]})"
