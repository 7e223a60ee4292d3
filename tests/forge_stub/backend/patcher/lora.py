"""Forge's backend.patcher.lora.LoraLoader: merges a patcher's LoRA patches into the module's parameters in place,
keeping each original in `backup` (restored before the next merge); online LoRAs are only attached to the layer.
The stand-in's merge knows the "diff" patch format alone (Forge's merge_lora_to_weight knows many)."""

import torch

CPU = torch.device("cpu")


def _get_attr_with_parent(obj, key):
    *parents, leaf = key.split(".")
    for name in parents:
        obj = getattr(obj, name)
    return obj, leaf, getattr(obj, leaf)


def _set_attr_raw(obj, key, value):
    parent, leaf, _ = _get_attr_with_parent(obj, key)
    setattr(parent, leaf, value)


def merge_lora_to_weight(patches, weight, key="", computation_dtype=torch.float32):
    original_dtype = weight.dtype
    weight = weight.to(dtype=computation_dtype)
    for strength_patch, patch, strength_model, _offset, _function in patches:
        if strength_model != 1.0:
            weight *= strength_model
        kind, values = patch
        if kind != "diff":
            raise NotImplementedError(f"the stand-in merges 'diff' patches only, not {kind!r} ({key})")
        weight += strength_patch * values[0].to(weight.device, computation_dtype)
    return weight.to(dtype=original_dtype)


class LoraLoader:
    def __init__(self, model):
        self.model = model
        self.backup = {}
        self.online_backup = []
        self.loaded_hash = str([])

    @torch.inference_mode()
    def refresh(self, lora_patches, offload_device=CPU, force_refresh=False):
        hashes = str(list(lora_patches.keys()))
        if hashes == self.loaded_hash and not force_refresh:
            return
        all_patches = {}
        for (_, _, _, online_mode), patches in lora_patches.items():
            for key, current_patches in patches.items():
                all_patches[(key, online_mode)] = all_patches.get((key, online_mode), []) + current_patches
        for m in set(self.online_backup):
            del m.forge_online_loras
        self.online_backup = []
        for k, w in self.backup.items():
            if not isinstance(w, torch.nn.Parameter):
                w = torch.nn.Parameter(w, requires_grad=False)
            _set_attr_raw(self.model, k, w)
        self.backup = {}
        for (key, online_mode), current_patches in all_patches.items():
            parent_layer, child_key, weight = _get_attr_with_parent(self.model, key)
            assert isinstance(weight, torch.nn.Parameter)
            if online_mode:
                if not hasattr(parent_layer, "forge_online_loras"):
                    parent_layer.forge_online_loras = {}
                parent_layer.forge_online_loras[child_key] = current_patches
                self.online_backup.append(parent_layer)
                continue
            if key not in self.backup:
                self.backup[key] = weight.to(device=offload_device)
            weight = merge_lora_to_weight(current_patches, weight, key, computation_dtype=torch.float32)
            _set_attr_raw(self.model, key, torch.nn.Parameter(weight, requires_grad=False))
        self.loaded_hash = hashes
