"""Forge's modules_forge.main_entry: the checkpoint and "VAE / Text Encoder" selection (what the dropdowns at the
top of the page call), the loading parameters they produce, and of its gradio parts the checkpoint dropdown alone."""

import os

import torch
from backend.args import dynamic_args
from modules import paths, processing, sd_models, shared

forge_unet_storage_dtype_options = {
    "Automatic": (None, False),
    "Automatic (fp16 LoRA)": (None, True),
    "bnb-nf4": ("nf4", False),
    "bnb-nf4 (fp16 LoRA)": ("nf4", True),
    "float8-e4m3fn": (torch.float8_e4m3fn, False),
    "float8-e4m3fn (fp16 LoRA)": (torch.float8_e4m3fn, True),
    "bnb-fp4": ("fp4", False),
    "bnb-fp4 (fp16 LoRA)": ("fp4", True),
    "float8-e5m2": (torch.float8_e5m2, False),
    "float8-e5m2 (fp16 LoRA)": (torch.float8_e5m2, True),
}

module_list = {}


def find_files_with_extensions(base_path, extensions):
    found_files = {}
    for root, _, files in os.walk(base_path):
        for file in files:
            if any(file.endswith(ext) for ext in extensions):
                found_files[file] = os.path.join(root, file)
    return found_files


def refresh_models():
    """The checkpoint dropdown's choices and the VAE / Text Encoder dropdown's (file names)."""
    shared.refresh_checkpoints()
    ckpt_list = shared.list_checkpoint_tiles(shared.opts.sd_checkpoint_dropdown_use_short)
    module_list.clear()
    module_paths = [os.path.abspath(os.path.join(paths.models_path, "VAE")),
                    os.path.abspath(os.path.join(paths.models_path, "text_encoder"))]
    for vae_path in module_paths:
        module_list.update(find_files_with_extensions(vae_path, ["ckpt", "pt", "bin", "safetensors", "gguf"]))
    return ckpt_list, module_list.keys()


def refresh_model_loading_parameters():
    from modules.sd_models import model_data, select_checkpoint

    checkpoint_info = select_checkpoint()
    unet_storage_dtype, lora_fp16 = forge_unet_storage_dtype_options.get(shared.opts.forge_unet_storage_dtype,
                                                                         (None, False))
    dynamic_args["online_lora"] = lora_fp16
    model_data.forge_loading_parameters = dict(checkpoint_info=checkpoint_info,
                                               additional_modules=shared.opts.forge_additional_modules,
                                               unet_storage_dtype=unet_storage_dtype)
    processing.need_global_unload = True


def checkpoint_change(ckpt_name, save=True, refresh=True):
    """The checkpoint dropdown's change: `ckpt_name` is one of its choices."""
    new_ckpt_info = sd_models.get_closet_checkpoint_match(ckpt_name)
    current_ckpt_info = sd_models.get_closet_checkpoint_match(shared.opts.data.get("sd_model_checkpoint", ""))
    if new_ckpt_info == current_ckpt_info:
        return False
    shared.opts.set("sd_model_checkpoint", ckpt_name)
    if refresh:
        refresh_model_loading_parameters()
    return True


def modules_change(module_values, save=True, refresh=True):
    """The VAE / Text Encoder dropdown's change: file names (or paths), stored as full paths."""
    modules = []
    for v in module_values:
        module_name = os.path.basename(v)
        if module_name in module_list:
            modules.append(module_list[module_name])
    if sorted(modules) == sorted(shared.opts.data.get("forge_additional_modules", [])):
        return False
    shared.opts.set("forge_additional_modules", modules)
    if refresh:
        refresh_model_loading_parameters()
    return True


def make_checkpoint_manager_ui():
    """The checkpoint dropdown Forge puts in the quicksettings row (no elem_id; elem_classes model_selection).
    Forge's patched gradio announces every component to the after-component callbacks with its keyword arguments;
    the stand-in announces this one the same way."""
    import gradio as gr
    from modules import script_callbacks

    kwargs = dict(label="Checkpoint", elem_classes=["model_selection"], choices=list(refresh_models()[0]))
    dropdown = gr.Dropdown(value=lambda: shared.opts.sd_model_checkpoint, **kwargs)
    script_callbacks.after_component_callback(dropdown, **kwargs)
    return dropdown


def redraw_checkpoint_dropdown():
    """What Forge's gradio 4 does each time an event updates the checkpoint dropdown (gradio/blocks.py,
    postprocess_data: `block.__class__(**constructor_args, render=False)`): a new dropdown from its constructor
    arguments, outside any Blocks, which Forge's patched Component.__init__ announces to the after-component
    callbacks like any other."""
    import gradio as gr
    from modules import script_callbacks

    kwargs = dict(label="Checkpoint", elem_classes=["model_selection"], choices=list(refresh_models()[0]),
                  value=shared.opts.sd_model_checkpoint, render=False)
    dropdown = gr.Dropdown(**kwargs)
    script_callbacks.after_component_callback(dropdown, **kwargs)
    return dropdown
