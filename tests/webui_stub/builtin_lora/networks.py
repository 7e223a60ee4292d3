"""Stand-in for the `networks` module of the WebUI v1.10.1's built-in Lora extension (extensions-builtin/Lora),
re-implemented from its source for what a LoRA file meets there:

- `list_available_networks()`: the files under --lora-dir by name (file name without extension), each with its
  metadata, its alias (`ss_output_name`) and the family it is listed for (`ss_base_model_version` sdxl_*: SDXL;
  `ss_v2` "True": SD2; any other metadata: SD1; none: Unknown);
- `match(sd_model, tensors)`: how `load_network` pairs each key with a layer of the loaded model. The key is split at
  its first dot into a module name and a part; the name goes through `convert_diffusers_name_to_compvis`, then
  the fallbacks (`_q_proj`/`_k_proj`/`_v_proj` onto an OpenCLIP attention, `lora_unet` -> `diffusion_model`,
  `lora_te1_text_model` -> `0_transformer_text_model` or `transformer_text_model`), and is looked up among the
  names `assign_network_names_to_compvis_modules` gives the model's layers;
- `apply(sd_model, tensors, multiplier)`: what `network_apply_weights` adds to each layer (`lora_up @ lora_down`
  reshaped, times alpha / rank and the multiplier). An OpenCLIP attention (torch's MultiheadAttention: q, k, v in
  one `in_proj_weight`) is updated only when its q, k, v and out projections all matched; a layer inside it is
  never updated on its own (the host only patches layers whose forward runs).

Only kohya's plain LoRA module type (lora_up/lora_down/alpha) is re-implemented: a file with any other part fails
here, as it would match no module type in the host ("Could not find a module type").
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import torch
from modules import sd_models, shared

available_networks: dict[str, NetworkOnDisk] = {}
available_network_aliases: dict[str, NetworkOnDisk] = {}

_LORA_PARTS = ("lora_up.weight", "lora_down.weight", "alpha")
_DIGITS = re.compile(r"\d+")
_X_PROJ = re.compile(r"(.*)_([qkv]_proj)$")
_RESNET_SUFFIXES = {"conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0",
                    "norm2": "out_layers_0", "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}


class NetworkOnDisk:
    def __init__(self, name: str, filename: str):
        self.name = name
        self.filename = filename
        self.metadata = sd_models.read_metadata_from_safetensors(filename) if filename.endswith(".safetensors") else {}
        self.alias = self.metadata.get("ss_output_name", name)
        self.sd_version = self._version()

    def _version(self) -> str:
        if str(self.metadata.get("ss_base_model_version", "")).startswith("sdxl_"):
            return "SDXL"
        if str(self.metadata.get("ss_v2", "")) == "True":
            return "SD2"
        return "SD1" if self.metadata else "Unknown"


def list_available_networks() -> None:
    available_networks.clear()
    available_network_aliases.clear()
    os.makedirs(shared.cmd_opts.lora_dir, exist_ok=True)
    for root, _, files in os.walk(shared.cmd_opts.lora_dir, followlinks=True):
        for file in sorted(files):
            if os.path.splitext(file)[1].lower() not in (".pt", ".ckpt", ".safetensors") or file.startswith("."):
                continue
            name = os.path.splitext(file)[0]
            entry = NetworkOnDisk(name, os.path.join(root, file))
            available_networks[name] = entry
            available_network_aliases[name] = entry
            available_network_aliases[entry.alias] = entry


# ----------------------------------------------------------------------------------------------------------
# Names


def convert_diffusers_name_to_compvis(key: str, is_sd2: bool) -> str:
    def groups(pattern: str) -> list | None:
        found = re.match(pattern, key)
        return None if found is None else [int(g) if _DIGITS.match(g) else g for g in found.groups()]

    if (m := groups(r"lora_unet_conv_in(.*)")) is not None:
        return f"diffusion_model_input_blocks_0_0{m[0]}"
    if (m := groups(r"lora_unet_conv_out(.*)")) is not None:
        return f"diffusion_model_out_2{m[0]}"
    if (m := groups(r"lora_unet_time_embedding_linear_(\d+)(.*)")) is not None:
        return f"diffusion_model_time_embed_{m[0] * 2 - 2}{m[1]}"
    if (m := groups(r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)")) is not None:
        suffix = _RESNET_SUFFIXES.get(m[3], m[3]) if m[1] == "resnets" else m[3]
        return f"diffusion_model_input_blocks_{1 + m[0] * 3 + m[2]}_{1 if m[1] == 'attentions' else 0}_{suffix}"
    if (m := groups(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)")) is not None:
        suffix = _RESNET_SUFFIXES.get(m[2], m[2]) if m[0] == "resnets" else m[2]
        return f"diffusion_model_middle_block_{1 if m[0] == 'attentions' else m[1] * 2}_{suffix}"
    if (m := groups(r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)")) is not None:
        suffix = _RESNET_SUFFIXES.get(m[3], m[3]) if m[1] == "resnets" else m[3]
        return f"diffusion_model_output_blocks_{m[0] * 3 + m[2]}_{1 if m[1] == 'attentions' else 0}_{suffix}"
    if (m := groups(r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv")) is not None:
        return f"diffusion_model_input_blocks_{3 + m[0] * 3}_0_op"
    if (m := groups(r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv")) is not None:
        return f"diffusion_model_output_blocks_{2 + m[0] * 3}_{2 if m[0] > 0 else 1}_conv"
    if (m := groups(r"lora_te_text_model_encoder_layers_(\d+)_(.+)")) is not None:
        if is_sd2:
            return f"model_transformer_resblocks_{m[0]}_{_open_clip_part(m[1])}"
        return f"transformer_text_model_encoder_layers_{m[0]}_{m[1]}"
    if (m := groups(r"lora_te2_text_model_encoder_layers_(\d+)_(.+)")) is not None:
        return f"1_model_transformer_resblocks_{m[0]}_{_open_clip_part(m[1])}"
    return key


def _open_clip_part(part: str) -> str:
    if "mlp_fc1" in part:
        return part.replace("mlp_fc1", "mlp_c_fc")
    if "mlp_fc2" in part:
        return part.replace("mlp_fc2", "mlp_c_proj")
    return part.replace("self_attn", "attn")


def layer_names(sd_model) -> dict[str, torch.nn.Module]:
    """assign_network_names_to_compvis_modules: each text-encoder and UNet layer under its network name."""
    mapping: dict[str, torch.nn.Module] = {}
    if sd_model.is_sdxl:
        for i, embedder in enumerate(sd_model.conditioner.embedders):
            if hasattr(embedder, "wrapped"):
                for name, module in embedder.wrapped.named_modules():
                    mapping[f"{i}_{name.replace('.', '_')}"] = module
    else:
        text = getattr(sd_model.cond_stage_model, "wrapped", sd_model.cond_stage_model)
        for name, module in text.named_modules():
            mapping[name.replace(".", "_")] = module
    for name, module in sd_model.model.named_modules():
        mapping[name.replace(".", "_")] = module
    return mapping


# ----------------------------------------------------------------------------------------------------------
# Matching a file to the model, and applying it


@dataclass
class Match:
    layers: dict[str, tuple[torch.nn.Module, dict[str, torch.Tensor]]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # file key -> the name it was looked up as


def match(sd_model, tensors: dict[str, torch.Tensor]) -> Match:
    mapping = layer_names(sd_model)
    is_sd2 = "model_transformer_resblocks" in mapping
    found = Match()
    for file_key, weight in tensors.items():
        module_name, _, part = file_key.partition(".")
        key = convert_diffusers_name_to_compvis(module_name, is_sd2)
        layer = mapping.get(key)
        if layer is None and (x_proj := _X_PROJ.match(key)):
            layer = mapping.get(x_proj.group(1))
        if layer is None and "lora_unet" in module_name:
            key = module_name.replace("lora_unet", "diffusion_model")
            layer = mapping.get(key)
        elif layer is None and "lora_te1_text_model" in module_name:
            key = module_name.replace("lora_te1_text_model", "0_transformer_text_model")
            layer = mapping.get(key)
            if layer is None:
                key = module_name.replace("lora_te1_text_model", "transformer_text_model")
                layer = mapping.get(key)
        if layer is None:
            found.failed[file_key] = key
            continue
        found.layers.setdefault(key, (layer, {}))[1][part] = weight
    for _key, (_, parts) in found.layers.items():
        if not all(p in parts for p in ("lora_up.weight", "lora_down.weight")) or set(parts) - set(_LORA_PARTS):
            raise AssertionError(f"Could not find a module type that would accept those keys: {', '.join(parts)}")
    return found


def _updown(parts: dict[str, torch.Tensor], shape: torch.Size, multiplier: float) -> torch.Tensor:
    up, down = parts["lora_up.weight"].float(), parts["lora_down.weight"].float()
    rank = down.shape[0]
    scale = parts["alpha"].item() / rank if "alpha" in parts else 1.0
    return (up.reshape(up.shape[0], -1) @ down.reshape(rank, -1)).reshape(shape) * scale * multiplier


def apply(sd_model, tensors: dict[str, torch.Tensor], multiplier: float = 1.0) -> Match:
    """Add the LoRA to the model's weights in place, as a generation with <lora:name:multiplier> does."""
    found = match(sd_model, tensors)
    attentions = {name: layer for name, layer in layer_names(sd_model).items()
                  if "in_proj_weight" in layer._parameters}
    with torch.no_grad():
        for name, attention in attentions.items():
            parts = [found.layers.get(f"{name}_{p}") for p in ("q_proj", "k_proj", "v_proj", "out_proj")]
            if all(parts):
                weight = attention.in_proj_weight
                rows = weight.shape[0] // 3
                updown = torch.cat([_updown(p[1], (rows, weight.shape[1]), multiplier) for p in parts[:3]])
                weight.add_(updown.to(weight.dtype))
                out = attention.out_proj.weight
                out.add_(_updown(parts[3][1], out.shape, multiplier).to(out.dtype))
        for key, (layer, parts) in found.layers.items():
            inside_attention = any(key.startswith(f"{name}_") for name in attentions)
            if inside_attention or "weight" not in layer._parameters:
                continue  # applied with its attention above, or never (the host patches only running layers)
            layer.weight.add_(_updown(parts, layer.weight.shape, multiplier).to(layer.weight.dtype))
    return found
