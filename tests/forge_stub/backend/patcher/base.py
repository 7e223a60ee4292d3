"""Forge's backend.patcher.base.ModelPatcher and the unet / clip / vae patchers built on it (patcher/unet.py,
clip.py, vae.py in Forge): what they hold and how LoRA patches reach the module."""

import copy

from backend.patcher.lora import CPU, LoraLoader


class ModelPatcher:
    def __init__(self, model, load_device=None, offload_device=None, size=0, current_device=None, **kwargs):
        self.size = size
        self.model = model
        self.lora_patches = {}
        self.object_patches = {}
        self.object_patches_backup = {}
        self.model_options = {"transformer_options": {}}
        self.load_device = load_device
        self.offload_device = offload_device
        if not hasattr(model, "lora_loader"):
            model.lora_loader = LoraLoader(model)
        self.lora_loader = model.lora_loader
        self.current_device = offload_device if current_device is None else current_device

    def clone(self):
        n = self.__class__(self.model, self.load_device, self.offload_device, self.size, self.current_device)
        n.lora_patches = self.lora_patches.copy()
        n.object_patches = self.object_patches.copy()
        n.model_options = copy.deepcopy(self.model_options)
        return n

    def add_patches(self, *, filename, patches, strength_patch=1.0, strength_model=1.0, online_mode=False):
        lora_identifier = (filename, strength_patch, strength_model, online_mode)
        this_patches = {}
        p = set()
        model_keys = set(k for k, _ in self.model.named_parameters())
        for k in patches:
            offset = function = None
            if isinstance(k, str):
                key = k
            else:
                key, offset = k[0], k[1]
                function = k[2] if len(k) > 2 else None
            if key in model_keys:
                p.add(k)
                this_patches.setdefault(key, []).append([strength_patch, patches[k], strength_model, offset, function])
        self.lora_patches[lora_identifier] = this_patches
        return p

    def refresh_loras(self):
        self.lora_loader.refresh(lora_patches=self.lora_patches, offload_device=self.offload_device or CPU)


class UnetPatcher(ModelPatcher):
    @classmethod
    def from_model(cls, model, predictor):
        from backend.diffusion_engine.base import KModel

        kmodel = KModel(model=model, predictor=predictor)
        return UnetPatcher(kmodel, load_device=model.load_device, offload_device=model.offload_device,
                           current_device=model.initial_device)


class CLIP:
    def __init__(self, model_dict=None, no_init=False):
        if no_init:
            return
        from backend.diffusion_engine.base import JointTextEncoder

        self.cond_stage_model = JointTextEncoder(model_dict or {})
        self.patcher = ModelPatcher(self.cond_stage_model)

    def clone(self):
        n = CLIP(no_init=True)
        n.patcher = self.patcher.clone()
        n.cond_stage_model = self.cond_stage_model
        return n

    def add_patches(self, *args, **kwargs):
        return self.patcher.add_patches(*args, **kwargs)


class VAE:
    def __init__(self, model=None, no_init=False):
        if no_init:
            return
        self.first_stage_model = model.eval()
        self.patcher = ModelPatcher(self.first_stage_model)

    def clone(self):
        n = VAE(no_init=True)
        n.patcher = self.patcher.clone()
        n.first_stage_model = self.first_stage_model
        return n
