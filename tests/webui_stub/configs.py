"""Model configs the stand-in host and its tests write."""

from __future__ import annotations


def sgm_config(unet, vae, scaling="EpsScaling"):
    """An sgm DiffusionEngine config (SDXL), as the host's sd_xl_base.yaml is laid out."""
    scaling_target = f"sgm.modules.diffusionmodules.denoiser_scaling.{scaling}"
    params = {"scale_factor": 0.13025, "disable_first_stage_autocast": True,
              "denoiser_config": {"target": "sgm.modules.diffusionmodules.denoiser.DiscreteDenoiser",
                                  "params": {"num_idx": 1000, "scaling_config": {"target": scaling_target}}},
              "network_config": {"target": "sgm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet},
              "conditioner_config": {"target": "sgm.modules.GeneralConditioner"},
              "first_stage_config": {"target": "sgm.models.autoencoder.AutoencoderKLInferenceWrapper",
                                     "params": vae}}
    return {"model": {"target": "sgm.models.diffusion.DiffusionEngine", "params": params}}
