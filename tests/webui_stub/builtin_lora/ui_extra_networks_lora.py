"""Stand-in for the built-in Lora extension's ui_extra_networks_lora (v1.10.1): the Lora page of txt2img and img2img.
Its refresh re-scans the Lora folder (`networks.list_available_networks()`); its items are `available_networks`,
each hidden while the loaded model is of another family than the LoRA's (unless Settings > "Always show all
networks on the Lora page", `lora_show_all`)."""

import networks
from modules import shared, ui_extra_networks
from modules.ui_extra_networks import quote_js


class ExtraNetworksPageLora(ui_extra_networks.ExtraNetworksPage):
    def __init__(self):
        super().__init__("Lora")

    def refresh(self):
        networks.list_available_networks()

    def create_item(self, name, index=None, enable_filter=True):
        lora_on_disk = networks.available_networks.get(name)
        if lora_on_disk is None:
            return None
        item = {"name": name, "filename": lora_on_disk.filename, "metadata": lora_on_disk.metadata,
                "sort_keys": {"default": index}, "sd_version": lora_on_disk.sd_version,
                "prompt": quote_js(f"<lora:{lora_on_disk.alias}:") + " + opts.extra_networks_default_multiplier + "
                + quote_js(">")}
        if getattr(shared.opts, "lora_show_all", False) or not enable_filter or not shared.sd_model:
            return item
        model = shared.sd_model
        model_version = "SDXL" if model.is_sdxl else "SD2" if model.is_sd2 else "SD1"
        if lora_on_disk.sd_version == "Unknown":
            return None if model_version in getattr(shared.opts, "lora_hide_unknown_for_versions", []) else item
        return item if lora_on_disk.sd_version == model_version else None

    def list_items(self):
        names = list(networks.available_networks)
        for index, name in enumerate(names):
            item = self.create_item(name, index)
            if item is not None:
                yield item

    def allowed_directories_for_previews(self):
        return [shared.cmd_opts.lora_dir]
