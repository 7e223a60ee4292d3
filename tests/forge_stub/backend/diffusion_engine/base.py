"""Forge's loaded model: ForgeDiffusionEngine with its ForgeObjects (backend/diffusion_engine/base.py, sd15.py,
sd20.py, sdxl.py), the KModel around the UNet (backend/modules/k_model.py) and the text encoders' ModuleDict
(backend/patcher/clip.py). The stand-in's modules are trees of parameters with Forge's state-dict keys; they are
never run."""

import torch


class ParameterTree(torch.nn.Module):
    """A module whose state dict is the given tensors under their keys (floats as frozen Parameters, as Forge's
    loaded modules have them; the rest as buffers)."""

    def __init__(self, tensors=None):
        super().__init__()
        for key, value in (tensors or {}).items():
            self.put(key, value)

    def put(self, key, value):
        *parents, leaf = key.split(".")
        module = self
        for part in parents:
            child = module._modules.get(part)
            if child is None:
                child = ParameterTree()
                module.add_module(part, child)
            module = child
        if value.is_floating_point():
            module.register_parameter(leaf, torch.nn.Parameter(value, requires_grad=False))
        else:
            module.register_buffer(leaf, value)


class JointTextEncoder(torch.nn.ModuleDict):
    pass


class Prediction(torch.nn.Module):
    """backend/modules/k_prediction.Prediction: what the UNet predicts ('epsilon' or 'v_prediction')."""

    def __init__(self, prediction_type="epsilon"):
        super().__init__()
        self.prediction_type = prediction_type


class KModel(torch.nn.Module):
    def __init__(self, model, predictor):
        super().__init__()
        self.storage_dtype = model.storage_dtype
        self.computation_dtype = model.computation_dtype
        self.diffusion_model = model
        self.predictor = predictor


class ForgeObjects:
    def __init__(self, unet, clip, vae, clipvision):
        self.unet = unet
        self.clip = clip
        self.vae = vae
        self.clipvision = clipvision

    def shallow_copy(self):
        return ForgeObjects(self.unet, self.clip, self.vae, self.clipvision)


class ForgeDiffusionEngine:
    def __init__(self, family, unet, clip, vae):
        self.model_config = family
        self.tiling_enabled = False
        self.first_stage_model = None
        self.cond_stage_model = None
        self.use_distilled_cfg_scale = False
        self.is_sd1 = family == "sd1"
        self.is_sd2 = family == "sd2"
        self.is_sdxl = family == "sdxl"
        self.is_sd3 = False
        self.forge_objects = ForgeObjects(unet=unet, clip=clip, vae=vae, clipvision=None)
        self.forge_objects_original = self.forge_objects.shallow_copy()
        self.forge_objects_after_applying_lora = self.forge_objects.shallow_copy()
        self.current_lora_hash = str([])
