"""Stand-in for modules.processing: only what decides which checkpoint a generation uses.

As in the host's process_images: unless the request overrides it with a checkpoint the host knows, the checkpoint
selected in the settings (opts.sd_model_checkpoint, the dropdown at the top of the page) is loaded first; a
model loaded some other way is swapped out without a word.
"""

from dataclasses import dataclass, field

from modules import sd_models, shared


@dataclass
class StableDiffusionProcessing:
    prompt: str = ""
    override_settings: dict = field(default_factory=dict)


@dataclass
class Processed:
    sd_model: object
    checkpoint_title: str


def process_images(p: StableDiffusionProcessing) -> Processed:
    if sd_models.checkpoint_aliases.get(p.override_settings.get("sd_model_checkpoint")) is None:
        p.override_settings.pop("sd_model_checkpoint", None)
        sd_models.reload_model_weights()
    for key, value in p.override_settings.items():
        shared.opts.set(key, value, is_api=True, run_callbacks=False)
        if key == "sd_model_checkpoint":
            sd_models.reload_model_weights()
    model = shared.sd_model
    return Processed(model, model.sd_checkpoint_info.title)
