"""Stand-in for modules.sd_vae: which VAE the loaded model uses (external file or the checkpoint's own)."""

import os
from dataclasses import dataclass

from modules import paths, shared

vae_path = os.path.abspath(os.path.join(paths.models_path, "VAE"))
vae_ckpt_extensions = [".pt", ".ckpt", ".safetensors"]
vae_dict = {}

base_vae = None
loaded_vae_file = None
checkpoint_info = None
unspecified = object()


def get_loaded_vae_name():
    return None if loaded_vae_file is None else os.path.basename(loaded_vae_file)


def store_base_vae(model):
    global base_vae, checkpoint_info
    if checkpoint_info != model.sd_checkpoint_info:
        assert not loaded_vae_file, "Trying to store non-base VAE!"
        base_vae = {k: v.clone() for k, v in model.first_stage_model.state_dict().items()}
        checkpoint_info = model.sd_checkpoint_info


def delete_base_vae():
    global base_vae, checkpoint_info
    base_vae = None
    checkpoint_info = None


def restore_base_vae(model):
    global loaded_vae_file
    if base_vae is not None and checkpoint_info == model.sd_checkpoint_info:
        _load_vae_dict(model, base_vae)
        loaded_vae_file = None
    delete_base_vae()


def refresh_vae_list():
    vae_dict.clear()
    folders = [vae_path] + ([shared.cmd_opts.vae_dir] if shared.cmd_opts.vae_dir else [])
    for folder in folders:
        if not os.path.isdir(folder):
            continue
        for root, _, files in os.walk(folder):
            for name in sorted(files):
                if os.path.splitext(name)[1].lower() in vae_ckpt_extensions:
                    vae_dict[name] = os.path.join(root, name)


@dataclass
class VaeResolution:
    vae: str = None
    source: str = None
    resolved: bool = True

    def tuple(self):
        return self.vae, self.source


def resolve_vae(checkpoint_file):
    """The VAE the sd_vae setting names (the host also looks for a VAE beside the checkpoint, and in its user
    metadata), as a VaeResolution like the host's."""
    setting = shared.opts.sd_vae
    if setting in ("Automatic", "None", None):
        return VaeResolution(resolved=setting == "None")
    return VaeResolution(vae_dict.get(setting), "specified in settings")


def load_vae_dict(filename, map_location):
    from modules import sd_models
    sd = sd_models.read_state_dict(filename, map_location=map_location)
    return {k[len("first_stage_model."):] if k.startswith("first_stage_model.") else k: v for k, v in sd.items()
            if not k.startswith(("loss", "model_ema"))}


def load_vae(model, vae_file=None, vae_source="from unknown source"):
    global loaded_vae_file
    if vae_file:
        store_base_vae(model)
        _load_vae_dict(model, load_vae_dict(vae_file, map_location="cpu"))
    elif loaded_vae_file:
        restore_base_vae(model)
    loaded_vae_file = vae_file
    model.base_vae = base_vae
    model.loaded_vae_file = loaded_vae_file


def _load_vae_dict(model, vae_dict_1):
    model.first_stage_model.load_state_dict(vae_dict_1)


def clear_loaded_vae():
    global loaded_vae_file
    loaded_vae_file = None


def reload_vae_weights(sd_model=None, vae_file=unspecified):
    sd_model = sd_model or shared.sd_model
    if vae_file == unspecified:
        vae_file, vae_source = resolve_vae(sd_model.sd_checkpoint_info.filename).tuple()
    else:
        vae_source = "function argument"
    if loaded_vae_file == vae_file:
        return None
    load_vae(sd_model, vae_file, vae_source)
    from modules import script_callbacks
    script_callbacks.model_loaded_callback(sd_model)
    return sd_model
