"""Forge's modules_forge.shared_options: its hidden options (registered by modules.shared_options in Forge)."""


def register(options_templates, options_section, OptionInfo):
    options_templates.update(options_section((None, "Forge Hidden options"), {
        "forge_unet_storage_dtype": OptionInfo("Automatic"),
        "forge_inference_memory": OptionInfo(1024),
        "forge_async_loading": OptionInfo("Queue"),
        "forge_pin_shared_memory": OptionInfo("CPU"),
        "forge_preset": OptionInfo("sd"),
        "forge_additional_modules": OptionInfo([]),
    }))
    # v1.10.1's own option, which Forge's dropdown follows (modules/shared_options.py)
    options_templates.update(options_section(("sd", "Stable Diffusion", "sd"), {
        "sd_checkpoint_dropdown_use_short": OptionInfo(False, "Checkpoint dropdown: use filenames without paths"),
    }))
