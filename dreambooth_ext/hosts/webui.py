"""The WebUI as a host: train the model it has loaded, save next to its checkpoints, share its device and progress.

With hosts/forge.py (Forge's differences), the only engine module that imports the WebUI's `modules` package,
always inside functions: importing this file outside the WebUI is harmless, calling into it is not.

What the live model looks like (AUTOMATIC1111 v1.10.1, read from its source and seen on a running host):
- `state_dict()` has the prompt hijack's extra levels: `cond_stage_model.wrapped.…` and the token embedding's
  `….token_embedding.wrapped.weight` (sd_hijack.EmbeddingsWithFixes);
- weights are fp16 unless --no-half, schedule buffers too (only `alphas_cumprod` is kept in fp32), Linear/Conv
  weights are fp8 with Settings > Optimizations > FP8 weight, and a generation with `<lora:…>` leaves LoRA deltas
  added in place, with clean copies in `network_weights_backup`/`network_bias_backup` (extensions-builtin/Lora).
Forge keeps the same callbacks and checkpoint list, but its model is a different object (`forge_objects`), it
loads lazily and several `sd_models` functions are stubs there: what differs lives in hosts/forge.py, called from
here where `is_forge()`.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..config import Config
from ..errors import DreamboothError
from ..models.bundle import (
    BaseFacts,
    ModelBundle,
    SourceInfo,
    check_checkpoint_file,
    declared_resolution,
    load_bundle,
    load_bundle_from_file,
)
from ..models.checkpoint import read_named_tensors, read_vae
from ..models.family import FAMILIES, UNET_PREFIX, Family, detect_family, normalize_keys
from . import forge
from .base import Host

log = logging.getLogger(__name__)

FP8_DTYPES = tuple(getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
                                                     "float8_e5m2fnuz") if hasattr(torch, name))
_SCHEDULE_KEYS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                  "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                  "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                  "posterior_mean_coef1", "posterior_mean_coef2")
_SIGMAS = "denoiser.sigmas"  # SDXL (sgm) keeps its schedule as sigmas

NO_MODEL = ("No checkpoint is loaded: pick one in the Stable Diffusion checkpoint dropdown at the top of the page, "
            "wait until it has loaded, then start training again.")


# ----------------------------------------------------------------------------------------------------------
# The host's state


def is_forge() -> bool:
    """Forge (lllyasviel/stable-diffusion-webui-forge) loads models through sd_models.forge_model_reload."""
    return forge.is_forge()


def _current_model() -> Any:
    """The loaded model without triggering a load (`shared.sd_model` loads one on first access)."""
    from modules import sd_models, shared

    data = getattr(sd_models, "model_data", None)
    model = data.sd_model if data is not None else shared.sd_model
    # Forge's placeholder before the first generation has no checkpoint info.
    return model if model is not None and getattr(model, "sd_checkpoint_info", None) is not None else None


def _loaded_model() -> Any:
    """The loaded model, loading the selected checkpoint first if the host has never loaded one."""
    from modules import shared

    model = _current_model()
    if model is None:
        model = shared.sd_model
    if model is None or getattr(model, "sd_checkpoint_info", None) is None:
        raise DreamboothError(NO_MODEL)
    return model


def selected_checkpoint() -> Any:
    """The CheckpointInfo the dropdown at the top of the page selects (`opts.sd_model_checkpoint`): what the host's
    next generation loads first; None when that option names no checkpoint the host lists."""
    from modules import sd_models, shared

    return sd_models.checkpoint_aliases.get(shared.opts.sd_model_checkpoint)


def pending_selection(model: Any) -> Any:
    """The selected checkpoint when `model` (the one in memory) is another file, else None.

    They differ when the selection changed without a load: the host's own `list_models()` (POST
    /sdapi/v1/refresh-checkpoints, the checkpoints' Refresh) selects the --ckpt file again, and a failed load
    leaves the old model in memory. The next generation loads the selection; a run started now must too."""
    info = selected_checkpoint()
    if model is None or info is None or info.filename == model.sd_checkpoint_info.filename:
        return None
    return info


def load_selected_checkpoint(info: Any) -> Any:
    """What processing.process_images does before every generation: `reload_model_weights()` loads the selected
    checkpoint (`info`) in place of the one in memory. Only where the host's queue lock is held (a run holds it),
    so that no generation sees its model change. Returns the loaded model."""
    from modules import sd_models

    loaded = _current_model()
    log.info("The checkpoint dropdown selects %s while %s is in memory: loading %s first, as a generation would.",
             info.title, loaded.sd_checkpoint_info.title if loaded is not None else "nothing", info.title)
    try:
        sd_models.reload_model_weights()
    except Exception as exc:
        raise DreamboothError(
            f"The checkpoint selected at the top of the page, {info.title}, is not the one in memory, and loading "
            f"it failed ({type(exc).__name__}: {exc}). Select a checkpoint that loads (generate an image to see "
            "the WebUI's own error), then start training again.") from exc
    return _loaded_model()


def dreambooth_dir() -> Path:
    """--dreambooth-dir, or `<models dir>/dreambooth` (follows --models-dir, like the host's other model folders)."""
    from modules import paths, shared

    configured = getattr(shared.cmd_opts, "dreambooth_dir", None)
    return Path(configured) if configured else Path(paths.models_path) / "dreambooth"


def lora_dir() -> Path:
    """The host's Lora folder: --lora-dir (added by the built-in Lora extension), else models/Lora."""
    from modules import paths, shared

    configured = getattr(shared.cmd_opts, "lora_dir", None)
    return Path(configured) if configured else Path(paths.models_path) / "Lora"


def refresh_lora_list() -> bool:
    """Re-scan the Lora folder the way the Lora tab's refresh does (the built-in extension's `networks` module:
    the host puts each extension's folder on sys.path, so it is importable once that extension has loaded), so
    <lora:name:1> works in prompts at once. False when the host has no such extension."""
    networks = sys.modules.get("networks")
    if networks is None or not callable(getattr(networks, "list_available_networks", None)):
        return False
    networks.list_available_networks()
    return True


LORA_PAGE = "lora"  # the built-in Lora extension's extra-networks page (title "Lora")


def refresh_lora_cards() -> bool:
    """Do for the Lora page what its Refresh button does in txt2img and img2img: re-scan the Lora folder, then
    rebuild the cards each of those tabs keeps (`ExtraNetworksUi.pages_contents`: every page load is served that
    list, so a new LoRA's card would appear only after a press of Refresh). Only the Lora page: the button also
    refreshes the Checkpoints page, whose `list_models()` selects the --ckpt file again. A tab no page has loaded
    yet builds all its cards fresh at the first load. False when the host has no Lora page or list."""
    from modules import ui_extra_networks

    page = next((p for p in ui_extra_networks.extra_pages if p.name == LORA_PAGE), None)
    if page is None:  # no UI (--nowebui): the list alone, for <lora:...> in API prompts
        return refresh_lora_list()
    page.refresh()
    for tab in _extra_networks_uis():
        if tab.pages_contents and page in tab.stored_extra_pages:
            tab.pages_contents[tab.stored_extra_pages.index(page)] = page.create_html(tab.tabname)
    return True


def _extra_networks_uis() -> list[Any]:
    """The `ExtraNetworksUi` of txt2img and of img2img. v1.10.1 and Forge keep them nowhere but in the handlers they
    give the hidden Refresh buttons of their pages (`{tab}_lora_extra_refresh_internal`): found there, in the page's
    events. Empty without a page."""
    from modules import shared

    demo = getattr(shared, "demo", None)
    suffix = f"_{LORA_PAGE}_extra_refresh_internal"
    found = []
    for targets, fn in _events(demo):
        if not any(str(getattr(demo.blocks.get(target), "elem_id", "")).endswith(suffix) for target in targets):
            continue
        tab = _closure_value(fn, "ui")
        if tab is not None and hasattr(tab, "pages_contents") and all(tab is not other for other in found):
            found.append(tab)
    return found


def _events(demo: Any) -> list[tuple[list, Any]]:
    """Each event of a gradio page as (the block ids it is on, its handler). gradio 3 (the WebUI) keeps the block ids
    in `demo.dependencies` beside the handlers in the list `demo.fns`; gradio 4 (Forge) keeps both in the values of
    the dict `demo.fns`, each target as (block id, event name)."""
    handlers, dependencies = getattr(demo, "fns", None), getattr(demo, "dependencies", None)
    if isinstance(handlers, dict):
        return [([target[0] for target in getattr(h, "targets", None) or ()], getattr(h, "fn", None))
                for h in handlers.values()]
    if isinstance(handlers, list) and isinstance(dependencies, list):
        return [(list(d.get("targets", ())), getattr(h, "fn", None))
                for d, h in zip(dependencies, handlers, strict=False)]
    return []


def _closure_value(fn: Any, name: str) -> Any:
    """The value a nested function closes over under `name`; None if it has none."""
    code, cells = getattr(fn, "__code__", None), getattr(fn, "__closure__", None) or ()
    cell = dict(zip(code.co_freevars, cells, strict=False)).get(name) if code is not None else None
    try:
        return cell.cell_contents if cell is not None else None
    except ValueError:  # not assigned yet
        return None


def checkpoints_dir() -> Path:
    """Where trained checkpoints go: --ckpt-dir if given, else models/Stable-diffusion (follows --models-dir)."""
    from modules import sd_models, shared

    return Path(shared.cmd_opts.ckpt_dir or sd_models.model_path)


def checkpoint_titles() -> list[str]:
    from modules import sd_models

    return list(sd_models.checkpoint_tiles())


def rescan_checkpoints() -> None:
    """Re-scan the checkpoint folders (new files appear in the list) without changing the selected checkpoint.

    The host's `list_models()` also sets `opts.sd_model_checkpoint` to the --ckpt file whenever the WebUI was
    started with --ckpt: called bare, every rescan would quietly select that file again, and the next generation
    would swap the user's model for it."""
    from modules import sd_models, shared

    selected = shared.opts.data.get("sd_model_checkpoint")
    sd_models.list_models()
    if selected is not None:
        shared.opts.data["sd_model_checkpoint"] = selected


def checkpoint_selection() -> tuple[list[str], str | None]:
    """The checkpoint dropdown's fresh choices (folders re-scanned) and the selected title: what it should show."""
    from modules import sd_models, shared

    rescan_checkpoints()
    return list(sd_models.checkpoint_tiles()), shared.opts.sd_model_checkpoint


def _checkpoint_info(path_or_title: str | os.PathLike) -> Any:
    """The host's CheckpointInfo for a file (by its path) or a title, name or hash it lists; None if unlisted."""
    from modules import sd_models

    wanted = os.path.normcase(os.path.abspath(path_or_title))
    for info in sd_models.checkpoints_list.values():
        if os.path.normcase(os.path.abspath(info.filename)) == wanted:
            return info
    return sd_models.checkpoint_aliases.get(str(path_or_title))


def load_checkpoint_now(path_or_title: str | os.PathLike) -> str:
    """Load a (freshly trained) checkpoint and make it the host's selected one; returns its title.

    Selected means `opts.sd_model_checkpoint` names it: the host loads that option's checkpoint before each
    generation, so a model loaded without it is swapped back at the next one. The option is written directly:
    `opts.set` would run its onchange, which takes the host's queue_lock, and a training job may hold it.
    """
    from modules import sd_models, shared

    rescan_checkpoints()
    info = _checkpoint_info(path_or_title)
    if info is None:
        raise DreamboothError(f"{str(path_or_title)!r} is not in the WebUI's checkpoint list: give a file inside "
                              f"{checkpoints_dir()} (or --ckpt-dir) or the title of a listed checkpoint.")
    if is_forge():
        forge.select_and_load(info)
    else:
        sd_models.reload_model_weights(info=info)
        shared.opts.data["sd_model_checkpoint"] = info.title  # the title now has its hash
    return info.title


def _forge_checkpoint_file() -> Path:
    """The checkpoint file Forge's next generation uses: the selected one when it differs from memory."""
    model = _current_model()
    info = forge.selected_checkpoint() if model is None or forge.load_pending() else model.sd_checkpoint_info
    if info is None:
        raise DreamboothError(NO_MODEL)
    return Path(info.filename)


# ----------------------------------------------------------------------------------------------------------
# Reading the live model


def _refuse_unusable(model: Any, live: dict[str, torch.Tensor]) -> Family:
    """Its family; other models get the engine's own message, fp8 storage and unrecoverable LoRA deltas are
    refused."""
    family = detect_family(normalize_keys(live))
    if any(v.dtype in FP8_DTYPES for v in live.values()):
        raise DreamboothError(_fp8_message(model))
    unrecoverable = [name for name, module in model.named_modules()
                     if getattr(module, "network_current_names", ()) and
                     getattr(module, "network_weights_backup", None) is None]
    if unrecoverable:
        raise DreamboothError(
            f"The loaded model has LoRA weights merged into {len(unrecoverable)} layer(s) (e.g. {unrecoverable[0]}) "
            "and the WebUI kept no clean copy of them, so its base weights cannot be recovered. Fix: remove every "
            "<lora:...> from the prompt and generate one image (that restores the weights), or reload the "
            "checkpoint, then start training again.")
    return family


def _fp8_message(model: Any) -> str:
    from modules import shared

    setting = getattr(shared.opts, "fp8_storage", "Enable")
    return (f"The loaded checkpoint {model.sd_checkpoint_info.title} is held in 8-bit (fp8) weights because "
            f"Settings > Optimizations > FP8 weight is '{setting}'; training from those would bake their rounding "
            "into your model. Fix: set FP8 weight to 'Disable', click Apply settings and reload the checkpoint (or "
            "pick the checkpoint file as the base model so it is read from disk).")


def live_model_facts(model: Any) -> BaseFacts:
    """What the loaded model is (refusing what cannot be trained); cheap: no weights are copied."""
    family = _refuse_unusable(model, model.state_dict())
    metadata = getattr(model.sd_checkpoint_info, "metadata", None) or {}
    prediction = "v_prediction" if getattr(model, "parameterization", "eps") == "v" else None
    return BaseFacts(family, prediction, declared_resolution(metadata))


def live_model_problem(model: Any = None) -> str | None:
    """Why the loaded model cannot be trained, or None; cheap (no weights are copied)."""
    try:
        model = model if model is not None else _current_model()
        if model is None:
            return NO_MODEL
        if is_forge():
            return _forge_problem(model)
        _refuse_unusable(model, model.state_dict())
    except DreamboothError as exc:
        return str(exc)
    return None


def _forge_problem(model: Any) -> str | None:
    """Why Forge's loaded model cannot be trained (not SD 1.x, 2.x or SDXL), or None; a quantized one is read from
    its file, which is no problem."""
    if forge.family_name(model) == "unknown":
        return ("Forge has loaded a model that is not SD 1.x, 2.x or SDXL (e.g. Flux or SD3); only those can be "
                "trained. Select such a checkpoint at the top of the page, generate once, then start training.")
    return None


def _lora_backups(model: Any) -> dict[str, torch.Tensor | None]:
    """Live key -> the clean tensor from the Lora extension's backup; None = the key did not exist before."""
    clean: dict[str, torch.Tensor | None] = {}
    for name, module in model.named_modules():
        if not getattr(module, "network_current_names", ()):
            continue
        prefix = f"{name}." if name else ""
        weights = module.network_weights_backup
        if isinstance(weights, (tuple, list)):  # MultiheadAttention: (in_proj_weight, out_proj.weight)
            clean[prefix + "in_proj_weight"], clean[prefix + "out_proj.weight"] = weights[0], weights[1]
            bias_key = prefix + "out_proj.bias"
        else:
            clean[prefix + "weight"] = weights
            bias_key = prefix + "bias"
        clean[bias_key] = getattr(module, "network_bias_backup", None)
    if clean:
        log.info("The loaded model has LoRA weights applied in place; training starts from the clean weights the "
                 "WebUI kept (%d tensors restored in our copy, the WebUI's model is left as it is).",
                 sum(v is not None for v in clean.values()))
    return clean


def _cpu_copy(tensor: torch.Tensor, *, fp32: bool) -> torch.Tensor:
    """A CPU copy that never shares storage with the host's tensor; with `fp32`, floats are upcast to fp32."""
    tensor = tensor.detach()
    if fp32 and tensor.is_floating_point():
        return tensor.to("cpu", torch.float32, copy=True)
    return tensor.to("cpu", copy=True)


def _schedule_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> dict[str, torch.Tensor]:
    """The DDPM schedule buffers of an ldm checkpoint, computed in float64 from alphas_cumprod."""
    ac = alphas_cumprod.detach().to("cpu", torch.float64)
    ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    betas = 1.0 - ac / ac_prev
    posterior_variance = betas * (1.0 - ac_prev) / (1.0 - ac)
    values = {
        "betas": betas, "alphas_cumprod": ac, "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": ac.sqrt(), "sqrt_one_minus_alphas_cumprod": (1.0 - ac).sqrt(),
        "log_one_minus_alphas_cumprod": (1.0 - ac).log(), "sqrt_recip_alphas_cumprod": (1.0 / ac).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / ac - 1).sqrt(), "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": posterior_variance.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * ac_prev.sqrt() / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - ac_prev) * (1.0 - betas).sqrt() / (1.0 - ac),
        _SIGMAS: ((1.0 - ac) / ac).sqrt(),
    }
    return {k: v.float() for k, v in values.items()}


def _restore_schedule(sd: dict[str, torch.Tensor], live: dict[str, torch.Tensor], model: Any) -> None:
    """The host halves the schedule buffers (SDXL's `denoiser.sigmas` too) but keeps `alphas_cumprod` (before any
    schedule override) in fp32: rebuild the halved ones from it instead of training with fp16-rounded values."""
    halved = [k for k in (*_SCHEDULE_KEYS, _SIGMAS) if k in live and live[k].dtype != torch.float32]
    original = getattr(model, "alphas_cumprod_original", None)
    if original is None:
        original = live.get("alphas_cumprod")
    if not halved or original is None or original.dtype != torch.float32:
        return
    rebuilt = _schedule_from_alphas_cumprod(original)
    for key in halved:
        sd[key] = rebuilt[key]


def live_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """The loaded model's clean weights in the on-disk layout, LoRA deltas undone: CPU copies, the UNet's in fp32
    (the weights a run trains: `load_bundle` takes them as they are), the rest in the host's precision (the VAE
    and text encoders stay frozen in it unless a run trains them)."""
    live = model.state_dict()
    _refuse_unusable(model, live)
    clean = _lora_backups(model)
    sd = {}
    for key, value in live.items():
        if key in clean:
            if clean[key] is None:
                continue  # a bias the LoRA added
            value = clean[key]
        sd[key] = _cpu_copy(value, fp32=key.startswith(UNET_PREFIX))
    _restore_schedule(sd, live, model)
    return normalize_keys(sd)


def _prediction_type(config: Config, model: Any, markers: dict[str, torch.Tensor]) -> str:
    if config.prediction_type != "auto":
        return config.prediction_type
    if getattr(model, "parameterization", "eps") == "v":
        return "v_prediction"
    return "auto" if "v_pred" in markers else "epsilon"  # the family reads the marker


def _file_markers(model: Any) -> dict[str, torch.Tensor]:
    """Flag tensors of the loaded checkpoint's file (SDXL's v_pred, ztsnr) that the host does not keep in its
    model: read from the file, so that the run trains as marked and the result keeps them."""
    names = tuple(dict.fromkeys(key for family in FAMILIES for key in family.marker_keys))
    path = getattr(model.sd_checkpoint_info, "filename", "")
    return read_named_tensors(path, names) if path and os.path.isfile(path) else {}


def _source_info(model: Any, config: Config) -> SourceInfo:
    from modules import sd_vae

    info = model.sd_checkpoint_info
    sha256 = getattr(info, "sha256", None) or ""
    short = getattr(info, "shorthash", None) or sha256[:10]
    external_vae = config.vae or getattr(sd_vae, "loaded_vae_file", None)
    return SourceInfo(name=info.name, path=str(info.filename), sha256=sha256, short_hash=short,
                      vae_name=Path(external_vae).name if external_vae else "")


def bundle_from_live_model(model: Any, config: Config) -> ModelBundle:
    """The bundle of the model in memory: its weights, the VAE in use (external or own), its prediction type."""
    markers = _file_markers(model)
    state_dict = {**live_state_dict(model), **markers}
    vae_state_dict = read_vae(config.vae) if config.vae else None
    metadata = getattr(model.sd_checkpoint_info, "metadata", None) or {}
    return load_bundle(state_dict, vae_state_dict=vae_state_dict, owned=True,
                       prediction_type=_prediction_type(config, model, markers),
                       source=_source_info(model, config), yaml_text=_used_config_text(model),
                       metadata={k: v for k, v in metadata.items() if isinstance(v, str)})


def _used_config_text(model: Any) -> str | None:
    """The ldm config the host built the loaded model from (the yaml beside its file, or one it guessed)."""
    path = getattr(model, "used_config", None)
    if not path or not os.path.isfile(path):
        return None
    return Path(path).read_text(encoding="utf-8", errors="replace")


def loaded_file() -> str | None:
    """The checkpoint file the host's next generation uses: the loaded model's, or the selected one that replaces
    it first; None when it has no model loaded (never loads one)."""
    if is_forge():
        try:
            return str(_forge_checkpoint_file())
        except DreamboothError:
            return None
    model = _current_model()
    if model is None:
        return None
    return (pending_selection(model) or model.sd_checkpoint_info).filename


def loaded_model_summary() -> dict[str, str | None]:
    """For the tab: which checkpoint and VAE training would start from, and why it can't (`problem`), if so.

    Keys: title (the checkpoint's name, without the hash the host's title carries), hash (10 hex chars or ""),
    vae (the external VAE's file name, "" for the checkpoint's own),
    family ("sd1", "sd2", "sdxl", "" when nothing is loaded), prediction ("v_prediction" when the host runs it
    as one, else ""), problem (None when it can be trained), note (on Forge, when a quantized model is read from
    its file instead of memory; else absent).
    """
    from modules import sd_vae

    if is_forge():
        return _forge_summary()
    model = _current_model()
    if model is None:
        return {"title": "", "hash": "", "vae": "", "family": "", "problem": NO_MODEL}
    pending = pending_selection(model)
    if pending is not None:
        return _selected_summary(pending)
    info = model.sd_checkpoint_info
    family = next((name for name, flag in (("sdxl", "is_sdxl"), ("sd2", "is_sd2"), ("sd1", "is_sd1"))
                   if getattr(model, flag, False)), "unknown")
    vae_file = getattr(sd_vae, "loaded_vae_file", None)
    prediction = "v_prediction" if getattr(model, "parameterization", "eps") == "v" else ""
    return {"title": info.name, "hash": getattr(info, "shorthash", None) or "",
            "vae": Path(vae_file).name if vae_file else "", "family": family, "prediction": prediction,
            "problem": live_model_problem(model)}


def _selected_summary(info: Any) -> dict[str, str | None]:
    """The summary of a selected checkpoint that a run loads before reading it: from its file's header, with the VAE
    the host will load with it."""
    from modules import sd_vae

    try:
        facts, problem = check_checkpoint_file(Path(info.filename)), None
    except DreamboothError as exc:
        facts, problem = None, str(exc)
    vae_file = sd_vae.resolve_vae(info.filename).vae
    prediction = facts.prediction_type if facts is not None and facts.prediction_type == "v_prediction" else ""
    return {"title": info.name, "hash": getattr(info, "shorthash", None) or "",
            "vae": Path(vae_file).name if vae_file else "", "family": facts.family.name if facts else "",
            "prediction": prediction, "problem": problem}


def _forge_facts() -> BaseFacts | None:
    """What Forge's next generation uses, without reading weights: its file's facts where the selection is not
    loaded yet (a run loads it first) or Forge holds a quantized UNet (read from the file), else the memory's."""
    model = _current_model()
    if model is None or forge.load_pending():
        return check_checkpoint_file(_forge_checkpoint_file())
    problem = _forge_problem(model)
    if problem is not None:
        raise DreamboothError(problem)
    if forge.unet_storage(model) is not None:
        return check_checkpoint_file(Path(model.sd_checkpoint_info.filename))
    return forge.live_facts(model)


def _forge_summary() -> dict[str, str | None]:
    """The summary on Forge: the model in memory, or the selection its next generation (and a run) loads first;
    the VAE line names Forge's "VAE / Text Encoder" selection."""
    model = _current_model()
    vae = forge.modules_summary()
    if model is None or forge.load_pending():
        info = forge.selected_checkpoint()
        if info is None:
            return {"title": "", "hash": "", "vae": "", "family": "", "problem": NO_MODEL}
        try:
            facts, problem = check_checkpoint_file(Path(info.filename)), None
        except DreamboothError as exc:
            facts, problem = None, str(exc)
        prediction = facts.prediction_type if facts is not None and facts.prediction_type == "v_prediction" else ""
        return {"title": info.name, "hash": getattr(info, "shorthash", None) or "", "vae": vae,
                "family": facts.family.name if facts else "", "prediction": prediction, "problem": problem}
    info = model.sd_checkpoint_info
    summary = {"title": info.name, "hash": getattr(info, "shorthash", None) or "", "vae": vae,
               "family": forge.family_name(model), "prediction": forge.prediction_type(model) or "",
               "problem": _forge_problem(model)}
    storage = forge.unet_storage(model)
    if storage is not None:
        summary["note"] = forge.quantized_note(storage)
    return summary


# ----------------------------------------------------------------------------------------------------------
# The host object


class WebUIHost(Host):
    """Train the model the WebUI has loaded (`checkpoint_title=None`; the selected checkpoint is loaded first when
    memory holds another, as before a generation), or a checkpoint from its list read from disk."""

    def __init__(self, checkpoint_title: str | None = None):
        self.checkpoint_title = checkpoint_title
        self._released: Any = None

    # -- the base model ---------------------------------------------------------------------------------

    def load_base(self, config: Config) -> ModelBundle:
        path = self._source_file(config)
        if path is not None:
            return self._from_file(path, config)
        if is_forge():
            return self._from_forge(config)
        return bundle_from_live_model(self._selected_model(), config)

    def _from_forge(self, config: Config) -> ModelBundle:
        """Forge's model in memory (its selected VAE / text encoder modules in it, a merged LoRA undone); from
        the checkpoint's file where Forge holds the UNet quantized."""
        model = self._forge_model()
        storage = forge.unet_storage(model)
        if storage is None:
            return forge.bundle_from_live(model, config)
        path = Path(model.sd_checkpoint_info.filename)
        log.warning("%s", forge.quantized_note(storage))
        vae = config.vae or forge.selected_vae()
        return load_bundle_from_file(path, vae_path=vae or None, prediction_type=config.prediction_type)

    def _forge_model(self) -> Any:
        """Forge's loaded model, after loading the selection first where memory holds another (or none), as its
        next generation would."""
        from modules import sd_models

        if _current_model() is not None and not forge.load_pending():
            return _current_model()
        model = forge.load_selection()
        if self._released is not None:
            sd_models.unload_model_weights(model)
            self._released = model
        return model

    def _selected_model(self) -> Any:
        """The loaded model, after loading the selected checkpoint if memory holds another (as a generation would);
        kept off the device when `release_device` had moved the host's model off it."""
        from modules import sd_models

        pending = pending_selection(_current_model())
        if pending is None:
            return _loaded_model()
        model = load_selected_checkpoint(pending)
        if self._released is not None:  # reload_model_weights put the model on the device the run trains on
            sd_models.unload_model_weights(model)
            self._released = model
        return model

    def check(self, config: Config) -> BaseFacts | None:
        """An unknown checkpoint title, a file of another family, an fp8-held or LoRA-patched live model: refused
        before the run starts, without reading any weights."""
        path = self._source_file(config)
        if path is None and is_forge():
            return _forge_facts()
        if path is not None:
            return check_checkpoint_file(path)
        model = _current_model()
        if model is None:
            raise DreamboothError(NO_MODEL)
        pending = pending_selection(model)  # loaded when the run starts: its file tells what it is
        if pending is not None:
            return check_checkpoint_file(Path(pending.filename))
        return live_model_facts(model)  # refuses what live_model_problem names

    def base_files(self, config: Config) -> tuple[Path, Path | None]:
        """The picked checkpoint's file, else the loaded model's file with the VAE the WebUI uses with it."""
        from modules import sd_vae

        path = self._source_file(config)
        if path is not None:
            return path, Path(config.vae) if config.vae else None
        if is_forge():
            vae = config.vae or forge.selected_vae()
            return _forge_checkpoint_file(), Path(vae) if vae else None
        model = _current_model()
        if model is None:
            raise DreamboothError(NO_MODEL)
        pending = pending_selection(model)
        if pending is not None:  # the selected checkpoint, which the host loads with its own VAE choice
            vae = config.vae or sd_vae.resolve_vae(pending.filename).vae
            return Path(pending.filename), Path(vae) if vae else None
        info = model.sd_checkpoint_info
        vae = config.vae or getattr(sd_vae, "loaded_vae_file", None)
        return Path(info.filename), Path(vae) if vae else None

    def _source_file(self, config: Config) -> Path | None:
        """The file named by checkpoint_title or config.base_model (a path or a title); None = the live model."""
        from modules import sd_models

        wanted = self.checkpoint_title or config.base_model
        if not wanted:
            return None
        if Path(wanted).is_file():
            return Path(wanted)
        info = sd_models.get_closet_checkpoint_match(wanted)
        if info is None:
            rescan_checkpoints()
            info = sd_models.get_closet_checkpoint_match(wanted)
        if info is None:
            raise DreamboothError(f"base model {wanted!r} is neither a file nor a checkpoint in the WebUI's list. "
                                  "Pick one from the checkpoint list (refresh it if the file is new), or leave the "
                                  "base model empty to train the loaded checkpoint.")
        return Path(info.filename)

    def _from_file(self, path: Path, config: Config) -> ModelBundle:
        log.info("Reading the base model from %s", path)
        return load_bundle_from_file(path, vae_path=config.vae or None, prediction_type=config.prediction_type)

    # -- where files go ---------------------------------------------------------------------------------

    def checkpoint_path(self, project: str, step: int) -> Path:
        return checkpoints_dir() / project / f"{project}_{step}.safetensors"

    def work_dir(self, project: str) -> Path:
        return dreambooth_dir() / project

    def publish(self, path: Path) -> None:
        """Re-scan the checkpoint folders so the file is in the list at once (title without hash until hashed)."""
        rescan_checkpoints()
        log.info("Published %s to the checkpoint list", path)

    def lora_path(self, project: str, step: int) -> Path:
        return lora_dir() / project / f"{project}_{step}.safetensors"

    def publish_lora(self, path: Path) -> None:
        """List the LoRA at once: in <lora:...> prompts, and its card in the Lora tab of txt2img and img2img."""
        try:
            listed = refresh_lora_cards()
        except Exception as exc:  # the file is written: a card that fails to draw must not fail the run
            log.warning("%s is written, but refreshing the Lora tab failed (%s): press the Lora tab's Refresh.",
                        path, exc)
            return
        if listed:
            log.info("Published %s to the Lora list and tab: use it with <lora:%s:1>", path, path.stem)
        else:
            log.warning("The WebUI's Lora extension is not loaded, so %s is not listed yet; enable the built-in "
                        "Lora extension, or restart the WebUI.", path)

    # -- the device -------------------------------------------------------------------------------------

    def release_device(self, device: torch.device | None = None) -> None:
        """Move the WebUI's model off the accelerator the way its "Unload SD checkpoint to RAM" does, when the run
        trains on the device the WebUI uses; on another GPU (or the CPU) the WebUI keeps generating."""
        from modules import devices, sd_models

        model = _current_model()
        if model is None:
            return
        if device is not None and not _same_device(device, torch.device(devices.device)):
            log.info("Training on %s; the WebUI keeps its model on %s.", device, devices.device)
            return
        sd_models.unload_model_weights(model)
        self._released = model

    def restore_device(self) -> None:
        """Put the WebUI's model back ("Load SD checkpoint to VRAM"); never raises over a training error."""
        from modules import sd_models

        model, self._released = self._released, None
        if model is None:
            return
        if _current_model() is not model:
            log.info("The loaded checkpoint changed during training; not moving the old one back.")
            return
        try:
            sd_models.send_model_to_device(model)
        except Exception as exc:
            log.warning("Could not move the WebUI's model back to its device (%s). Use Settings > Actions > "
                        "'Load SD checkpoint to VRAM', or reload the checkpoint.", exc)

    # -- progress and cancel ----------------------------------------------------------------------------

    def report(self, progress: Any) -> None:
        """Mirror a train.run.Progress into shared.state: the host's progress bar and /sdapi/v1/progress follow.

        The host's bar computes its own ETA from the time since the job began and the fraction done; during
        training and class-image generation `time_start` is set so that this ETA is the run's own (what is left /
        its rate), and the text carries no second one.
        """
        from modules import shared

        state = shared.state
        done, total = _progress_counts(progress)
        if total > 0:
            state.job_count = max(int(state.job_count or 0), 1)
            state.job_no = 0
            state.sampling_steps = total
            state.sampling_step = min(done, total)
        if progress.it_per_s and done:  # training steps or class images: the bar's ETA is the run's own
            state.time_start = time.time() - done / progress.it_per_s
        state.textinfo = describe_progress(progress)

    def cancel_requested(self) -> bool:
        """The user pressed Interrupt (or Skip-all/stop generating) in the WebUI or called /sdapi/v1/interrupt."""
        from modules import shared

        return bool(shared.state.interrupted or shared.state.stopping_generation)


def _progress_counts(progress: Any) -> tuple[int, int]:
    if progress.total_steps:
        return progress.step, progress.total_steps
    return progress.done, progress.total


def _same_device(a: torch.device, b: torch.device) -> bool:
    """cuda and cuda:0 are one device (an unnumbered CUDA device is the current one, 0 unless changed)."""
    def index(device: torch.device) -> int | None:
        return device.index if device.index is not None else (0 if device.type == "cuda" else None)

    return a.type == b.type and index(a) == index(b)


def describe_progress(progress: Any) -> str:
    """One line for the progress bar: "Training step 12/400, loss 0.1234, 1.52 it/s" (the bar adds the ETA)."""
    if progress.phase == "class_images" and progress.done:
        rate = f", {progress.it_per_s:.2f} images/s" if progress.it_per_s else ""
        return f"Generating class images: {progress.done}/{progress.total}{rate}"
    if progress.phase != "training":
        return progress.message or progress.phase.replace("_", " ").capitalize()
    parts = [f"Training step {progress.step}/{progress.total_steps}"]
    if progress.loss is not None:
        parts.append(f"loss {progress.loss:.4f}")
    if progress.it_per_s:
        parts.append(f"{progress.it_per_s:.2f} it/s")
    if getattr(progress, "memory_gib", None):
        parts.append(f"{progress.memory_gib:.1f} GiB {progress.memory_kind}".rstrip())
    return ", ".join(parts)
