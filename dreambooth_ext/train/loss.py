"""The Dreambooth loss: denoising error on instance samples plus weighted error on class samples."""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler


def training_target(scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor,
                    timesteps: torch.Tensor) -> torch.Tensor:
    """The noise for epsilon models, the velocity for v-prediction models."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction type {kind!r}")


def snr(scheduler: DDPMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    alphas_cumprod = scheduler.alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)[timesteps]
    return alphas_cumprod / (1.0 - alphas_cumprod)


def min_snr_weights(scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma weighting (Hang et al. 2023), expressed for the model's prediction target."""
    ratio = snr(scheduler, timesteps)
    clipped = torch.clamp(ratio, max=gamma)
    if scheduler.config.prediction_type == "v_prediction":
        return clipped / (ratio + 1.0)
    # A zero-terminal-SNR schedule has SNR 0 at its last step: weight 0 there, not 0/0.
    return clipped / ratio.clamp(min=torch.finfo(ratio.dtype).tiny)


def per_sample_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((prediction.float() - target.float()) ** 2).mean(dim=tuple(range(1, prediction.ndim)))


def dreambooth_loss(per_sample: torch.Tensor, is_class: torch.Tensor, prior_loss_weight: float, *,
                    counts: tuple[int, int] | None = None) -> torch.Tensor:
    """mse(instance) + prior_loss_weight * mse(class), each the mean over its samples. `counts`: how many
    instance and class samples the whole batch has, when `per_sample` holds only part of it (one process's
    share): the parts' losses then add up to the whole batch's."""
    instance, prior = per_sample[~is_class], per_sample[is_class]
    n_instance, n_class = counts if counts is not None else (len(instance), len(prior))
    loss = instance.sum() / n_instance if n_instance else per_sample.new_zeros(())
    if n_class:
        loss = loss + prior_loss_weight * (prior.sum() / n_class)
    return loss
