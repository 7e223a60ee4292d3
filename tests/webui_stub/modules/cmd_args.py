"""Stand-in for modules.cmd_args: the host flags the extension and its tests read."""

import argparse
import os

from modules.paths_internal import data_path, models_path, normalized_filepath, sd_model_file  # noqa: F401

parser = argparse.ArgumentParser()

parser.add_argument("--data-dir", type=normalized_filepath, default=data_path)
parser.add_argument("--models-dir", type=normalized_filepath, default=None)
parser.add_argument("--ckpt", type=normalized_filepath, default=sd_model_file, help="path to checkpoint")
parser.add_argument("--ckpt-dir", type=normalized_filepath, default=None)
parser.add_argument("--vae-dir", type=normalized_filepath, default=None, help="Path to directory with VAE files")
parser.add_argument("--no-half", action="store_true", help="do not switch the model to 16-bit floats")
parser.add_argument("--no-half-vae", action="store_true", help="do not switch the VAE model to 16-bit floats")
parser.add_argument("--medvram", action="store_true")
parser.add_argument("--medvram-sdxl", action="store_true")
parser.add_argument("--lowvram", action="store_true")
parser.add_argument("--use-cpu", nargs="+", default=[], type=str.lower)
parser.add_argument("--api", action="store_true")
parser.add_argument("--api-auth", type=str, default=None, help='"username:password"; or comma-delimit multiple')
parser.add_argument("--nowebui", action="store_true")
parser.add_argument("--listen", action="store_true")
parser.add_argument("--share", action="store_true")
parser.add_argument("--ngrok", type=str, default=None)
parser.add_argument("--server-name", type=str, default=None)
parser.add_argument("--enable-insecure-extension-access", action="store_true")
parser.add_argument("--no-download-sd-model", action="store_true", default=False)
parser.add_argument("--skip-install", action="store_true")
parser.add_argument("--disable-safe-unpickle", action="store_true")
parser.add_argument("--freeze-settings", action="store_true")
parser.add_argument("--freeze-settings-in-sections", type=str, default=None)
parser.add_argument("--freeze-specific-settings", type=str, default=None)
parser.add_argument("--hide-ui-dir-config", action="store_true")
parser.add_argument("--ui-settings-file", type=str, default=os.path.join(data_path, "config.json"))
parser.add_argument("--ui-config-file", type=str, default=os.path.join(data_path, "ui-config.json"))
# Registered by the built-in Lora extension's preload.py in the host.
parser.add_argument("--lora-dir", type=normalized_filepath, default=os.path.join(models_path, "Lora"))
