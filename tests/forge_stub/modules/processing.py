"""Forge's modules.processing, as far as the model goes: before every generation
`manage_model_and_prompt_cache` calls `forge_model_reload()`, which loads the selection unless it is loaded."""

from dataclasses import dataclass, field

from backend import memory_management
from modules import sd_models
from modules.sd_models import forge_model_reload

need_global_unload = False


@dataclass
class StableDiffusionProcessing:
    prompt: str = ""
    override_settings: dict = field(default_factory=dict)
    sd_model: object = None


@dataclass
class Processed:
    sd_model: object
    checkpoint_title: str


def manage_model_and_prompt_cache(p):
    global need_global_unload
    p.sd_model, just_reloaded = forge_model_reload()
    if need_global_unload and not just_reloaded:
        memory_management.unload_all_models()
    need_global_unload = False


def process_images(p: StableDiffusionProcessing) -> Processed:
    if sd_models.checkpoint_aliases.get(p.override_settings.get("sd_model_checkpoint")) is None:
        p.override_settings.pop("sd_model_checkpoint", None)
    manage_model_and_prompt_cache(p)
    # Loading a patcher for a generation refreshes its LoRAs (memory_management.LoadedModel.model_load): a merged
    # LoRA changes the weights here.
    p.sd_model.forge_objects.unet.refresh_loras()
    p.sd_model.forge_objects.clip.patcher.refresh_loras()
    return Processed(p.sd_model, p.sd_model.sd_checkpoint_info.title)
