"""Stand-in for modules.ui_extra_networks_checkpoints: the Checkpoints page. Its refresh is the host's
`shared.refresh_checkpoints()` (sd_models.list_models), which selects the --ckpt file again when there is one."""

from modules import sd_models, shared, ui_extra_networks


class ExtraNetworksPageCheckpoints(ui_extra_networks.ExtraNetworksPage):
    def __init__(self):
        super().__init__("Checkpoints")
        self.allow_prompt = False

    def refresh(self):
        shared.refresh_checkpoints()

    def create_item(self, name, index=None, enable_filter=True):
        checkpoint = sd_models.checkpoint_aliases.get(name)
        if checkpoint is None:
            return None
        return {"name": checkpoint.name_for_extra, "filename": checkpoint.filename, "shorthash": checkpoint.shorthash,
                "metadata": checkpoint.metadata, "sort_keys": {"default": index}}

    def list_items(self):
        names = list(sd_models.checkpoints_list)
        for index, name in enumerate(names):
            item = self.create_item(name, index)
            if item is not None:
                yield item

    def allowed_directories_for_previews(self):
        return [v for v in [shared.cmd_opts.ckpt_dir, sd_models.model_path] if v is not None]
