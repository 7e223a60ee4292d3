"""Forge's backend.loader.forge_loader: read the checkpoint, merge the selected VAE / text encoder files into its
state dict (replace_state_dict), split it per component in Forge's layout (huggingface_guess'
process_*_state_dict) and build the engine's patchers; a file it does not recognise raises
"Failed to recognize model type!".

Departures: the family is told from the text encoder's keys (Forge's huggingface_guess matches full-size UNet
configs, which the tiny test models are not), and a selected CLIP-L file is matched to the model's own CLIP width
(Forge: 768)."""

import os

import safetensors.torch
import torch
import yaml
from backend import memory_management
from backend.args import dynamic_args
from backend.diffusion_engine.base import ForgeDiffusionEngine, ParameterTree, Prediction
from backend.patcher.base import CLIP, VAE, UnetPatcher

UNET = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
_FAMILY_KEYS = {
    "sdxl": "conditioner.embedders.1.model.transformer.resblocks.0.ln_1.bias",
    "sd2": "cond_stage_model.model.transformer.resblocks.0.ln_1.bias",
    "sd1": "cond_stage_model.transformer.text_model.encoder.layers.0.layer_norm1.bias",
}
_CLIP_L_PREFIX = {"sd1": "cond_stage_model.transformer.", "sdxl": "conditioner.embedders.0.transformer."}
_QUANTIZED = ("nf4", "fp4", "gguf")
STORAGE_DTYPE = torch.float16  # what Forge stores the modules in on a GPU (tests may change it)


def load_torch_file(path):
    return safetensors.torch.load_file(path, device="cpu")


def guess_family(sd):
    for family, key in _FAMILY_KEYS.items():
        if key in sd and any(k.startswith(UNET) for k in sd):
            return family
    raise ValueError("not a known model")


def replace_state_dict(sd, asd, family):
    """A selected VAE replaces the checkpoint's; a selected CLIP-L (transformers layout) replaces its CLIP-L."""
    if "decoder.conv_in.weight" in asd:
        for k in [k for k in sd if k.startswith(VAE_PREFIX)]:
            del sd[k]
        for k, v in asd.items():
            sd[VAE_PREFIX + k] = v
    if "first_stage_model.decoder.conv_in.weight" in asd:
        sd.update(asd)
    clip_key = "text_model.encoder.layers.0.layer_norm1.bias"
    prefix = _CLIP_L_PREFIX.get(family)
    if clip_key in asd and prefix and asd[clip_key].shape == sd.get(prefix + clip_key, torch.empty(0)).shape:
        for k, v in asd.items():
            sd[prefix + k] = v
    return sd


def transformers_convert(sd, prefix_from, prefix_to):
    """huggingface_guess.utils.clip_text_transformers_convert: an OpenCLIP text tower -> transformers' keys."""
    out = {}
    renames = {"positional_embedding": "embeddings.position_embedding.weight",
               "token_embedding.weight": "embeddings.token_embedding.weight",
               "ln_final.weight": "final_layer_norm.weight", "ln_final.bias": "final_layer_norm.bias"}
    blocks = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
              "attn.out_proj": "self_attn.out_proj"}
    for key, value in sd.items():
        if not key.startswith(prefix_from):
            continue
        rest = key[len(prefix_from):]
        if rest in renames:
            out[f"{prefix_to}text_model.{renames[rest]}"] = value
        elif rest == "text_projection":
            out[f"{prefix_to}text_projection.weight"] = value.transpose(0, 1).contiguous()
        elif rest.startswith("transformer.resblocks."):
            index, name = rest[len("transformer.resblocks."):].split(".", 1)
            layer = f"{prefix_to}text_model.encoder.layers.{index}."
            stem, kind = ("attn.in_proj", name[len("attn.in_proj_"):]) if name.startswith("attn.in_proj_") \
                else name.rsplit(".", 1)
            if stem == "attn.in_proj":
                third = value.shape[0] // 3
                for i, part in enumerate(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")):
                    out[f"{layer}{part}.{kind}"] = value[third * i:third * (i + 1)]
            else:
                out[f"{layer}{blocks[stem]}.{kind}"] = value
        else:
            out[prefix_to + rest] = value  # logit_scale and the like
    return out


def _integrated_clip(hf_keys, width):
    """IntegratedCLIP: the transformers model under `transformer.`, plus logit_scale and the text projection
    Forge adds (random where the file has none)."""
    tensors = {k if k == "logit_scale" else "transformer." + k: v for k, v in hf_keys.items()
               if not k.endswith("position_ids")}
    tensors.setdefault("transformer.text_projection.weight", torch.randn(width, width))
    tensors.setdefault("logit_scale", torch.tensor(4.6055))
    return tensors


def _text_encoders(sd, family):
    """Per text encoder, its tensors as Forge's modules hold them (clip_l / clip_h / clip_g)."""
    def strip(prefix):
        return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}

    if family == "sd1":
        clip_l = strip("cond_stage_model.transformer.")
        return {"clip_l": _integrated_clip(clip_l, clip_l["text_model.final_layer_norm.weight"].shape[0])}
    if family == "sd2":
        clip_h = transformers_convert(sd, "cond_stage_model.model.", "")
        return {"clip_h": _integrated_clip(clip_h, clip_h["text_model.final_layer_norm.weight"].shape[0])}
    clip_l = strip("conditioner.embedders.0.transformer.")
    clip_g = transformers_convert(sd, "conditioner.embedders.1.model.", "")
    return {"clip_l": _integrated_clip(clip_l, clip_l["text_model.final_layer_norm.weight"].shape[0]),
            "clip_g": _integrated_clip(clip_g, clip_g["text_model.final_layer_norm.weight"].shape[0])}


def _store(tensors, dtype):
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}


def _unet_module(sd):
    """The UNet in the storage Forge picks: "Diffusion in Low Bits" (dynamic_args), else its default."""
    storage = dynamic_args.get("forge_unet_storage_dtype") or STORAGE_DTYPE
    tensors = {k[len(UNET):]: v for k, v in sd.items() if k.startswith(UNET)}
    if storage in _QUANTIZED:  # bitsandbytes' packed 4-bit weights, stored as uint8
        stored = {k: (v.float().flatten()[: max(v.numel() // 2, 1)] * 0).to(torch.uint8) if v.dim() > 1 else v
                  for k, v in tensors.items()}
    else:
        stored = _store(tensors, storage)
    model = ParameterTree(stored)
    model.storage_dtype = storage
    model.computation_dtype = STORAGE_DTYPE
    model.load_device = model.offload_device = model.initial_device = memory_management.cpu
    return model


def _prediction(sd, path):
    """The yaml beside the checkpoint, else what the file says (SDXL's v_pred marker)."""
    config_filename = os.path.splitext(path)[0] + ".yaml"
    if os.path.isfile(config_filename):
        with open(config_filename) as stream:
            params = (yaml.safe_load(stream) or {}).get("model", {}).get("params", {})
        target = params.get("denoiser_config", {}).get("params", {}).get("scaling_config", {}).get("target", "")
        if params.get("parameterization") == "v" or target.endswith(".VScaling"):
            return "v_prediction"
    return "v_prediction" if "v_pred" in sd else "epsilon"


@torch.inference_mode()
def forge_loader(sd, additional_state_dicts=None):
    path = sd
    try:
        sd = load_torch_file(path)
        family = guess_family(sd)
        for asd in additional_state_dicts or []:
            sd = replace_state_dict(sd, load_torch_file(asd), family)
    except Exception:
        raise ValueError("Failed to recognize model type!") from None
    unet = UnetPatcher.from_model(_unet_module(sd), Prediction(_prediction(sd, path)))
    clip = CLIP(model_dict={name: ParameterTree(_store(tensors, STORAGE_DTYPE))
                            for name, tensors in _text_encoders(sd, family).items()})
    vae = VAE(model=ParameterTree(_store({k[len(VAE_PREFIX):]: v for k, v in sd.items()
                                          if k.startswith(VAE_PREFIX)}, STORAGE_DTYPE)))
    return ForgeDiffusionEngine(family, unet, clip, vae)
