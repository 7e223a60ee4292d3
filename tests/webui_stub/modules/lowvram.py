"""Stand-in for modules.lowvram: only whether it is needed and the `lowvram` flag on the model."""

from modules import shared


def send_everything_to_cpu():
    pass


def is_needed(sd_model):
    return shared.cmd_opts.lowvram or shared.cmd_opts.medvram or (
        shared.cmd_opts.medvram_sdxl and hasattr(sd_model, "conditioner"))


def apply(sd_model):
    enable = is_needed(sd_model)
    shared.parallel_processing_allowed = not enable
    sd_model.lowvram = bool(enable)
