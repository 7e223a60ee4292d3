"""Between the WebUI's (ldm) checkpoint layout and diffusers/transformers modules.

Sizes are read off tensor shapes, so a tiny test model and a real SD1.5/SD2.1 checkpoint take the same path.
ldm -> modules uses diffusers' own single-file helpers; modules -> ldm is ours, written as explicit prefix
tables, and the pair is exact: every tensor the forward direction consumed comes back bit for bit.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import torch

from ..errors import DreamboothError, MissingFeatureError
from .family import UNET_PREFIX, Family

logger = logging.getLogger(__name__)

VAE_PREFIX = "first_stage_model."
DIFFUSERS_RANGE = "diffusers>=0.27,<0.36"
_POSITION_IDS = "text_model.embeddings.position_ids"

_RESNET_TO_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
                  "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_VAE_RESNET_TO_LDM = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION_TO_LDM = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_OPEN_CLIP_LAYER_TO_LDM = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                           "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_OPEN_CLIP_TOP_TO_LDM = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}


def _helpers() -> Any:
    """diffusers' single-file conversion module, checked for the functions we call."""
    names = ("convert_ldm_unet_checkpoint", "convert_ldm_vae_checkpoint", "convert_open_clip_checkpoint")
    try:
        from diffusers.loaders import single_file_utils
    except ImportError as exc:
        raise MissingFeatureError(f"diffusers' checkpoint conversion could not be imported ({exc}); install "
                                  f"{DIFFUSERS_RANGE}") from exc
    missing = [n for n in names if not hasattr(single_file_utils, n)]
    if missing:
        import diffusers

        raise MissingFeatureError(f"diffusers {diffusers.__version__} lacks {', '.join(missing)}; install "
                                  f"{DIFFUSERS_RANGE}")
    return single_file_utils


def _sub(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _indices(keys: Any, pattern: str) -> list[int]:
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return sorted(found)


def _need(sd: dict[str, torch.Tensor], key: str, what: str) -> torch.Tensor:
    if key not in sd:
        raise DreamboothError(f"The checkpoint's {what} is missing {key!r}, so its layout cannot be read; the file "
                              "may be damaged or an unsupported variant: pick a standard SD 1.x, 2.x or SDXL "
                              "checkpoint")
    return sd[key]


# ----------------------------------------------------------------------------------------------------------
# Configs (shared by the shape inference below and tiny.py, so both always agree)


def make_unet_config(*, family: Family, block_out_channels: tuple[int, ...], layers_per_block: int,
                     attention_levels: tuple[bool, ...], cross_attention_dim: int, in_channels: int = 4,
                     out_channels: int = 4, use_linear_projection: bool | None = None,
                     transformer_layers_per_block: int | tuple[int, ...] = 1, sample_size: int = 64,
                     added_input_dim: int | None = None) -> dict:
    """A UNet2DConditionModel config in diffusers' naming (`attention_head_dim` there means heads per level);
    the family adds what shapes do not show. `added_input_dim`: the width of the extra conditioning vector
    (SDXL's pooled text embedding and size/crop embeddings), None for UNets without one."""
    attention = family.unet_attention(tuple(block_out_channels))
    if added_input_dim is not None:
        attention.update(family.unet_added_conditioning(added_input_dim))
    if use_linear_projection is None:
        use_linear_projection = attention["use_linear_projection"]
    config = {
        "sample_size": sample_size,
        "in_channels": in_channels,
        "out_channels": out_channels,
        "down_block_types": tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention_levels),
        "up_block_types": tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention_levels)),
        "block_out_channels": tuple(block_out_channels),
        "layers_per_block": layers_per_block,
        "cross_attention_dim": cross_attention_dim,
        "use_linear_projection": use_linear_projection,
        "transformer_layers_per_block": (transformer_layers_per_block if isinstance(transformer_layers_per_block, int)
                                         else tuple(transformer_layers_per_block)),
        "norm_num_groups": 32,
    }
    config.update({k: v for k, v in attention.items() if k != "use_linear_projection"})
    return config


def make_vae_config(*, family: Family, block_out_channels: tuple[int, ...], layers_per_block: int,
                    latent_channels: int, in_channels: int = 3, out_channels: int = 3) -> dict:
    """An AutoencoderKL config of the SD VAE's shape."""
    return {
        "in_channels": in_channels,
        "out_channels": out_channels,
        "down_block_types": ("DownEncoderBlock2D",) * len(block_out_channels),
        "up_block_types": ("UpDecoderBlock2D",) * len(block_out_channels),
        "block_out_channels": tuple(block_out_channels),
        "layers_per_block": layers_per_block,
        "latent_channels": latent_channels,
        "norm_num_groups": 32,
        "sample_size": 512,
        "scaling_factor": family.vae_scaling_factor,
    }


def make_text_encoder_config(*, vocab_size: int, hidden_size: int, max_position_embeddings: int,
                             intermediate_size: int, num_hidden_layers: int, hidden_act: str) -> Any:
    """A transformers CLIPTextConfig: OpenAI CLIP uses quick_gelu (and pads with <|endoftext|>), OpenCLIP gelu
    (and pads with id 0)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, max_position_embeddings=max_position_embeddings,
        intermediate_size=intermediate_size, num_hidden_layers=num_hidden_layers,
        num_attention_heads=max(1, hidden_size // 64), hidden_act=hidden_act,
        # diffusers splits OpenCLIP's fused q/k/v by projection_dim when no text_projection is given.
        projection_dim=hidden_size, layer_norm_eps=1e-5,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407 if hidden_act == "quick_gelu" else 0)


# ----------------------------------------------------------------------------------------------------------
# Shape inference


def unet_config_from_ldm(sd: dict[str, torch.Tensor], family: Family) -> dict:
    """The UNet2DConditionModel config of the checkpoint's UNet, read off its tensor shapes."""
    unet = _sub(sd, UNET_PREFIX)
    what = "UNet"
    conv_in = _need(unet, "input_blocks.0.0.weight", what)
    inputs = _indices(unet, r"input_blocks\.(\d+)\.")
    if not inputs:
        raise DreamboothError("The checkpoint has no UNet input blocks; pick a full SD 1.x, 2.x or SDXL checkpoint")
    num_inputs = inputs[-1] + 1
    levels = len([i for i in inputs if f"input_blocks.{i}.0.op.weight" in unet]) + 1
    per_level, rest = divmod(num_inputs - 1 - (levels - 1), levels)
    if rest or per_level < 1:
        raise DreamboothError(f"The checkpoint's UNet has {num_inputs} input blocks over {levels} levels, which is "
                              "not a Stable Diffusion UNet; pick a standard SD 1.x, 2.x or SDXL checkpoint")
    block_out, attention = [], []
    for level in range(levels):
        first = 1 + level * (per_level + 1)
        block_out.append(int(_need(unet, f"input_blocks.{first}.0.out_layers.3.weight", what).shape[0]))
        attention.append(f"input_blocks.{first}.1.proj_in.weight" in unet)
    to_k = [v for k, v in unet.items() if k.endswith("attn2.to_k.weight")]
    proj_in = [v for k, v in unet.items() if k.endswith(".proj_in.weight")]
    if not to_k or not proj_in:
        raise DreamboothError("The checkpoint's UNet has no cross-attention, so it cannot follow prompts; pick a "
                              "text-to-image SD 1.x, 2.x or SDXL checkpoint")
    depths = tuple(max(1, len(_indices(unet, rf"input_blocks\.{1 + level * (per_level + 1)}\.1\."
                                                r"transformer_blocks\.(\d+)\."))) for level in range(levels))
    added = unet.get("label_emb.0.0.weight")
    return make_unet_config(
        family=family, block_out_channels=tuple(block_out), layers_per_block=per_level,
        attention_levels=tuple(attention), cross_attention_dim=int(to_k[0].shape[1]),
        in_channels=int(conv_in.shape[1]), out_channels=int(_need(unet, "out.2.weight", what).shape[0]),
        use_linear_projection=proj_in[0].ndim == 2,
        # One depth for all levels when they agree (SD1/SD2), else each level's (SDXL: 0/2/10 blocks).
        transformer_layers_per_block=depths[0] if len(set(depths)) == 1 else depths,
        added_input_dim=int(added.shape[1]) if added is not None else None)


def vae_config_from_ldm(sd: dict[str, torch.Tensor], family: Family) -> dict:
    """The AutoencoderKL config of the checkpoint's VAE, read off its tensor shapes."""
    vae = _sub(sd, VAE_PREFIX)
    what = "VAE"
    levels = _indices(vae, r"encoder\.down\.(\d+)\.")
    if not levels:
        raise DreamboothError("The checkpoint has no VAE (first_stage_model.encoder.*); pick a full checkpoint or "
                              "give a separate VAE file")
    block_out = tuple(int(_need(vae, f"encoder.down.{i}.block.0.conv2.weight", what).shape[0]) for i in levels)
    return make_vae_config(
        family=family, block_out_channels=block_out,
        layers_per_block=len(_indices(vae, r"encoder\.down\.0\.block\.(\d+)\.")),
        latent_channels=int(_need(vae, "post_quant_conv.weight", what).shape[0]),
        in_channels=int(_need(vae, "encoder.conv_in.weight", what).shape[1]),
        out_channels=int(_need(vae, "decoder.conv_out.weight", what).shape[0]))


def clip_config_from_ldm(sd: dict[str, torch.Tensor], prefix: str, hidden_act: str) -> Any:
    """The CLIPTextConfig of a text encoder stored in Hugging Face's layout under `prefix` (OpenAI CLIP)."""
    what = "text encoder"
    text = _sub(sd, prefix + "text_model.")
    tokens = _need(text, "embeddings.token_embedding.weight", what)
    return make_text_encoder_config(
        vocab_size=int(tokens.shape[0]), hidden_size=int(tokens.shape[1]),
        max_position_embeddings=int(_need(text, "embeddings.position_embedding.weight", what).shape[0]),
        intermediate_size=int(_need(text, "encoder.layers.0.mlp.fc1.weight", what).shape[0]),
        num_hidden_layers=len(_indices(text, r"encoder\.layers\.(\d+)\.")), hidden_act=hidden_act)


def open_clip_config_from_ldm(sd: dict[str, torch.Tensor], prefix: str, skip_last_layer: bool) -> Any:
    """The CLIPTextConfig of an OpenCLIP text encoder under `prefix` (all but its last layer when it is unused)."""
    what = "text encoder"
    text = _sub(sd, prefix)
    tokens = _need(text, "token_embedding.weight", what)
    blocks = len(_indices(text, r"transformer\.resblocks\.(\d+)\."))
    if blocks < 1 + skip_last_layer:
        raise DreamboothError(f"The checkpoint's OpenCLIP text encoder has {blocks} layer(s); the penultimate one is "
                              "used, so it needs at least 2: pick a standard checkpoint")
    return make_text_encoder_config(
        vocab_size=int(tokens.shape[0]), hidden_size=int(tokens.shape[1]),
        max_position_embeddings=int(_need(text, "positional_embedding", what).shape[0]),
        intermediate_size=int(_need(text, "transformer.resblocks.0.mlp.c_fc.weight", what).shape[0]),
        num_hidden_layers=blocks - skip_last_layer, hidden_act="gelu")


# ----------------------------------------------------------------------------------------------------------
# ldm -> modules


def _empty(cls: Any, *args: Any, **kwargs: Any) -> Any:
    """A module built on the meta device: no memory, no random initialisation (its weights come next)."""
    with torch.device("meta"):
        return cls(*args, **kwargs)


def _load_exact(module: torch.nn.Module, state_dict: dict[str, torch.Tensor], what: str,
                optional: tuple[str, ...] = (), *, as_stored: bool = False) -> None:
    """Give a module built by `_empty` the checkpoint's tensors as its weights: fp32 ones (taken as they are, no
    copy, where they are fp32 already), or with `as_stored` the tensors themselves in the checkpoint's precision.
    Missing and unexpected weights are refused; `optional` keys may be absent on either side (a buffer left out
    is made the way the module makes it)."""
    own = module.state_dict().keys()
    state_dict = {k: v for k, v in state_dict.items() if k not in optional}
    none = [k for k, v in state_dict.items() if v is None]
    missing = sorted(k for k in own - state_dict.keys() if k not in optional)
    unexpected = sorted(state_dict.keys() - own)
    if none or missing or unexpected:
        raise DreamboothError(f"The checkpoint's {what} does not match the layout read from it (missing: "
                              f"{(missing + none)[:5]}, unexpected: {unexpected[:5]}); the file may be damaged or an "
                              "unsupported variant: pick a standard SD 1.x, 2.x or SDXL checkpoint")
    if not as_stored:
        state_dict = {k: (v.float() if v.is_floating_point() else v) for k, v in state_dict.items()}
    try:
        module.load_state_dict(state_dict, strict=False, assign=True)
    except RuntimeError as exc:  # size mismatches
        raise DreamboothError(f"The checkpoint's {what} weights have unexpected shapes ({exc}); pick a standard "
                              "SD 1.x, 2.x or SDXL checkpoint") from exc
    _materialize_left_out(module)


def _materialize_left_out(module: torch.nn.Module) -> None:
    """Buffers the checkpoint did not give (a text encoder's position_ids) are made as the module makes them."""
    for name, buffer in list(module.named_buffers()):
        if not buffer.is_meta:
            continue
        if not name.endswith("position_ids"):
            raise DreamboothError(f"The checkpoint gives no value for {name}; the file may be damaged or an "
                                  "unsupported variant")
        owner = module.get_submodule(name.rpartition(".")[0])
        persistent = name.rpartition(".")[2] not in owner._non_persistent_buffers_set
        owner.register_buffer("position_ids", torch.arange(buffer.shape[-1]).expand(buffer.shape).clone(),
                              persistent=persistent)


def unet_from_ldm(sd: dict[str, torch.Tensor], family: Family) -> Any:
    """The checkpoint's UNet as a fp32 CPU diffusers UNet2DConditionModel."""
    from diffusers import UNet2DConditionModel

    config = unet_config_from_ldm(sd, family)
    unet = _empty(UNet2DConditionModel, **config)
    _load_exact(unet, _helpers().convert_ldm_unet_checkpoint(sd, config), "UNet")
    return unet.eval()


def vae_from_ldm(sd: dict[str, torch.Tensor], family: Family, *, as_stored: bool = False) -> Any:
    """The checkpoint's VAE as a fp32 CPU diffusers AutoencoderKL (with its family's latent scale); `as_stored`:
    in the checkpoint's own precision, sharing its tensors."""
    from diffusers import AutoencoderKL

    config = vae_config_from_ldm(sd, family)
    vae = _empty(AutoencoderKL, **config)
    # The helper wants the prefix; passing only the VAE's keys keeps it from scanning the whole checkpoint.
    only_vae = {k: v for k, v in sd.items() if k.startswith(VAE_PREFIX)}
    _load_exact(vae, _helpers().convert_ldm_vae_checkpoint(only_vae, config), "VAE", as_stored=as_stored)
    return vae.eval()


def clip_from_ldm(sd: dict[str, torch.Tensor], prefix: str, hidden_act: str, *, as_stored: bool = False) -> Any:
    """A text encoder stored in Hugging Face's layout under `prefix`, as a fp32 CPU CLIPTextModel (`as_stored`: in
    the checkpoint's own precision, sharing its tensors)."""
    from transformers import CLIPTextModel

    model = _empty(CLIPTextModel, clip_config_from_ldm(sd, prefix, hidden_act))
    converted = _sub(sd, prefix)  # the layout is Hugging Face's own: only the prefix goes
    # position_ids is a buffer (persistent in some transformers versions, not in others) and some old SD1 files
    # hold a damaged float copy of it: the model's own fresh arange is always the right value.
    _load_exact(model, converted, "text encoder", optional=(_POSITION_IDS,), as_stored=as_stored)
    return model.eval()


def open_clip_from_ldm(sd: dict[str, torch.Tensor], prefix: str, *, skip_last_layer: bool,
                       projection: bool = False, as_stored: bool = False) -> Any:
    """An OpenCLIP text encoder stored under `prefix`, as a fp32 CPU CLIPTextModel (without its last layer when
    the family conditions on the penultimate one), or a CLIPTextModelWithProjection with its `text_projection`
    when the family uses the pooled, projected embedding too (SDXL); `as_stored` as for `clip_from_ldm`."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    config = open_clip_config_from_ldm(sd, prefix, skip_last_layer)
    used = _open_clip_used(sd, prefix, config.num_hidden_layers)
    if projection:
        config.projection_dim = int(_need(sd, prefix + "text_projection", "text encoder").shape[1])
        used[prefix + "text_projection"] = sd[prefix + "text_projection"]
    model = _empty(CLIPTextModelWithProjection if projection else CLIPTextModel, config)
    converted = _helpers().convert_open_clip_checkpoint(model, used, prefix=prefix)
    _load_exact(model, converted, "text encoder", optional=(_POSITION_IDS,), as_stored=as_stored)
    return model.eval()


def _open_clip_used(sd: dict[str, torch.Tensor], prefix: str, layers: int) -> dict[str, torch.Tensor]:
    """The OpenCLIP keys the text encoder takes: embeddings, ln_final and the first `layers` blocks."""
    used = {}
    block = re.compile(re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.")
    for key, value in sd.items():
        if not key.startswith(prefix):
            continue
        match = block.match(key)
        if match and int(match.group(1)) >= layers:
            continue
        if key[len(prefix):] in ("text_projection", "logit_scale"):
            continue
        used[key] = value
    return used


# ----------------------------------------------------------------------------------------------------------
# modules -> ldm (ours)


def _map_by_prefix(state_dict: dict[str, torch.Tensor], table: dict[str, tuple[str, Any]], what: str,
                   skip: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Rename each key by its longest listed prefix; `table[prefix] = (ldm_prefix, rename(rest, tensor))`."""
    out = {}
    for key, value in state_dict.items():
        if key.endswith(skip):
            continue
        parts = key.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            prefix = ".".join(parts[:cut])
            if prefix in table:
                ldm_prefix, rename = table[prefix]
                rest, value = rename(".".join(parts[cut:]), value)
                out[f"{ldm_prefix}.{rest}"] = value
                break
        else:
            raise DreamboothError(f"The {what} has a weight {key!r} that has no place in a WebUI checkpoint; it is "
                                  "not a Stable Diffusion model of a supported layout")
    return out


def _same(rest: str, value: torch.Tensor) -> tuple[str, torch.Tensor]:
    return rest, value


def _renamer(names: dict[str, str]) -> Any:
    def rename(rest: str, value: torch.Tensor) -> tuple[str, torch.Tensor]:
        head, _, tail = rest.rpartition(".")
        return f"{names.get(head, head)}.{tail}", value
    return rename


def _vae_attention(rest: str, value: torch.Tensor) -> tuple[str, torch.Tensor]:
    head, _, tail = rest.rpartition(".")
    if head not in _VAE_ATTENTION_TO_LDM:
        raise DreamboothError(f"Unexpected VAE attention weight {rest!r}; the VAE is not of a supported layout")
    if tail == "weight" and head != "group_norm":
        value = value.reshape(*value.shape, 1, 1)  # ldm's VAE attention uses 1x1 convolutions, diffusers Linear
    return f"{_VAE_ATTENTION_TO_LDM[head]}.{tail}", value


def _unet_table(config: dict) -> dict[str, tuple[str, Any]]:
    resnet, same = _renamer(_RESNET_TO_LDM), _same
    n = config["layers_per_block"]
    levels = len(config["block_out_channels"])
    down_attn = [t.startswith("CrossAttn") for t in config["down_block_types"]]
    up_attn = [t.startswith("CrossAttn") for t in config["up_block_types"]]
    table = {"time_embedding.linear_1": ("time_embed.0", same), "time_embedding.linear_2": ("time_embed.2", same),
             "add_embedding.linear_1": ("label_emb.0.0", same), "add_embedding.linear_2": ("label_emb.0.2", same),
             "conv_in": ("input_blocks.0.0", same), "conv_norm_out": ("out.0", same), "conv_out": ("out.2", same),
             "mid_block.resnets.0": ("middle_block.0", resnet), "mid_block.attentions.0": ("middle_block.1", same),
             "mid_block.resnets.1": ("middle_block.2", resnet)}
    for level in range(levels):
        for j in range(n):
            i = 1 + level * (n + 1) + j
            table[f"down_blocks.{level}.resnets.{j}"] = (f"input_blocks.{i}.0", resnet)
            if down_attn[level]:
                table[f"down_blocks.{level}.attentions.{j}"] = (f"input_blocks.{i}.1", same)
        if level < levels - 1:
            table[f"down_blocks.{level}.downsamplers.0.conv"] = (f"input_blocks.{1 + level * (n + 1) + n}.0.op", same)
    for up in range(levels):
        for j in range(n + 1):
            i = up * (n + 1) + j
            table[f"up_blocks.{up}.resnets.{j}"] = (f"output_blocks.{i}.0", resnet)
            if up_attn[up]:
                table[f"up_blocks.{up}.attentions.{j}"] = (f"output_blocks.{i}.1", same)
        if up < levels - 1:
            # ldm puts the upsampler after the attention when the level has one.
            slot = 2 if up_attn[up] else 1
            table[f"up_blocks.{up}.upsamplers.0.conv"] = (f"output_blocks.{up * (n + 1) + n}.{slot}.conv", same)
    return table


def unet_to_ldm(state_dict: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """A diffusers UNet state dict -> `model.diffusion_model.*` keys of the WebUI layout."""
    mapped = _map_by_prefix(state_dict, _unet_table(config), "UNet")
    return {UNET_PREFIX + k: v for k, v in mapped.items()}


def _vae_table(config: dict) -> dict[str, tuple[str, Any]]:
    resnet, same = _renamer(_VAE_RESNET_TO_LDM), _same
    levels = len(config["block_out_channels"])
    n = config["layers_per_block"]
    table = {"quant_conv": ("quant_conv", same), "post_quant_conv": ("post_quant_conv", same)}
    for part in ("encoder", "decoder"):
        table[f"{part}.conv_in"] = (f"{part}.conv_in", same)
        table[f"{part}.conv_out"] = (f"{part}.conv_out", same)
        table[f"{part}.conv_norm_out"] = (f"{part}.norm_out", same)
        table[f"{part}.mid_block.resnets.0"] = (f"{part}.mid.block_1", resnet)
        table[f"{part}.mid_block.resnets.1"] = (f"{part}.mid.block_2", resnet)
        table[f"{part}.mid_block.attentions.0"] = (f"{part}.mid.attn_1", _vae_attention)
    for level in range(levels):
        for j in range(n):
            table[f"encoder.down_blocks.{level}.resnets.{j}"] = (f"encoder.down.{level}.block.{j}", resnet)
        table[f"encoder.down_blocks.{level}.downsamplers.0.conv"] = (f"encoder.down.{level}.downsample.conv", same)
        # diffusers counts decoder levels from the bottom up, ldm from the top down.
        ldm_level = levels - 1 - level
        for j in range(n + 1):
            table[f"decoder.up_blocks.{level}.resnets.{j}"] = (f"decoder.up.{ldm_level}.block.{j}", resnet)
        table[f"decoder.up_blocks.{level}.upsamplers.0.conv"] = (f"decoder.up.{ldm_level}.upsample.conv", same)
    return table


def vae_to_ldm(state_dict: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL state dict -> `first_stage_model.*` keys of the WebUI layout."""
    mapped = _map_by_prefix(state_dict, _vae_table(config), "VAE")
    return {VAE_PREFIX + k: v for k, v in mapped.items()}


def clip_to_ldm(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A CLIPTextModel state dict -> the Hugging Face layout under `prefix` (SD1's cond_stage_model.transformer.)."""
    return {prefix + k: v for k, v in state_dict.items() if not k.endswith("position_ids")}


def open_clip_to_ldm(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A CLIPTextModel(WithProjection) state dict -> OpenCLIP's layout under `prefix` (SD2's cond_stage_model.model.,
    SDXL's conditioner.embedders.1.model.)."""
    params = {k: v for k, v in state_dict.items() if not k.endswith("position_ids")}
    out: dict[str, torch.Tensor] = {}
    if "text_projection.weight" in params:  # OpenCLIP multiplies by the matrix, transformers' Linear by its transpose
        out[prefix + "text_projection"] = params.pop("text_projection.weight").T.contiguous()
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    layer = re.compile(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
    for key, value in params.items():
        if key in _OPEN_CLIP_TOP_TO_LDM:
            out[prefix + _OPEN_CLIP_TOP_TO_LDM[key]] = value
            continue
        match = layer.match(key)
        if not match:
            raise DreamboothError(f"The text encoder has a weight {key!r} that has no place in an OpenCLIP layout")
        index, name, kind = int(match.group(1)), match.group(2), match.group(3)
        block = f"{prefix}transformer.resblocks.{index}."
        if name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            qkv.setdefault((index, kind), {})[name[-6]] = value
        elif name in _OPEN_CLIP_LAYER_TO_LDM:
            out[f"{block}{_OPEN_CLIP_LAYER_TO_LDM[name]}.{kind}"] = value
        else:
            raise DreamboothError(f"The text encoder has a weight {key!r} that has no place in an OpenCLIP layout")
    for (index, kind), parts in sorted(qkv.items()):
        # OpenCLIP keeps q, k and v as one fused projection, in that order.
        out[f"{prefix}transformer.resblocks.{index}.attn.in_proj_{kind}"] = torch.cat(
            [parts["q"], parts["k"], parts["v"]], dim=0)
    return out
