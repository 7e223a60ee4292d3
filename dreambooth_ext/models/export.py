"""Writing a trained model back as a WebUI checkpoint (every base key kept, trained parts replaced) or as a LoRA
file the WebUI's Lora tab lists; atomic saves."""

from __future__ import annotations

import base64
import datetime
import glob
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..errors import DreamboothError
from .bundle import ModelBundle
from .convert import UNET_PREFIX, unet_to_ldm, vae_to_ldm

logger = logging.getLogger(__name__)

MODEL_PARTS = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner.")
PRECISIONS = {"fp16": torch.float16, "fp32": torch.float32}
PARTIAL_SUFFIX = ".partial"  # the WebUI lists only .safetensors/.ckpt, so half-written files stay invisible


def _state_dict(module: Any) -> dict[str, torch.Tensor]:
    # torch.compile wraps modules; the weights live on the original one under the same names.
    module = getattr(module, "_orig_mod", module)
    return {k: v.detach().to("cpu") for k, v in module.state_dict().items()}


def build_checkpoint(bundle: ModelBundle, unet: Any, text_encoders: tuple[Any, ...] | None = None, vae: Any = None,
                     precision: str = "fp16", *,
                     unet_state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The base checkpoint with the given (trained) modules' weights in place, cast to `precision`.
    `text_encoders`: all of the family's, in its order, when they were trained.

    `unet_state` (a diffusers-key state dict, e.g. EMA weights) replaces the UNet's own weights when given.
    Keys the engine does not own (schedule buffers, SD2's last text block, text_projection...) come from the base
    unchanged. With fp32 the result may share memory with the modules; save it before training on.
    """
    if precision not in PRECISIONS:
        raise DreamboothError(f"save precision = {precision!r}: use fp16 or fp32")
    out = {k: v for k, v in bundle.base.items() if not k.startswith(bundle.family.dropped_prefixes)}
    if unet_state is not None:
        unet_state = {k: v.detach().to("cpu") for k, v in unet_state.items()}
    out.update(unet_to_ldm(unet_state if unet_state is not None else _state_dict(unet), bundle.unet_config))
    if text_encoders is not None:
        out.update(bundle.family.text_encoders_to_ldm(tuple(_state_dict(e) for e in text_encoders)))
    if vae is not None:
        out.update(vae_to_ldm(_state_dict(vae), bundle.vae_config))
    return _cast(out, precision)


def _cast(out: dict[str, torch.Tensor], precision: str) -> dict[str, torch.Tensor]:
    """The model parts in the saved precision (schedule buffers and flags stay as they are), contiguous."""
    dtype = PRECISIONS[precision]
    result = {}
    for key, value in out.items():
        if key.startswith(MODEL_PARTS) and value.is_floating_point():
            value = value.to(dtype)
        result[key] = value.contiguous()
    return result


def build_merged_checkpoint(bundle: ModelBundle, unet: Any, text_encoders: tuple[Any, ...] | None,
                            precision: str = "fp16", *,
                            unet_state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The base checkpoint with the LoRA adapters of `unet` (and of `text_encoders`, when they were trained) added
    into its weights: W + alpha / rank * up @ down, computed in fp32 from the base file's own tensors (the modules'
    frozen weights may be held in half precision)."""
    from .lora import adapters, delta_of, unet_module_name

    if precision not in PRECISIONS:
        raise DreamboothError(f"save precision = {precision!r}: use fp16 or fp32")
    state = unet_state if unet_state is not None else unet.state_dict()
    out = {k: v for k, v in bundle.base.items() if not k.startswith(bundle.family.dropped_prefixes)}
    for name, layer in adapters(unet).items():
        key = f"{UNET_PREFIX}{unet_module_name(name, bundle.unet_config)}.weight"
        delta = delta_of(layer, state[f"{name}.down.weight"], state[f"{name}.up.weight"])
        out[key] = out[key].float() + delta.reshape(out[key].shape)
    if text_encoders is not None:
        fresh = bundle.family.text_encoders_from_ldm(bundle.base)  # exact fp32 copies of the base encoders
        states = []
        for clean, trained in zip(fresh, text_encoders, strict=True):
            weights = {k: v.detach().float() for k, v in clean.state_dict().items()}
            for name, layer in adapters(trained).items():
                weights[f"{name}.weight"] = weights[f"{name}.weight"] + layer.delta()
            states.append(weights)
        out.update(bundle.family.text_encoders_to_ldm(tuple(states)))
    return _cast(out, precision)


def lora_metadata(bundle: ModelBundle, *, title: str, steps: int, config_json: str, resolution: int, rank: int,
                  alpha: float, num_images: int, tag_frequency: dict[str, dict[str, int]], started_at: float,
                  conv_rank: int = 0, cover_image: bytes | None = None,
                  extra: dict[str, str] | None = None) -> dict[str, str]:
    """What the WebUI's Lora tab reads (kohya's ss_* keys: the name for <lora:name:1>, the family that decides
    which checkpoints it is listed for, the card's preview) plus the modelspec and dreambooth.* keys. With adapters
    on the 3x3 convolutions (LoCon, `conv_rank` > 0) also kohya's ss_network_args."""
    metadata = checkpoint_metadata(bundle, title=title, steps=steps, config_json=config_json,
                                   resolution=resolution, extra=extra)
    metadata["modelspec.architecture"] += "/lora"
    family = bundle.family
    metadata.update({
        "ss_output_name": title,
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": f"{alpha:g}",
        "ss_base_model_version": family.lora_base_version,
        "ss_v2": str(family.lora_base_version == "sd_v2"),
        "ss_v_parameterization": str(bundle.prediction_type == "v_prediction"),
        "ss_resolution": f"({resolution}, {resolution})",
        "ss_num_train_images": str(num_images),
        "ss_tag_frequency": json.dumps(tag_frequency),
        "ss_training_started_at": f"{started_at:.0f}",
        "ss_sd_model_name": bundle.source.name,
        "ss_new_sd_model_hash": bundle.source.sha256,
        "ss_steps": str(steps),
    })
    if conv_rank:
        metadata["ss_network_args"] = locon_network_args(conv_rank)
    if cover_image is not None:
        metadata["ssmd_cover_images"] = json.dumps([base64.b64encode(cover_image).decode("ascii")])
    return metadata


def locon_network_args(conv_rank: int) -> str:
    """kohya's ss_network_args of a LoCon file: the JSON of its --network_args, values as typed (strings). The
    conv adapters' alpha is their rank (models/lora.py add_adapters)."""
    return json.dumps({"conv_dim": str(conv_rank), "conv_alpha": str(conv_rank)})


def addnet_hash(tensors: dict[str, torch.Tensor]) -> str:
    """kohya's (and the WebUI's) hash of a .safetensors file: sha256 of the tensor data after the header, which
    metadata does not change, so it can be written into the file it describes."""
    import safetensors.torch

    data = safetensors.torch.save(tensors)
    header = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[8 + header:]).hexdigest()


def checkpoint_metadata(bundle: ModelBundle, *, title: str, steps: int, config_json: str, resolution: int,
                        extra: dict[str, str] | None = None) -> dict[str, str]:
    """safetensors header metadata: kohya/SAI modelspec keys plus our dreambooth.* keys, all strings.
    `resolution` is the size the model was trained at."""
    from .. import __version__

    size = resolution
    metadata = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": bundle.family.architecture(bundle.prediction_type),
        "modelspec.implementation": "diffusers",
        "modelspec.title": title,
        "modelspec.date": datetime.datetime.now().isoformat(timespec="seconds"),
        "modelspec.prediction_type": "v" if bundle.prediction_type == "v_prediction" else "epsilon",
        "modelspec.resolution": f"{size}x{size}",
        "dreambooth.base_model": bundle.source.name,
        "dreambooth.base_model_hash": bundle.source.short_hash,
        "dreambooth.base_model_sha256": bundle.source.sha256,
        "dreambooth.vae": bundle.source.vae_name,
        "dreambooth.engine_version": __version__,
        "dreambooth.steps": str(steps),
        "dreambooth.config": config_json,
    }
    metadata.update({str(k): str(v) for k, v in (extra or {}).items()})
    return {k: str(v) for k, v in metadata.items()}


# ----------------------------------------------------------------------------------------------------------
# The ldm config written beside v-prediction models (the WebUI needs it to sample them correctly)


def _ldm_unet_params(bundle: ModelBundle) -> dict:
    config = bundle.unet_config
    channels = list(config["block_out_channels"])
    base = channels[0]
    attention = [t.startswith("CrossAttn") for t in config["down_block_types"]]
    params = {
        "image_size": bundle.native_resolution // 8,
        "in_channels": config["in_channels"],
        "out_channels": config["out_channels"],
        "model_channels": base,
        # ldm names attention levels by their downsampling factor: level i is 2**i.
        "attention_resolutions": [2 ** i for i, has in enumerate(attention) if has][::-1],
        "num_res_blocks": config["layers_per_block"],
        "channel_mult": [c // base for c in channels],
        "use_checkpoint": True,
        "use_spatial_transformer": True,
        "transformer_depth": config.get("transformer_layers_per_block", 1),
        "context_dim": config["cross_attention_dim"],
        "legacy": False,
    }
    params.update(_ldm_heads(config))
    if config.get("use_linear_projection"):
        params["use_linear_in_transformer"] = True
    return params


def _ldm_heads(config: dict) -> dict:
    """ldm splits every attention level alike: the same number of heads, or heads of the same width.

    diffusers' `attention_head_dim` holds the heads per level (its old naming), e.g. 8 for SD1 and
    (5, 10, 20, 20) = 64-wide heads for SD2."""
    channels = list(config["block_out_channels"])
    heads = config.get("attention_head_dim", 8)
    heads = [heads] * len(channels) if isinstance(heads, int) else list(heads)
    levels = [i for i, kind in enumerate(config["down_block_types"]) if kind.startswith("CrossAttn")]
    counts = {heads[i] for i in levels}
    if len(counts) <= 1:
        return {"num_heads": counts.pop() if counts else 8}
    widths = {channels[i] // heads[i] for i in levels}
    if len(widths) == 1:
        return {"num_head_channels": widths.pop()}
    raise DreamboothError(f"The UNet's attention heads ({heads}) differ in both number and width between levels; "
                          "an ldm config cannot describe it.")


def _ldm_vae_params(bundle: ModelBundle) -> dict:
    config = bundle.vae_config
    channels = list(config["block_out_channels"])
    return {
        "embed_dim": config["latent_channels"],
        "monitor": "val/rec_loss",
        "ddconfig": {
            "double_z": True, "z_channels": config["latent_channels"], "resolution": 256,
            "in_channels": config["in_channels"], "out_ch": config["out_channels"], "ch": channels[0],
            "ch_mult": [c // channels[0] for c in channels], "num_res_blocks": config["layers_per_block"],
            "attn_resolutions": [], "dropout": 0.0,
        },
        "lossconfig": {"target": "torch.nn.Identity"},
    }


def ldm_yaml(bundle: ModelBundle) -> str:
    """An ldm LatentDiffusion config describing this bundle's model (v-parameterization when it is one)."""
    import yaml

    params: dict[str, Any] = {
        "linear_start": 0.00085, "linear_end": 0.0120, "num_timesteps_cond": 1, "log_every_t": 200,
        "timesteps": 1000, "first_stage_key": "jpg", "cond_stage_key": "txt",
        "image_size": bundle.native_resolution // 8, "channels": bundle.vae_config["latent_channels"],
        "cond_stage_trainable": False, "conditioning_key": "crossattn", "monitor": "val/loss_simple_ema",
        "scale_factor": bundle.family.vae_scaling_factor, "use_ema": False,
    }
    if bundle.prediction_type == "v_prediction":
        params["parameterization"] = "v"
    params["unet_config"] = {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                             "params": _ldm_unet_params(bundle)}
    params["first_stage_config"] = {"target": "ldm.models.autoencoder.AutoencoderKL",
                                    "params": _ldm_vae_params(bundle)}
    params["cond_stage_config"] = bundle.family.ldm_cond_stage()
    document = {"model": {"base_learning_rate": 1.0e-4, "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
                          "params": params}}
    return yaml.safe_dump(document, sort_keys=False)


def yaml_for_bundle(bundle: ModelBundle) -> str | None:
    """The .yaml to save beside a result: the base's own config when it had one (with the parameterization the
    run trained), else a generated one for v-prediction models (the WebUI would take them for epsilon), else
    None (the WebUI's guess is right for standard models)."""
    if bundle.base_yaml:
        return with_parameterization(bundle.base_yaml, bundle.prediction_type)
    if bundle.prediction_type != "v_prediction":
        return None
    if bundle.family.ldm_cond_stage() is None:
        logger.warning("No .yaml is written beside this v-prediction %s model (its base had none): load it in the "
                       "WebUI with the same config you used for the base model.", bundle.family.title)
        return None
    return ldm_yaml(bundle)


def with_parameterization(yaml_text: str, prediction_type: str) -> str:
    """An ldm config saying `parameterization: v` exactly when the model predicts velocity."""
    import yaml

    try:
        document = yaml.safe_load(yaml_text)
        params = document["model"]["params"]
    except Exception as exc:
        logger.warning("The base model's config cannot be read as an ldm config (%s); it is copied as it is.", exc)
        return yaml_text
    scaling = (params.get("denoiser_config") or {}).get("params", {}).get("scaling_config")
    if isinstance(scaling, dict) and "target" in scaling:  # an sgm (SDXL) config: its denoiser's scaling says it
        says_v = str(scaling["target"]).endswith(".VScaling")
    else:
        scaling = None
        says_v = str(params.get("parameterization", "eps")).strip() == "v"
    if says_v == (prediction_type == "v_prediction"):
        return yaml_text  # already right: keep the file as the user wrote it
    if scaling is not None:
        module = str(scaling["target"]).rsplit(".", 1)[0]
        scaling["target"] = f"{module}.{'VScaling' if prediction_type == 'v_prediction' else 'EpsScaling'}"
    elif prediction_type == "v_prediction":
        params["parameterization"] = "v"
    else:
        params.pop("parameterization", None)
    return yaml.safe_dump(document, sort_keys=False)


# ----------------------------------------------------------------------------------------------------------
# Atomic files


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; not possible on every platform (e.g. Windows), where it is skipped.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temp_path(path: Path) -> Path:
    """A hidden temporary file beside `path`, readable like a normally created file (mkstemp makes it 0600,
    which a WebUI running as another user could not read once it is renamed)."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=PARTIAL_SUFFIX)
    os.close(fd)
    os.chmod(name, 0o666 & ~_umask())
    return Path(name)


def _umask() -> int:
    """The process's umask, read without changing it where the system allows."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def remove_partial_files(folder: Path, name_prefix: str) -> list[Path]:
    """Delete the hidden temporary files a killed save left in `folder` for files named `name_prefix`*."""
    removed = []
    if folder.is_dir():
        for leftover in folder.glob(f".{glob.escape(name_prefix)}*{PARTIAL_SUFFIX}"):
            leftover.unlink(missing_ok=True)
            removed.append(leftover)
    if removed:
        logger.info("Removed %d half-written file(s) an interrupted save left in %s", len(removed), folder)
    return removed


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        handle.flush()
        os.fsync(handle.fileno())


def save_checkpoint(state_dict: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str],
                    yaml_text: str | None = None) -> Path:
    """Write a .safetensors file (and `<name>.yaml` when given) so readers only ever see complete files."""
    import safetensors.torch

    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise DreamboothError(f"{str(path)!r}: models are saved as .safetensors; use a name ending in .safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    yaml_path = path.with_suffix(".yaml")
    temps: list[Path] = []
    try:
        tmp = _temp_path(path)
        temps.append(tmp)
        safetensors.torch.save_file(state_dict, str(tmp), metadata={k: str(v) for k, v in metadata.items()})
        _fsync_file(tmp)
        tmp_yaml = None
        if yaml_text is not None:
            tmp_yaml = _temp_path(yaml_path)
            temps.append(tmp_yaml)
            tmp_yaml.write_text(yaml_text, encoding="utf-8")
            _fsync_file(tmp_yaml)
            # The yaml goes first: the WebUI must never see a v-model without it.
            os.replace(tmp_yaml, yaml_path)
        os.replace(tmp, path)
    except BaseException:
        for temp in temps:
            temp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    if yaml_text is None and yaml_path.is_file():
        logger.warning("%s is beside the saved model but was not written by this save; the WebUI will use it for "
                       "%s: delete it if it does not describe this model", yaml_path.name, path.name)
    logger.info("Saved %s", path)
    return path
