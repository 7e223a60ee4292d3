"""Stand-in for modules.shared: cmd_opts, opts, state, the sd_model property and a few host globals."""

import sys

from modules import options, shared_cmd_options
from modules.paths_internal import (  # noqa: F401
    data_path,
    default_sd_model_file,
    extensions_builtin_dir,
    extensions_dir,
    models_path,
    script_path,
    sd_configs_path,
    sd_default_config,
    sd_model_file,
)

cmd_opts = shared_cmd_options.cmd_opts
parser = shared_cmd_options.parser

parallel_processing_allowed = True
demo = None
device = None
weight_load_location = None
mem_mon = None
state = None
sd_model_val = None
settings_components: dict = {}
tab_names: list = []
hf_endpoint = "https://huggingface.co"

OptionInfo = options.OptionInfo
OptionHTML = options.OptionHTML
options_section = options.options_section

# The host's options_templates has hundreds of entries; these are the ones the extension and its tests touch.
options_templates = {}
options_templates.update(options.options_section(("sd", "Stable Diffusion", "sd"), {
    "sd_model_checkpoint": OptionInfo(None, "Stable Diffusion checkpoint"),
    "sd_checkpoints_limit": OptionInfo(1, "Maximum number of checkpoints loaded at the same time"),
    "sd_checkpoints_keep_in_cpu": OptionInfo(True, "Only keep one model on device"),
    "sd_checkpoint_cache": OptionInfo(0, "Checkpoints to cache in RAM"),
}))
options_templates.update(options.options_section(("vae", "VAE", "sd"), {
    "sd_vae": OptionInfo("Automatic", "SD VAE"),
}))
options_templates.update(options.options_section(("optimizations", "Optimizations", "sd"), {
    "fp8_storage": OptionInfo("Disable", "FP8 weight"),
    "cache_fp16_weight": OptionInfo(False, "Cache FP16 weight for LoRA"),
}))
options_templates.update(options.options_section(("system", "System", "system"), {
    "disable_mmap_load_safetensors": OptionInfo(False, "Disable memmapping for loading .safetensors files."),
    "memmon_poll_rate": OptionInfo(0, "VRAM usage polls per second during generation."),
}))
options_templates.update(options.options_section(("ui", "Live previews", "ui"), {
    "live_previews_enable": OptionInfo(False, "Show live previews of the created image"),
    "show_progress_every_n_steps": OptionInfo(10, "Live preview display period"),
}))
options_templates.update(options.options_section(("profiler", "Profiler", "system"), {
    "profiling_enable": OptionInfo(False, "Enable profiling"),
    "profiling_filename": OptionInfo("trace.json", "Profile filename"),
}))
restricted_opts: set = set()
opts = options.Options(options_templates, restricted_opts)


def list_checkpoint_tiles(use_short=False):
    import modules.sd_models
    return modules.sd_models.checkpoint_tiles(use_short)


def refresh_checkpoints():
    import modules.sd_models
    return modules.sd_models.list_models()


class Shared(sys.modules[__name__].__class__):
    """sd_model as a property over sd_models.model_data, as the host's shared_items.Shared does."""

    @property
    def sd_model(self):
        import modules.sd_models
        return modules.sd_models.model_data.get_sd_model()

    @sd_model.setter
    def sd_model(self, value):
        import modules.sd_models
        modules.sd_models.model_data.set_sd_model(value)


sys.modules[__name__].__class__ = Shared

from modules import devices, shared_state  # noqa: E402  (the host fills these in initialize)

state = shared_state.State()
device = devices.device
