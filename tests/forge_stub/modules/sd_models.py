"""Forge's modules.sd_models: v1.10.1's checkpoint list (CheckpointInfo, list_models, aliases, select_checkpoint)
unchanged, its dropdown titles and every loading function replaced (load_model, reload_model_weights,
send_model_to_device ... are stubs that do nothing), and `forge_model_reload`, which loads lazily what
`model_data.forge_loading_parameters` names."""

import gc
import importlib.util
import math
import os
import sys

import torch
from backend import memory_management
from backend.args import dynamic_args
from backend.loader import forge_loader
from modules import devices, script_callbacks, shared
from modules.shared import cmd_opts, opts


def _webui_sd_models():
    """The WebUI stand-in's sd_models, whose checkpoint list Forge keeps as it is."""
    name = "modules._webui_sd_models"
    if name not in sys.modules:
        path = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "webui_stub", "modules", "sd_models.py")
        spec = importlib.util.spec_from_file_location(name, os.path.abspath(path))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


_webui = _webui_sd_models()
model_dir = _webui.model_dir
model_path = _webui.model_path
checkpoints_list = _webui.checkpoints_list
checkpoint_aliases = _webui.checkpoint_aliases
checkpoint_alisases = checkpoint_aliases
checkpoints_loaded = _webui.checkpoints_loaded
CheckpointInfo = _webui.CheckpointInfo
list_models = _webui.list_models
get_closet_checkpoint_match = _webui.get_closet_checkpoint_match
model_hash = _webui.model_hash
select_checkpoint = _webui.select_checkpoint
read_metadata_from_safetensors = _webui.read_metadata_from_safetensors
re_strip_checksum = _webui.re_strip_checksum


def checkpoint_tiles(use_short=False):
    """Forge's dropdown lists names (without the hash), or short titles."""
    return [x.short_title if use_short else x.name for x in checkpoints_list.values()]


def read_state_dict(checkpoint_file, print_global_state=False, map_location=None):
    pass


def load_model_weights(model, checkpoint_info, state_dict, timer=None):
    pass


class FakeInitialModel:
    """Forge's placeholder before the first generation (no checkpoint info)."""

    def __init__(self):
        self.cond_stage_model = None
        self.chunk_length = 75

    def get_prompt_lengths_on_ui(self, prompt):
        r = len(prompt.strip("!,. ").replace(" ", ",").split(","))
        return r, math.ceil(max(r, 1) / self.chunk_length) * self.chunk_length


class SdModelData:
    def __init__(self):
        self.sd_model = FakeInitialModel()
        self.forge_loading_parameters = {}
        self.forge_hash = ""

    def get_sd_model(self):
        return self.sd_model

    def set_sd_model(self, v):
        self.sd_model = v


model_data = SdModelData()


def send_model_to_cpu(m):
    pass


def model_target_device(m):
    return devices.device


def send_model_to_device(m):
    pass


def send_model_to_trash(m):
    pass


def load_model(checkpoint_info=None, already_loaded_state_dict=None):
    pass


def reload_model_weights(sd_model=None, info=None, forced_reload=False):
    pass


def unload_model_weights(sd_model=None, info=None):
    memory_management.unload_all_models()


@torch.inference_mode()
def forge_model_reload():
    current_hash = str(model_data.forge_loading_parameters)
    if model_data.forge_hash == current_hash:
        return model_data.sd_model, False
    if model_data.sd_model:
        model_data.sd_model = None
        memory_management.unload_all_models()
        gc.collect()
    checkpoint_info = model_data.forge_loading_parameters["checkpoint_info"]
    if checkpoint_info is None:
        raise ValueError("You do not have any model! Please download at least one model in [models/Stable-diffusion].")
    additional_state_dicts = model_data.forge_loading_parameters.get("additional_modules", [])
    dynamic_args["forge_unet_storage_dtype"] = model_data.forge_loading_parameters.get("unet_storage_dtype", None)
    dynamic_args["embedding_dir"] = cmd_opts.embeddings_dir if hasattr(cmd_opts, "embeddings_dir") else None
    sd_model = forge_loader(checkpoint_info.filename, additional_state_dicts=additional_state_dicts)
    sd_model.extra_generation_params = {}
    sd_model.comments = []
    sd_model.sd_checkpoint_info = checkpoint_info
    sd_model.filename = checkpoint_info.filename
    sd_model.sd_model_hash = checkpoint_info.calculate_shorthash()
    shared.opts.data["sd_checkpoint_hash"] = checkpoint_info.sha256
    model_data.set_sd_model(sd_model)
    script_callbacks.model_loaded_callback(sd_model)
    model_data.forge_hash = current_hash
    return sd_model, True


__all__ = ["opts"]
