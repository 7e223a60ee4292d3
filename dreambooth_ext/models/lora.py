"""LoRA: low-rank adapters on a frozen model, and the file the WebUI's built-in Lora extension loads.

A `LoRALayer` takes the place of a Linear or Conv2d and adds `up(down(x)) * alpha / rank` to its output; `down` is
initialised like a Linear, `up` with zeros, so training starts exactly at the base model.

The file (kohya's layout, which the WebUI v1.10.1 reads in extensions-builtin/Lora/networks.py): each key is
`<module>.lora_down.weight`, `<module>.lora_up.weight` or `<module>.alpha`, split by the WebUI at the first dot.
Module names are kohya's (sd-scripts networks/lora.py: the prefix plus the module's name in kohya's own model, dots
as underscores), so kohya's tools, which load a file by those names without converting them, find every module:
`lora_unet_<diffusers name>` for an SD1/SD2 UNet (kohya's library/original_unet.py has diffusers' module names),
`lora_unet_<ldm name>` for an SDXL one (its sdxl_original_unet.py has the ldm checkpoint's names), and
`<text prefix>_<Hugging Face name>` for the text encoders (`lora_te_` for SD1/SD2, `lora_te1_`/`lora_te2_` for
SDXL's two). The WebUI converts the SD1/SD2 names to its own with fixed block arithmetic and maps `lora_unet` to
its `diffusion_model` otherwise; an OpenCLIP attention is updated only when q, k, v and out projections are all
present, so all four are always trained together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .convert import UNET_PREFIX, unet_to_ldm

DOWN, UP, ALPHA = "lora_down.weight", "lora_up.weight", "alpha"
# Inside each of the UNet's transformer blocks: every projection of attention and feed-forward, and the
# block's proj_in/proj_out (kohya's default set); with conv adapters also its resnets' and samplers' 3x3 convs.
_UNET_BLOCKS = (".attentions.",)
_UNET_CONV_BLOCKS = (".resnets.", ".downsamplers.", ".upsamplers.")
# The text encoders' attention and MLP projections.
_TEXT_LEAVES = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


class LoRALayer(nn.Module):
    """base(x) + up(down(dropout(x))) * alpha / rank, for a frozen Linear or Conv2d `base`."""

    def __init__(self, base: nn.Linear | nn.Conv2d, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.rank, self.alpha = rank, float(alpha)
        if isinstance(base, nn.Conv2d):
            self.down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding, bias=False)
            self.up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        else:
            self.down = nn.Linear(base.in_features, rank, bias=False)
            self.up = nn.Linear(rank, base.out_features, bias=False)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)
        self.down.to(torch.float32)
        self.up.to(torch.float32)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dropout(x)
        if not _autocasting(h.device.type):  # under autocast, down casts its input itself (no fp32 copy of x)
            h = h.to(self.down.weight.dtype)
        out = self.base(x)
        # The sum keeps the base's dtype (under autocast the autocast dtype, even for a fp32 x), as the plain layer's
        # output would: attention refuses a bf16 query beside fp32 keys (on the CPU, torch before 2.2).
        return out + (self.up(self.down(h)) * self.scale).to(out.dtype)

    def delta(self) -> torch.Tensor:
        """scale * up @ down in the shape of the base weight (what merging adds to it)."""
        return delta_of(self, self.down.weight, self.up.weight)


def _autocasting(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch before 2.4 (the WebUI's 2.1): no device argument
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


def delta_of(layer: LoRALayer, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """What `layer` adds to its base weight with these adapter weights (e.g. averaged ones), in fp32."""
    product = up.detach().float().cpu().flatten(1) @ down.detach().float().cpu().flatten(1)
    return product.reshape(layer.base.weight.shape) * layer.scale


@dataclass(frozen=True)
class LoRASettings:
    rank: int
    alpha: float
    dropout: float = 0.0
    conv_rank: int = 0  # 0: no adapters on the UNet's 3x3 convolutions (they use alpha = conv_rank)


def unet_targets(unet: nn.Module, conv: bool) -> list[str]:
    """Module names of the UNet that get adapters: the Linear and 1x1 Conv layers of its transformer blocks, and
    with `conv` the 3x3 convolutions of its resnets, down- and upsamplers."""
    names = []
    for name, module in unet.named_modules():
        if any(part in name for part in _UNET_BLOCKS) and (isinstance(module, nn.Linear) or _is_1x1(module)):
            names.append(name)
        elif conv and any(part in name for part in _UNET_CONV_BLOCKS) and _is_3x3(module):
            names.append(name)
    return names


def text_targets(encoder: nn.Module) -> list[str]:
    return [name for name, module in encoder.named_modules()
            if isinstance(module, nn.Linear) and name.startswith("text_model.encoder.")
            and name.rsplit(".", 1)[-1] in _TEXT_LEAVES]


def _is_1x1(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and tuple(module.kernel_size) == (1, 1)


def _is_3x3(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and tuple(module.kernel_size) == (3, 3)


def add_adapters(module: nn.Module, names: list[str], settings: LoRASettings) -> None:
    """Replace each named layer with a LoRALayer around it (3x3 convolutions with the conv rank)."""
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        base = getattr(parent, leaf)
        conv = _is_3x3(base)
        rank = settings.conv_rank if conv else settings.rank
        alpha = rank if conv else settings.alpha
        setattr(parent, leaf, LoRALayer(base, rank, alpha, settings.dropout))


def adapters(module: nn.Module) -> dict[str, LoRALayer]:
    return {name: layer for name, layer in module.named_modules() if isinstance(layer, LoRALayer)}


def freeze_base(module: nn.Module) -> None:
    """Only the adapters train."""
    module.requires_grad_(False)
    for layer in adapters(module).values():
        layer.down.requires_grad_(True)
        layer.up.requires_grad_(True)


# ----------------------------------------------------------------------------------------------------------
# The WebUI's file


def unet_module_name(name: str, unet_config: dict) -> str:
    """The WebUI's (ldm) name of a diffusers UNet module, e.g. down_blocks.0.attentions.0.proj_in ->
    input_blocks.1.1.proj_in."""
    (key,) = unet_to_ldm({f"{name}.weight": torch.empty(0)}, unet_config)
    return key[len(UNET_PREFIX):-len(".weight")]


def unet_file_name(name: str, unet_config: dict) -> str:
    """kohya's name of the adapter on a diffusers UNet module: lora_unet_down_blocks_0_attentions_0_proj_in for
    SD1/SD2, lora_unet_input_blocks_1_1_proj_in for SDXL.

    A UNet without SD1/SD2's block layout (the tiny demo and test models) keeps the ldm name: kohya cannot train
    one, and the WebUI's conversion of diffusers names would put its adapters on the wrong layers."""
    if _is_sdxl(unet_config) or not _has_sd_block_layout(unet_config):
        name = unet_module_name(name, unet_config)
    return "lora_unet_" + name.replace(".", "_")


def _is_sdxl(unet_config: dict) -> bool:
    # SDXL's UNet is the one conditioned on the pooled text and the picture's sizes.
    return unet_config.get("addition_embed_type") == "text_time"


def _has_sd_block_layout(unet_config: dict) -> bool:
    """Whether the WebUI maps diffusers names onto this UNet's ldm blocks rightly. Its networks.py does it with
    SD1/SD2's arithmetic: three ldm blocks per level (two resnets per down level, three per up level), and each
    upsampler after one block in the first up level (no attention there) and after two in the others."""
    ups = unet_config["up_block_types"]
    with_upsampler = ups[:-1]  # the last up level has none
    return unet_config["layers_per_block"] == 2 and all(
        ("CrossAttn" in kind) == (level > 0) for level, kind in enumerate(with_upsampler))


def lora_file_tensors(unet: nn.Module, unet_config: dict, text_encoders: tuple[nn.Module, ...],
                      text_prefixes: tuple[str, ...], dtype: torch.dtype,
                      unet_state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Every adapter under kohya's name (see the module's docstring). `unet_state` (e.g. averaged weights, keyed
    like the UNet's state dict) replaces the UNet adapters' own weights when given."""
    state = unet_state if unet_state is not None else unet.state_dict()
    out: dict[str, torch.Tensor] = {}
    for name, layer in adapters(unet).items():
        _put(out, unet_file_name(name, unet_config), layer, state[f"{name}.down.weight"],
             state[f"{name}.up.weight"], dtype)
    for encoder, prefix in zip(text_encoders, text_prefixes, strict=True):
        for name, layer in adapters(encoder).items():
            _put(out, f"{prefix}_{name.replace('.', '_')}", layer, layer.down.weight, layer.up.weight, dtype)
    return out


def _put(out: dict[str, torch.Tensor], module: str, layer: LoRALayer, down: torch.Tensor, up: torch.Tensor,
         dtype: torch.dtype) -> None:
    out[f"{module}.{DOWN}"] = down.detach().to("cpu", dtype).contiguous()
    out[f"{module}.{UP}"] = up.detach().to("cpu", dtype).contiguous()
    out[f"{module}.{ALPHA}"] = torch.tensor(layer.alpha, dtype=dtype)
