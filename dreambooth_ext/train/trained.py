"""What a run trains: the whole model (a full fine-tune, written as a checkpoint) or LoRA adapters on the frozen
model (written as a file for the WebUI's Lora tab, optionally merged into a checkpoint too).

Each kind prepares the modules, returns the ones whose `requires_grad` weights train (the optimizer, the EMA and
the training state take exactly those), names the folders it writes to, and saves the result through the host.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..config import Config
from ..hosts.base import Host
from ..models.bundle import ModelBundle
from ..models.export import (
    addnet_hash,
    build_checkpoint,
    build_merged_checkpoint,
    checkpoint_metadata,
    lora_metadata,
    save_checkpoint,
    yaml_for_bundle,
)
from ..models.lora import (
    LoRASettings,
    adapters,
    add_adapters,
    freeze_base,
    lora_file_tensors,
    text_targets,
    unet_targets,
)
from .devices import Precision
from .guard import output_error, write_errors

log = logging.getLogger(__name__)

COMPILE_BACKEND = "inductor"  # torch.compile's default backend (the tests use a quicker one)


@dataclass
class Saving:
    """What a save records besides the weights."""

    step: int
    config_json: str
    extra: dict[str, str]  # dreambooth.* metadata
    unet_state: dict[str, torch.Tensor] | None = None  # averaged UNet weights to write instead of the trained ones
    num_images: int = 0
    tag_frequency: dict[str, dict[str, int]] = field(default_factory=dict)
    started_at: float = 0.0
    cover: Path | None = None  # a sample image for the LoRA card


@dataclass
class Saved:
    checkpoints: list[Path] = field(default_factory=list)  # full checkpoints, for the checkpoint list
    loras: list[Path] = field(default_factory=list)  # LoRA files, for the Lora list


def checkpointing(config: Config, device: torch.device) -> bool:
    """Whether activations are recomputed in the backward pass: `auto` turns it on where memory is scarce (a GPU)
    and off on a CPU, where it would cost a third of every step."""
    if config.gradient_checkpointing == "auto":
        return device.type != "cpu"
    return config.gradient_checkpointing == "on"


def compile_unet(unet: nn.Module, config: Config) -> None:
    """torch.compile the UNet in place (its weights keep their names, so states and exports are unchanged)."""
    if config.compile_unet:
        log.info("Compiling the UNet (%s): the first steps wait for it", COMPILE_BACKEND)
        unet.compile(backend=COMPILE_BACKEND)


def weights_dtype(config: Config) -> torch.dtype:
    """The dtype the trained weights are kept in (bf16 ones are updated with stochastic rounding)."""
    return torch.bfloat16 if config.weights_dtype == "bf16" else torch.float32


def _text_key(index: int) -> str:
    # State keys: text_encoder.<name> for the first encoder, text_encoder_2.<name> for the second ...
    return "text_encoder" + (f"_{index + 1}" if index else "")


class FullFineTune:
    """Every weight of the UNet, and of the text encoders while they train; the result is a checkpoint."""

    name = "full"

    def prepare(self, bundle: ModelBundle, config: Config, device: torch.device,
                precision: Precision) -> dict[str, nn.Module]:
        dtype = weights_dtype(config)
        bundle.drop_base_unet()
        bundle.unet.to(device, dtype).requires_grad_(True).train()
        if checkpointing(config, device):
            bundle.unet.enable_gradient_checkpointing()
        compile_unet(bundle.unet, config)
        trained: dict[str, nn.Module] = {"unet": bundle.unet}
        for index, text_encoder in enumerate(bundle.text_encoders):
            if config.train_text_encoder:
                text_encoder.to(device, dtype).requires_grad_(True).train()
                if checkpointing(config, device):
                    text_encoder.gradient_checkpointing_enable()
                trained[_text_key(index)] = text_encoder
            else:
                text_encoder.requires_grad_(False).eval()
        return trained

    def folders(self, host: Host, config: Config) -> list[tuple[Path, str]]:
        """(folder, what goes there) of every folder a save writes to."""
        return [(host.checkpoint_path(config.project_name, 0).parent, "the trained model")]

    def save(self, bundle: ModelBundle, config: Config, host: Host, saving: Saving) -> Saved:
        path = host.checkpoint_path(config.project_name, saving.step)
        text_encoders = bundle.text_encoders if config.train_text_encoder else None
        state_dict = build_checkpoint(bundle, bundle.unet, text_encoders=text_encoders,
                                      precision=config.save_precision, unet_state=saving.unet_state)
        metadata = checkpoint_metadata(bundle, title=path.stem, steps=saving.step, config_json=saving.config_json,
                                       resolution=config.resolution, extra=saving.extra)
        _write(state_dict, path, metadata, yaml_for_bundle(bundle), "the trained model")
        host.publish(path)
        return Saved(checkpoints=[path])


class LoRATraining:
    """Low-rank adapters on the frozen UNet (and text encoders while they train); the result is a LoRA file in
    the host's Lora folder, and with lora_save_merged also a checkpoint with the adapters merged in.

    The frozen weights stay in the run's half precision where it computes in one (no gradients, no optimizer
    state for them): only the adapters are fp32 and trained."""

    name = "lora"

    def prepare(self, bundle: ModelBundle, config: Config, device: torch.device,
                precision: Precision) -> dict[str, nn.Module]:
        from .batches import derive_seed

        rank = config.lora_rank
        settings = LoRASettings(rank=rank, alpha=config.lora_alpha or rank, dropout=config.lora_dropout,
                                conv_rank=config.lora_conv_rank)
        with torch.random.fork_rng(devices=[]):  # the same seed gives the same starting adapters
            torch.manual_seed(derive_seed(config.seed, "lora"))
            trained = {"unet": self._adapt(bundle.unet, unet_targets(bundle.unet, config.lora_conv_rank > 0),
                                           settings, device, precision, config)}
            for index, text_encoder in enumerate(bundle.text_encoders):
                if config.train_text_encoder:
                    trained[_text_key(index)] = self._adapt(text_encoder, text_targets(text_encoder), settings,
                                                            device, precision, config)
                else:
                    text_encoder.requires_grad_(False).eval()
        compile_unet(bundle.unet, config)
        count = sum(len(adapters(module)) for module in trained.values())
        size = sum(p.numel() for module in trained.values() for p in module.parameters() if p.requires_grad)
        log.info("LoRA: %d adapters of rank %d (%.1f M weights) on the frozen %s", count, rank, size / 1e6,
                 bundle.family.title)
        return trained

    @staticmethod
    def _adapt(module: nn.Module, names: list[str], settings: LoRASettings, device: torch.device,
               precision: Precision, config: Config) -> nn.Module:
        module.to(device, precision.frozen_dtype)
        add_adapters(module, names, settings)
        for layer in adapters(module).values():
            layer.down.to(device, weights_dtype(config))
            layer.up.to(device, weights_dtype(config))
        freeze_base(module)
        module.train()
        if checkpointing(config, device):
            enable = getattr(module, "enable_gradient_checkpointing", None) or module.gradient_checkpointing_enable
            enable()
        return module

    def folders(self, host: Host, config: Config) -> list[tuple[Path, str]]:
        folders = [(host.lora_path(config.project_name, 0).parent, "the trained LoRA")]
        if config.lora_save_merged:
            folders.append((host.checkpoint_path(config.project_name, 0).parent, "the merged model"))
        return folders

    def save(self, bundle: ModelBundle, config: Config, host: Host, saving: Saving) -> Saved:
        path = host.lora_path(config.project_name, saving.step)
        text_encoders = bundle.text_encoders if config.train_text_encoder else ()
        dtype = torch.float16 if config.save_precision == "fp16" else torch.float32
        tensors = lora_file_tensors(bundle.unet, bundle.unet_config, text_encoders,
                                    bundle.family.lora_text_prefixes[:len(text_encoders)], dtype,
                                    unet_state=saving.unet_state)
        cover = saving.cover.read_bytes() if saving.cover and saving.cover.is_file() else None
        metadata = lora_metadata(bundle, title=path.stem, steps=saving.step, config_json=saving.config_json,
                                 resolution=config.resolution, rank=config.lora_rank,
                                 alpha=config.lora_alpha or config.lora_rank, conv_rank=config.lora_conv_rank,
                                 num_images=saving.num_images,
                                 tag_frequency=saving.tag_frequency, started_at=saving.started_at,
                                 cover_image=cover, extra=saving.extra)
        metadata["sshs_model_hash"] = addnet_hash(tensors)
        _write(tensors, path, metadata, None, "the trained LoRA")
        host.publish_lora(path)
        saved = Saved(loras=[path])
        if config.lora_save_merged:
            merged_path = host.checkpoint_path(config.project_name, saving.step)
            merged = build_merged_checkpoint(bundle, bundle.unet, bundle.text_encoders if text_encoders else None,
                                             config.save_precision, unet_state=saving.unet_state)
            merged_metadata = checkpoint_metadata(bundle, title=merged_path.stem, steps=saving.step,
                                                  config_json=saving.config_json, resolution=config.resolution,
                                                  extra={**saving.extra, "dreambooth.lora": path.name})
            _write(merged, merged_path, merged_metadata, yaml_for_bundle(bundle), "the merged model")
            host.publish(merged_path)
            saved.checkpoints.append(merged_path)
        return saved


def _write(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str], yaml_text: str | None,
           what: str) -> None:
    try:
        save_checkpoint(tensors, path, metadata, yaml_text=yaml_text)
    except write_errors() as exc:
        raise output_error(exc, what, path) from exc


def trained_kind(config: Config) -> FullFineTune | LoRATraining:
    return LoRATraining() if config.train_mode == "lora" else FullFineTune()


def result_folders(host: Host, config: Config) -> list[Path]:
    """The folders the run's saves write its results to."""
    return [folder for folder, _ in trained_kind(config).folders(host, config)]
