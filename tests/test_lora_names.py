"""A LoRA file's module names are the ones kohya's sd-scripts give (networks/lora.py), for SD1, SD2 and SDXL, and
the WebUI's built-in Lora extension (the stand-in, re-implemented from v1.10.1's networks.py) puts every adapter
on the layer the engine trained.

kohya's naming is re-implemented here from its source, apart from the engine's code: `LoRANetwork.create_modules`
walks the model's modules; inside each module whose class is a target, every Linear and Conv2d gets the adapter
named `prefix + "." + module name + "." + child name` with dots as underscores. Targets: the UNet's
Transformer2DModel (plain LoRA: Linear and 1x1 Conv2d get the network's rank), with `conv_dim` also its
ResnetBlock2D, Downsample2D and Upsample2D (3x3 Conv2d get conv_dim); the text encoders' CLIPAttention,
CLIPSdpaAttention and CLIPMLP. Prefixes: lora_unet, lora_te (SD1/SD2), lora_te1 and lora_te2 (SDXL).

The module names are those of kohya's own models. Its SD1/SD2 UNet (library/original_unet.py) has diffusers'
module and class names, so a diffusers UNet is walked; its SDXL UNet (library/sdxl_original_unet.py) loads the
checkpoint's `model.diffusion_model.*` tensors under their own (ldm) names, so its tree is rebuilt from those keys
with its classes; its text encoders are transformers' CLIP models, as the engine's are.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from dreambooth_ext.models.bundle import load_bundle
from dreambooth_ext.models.convert import make_unet_config, unet_to_ldm
from dreambooth_ext.models.export import build_merged_checkpoint
from dreambooth_ext.models.family import UNET_PREFIX, family_named, normalize_keys
from dreambooth_ext.models.lora import (
    LoRASettings,
    adapters,
    add_adapters,
    lora_file_tensors,
    text_targets,
    unet_targets,
)
from dreambooth_ext.models.tiny import TINY_WIDTH, tiny_checkpoint

pytest_plugins = ("webui_stub.fixtures",)

KOHYA_UNET_TARGETS = ("Transformer2DModel",)
KOHYA_CONV_TARGETS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
KOHYA_TEXT_TARGETS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")
PARTS = {"lora_down.weight", "lora_up.weight", "alpha"}
# The models: SD1 and SD2 in their real block layout (two resnets per down level, attention on all levels but the
# lowest), which kohya's UNet has and the WebUI's name conversion assumes; SDXL and the default tiny SD1 (one
# resnet per level, attention everywhere: a layout kohya cannot train) as the engine's tiny models are.
MODELS = ("sd1", "sd2", "sdxl", "sd1-tiny-layout")


def sd_layout_checkpoint(family: str) -> tuple[dict[str, torch.Tensor], nn.Module]:
    """A tiny SD1/SD2 checkpoint whose UNet has SD's block layout, and that UNet as a diffusers module."""
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        unet = UNet2DConditionModel(**make_unet_config(
            family=family_named(family), block_out_channels=(TINY_WIDTH, 2 * TINY_WIDTH, 2 * TINY_WIDTH),
            layers_per_block=2, attention_levels=(True, True, False), cross_attention_dim=TINY_WIDTH))
    checkpoint = {k: v for k, v in tiny_checkpoint(family, seed=3).items() if not k.startswith(UNET_PREFIX)}
    checkpoint.update(unet_to_ldm(unet.state_dict(), dict(unet.config)))
    return checkpoint, unet


@functools.cache
def model(name: str) -> tuple[str, dict[str, torch.Tensor], nn.Module | None]:
    """(family, checkpoint, kohya's UNet when it is a diffusers one)."""
    if name in ("sd1", "sd2"):
        return (name, *sd_layout_checkpoint(name))
    family = name.split("-")[0]
    return family, tiny_checkpoint(family, seed=3), None


def engine_file(checkpoint: dict[str, torch.Tensor]):
    """The bundle with LoCon adapters (3x3 convs too) on its UNet and both text encoders, made non-zero, and the
    LoRA file's tensors for it, as a run with lora_conv_rank > 0 and train_text_encoder writes them."""
    bundle = load_bundle(checkpoint)
    settings = LoRASettings(rank=4, alpha=8, conv_rank=2)
    add_adapters(bundle.unet, unet_targets(bundle.unet, conv=True), settings)
    for encoder in bundle.text_encoders:
        add_adapters(encoder, text_targets(encoder), settings)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for module in (bundle.unet, *bundle.text_encoders):
            for layer in adapters(module).values():
                layer.up.weight.copy_(torch.randn(layer.up.weight.shape, generator=generator) * 0.1)
    prefixes = bundle.family.lora_text_prefixes
    return bundle, lora_file_tensors(bundle.unet, bundle.unet_config, bundle.text_encoders, prefixes, torch.float32)


# ----------------------------------------------------------------------------------------------------------
# kohya's naming


def kohya_names(prefix: str, root: nn.Module, targets: tuple[str, ...]) -> dict[str, bool]:
    """LoRANetwork.create_modules: every adapter name it creates under `root`, each with whether it is a 3x3 (a
    conv_dim) adapter."""
    names = {}
    for name, module in root.named_modules():
        if type(module).__name__ not in targets:
            continue
        for child_name, child in module.named_modules():
            kind = type(child).__name__
            if kind in ("Linear", "Conv2d"):
                lora_name = f"{prefix}.{name}.{child_name}".replace(".", "_")
                names[lora_name] = kind == "Conv2d" and tuple(child.kernel_size) != (1, 1)
    return names


def kohya_sdxl_unet(checkpoint: dict[str, torch.Tensor]) -> nn.Module:
    """kohya's SdxlUNet2DConditionModel, as far as names and classes go: the checkpoint's UNet tensors under their
    own names, Linear (2-D weights) and Conv2d (4-D) on meta, each block with kohya's class, known by its children
    (ResnetBlock2D: in_layers, emb_layers, out_layers, skip_connection; Transformer2DModel: proj_in,
    transformer_blocks, proj_out; Downsample2D: op; Upsample2D: conv)."""
    root = nn.Module()
    for key, tensor in checkpoint.items():
        if not (key.startswith(UNET_PREFIX) and key.endswith(".weight")) or tensor.ndim not in (2, 4):
            continue  # the norms' weights
        *path, leaf = key[len(UNET_PREFIX):-len(".weight")].split(".")
        parent = root
        for part in path:
            if part not in parent._modules:
                parent.add_module(part, nn.Module())
            parent = parent._modules[part]
        out_features, in_features = tensor.shape[:2]
        parent.add_module(leaf, nn.Linear(in_features, out_features, device="meta") if tensor.ndim == 2 else
                          nn.Conv2d(in_features, out_features, tuple(tensor.shape[2:]), device="meta"))
    kinds = {"in_layers": "ResnetBlock2D", "proj_in": "Transformer2DModel", "op": "Downsample2D",
             "conv": "Upsample2D"}
    classes = {name: type(name, (nn.Module,), {}) for name in kinds.values()}
    for module in root.modules():
        for child, kind in kinds.items():
            if child in module._modules and type(module) is nn.Module:
                module.__class__ = classes[kind]
    return root


def kohya_network(checkpoint: dict[str, torch.Tensor], unet: nn.Module | None) -> dict[str, bool]:
    """Every name kohya's LoRANetwork creates for this model with conv_dim set (UNet and text encoders)."""
    kohya_unet = unet if unet is not None else kohya_sdxl_unet(checkpoint)
    names = kohya_names("lora_unet", kohya_unet, KOHYA_UNET_TARGETS + KOHYA_CONV_TARGETS)
    encoders = load_bundle(checkpoint).text_encoders
    prefixes = ["lora_te"] if len(encoders) == 1 else ["lora_te1", "lora_te2"]
    for prefix, encoder in zip(prefixes, encoders, strict=True):
        names.update(kohya_names(prefix, encoder, KOHYA_TEXT_TARGETS))
    return names


def modules_of(tensors: dict[str, torch.Tensor]) -> set[str]:
    return {key.split(".", 1)[0] for key in tensors}


# ----------------------------------------------------------------------------------------------------------


EXAMPLES = {
    "sd1": ("lora_unet_down_blocks_0_attentions_0_proj_in", "lora_unet_up_blocks_1_upsamplers_0_conv",
            "lora_unet_down_blocks_1_resnets_1_conv2", "lora_te_text_model_encoder_layers_0_mlp_fc1"),
    "sd2": ("lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k",
            "lora_unet_down_blocks_0_downsamplers_0_conv", "lora_te_text_model_encoder_layers_1_self_attn_q_proj"),
    "sdxl": ("lora_unet_input_blocks_4_1_transformer_blocks_1_ff_net_2", "lora_unet_output_blocks_2_2_conv",
             "lora_unet_input_blocks_3_0_op", "lora_te1_text_model_encoder_layers_0_self_attn_out_proj",
             "lora_te2_text_model_encoder_layers_1_mlp_fc2"),
}


@pytest.mark.parametrize("name", ["sd1", "sd2", "sdxl"])
def test_every_key_of_a_locon_file_is_a_name_kohyas_lora_network_creates(name):
    """kohya's loader (no name conversion for SD1/SD2, non-strict) finds every adapter of the file."""
    family, checkpoint, unet = model(name)
    _, tensors = engine_file(checkpoint)
    kohya = kohya_network(checkpoint, unet)
    assert all(key.split(".", 1)[1] in PARTS for key in tensors)
    ours = modules_of(tensors)
    assert sorted(ours - kohya.keys()) == []
    # They are all kohya would train but two kinds: every module of its plain LoRA (attention, feed-forward,
    # proj_in/out), every 3x3 convolution of its LoCon, every text-encoder projection. (Its LoCon also puts
    # adapters of the plain rank on the resnets' time_emb_proj and 1x1 conv_shortcut, which ours leaves alone.)
    kohya_unet = unet if unet is not None else kohya_sdxl_unet(checkpoint)
    in_transformers = kohya_names("lora_unet", kohya_unet, KOHYA_UNET_TARGETS).keys()
    convs = {module for module, conv3x3 in kohya.items() if conv3x3}
    text = {module for module in kohya if module.startswith("lora_te")}
    assert ours == in_transformers | convs | text
    assert set(EXAMPLES[family]) <= ours


@pytest.mark.parametrize("name", MODELS)
def test_the_webui_puts_every_adapter_on_the_layer_the_engine_trained(name, make_webui):
    """The stand-in host (v1.10.1's key conversion and fallbacks) matches every key, and <lora:name:1> gives the
    weights of the engine's own merge of the same adapters (which maps them to the ldm layers by its key tables)."""
    make_webui(load=False)
    import networks
    from webui_stub.fake_model import FakeSDModel

    _, checkpoint, _ = model(name)
    bundle, tensors = engine_file(checkpoint)
    live = FakeSDModel(checkpoint)
    found = networks.apply(live, tensors)
    assert found.failed == {}
    assert len(found.layers) == len(modules_of(tensors)) == sum(
        len(adapters(m)) for m in (bundle.unet, *bundle.text_encoders))
    merged = build_merged_checkpoint(bundle, bundle.unet, bundle.text_encoders, "fp32")
    applied = normalize_keys(live.state_dict())
    changed = [k for k in merged if not torch.equal(merged[k], checkpoint[k])]
    assert any(k.startswith(UNET_PREFIX) for k in changed) and any(not k.startswith(UNET_PREFIX) for k in changed)
    for key in merged:
        assert torch.allclose(applied[key].float(), merged[key].float(), atol=1e-5), key



def test_real_sd1_sd2_and_sdxl_unets_get_kohyas_names():
    """The full-size layouts (configs only): SD1.5 and SD2.1 diffusers names, SDXL ldm ones."""
    from dreambooth_ext.models.lora import unet_file_name

    sd1 = make_unet_config(family=family_named("sd1"), block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                           attention_levels=(True, True, True, False), cross_attention_dim=768)
    sd2 = make_unet_config(family=family_named("sd2"), block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                           attention_levels=(True, True, True, False), cross_attention_dim=1024)
    sdxl = make_unet_config(family=family_named("sdxl"), block_out_channels=(320, 640, 1280), layers_per_block=2,
                            attention_levels=(False, True, True), cross_attention_dim=2048,
                            transformer_layers_per_block=(1, 2, 10), added_input_dim=2816)
    for config in (sd1, sd2):
        for module in ("down_blocks.0.attentions.0.proj_in", "down_blocks.3.resnets.1.conv2",
                       "up_blocks.0.upsamplers.0.conv", "up_blocks.2.attentions.2.transformer_blocks.0.ff.net.2"):
            assert unet_file_name(module, config) == "lora_unet_" + module.replace(".", "_")
    assert unet_file_name("down_blocks.2.attentions.1.transformer_blocks.9.attn1.to_q", sdxl) == (
        "lora_unet_input_blocks_8_1_transformer_blocks_9_attn1_to_q")
    assert unet_file_name("up_blocks.1.upsamplers.0.conv", sdxl) == "lora_unet_output_blocks_5_2_conv"
    assert unet_file_name("down_blocks.0.downsamplers.0.conv", sdxl) == "lora_unet_input_blocks_3_0_op"
