"""Forge (lllyasviel/stable-diffusion-webui-forge, f2.x) as a host: what differs from the WebUI it forks.

Imported and called by hosts/webui.py only when `is_forge()`; like that module it imports the host's packages
(`modules`, `modules_forge`) inside functions only.

What Forge's loaded model looks like (main of 2025-06-26, read from its source):
- `shared.sd_model` is a ForgeDiffusionEngine (backend/diffusion_engine/): `first_stage_model` and
  `cond_stage_model` are None; the modules live in `sd_model.forge_objects`: `unet.model.diffusion_model` (the
  ldm UNet, keys as in a file after `model.diffusion_model.`), `vae.first_stage_model` (the ldm VAE, keys as after
  `first_stage_model.`), `clip.cond_stage_model` (a ModuleDict of IntegratedCLIP: `clip_l`, `clip_h` or
  `clip_g`, each a transformers CLIPTextModel under `.transformer` plus `logit_scale` and an added
  `text_projection`). Forge's own `save_checkpoint` maps them back to a file's layout the same way.
- The "VAE / Text Encoder" selection (`opts.forge_additional_modules`, full paths) is merged into the state dict
  before those modules are built (backend/loader.py): the modules in memory already hold the selected files.
- A merged LoRA (backend/patcher/lora.py, LoraLoader) replaces the patched parameters in place and keeps each
  original in `<module>.lora_loader.backup` (key -> tensor); an "online" LoRA leaves the weights untouched.
- "Diffusion in Low Bits" (nf4/fp4, fp8) and gguf files leave the UNet quantized (`storage_dtype` on the UNet).
- Loading is lazy: the checkpoint and modules to load are `sd_models.model_data.forge_loading_parameters`, and
  `forge_model_reload()` loads them before each generation unless `model_data.forge_hash` says they are loaded.
- Its checkpoint dropdown lists `CheckpointInfo.name` (`short_title` with "use filenames without paths") and its
  own selection writes that value to `opts.sd_model_checkpoint`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from ..config import Config
from ..errors import DreamboothError
from ..models.bundle import BaseFacts, ModelBundle, SourceInfo, declared_resolution, load_bundle
from ..models.checkpoint import read_checkpoint_shapes, read_named_tensors, read_vae
from ..models.convert import clip_to_ldm, open_clip_to_ldm
from ..models.family import (
    SD1_TEXT_PREFIX,
    SD2_TEXT_PREFIX,
    SDXL_CLIP_PREFIX,
    SDXL_OPEN_CLIP_PREFIX,
    UNET_PREFIX,
    detect_family,
    normalize_keys,
)

log = logging.getLogger(__name__)

VAE_PREFIX = "first_stage_model."
QUANTIZED = ("nf4", "fp4", "gguf")
FP8_DTYPES = tuple(getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
                                                     "float8_e5m2fnuz") if hasattr(torch, name))
_MODULE_PREFIXES = (UNET_PREFIX, VAE_PREFIX, "cond_stage_model.", "conditioner.")
_VAE_MARKERS = ("decoder.conv_in.weight", "first_stage_model.decoder.conv_in.weight")  # backend/loader.py


def is_forge() -> bool:
    """Forge loads models through sd_models.forge_model_reload, which the WebUI lacks."""
    from modules import sd_models

    return hasattr(sd_models, "forge_model_reload")


# ----------------------------------------------------------------------------------------------------------
# The selection: checkpoint, VAE / Text Encoder modules, what is loaded


def selected_modules() -> list[str]:
    """The files of Forge's "VAE / Text Encoder" selection (full paths), in the order chosen."""
    from modules import shared

    value = shared.opts.data.get("forge_additional_modules") or []
    return [str(path) for path in value] if isinstance(value, (list, tuple)) else []


def is_vae_file(path: str | os.PathLike) -> bool:
    """Whether Forge's loader uses this selected file as the VAE (it has a decoder), as opposed to a text encoder.
    A pickled file is told by its folder (models/VAE)."""
    try:
        shapes = read_checkpoint_shapes(path)
    except DreamboothError:
        return False
    if shapes is None:
        return Path(path).parent.name.lower() == "vae"
    return any(marker in shapes for marker in _VAE_MARKERS)


def selected_vae() -> str | None:
    """The VAE file among the selected modules (the one Forge loads in place of the checkpoint's), or None."""
    return next((path for path in selected_modules() if is_vae_file(path)), None)


def loading_parameters() -> dict[str, Any]:
    """What Forge's next generation loads: {checkpoint_info, additional_modules, unet_storage_dtype}."""
    from modules import sd_models

    params = sd_models.model_data.forge_loading_parameters
    if not params:  # set by modules_forge.main_entry when the UI is built; not yet (or --nowebui)
        refresh_loading_parameters()
        params = sd_models.model_data.forge_loading_parameters
    return params


def refresh_loading_parameters() -> None:
    """Forge's own: turn the options (checkpoint, modules, low-bits storage) into the loading parameters."""
    from modules_forge import main_entry

    main_entry.refresh_model_loading_parameters()


def load_pending() -> bool:
    """Whether the model in memory is not what the next generation uses (another checkpoint, other modules, or
    none loaded yet): Forge would load the selection first."""
    from modules import sd_models

    data = sd_models.model_data
    model = data.sd_model
    return getattr(model, "sd_checkpoint_info", None) is None or data.forge_hash != str(loading_parameters())


def selected_checkpoint() -> Any:
    """The CheckpointInfo Forge's next generation loads (None when it lists no checkpoint)."""
    return loading_parameters().get("checkpoint_info")


def load_selection() -> Any:
    """What Forge does before every generation (processing.manage_model_and_prompt_cache): load the selected
    checkpoint and modules unless they are loaded. Returns the loaded model; Forge's failure is a DreamboothError
    that carries its reason."""
    from modules import sd_models

    params = loading_parameters()
    info = params.get("checkpoint_info")
    title = getattr(info, "title", None) or "the selected checkpoint"
    try:
        model, _ = sd_models.forge_model_reload()
    except Exception as exc:
        raise DreamboothError(
            f"Forge could not load {title}{_with_modules(params)} ({type(exc).__name__}: {exc}). Select a "
            "checkpoint (and VAE / Text Encoder) that Forge loads: generate an image to see its own error.") from exc
    if model is None or getattr(model, "sd_checkpoint_info", None) is None:
        raise DreamboothError(f"Forge loaded no model for {title}. Generate an image once, then start again.")
    return model


def _with_modules(params: dict[str, Any]) -> str:
    modules = [Path(path).name for path in params.get("additional_modules") or []]
    return f" with {', '.join(modules)}" if modules else ""


def checkpoint_option_value(info: Any) -> str:
    """The value Forge's own checkpoint selection writes (main_entry.checkpoint_change is handed the dropdown's
    value): one of `sd_models.checkpoint_tiles()`, the name without hash (or the short title)."""
    from modules import shared

    return info.short_title if getattr(shared.opts, "sd_checkpoint_dropdown_use_short", False) else info.name


def select_and_load(info: Any) -> None:
    """Make `info` Forge's selected checkpoint and load it now, as its dropdown and next generation would.

    When Forge cannot load it, the previous selection is put back (the next generation loads that model again,
    not the broken one) and a DreamboothError gives Forge's reason. The option is written directly: `opts.set`
    runs onchange handlers, and a training job may hold the queue lock they take."""
    from modules import sd_models, shared

    previous = shared.opts.data.get("sd_model_checkpoint")
    shared.opts.data["sd_model_checkpoint"] = checkpoint_option_value(info)
    refresh_loading_parameters()
    try:
        load_selection()
    except DreamboothError:
        shared.opts.data["sd_model_checkpoint"] = previous
        refresh_loading_parameters()
        sd_models.model_data.forge_hash = ""  # memory holds no model now: the next generation loads the previous one
        raise
    shared.opts.data["sd_model_checkpoint"] = checkpoint_option_value(info)  # the short title has its hash now


# ----------------------------------------------------------------------------------------------------------
# Reading the loaded model


def unet_storage(model: Any) -> str | None:
    """How Forge stores the loaded UNet when that is quantized ("nf4", "fp4", "gguf", "float8_e4m3fn", ...),
    else None."""
    kmodel = model.forge_objects.unet.model
    dtype = getattr(kmodel, "storage_dtype", None) or getattr(kmodel.diffusion_model, "storage_dtype", None)
    if isinstance(dtype, str) and dtype in QUANTIZED:
        return dtype
    if dtype in FP8_DTYPES:
        return str(dtype).removeprefix("torch.")
    odd = next((p.dtype for p in kmodel.diffusion_model.parameters() if p.dtype in FP8_DTYPES
                or not p.dtype.is_floating_point), None)
    return str(odd).removeprefix("torch.") if odd is not None else None


def quantized_note(storage: str) -> str:
    return (f"Forge holds this model's UNet quantized ({storage}), so training reads the checkpoint's file instead "
            "(the VAE selected in Forge is used; a LoRA merged in memory is not). For training from memory, set "
            "'Diffusion in Low Bits' to Automatic and generate once.")


def _clean_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A module's state dict with every weight a merged LoRA replaced put back from the loader's backup."""
    state = module.state_dict()
    for key, clean in _lora_backup(module).items():
        if key in state:
            state[key] = clean
    return state


def _lora_backup(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return getattr(getattr(module, "lora_loader", None), "backup", None) or {}


def merged_lora_weights(model: Any) -> int:
    """How many weights of the loaded model a merged LoRA changed (Forge keeps their originals)."""
    objects = model.forge_objects
    return sum(len(_lora_backup(module)) for module in (objects.unet.model, objects.vae.first_stage_model,
                                                        objects.clip.cond_stage_model))


def _strip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _text_encoders_ldm(clip_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Forge's text encoders (clip_l / clip_h / clip_g, transformers layout) in a checkpoint file's layout, as
    huggingface_guess' `process_clip_state_dict_for_saving` writes them for SD1, SD2 and SDXL."""
    names = {key.split(".", 1)[0] for key in clip_state}
    out: dict[str, torch.Tensor] = {}
    if "clip_l" in names:  # no projection in SD1's or SDXL's CLIP-L: Forge's added one is not the model's
        clip_l = {k: v for k, v in _strip(clip_state, "clip_l.transformer.").items() if k.startswith("text_model.")}
        out.update(clip_to_ldm(clip_l, SDXL_CLIP_PREFIX if "clip_g" in names else SD1_TEXT_PREFIX))
    for name, prefix in (("clip_h", SD2_TEXT_PREFIX), ("clip_g", SDXL_OPEN_CLIP_PREFIX)):
        if name in names:
            out.update(open_clip_to_ldm(_strip(clip_state, f"{name}.transformer."), prefix))
    if not out:
        raise DreamboothError(f"Forge's loaded text encoders ({', '.join(sorted(names))}) are not those of an SD 1.x, "
                              "2.x or SDXL model; only those can be trained.")
    return out


def module_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """The loaded model's weights in a checkpoint file's layout, LoRA merges undone; Forge's tensors (no copy)."""
    objects = model.forge_objects
    unet = _strip(_clean_state(objects.unet.model), "diffusion_model.")
    sd = {UNET_PREFIX + k: v for k, v in unet.items()}
    sd.update({VAE_PREFIX + k: v for k, v in _clean_state(objects.vae.first_stage_model).items()})
    sd.update(_text_encoders_ldm(_clean_state(objects.clip.cond_stage_model)))
    return sd


def _file_keys(path: str) -> dict[str, tuple[int, ...]] | None:
    try:
        return read_checkpoint_shapes(path) if path and os.path.isfile(path) else None
    except DreamboothError:
        return None


def live_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """What a run trains from: Forge's modules in memory as CPU copies (the UNet in fp32, the rest in Forge's
    precision) in the file's layout. Tensors Forge keeps in no module (the DDPM schedule, SDXL's v_pred marker,
    logit_scale, ...) are read from the checkpoint file; keys the file lacks (Forge's added text projection) are
    left out, so that a result has the file's keys."""
    path = str(model.sd_checkpoint_info.filename)
    live = module_state_dict(model)
    merged = merged_lora_weights(model)
    if merged:
        log.info("Forge has a LoRA merged into %d weights; training starts from the clean weights it kept (Forge's "
                 "model is left as it is).", merged)
    shapes = _file_keys(path)
    if shapes is not None:
        live = {k: v for k, v in live.items() if k in shapes}
        extra = tuple(k for k in shapes if k not in live and not k.startswith((UNET_PREFIX, VAE_PREFIX)))
        live.update(read_named_tensors(path, extra))
    sd = {}
    for key, value in live.items():
        value = value.detach()
        if key.startswith(UNET_PREFIX) and value.is_floating_point():
            sd[key] = value.to("cpu", torch.float32, copy=True)
        else:
            sd[key] = value.to("cpu", copy=True)
    return normalize_keys(sd)


def live_family_keys(model: Any) -> dict[str, tuple[int, ...]]:
    """The loaded model's keys and shapes in the file's layout (for telling its family; no weights copied)."""
    return {key: tuple(value.shape) for key, value in module_state_dict(model).items()}


def family_name(model: Any) -> str:
    return next((name for name, flag in (("sdxl", "is_sdxl"), ("sd2", "is_sd2"), ("sd1", "is_sd1"))
                 if getattr(model, flag, False)), "unknown")


def prediction_type(model: Any) -> str | None:
    """"v_prediction" where Forge samples the loaded model as one (its UNet's k-diffusion predictor), else None."""
    predictor = getattr(model.forge_objects.unet.model, "predictor", None)
    return "v_prediction" if getattr(predictor, "prediction_type", None) == "v_prediction" else None


def live_facts(model: Any) -> BaseFacts:
    """What the loaded model is (its family from its modules' shapes; refused if not SD 1.x, 2.x or SDXL)."""
    metadata = getattr(model.sd_checkpoint_info, "metadata", None) or {}
    family = detect_family(live_family_keys(model))
    return BaseFacts(family, prediction_type(model), declared_resolution(metadata))


def modules_summary() -> str:
    """The model box's VAE line on Forge: the selected VAE file, and any selected text encoder after it ("" when
    nothing is selected: the checkpoint's own)."""
    modules = selected_modules()
    if not modules:
        return ""
    vae = selected_vae()
    encoders = [Path(path).name for path in modules if path != vae]
    text = Path(vae).name if vae else "the checkpoint’s own"
    if encoders:
        text += f"; text encoder: {', '.join(encoders)}"
    return text + " (Forge's VAE / Text Encoder selection)"


def bundle_from_live(model: Any, config: Config) -> ModelBundle:
    """The bundle of Forge's model in memory: its modules' weights (the selected VAE and text encoders in them),
    the vae option's VAE where one is given, the prediction type Forge samples it with."""
    info = model.sd_checkpoint_info
    state_dict = live_state_dict(model)
    vae_state_dict = read_vae(config.vae) if config.vae else None
    prediction = config.prediction_type
    if prediction == "auto":
        prediction = prediction_type(model) or ("auto" if "v_pred" in state_dict else "epsilon")
    vae_file = config.vae or selected_vae()
    sha256 = getattr(info, "sha256", None) or ""
    source = SourceInfo(name=info.name, path=str(info.filename), sha256=sha256,
                        short_hash=getattr(info, "shorthash", None) or sha256[:10],
                        vae_name=Path(vae_file).name if vae_file else "")
    yaml_path = Path(info.filename).with_suffix(".yaml")
    yaml_text = yaml_path.read_text(encoding="utf-8", errors="replace") if yaml_path.is_file() else None
    metadata = getattr(info, "metadata", None) or {}
    return load_bundle(state_dict, vae_state_dict=vae_state_dict, owned=True, prediction_type=prediction,
                       source=source, yaml_text=yaml_text,
                       metadata={k: v for k, v in metadata.items() if isinstance(v, str)})
