"""Stand-in for modules.sd_models: the checkpoint list, reading files, and loading/moving the live model.

Loading builds a `webui_stub.fake_model.FakeSDModel` (the live-model stand-in) instead of an ldm model.
"""

import collections
import json
import os
import re
import sys
import threading

import safetensors.torch
import torch
from modules import devices, errors, hashes, lowvram, paths, script_callbacks, sd_models_config, sd_vae, shared

model_dir = "Stable-diffusion"
model_path = os.path.abspath(os.path.join(paths.models_path, model_dir))

checkpoints_list = {}
checkpoint_aliases = {}
checkpoint_alisases = checkpoint_aliases
checkpoints_loaded = collections.OrderedDict()


def replace_key(d, key, new_key, value):
    keys = list(d.keys())
    d[new_key] = value
    if key not in keys:
        return d
    keys[keys.index(key)] = new_key
    new_d = {k: d[k] for k in keys}
    d.clear()
    d.update(new_d)
    return d


class CheckpointInfo:
    def __init__(self, filename):
        self.filename = filename
        abspath = os.path.abspath(filename)
        abs_ckpt_dir = os.path.abspath(shared.cmd_opts.ckpt_dir) if shared.cmd_opts.ckpt_dir is not None else None
        self.is_safetensors = os.path.splitext(filename)[1].lower() == ".safetensors"
        if abs_ckpt_dir and abspath.startswith(abs_ckpt_dir):
            name = abspath.replace(abs_ckpt_dir, "")
        elif abspath.startswith(model_path):
            name = abspath.replace(model_path, "")
        else:
            name = os.path.basename(filename)
        if name.startswith("\\") or name.startswith("/"):
            name = name[1:]
        self.metadata = {}
        if self.is_safetensors:
            try:
                self.metadata = read_metadata_from_safetensors(filename)
            except Exception as e:
                errors.display(e, f"reading metadata for {filename}")
        self.modelspec_thumbnail = self.metadata.pop("modelspec.thumbnail", None)
        self.name = name
        self.name_for_extra = os.path.splitext(os.path.basename(filename))[0]
        self.model_name = os.path.splitext(name.replace("/", "_").replace("\\", "_"))[0]
        self.hash = model_hash(filename)
        self.sha256 = hashes.sha256_from_cache(self.filename, f"checkpoint/{name}")
        self.shorthash = self.sha256[0:10] if self.sha256 else None
        self.title = name if self.shorthash is None else f"{name} [{self.shorthash}]"
        self.short_title = (self.name_for_extra if self.shorthash is None
                            else f"{self.name_for_extra} [{self.shorthash}]")
        self.ids = [self.hash, self.model_name, self.title, name, self.name_for_extra, f"{name} [{self.hash}]"]
        if self.shorthash:
            self.ids += [self.shorthash, self.sha256, f"{self.name} [{self.shorthash}]",
                         f"{self.name_for_extra} [{self.shorthash}]"]

    def register(self):
        checkpoints_list[self.title] = self
        for id_ in self.ids:
            checkpoint_aliases[id_] = self

    def calculate_shorthash(self):
        self.sha256 = hashes.sha256(self.filename, f"checkpoint/{self.name}")
        if self.sha256 is None:
            return None
        shorthash = self.sha256[0:10]
        if self.shorthash == shorthash:
            return self.shorthash
        self.shorthash = shorthash
        if self.shorthash not in self.ids:
            self.ids += [self.shorthash, self.sha256, f"{self.name} [{self.shorthash}]",
                         f"{self.name_for_extra} [{self.shorthash}]"]
        old_title = self.title
        self.title = f"{self.name} [{self.shorthash}]"
        self.short_title = f"{self.name_for_extra} [{self.shorthash}]"
        replace_key(checkpoints_list, old_title, self.title, self)
        self.register()
        return self.shorthash


def setup_model():
    os.makedirs(model_path, exist_ok=True)


def checkpoint_tiles(use_short=False):
    return [x.short_title if use_short else x.title for x in checkpoints_list.values()]


def _walk_models(folder, ext_filter, ext_blacklist):
    """What modelloader.load_models lists: every file below the folder with a wanted extension."""
    found = []
    if not folder or not os.path.isdir(folder):
        return found
    for root, _, files in os.walk(folder, followlinks=True):
        for name in sorted(files):
            if os.path.splitext(name)[1].lower() not in ext_filter:
                continue
            if any(name.lower().endswith(b) for b in ext_blacklist):
                continue
            found.append(os.path.join(root, name))
    return found


def list_models():
    checkpoints_list.clear()
    checkpoint_aliases.clear()
    exts, blacklist = [".ckpt", ".safetensors"], [".vae.ckpt", ".vae.safetensors"]
    model_list = _walk_models(model_path, exts, blacklist)
    if shared.cmd_opts.ckpt_dir and os.path.abspath(shared.cmd_opts.ckpt_dir) != model_path:
        model_list += _walk_models(shared.cmd_opts.ckpt_dir, exts, blacklist)
    cmd_ckpt = shared.cmd_opts.ckpt
    if cmd_ckpt and os.path.exists(cmd_ckpt):
        checkpoint_info = CheckpointInfo(cmd_ckpt)
        checkpoint_info.register()
        shared.opts.data["sd_model_checkpoint"] = checkpoint_info.title
    for filename in model_list:
        CheckpointInfo(filename).register()


re_strip_checksum = re.compile(r"\s*\[[^]]+]\s*$")


def get_closet_checkpoint_match(search_string):
    if not search_string:
        return None
    checkpoint_info = checkpoint_aliases.get(search_string, None)
    if checkpoint_info is not None:
        return checkpoint_info
    found = sorted([i for i in checkpoints_list.values() if search_string in i.title], key=lambda x: len(x.title))
    if found:
        return found[0]
    stripped = re.sub(re_strip_checksum, "", search_string)
    found = sorted([i for i in checkpoints_list.values() if stripped in i.title], key=lambda x: len(x.title))
    return found[0] if found else None


def model_hash(filename):
    try:
        with open(filename, "rb") as file:
            import hashlib
            m = hashlib.sha256()
            file.seek(0x100000)
            m.update(file.read(0x10000))
            return m.hexdigest()[0:8]
    except FileNotFoundError:
        return "NOFILE"


def select_checkpoint():
    model_checkpoint = shared.opts.sd_model_checkpoint
    checkpoint_info = checkpoint_aliases.get(model_checkpoint, None)
    if checkpoint_info is not None:
        return checkpoint_info
    if len(checkpoints_list) == 0:
        raise FileNotFoundError(f"No checkpoints found. When searching for checkpoints, looked at:\n - directory "
                                f"{model_path}Can't run without a checkpoint.")
    checkpoint_info = next(iter(checkpoints_list.values()))
    if model_checkpoint is not None:
        print(f"Checkpoint {model_checkpoint} not found; loading fallback {checkpoint_info.title}", file=sys.stderr)
    return checkpoint_info


checkpoint_dict_replacements_sd1 = {
    "cond_stage_model.transformer.embeddings.": "cond_stage_model.transformer.text_model.embeddings.",
    "cond_stage_model.transformer.encoder.": "cond_stage_model.transformer.text_model.encoder.",
    "cond_stage_model.transformer.final_layer_norm.": "cond_stage_model.transformer.text_model.final_layer_norm.",
}


def transform_checkpoint_dict_key(k, replacements):
    for text, replacement in replacements.items():
        if k.startswith(text):
            k = replacement + k[len(text):]
    return k


def get_state_dict_from_checkpoint(pl_sd):
    pl_sd = pl_sd.pop("state_dict", pl_sd)
    pl_sd.pop("state_dict", None)
    sd = {transform_checkpoint_dict_key(k, checkpoint_dict_replacements_sd1): v for k, v in pl_sd.items()}
    pl_sd.clear()
    pl_sd.update(sd)
    return pl_sd


def read_metadata_from_safetensors(filename):
    with open(filename, mode="rb") as file:
        metadata_len = int.from_bytes(file.read(8), "little")
        json_start = file.read(2)
        assert metadata_len > 2 and json_start in (b'{"', b"{'"), f"{filename} is not a safetensors file"
        res = {}
        json_obj = json.loads(json_start + file.read(metadata_len - 2))
        for k, v in json_obj.get("__metadata__", {}).items():
            res[k] = v
            if isinstance(v, str) and v[0:1] == "{":
                try:
                    res[k] = json.loads(v)
                except Exception:
                    pass
        return res


def read_state_dict(checkpoint_file, print_global_state=False, map_location=None):
    _, extension = os.path.splitext(checkpoint_file)
    if extension.lower() == ".safetensors":
        device = map_location or shared.weight_load_location or devices.get_optimal_device_name()
        pl_sd = safetensors.torch.load_file(checkpoint_file, device=device)
    else:
        pl_sd = torch.load(checkpoint_file, map_location=map_location or shared.weight_load_location)
    return get_state_dict_from_checkpoint(pl_sd)


def get_checkpoint_state_dict(checkpoint_info, timer=None):
    checkpoint_info.calculate_shorthash()
    return read_state_dict(checkpoint_info.filename, map_location="cpu")


class SkipWritingToConfig:
    """Loads inside this block do not make the loaded checkpoint the selected one (opts.sd_model_checkpoint)."""

    skip = False
    previous = None

    def __enter__(self):
        self.previous = SkipWritingToConfig.skip
        SkipWritingToConfig.skip = True
        return self

    def __exit__(self, exc_type, exc_value, exc_traceback):
        SkipWritingToConfig.skip = self.previous


def check_fp8(model):
    if model is None:
        return None
    if shared.opts.fp8_storage == "Enable":
        return True
    return bool(getattr(model, "is_sdxl", False) and shared.opts.fp8_storage == "Enable for SDXL")


class SdModelData:
    def __init__(self):
        self.sd_model = None
        self.loaded_sd_models = []
        self.was_loaded_at_least_once = False
        self.lock = threading.Lock()

    def get_sd_model(self):
        if self.was_loaded_at_least_once:
            return self.sd_model
        if self.sd_model is None:
            with self.lock:
                if self.sd_model is not None or self.was_loaded_at_least_once:
                    return self.sd_model
                try:
                    load_model()
                except Exception as e:
                    errors.display(e, "loading stable diffusion model", full_traceback=True)
                    self.sd_model = None
        return self.sd_model

    def set_sd_model(self, v, already_loaded=False):
        self.sd_model = v
        if already_loaded:
            sd_vae.base_vae = getattr(v, "base_vae", None)
            sd_vae.loaded_vae_file = getattr(v, "loaded_vae_file", None)
            sd_vae.checkpoint_info = v.sd_checkpoint_info
        try:
            self.loaded_sd_models.remove(v)
        except ValueError:
            pass
        if v is not None:
            self.loaded_sd_models.insert(0, v)


model_data = SdModelData()


def send_model_to_cpu(m):
    if m is not None:
        if m.lowvram:
            lowvram.send_everything_to_cpu()
        else:
            m.to(devices.cpu)
    devices.torch_gc()


def model_target_device(m):
    return devices.cpu if lowvram.is_needed(m) else devices.device


def send_model_to_device(m):
    lowvram.apply(m)
    if not m.lowvram:
        m.to(shared.device)


def send_model_to_trash(m):
    m.to(device="meta")
    devices.torch_gc()


def load_model(checkpoint_info=None, already_loaded_state_dict=None):
    """Build the live model from the file: fp16 unless --no-half, fp8 when that setting is on, VAE per setting."""
    from webui_stub.fake_model import FakeSDModel

    checkpoint_info = checkpoint_info or select_checkpoint()
    if model_data.sd_model:
        send_model_to_trash(model_data.sd_model)
        model_data.sd_model = None
    state_dict = already_loaded_state_dict or get_checkpoint_state_dict(checkpoint_info)
    checkpoint_config = sd_models_config.find_checkpoint_config(state_dict, checkpoint_info)
    print(f"Creating model from config: {checkpoint_config}")
    params = sd_models_config.check_state_dict_fits(checkpoint_config, state_dict)
    sd_model = FakeSDModel(state_dict, checkpoint_info=checkpoint_info,
                           parameterization=params.get("parameterization", "eps"))
    sd_model.used_config = checkpoint_config
    load_model_weights(sd_model, checkpoint_info, state_dict)
    send_model_to_device(sd_model)
    sd_model.eval()
    model_data.set_sd_model(sd_model)
    model_data.was_loaded_at_least_once = True
    script_callbacks.model_loaded_callback(sd_model)
    return sd_model


def load_model_weights(model, checkpoint_info, state_dict, timer=None):
    checkpoint_info.calculate_shorthash()
    if not SkipWritingToConfig.skip:
        shared.opts.data["sd_model_checkpoint"] = checkpoint_info.title
    if state_dict is None:
        state_dict = get_checkpoint_state_dict(checkpoint_info)
    sd_models_config.check_state_dict_fits(model.used_config, state_dict)  # the host fails in load_state_dict
    model.load_file_state_dict(state_dict)
    if shared.cmd_opts.no_half:
        model.float()
        devices.dtype_unet = torch.float32
    else:
        model.half_like_host(keep_vae_fp32=shared.cmd_opts.no_half_vae)
        devices.dtype_unet = torch.float16
    devices.fp8 = bool(check_fp8(model))
    if devices.fp8:
        model.to_fp8()
    model.sd_model_hash = checkpoint_info.shorthash
    model.sd_model_checkpoint = checkpoint_info.filename
    model.sd_checkpoint_info = checkpoint_info
    shared.opts.data["sd_checkpoint_hash"] = checkpoint_info.sha256
    sd_vae.delete_base_vae()
    sd_vae.clear_loaded_vae()
    vae_file, vae_source = sd_vae.resolve_vae(checkpoint_info.filename).tuple()
    sd_vae.load_vae(model, vae_file, vae_source)


def reload_model_weights(sd_model=None, info=None, forced_reload=False):
    """As the host: nothing to do when the file is already loaded; a new config builds a new model; the same config
    loads the weights into the model in place, restoring the previous checkpoint when that fails."""
    checkpoint_info = info or select_checkpoint()
    if not sd_model:
        sd_model = model_data.sd_model
    if sd_model is None:
        current_checkpoint_info = None
    else:
        current_checkpoint_info = sd_model.sd_checkpoint_info
        if check_fp8(sd_model) != devices.fp8:
            forced_reload = True
        elif sd_model.sd_model_checkpoint == checkpoint_info.filename and not forced_reload:
            return sd_model
        send_model_to_cpu(sd_model)
    state_dict = get_checkpoint_state_dict(checkpoint_info)
    checkpoint_config = sd_models_config.find_checkpoint_config(state_dict, checkpoint_info)
    if sd_model is None or checkpoint_config != sd_model.used_config:
        if sd_model is not None:
            send_model_to_trash(sd_model)
            model_data.loaded_sd_models.clear()
            model_data.sd_model = None
        load_model(checkpoint_info, already_loaded_state_dict=state_dict)
        return model_data.sd_model
    try:
        load_model_weights(sd_model, checkpoint_info, state_dict)
    except Exception:
        print("Failed to load checkpoint, restoring previous")
        load_model_weights(sd_model, current_checkpoint_info, None)
        raise
    finally:
        if not sd_model.lowvram:
            sd_model.to(devices.device)
        script_callbacks.model_loaded_callback(sd_model)
    model_data.set_sd_model(sd_model)
    return sd_model


def unload_model_weights(sd_model=None, info=None):
    send_model_to_cpu(sd_model or shared.sd_model)
    return sd_model
