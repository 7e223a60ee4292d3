"""The tiny checkpoint the stand-in host serves, cached per session, with the `<name>.yaml` a host needs beside a
checkpoint of unusual size (without it the host builds the real-size model and the load fails)."""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import yaml

from webui_stub.configs import sgm_config

WIDTH = 32  # dreambooth_ext.models.tiny.TINY_WIDTH


@functools.lru_cache(maxsize=4)
def _tiny(family: str, seed: int) -> dict[str, torch.Tensor]:
    from dreambooth_ext.models.tiny import tiny_checkpoint

    return tiny_checkpoint(family, seed)


def tiny_state_dict(family: str = "sd1", seed: int = 0) -> dict[str, torch.Tensor]:
    """The tiny checkpoint (file layout, fp32), cached per session; a fresh dict with the shared tensors."""
    return dict(_tiny(family, seed))


def tiny_yaml(family: str = "sd1", parameterization: str = "eps") -> str:
    """The ldm config of the tiny model, written by hand from its sizes (two UNet levels of 32 and 64 channels,
    attention on both, 32-wide text encoder; a four-level VAE of 32 channels). SDXL: an sgm config of the tiny
    SDXL's sizes (dreambooth_ext.models.tiny)."""
    if family == "sdxl":
        unet = {"adm_in_channels": 128 + 6 * 256, "num_classes": "sequential", "in_channels": 4, "out_channels": 4,
                "model_channels": 32, "attention_resolutions": [4, 2], "num_res_blocks": 2, "channel_mult": [1, 2, 4],
                "num_head_channels": 64, "use_spatial_transformer": True, "use_linear_in_transformer": True,
                "transformer_depth": [1, 2, 3], "context_dim": 192, "legacy": False}
        vae = {"embed_dim": 4, "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3,
                                             "out_ch": 3, "ch": WIDTH, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2,
                                             "attn_resolutions": [], "dropout": 0.0}}
        scaling = "VScaling" if parameterization == "v" else "EpsScaling"
        return yaml.safe_dump(sgm_config(unet, vae, scaling), sort_keys=False)
    unet = {"image_size": 8, "in_channels": 4, "out_channels": 4, "model_channels": WIDTH,
            "attention_resolutions": [1, 2], "num_res_blocks": 1, "channel_mult": [1, 2],
            "use_spatial_transformer": True, "transformer_depth": 1, "context_dim": WIDTH, "legacy": False}
    if family == "sd2":
        unet.update(num_heads=1, use_linear_in_transformer=True)
        cond = {"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
                "params": {"layer": "penultimate", "width": WIDTH, "layers": 3}}
    else:
        unet.update(num_heads=8)
        cond = {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder", "params": {"width": WIDTH}}
    vae = {"embed_dim": 4, "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3,
                                         "out_ch": 3, "ch": WIDTH, "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1,
                                         "attn_resolutions": [], "dropout": 0.0}}
    params = {"timesteps": 1000, "scale_factor": 0.18215, "parameterization": parameterization,
              "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet},
              "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": vae},
              "cond_stage_config": cond}
    return yaml.safe_dump({"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": params}},
                          sort_keys=False)


def save_tiny(path: Path, family: str = "sd1", seed: int = 0, metadata: dict | None = None, *,
              with_yaml: bool = True, parameterization: str = "eps") -> Path:
    """Write the tiny checkpoint, and (as a user of a small model must) its yaml beside it."""
    import safetensors.torch

    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(tiny_state_dict(family, seed), str(path), metadata=metadata)
    if with_yaml:
        path.with_suffix(".yaml").write_text(tiny_yaml(family, parameterization), encoding="utf-8")
    return path
