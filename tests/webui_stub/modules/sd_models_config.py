"""Stand-in for modules.sd_models_config: which ldm config a checkpoint is built from, and (the stand-in's own
part) whether its tensors fit that config.

As in the host: a `<name>.yaml` beside the checkpoint wins; otherwise the config is guessed from a few keys, and
the guess is a config for the real model sizes (SD1.5, SD2, SDXL). A small or unusual checkpoint without its own
yaml therefore fails to load with size mismatches, as it does in the host. The real host instantiates the ldm
model from the config; the stand-in compares the tensor shapes that config implies with the file's.
"""

import os

import yaml
from modules import shared

from webui_stub.configs import sgm_config

sd_configs_path = shared.sd_configs_path
config_default = shared.sd_default_config
config_sd2 = os.path.join(sd_configs_path, "v2-inference.yaml")
config_sd2v = os.path.join(sd_configs_path, "v2-inference-v.yaml")
config_sdxl = os.path.join(sd_configs_path, "sd_xl_base.yaml")

_SD_VAE = {"embed_dim": 4, "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3,
                                         "out_ch": 3, "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2,
                                         "attn_resolutions": [], "dropout": 0.0}}
_SD_UNET = {"image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 320,
            "attention_resolutions": [4, 2, 1], "num_res_blocks": 2, "channel_mult": [1, 2, 4, 4],
            "use_spatial_transformer": True, "transformer_depth": 1, "legacy": False}
# The host's own configs for the real model sizes (only what decides tensor shapes and behaviour).
DEFAULT_CONFIGS = {
    config_default: {"unet": dict(_SD_UNET, num_heads=8, context_dim=768), "cond": "FrozenCLIPEmbedder"},
    config_sd2: {"unet": dict(_SD_UNET, num_head_channels=64, context_dim=1024, use_linear_in_transformer=True),
                 "cond": "FrozenOpenCLIPEmbedder"},
    config_sd2v: {"unet": dict(_SD_UNET, num_head_channels=64, context_dim=1024, use_linear_in_transformer=True),
                  "cond": "FrozenOpenCLIPEmbedder", "parameterization": "v"},
}
_SDXL_UNET = {"adm_in_channels": 2816, "num_classes": "sequential", "in_channels": 4, "out_channels": 4,
              "model_channels": 320, "attention_resolutions": [4, 2], "num_res_blocks": 2, "channel_mult": [1, 2, 4],
              "num_head_channels": 64, "use_spatial_transformer": True, "use_linear_in_transformer": True,
              "transformer_depth": [1, 2, 10], "context_dim": 2048, "legacy": False}
_SDXL_VAE = {**_SD_VAE, "ddconfig": dict(_SD_VAE["ddconfig"])}


def write_default_configs():
    """The host ships these files; the stand-in writes them into its configs folder at start."""
    os.makedirs(sd_configs_path, exist_ok=True)
    for path, spec in DEFAULT_CONFIGS.items():
        params = {"timesteps": 1000, "scale_factor": 0.18215,
                  "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                                  "params": spec["unet"]},
                  "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": _SD_VAE},
                  "cond_stage_config": {"target": f"ldm.modules.encoders.modules.{spec['cond']}"}}
        if "parameterization" in spec:
            params["parameterization"] = spec["parameterization"]
        document = {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": params}}
        with open(path, "w", encoding="utf-8") as f:
            yaml.safe_dump(document, f, sort_keys=False)
    with open(config_sdxl, "w", encoding="utf-8") as f:
        yaml.safe_dump(sgm_config(_SDXL_UNET, _SDXL_VAE), f, sort_keys=False)


def guess_model_config_from_state_dict(sd, filename):
    if sd.get("conditioner.embedders.1.model.ln_final.weight") is not None:
        return config_sdxl
    sd2_proj = sd.get("cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight")
    if sd2_proj is not None and sd2_proj.shape[1] == 1024:
        return config_sd2  # the host probes the UNet for v here; real-size SD2 is never built in tests
    return config_default


def find_checkpoint_config_near_filename(info):
    if info is None:
        return None
    config = f"{os.path.splitext(info.filename)[0]}.yaml"
    return config if os.path.exists(config) else None


def find_checkpoint_config(state_dict, info):
    if info is None:
        return guess_model_config_from_state_dict(state_dict, "")
    return find_checkpoint_config_near_filename(info) or guess_model_config_from_state_dict(state_dict, info.filename)


# ----------------------------------------------------------------------------------------------------------
# The stand-in's check: do the tensors fit the config? (the host finds out in load_state_dict)


def read_config(path):
    """The model params of an ldm config, or of an sgm one (SDXL) in the same shape: `unet_config` and a
    `parameterization` read off its denoiser's scaling (what sd_models_xl.extend_sdxl does)."""
    with open(path, encoding="utf-8") as f:
        params = yaml.safe_load(f)["model"]["params"]
    if "network_config" in params:
        scaling = params["denoiser_config"]["params"]["scaling_config"]["target"]
        params = {**params, "unet_config": params["network_config"],
                  "parameterization": "v" if scaling.endswith(".VScaling") else "eps"}
    return params


def _expected_unet(p):
    mc, mult, blocks = p["model_channels"], list(p["channel_mult"]), p["num_res_blocks"]
    u = "model.diffusion_model."
    expected = {u + "input_blocks.0.0.weight": (mc, p["in_channels"], 3, 3),
                u + "time_embed.0.weight": (4 * mc, mc),
                u + "out.2.weight": (p["out_channels"], mc, 3, 3),
                u + f"input_blocks.{len(mult) * blocks + len(mult) - 1}.0.out_layers.3.weight": (mc * mult[-1],)}
    if "adm_in_channels" in p:  # SDXL's added conditioning (pooled text + size embeddings)
        expected[u + "label_emb.0.0.weight"] = (4 * mc, p["adm_in_channels"])
    if 1 in p["attention_resolutions"]:  # attention at the first level: its cross-attention reads the context
        width = mc * mult[0]
        expected[u + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"] = (width, p["context_dim"])
        linear = p.get("use_linear_in_transformer", False)
        expected[u + "input_blocks.1.1.proj_in.weight"] = (width, width) if linear else (width, width, 1, 1)
    return expected


def _expected_vae(p):
    d, f = p["ddconfig"], "first_stage_model."
    return {f + "encoder.conv_in.weight": (d["ch"], d["in_channels"], 3, 3),
            f + "quant_conv.weight": (2 * p["embed_dim"], 2 * d["z_channels"], 1, 1),
            f + f"encoder.down.{len(d['ch_mult']) - 1}.block.0.conv2.weight": (d["ch"] * d["ch_mult"][-1],)}


def _heads_fit(p):
    """ldm splits each attention level's channels into heads: num_heads, or channels / num_head_channels."""
    mc = p["model_channels"]
    widths = [mc * m for i, m in enumerate(p["channel_mult"]) if 2 ** i in p["attention_resolutions"]]
    head_channels = p.get("num_head_channels", -1)
    if head_channels and head_channels > 0:
        return [w for w in widths if w % head_channels or w < head_channels]
    return [w for w in widths if w % p.get("num_heads", 1)]


def check_state_dict_fits(config_path, state_dict):
    """Raise like torch's load_state_dict when the file's tensors do not fit the config's model."""
    params = read_config(config_path)
    expected = {**_expected_unet(params["unet_config"]["params"]),
                **_expected_vae(params["first_stage_config"]["params"])}
    problems = []
    for key, shape in expected.items():
        tensor = state_dict.get(key)
        if tensor is None:
            problems.append(f'Missing key(s) in state_dict: "{key}".')
        elif tuple(tensor.shape) != tuple(shape) and tuple(tensor.shape[:len(shape)]) != tuple(shape):
            problems.append(f"size mismatch for {key}: copying a param with shape {tuple(tensor.shape)} from "
                            f"checkpoint, the shape in current model is {tuple(shape)}.")
    bad_heads = _heads_fit(params["unet_config"]["params"])
    if bad_heads:
        problems.append(f"attention widths {bad_heads} cannot be split into the config's heads")
    if problems:
        raise RuntimeError(f"Error(s) in loading state_dict for LatentDiffusion ({config_path}):\n\t"
                           + "\n\t".join(problems))
    return params
