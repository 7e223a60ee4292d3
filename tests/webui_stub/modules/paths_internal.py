"""Paths as the host derives them from --data-dir / --models-dir before anything else is parsed.

The host reads sys.argv (+ COMMANDLINE_ARGS); the stand-in reads the WEBUI_STUB_ARGS environment variable so a
test can start a fresh "host" with its own command line.
"""

import argparse
import os
import shlex
from pathlib import Path


def normalized_filepath(filepath):
    return str(Path(filepath).absolute())


def stub_argv() -> list:
    return shlex.split(os.environ.get("WEBUI_STUB_ARGS", ""))


cwd = os.getcwd()
modules_path = os.path.dirname(os.path.realpath(__file__))
script_path = os.environ.get("WEBUI_STUB_SCRIPT_PATH", os.path.dirname(modules_path))

sd_configs_path = os.path.join(script_path, "configs")
sd_default_config = os.path.join(sd_configs_path, "v1-inference.yaml")
sd_model_file = os.path.join(script_path, "model.ckpt")
default_sd_model_file = sd_model_file

parser_pre = argparse.ArgumentParser(add_help=False)
parser_pre.add_argument("--data-dir", type=str, default=script_path)
parser_pre.add_argument("--models-dir", type=str, default=None)
cmd_opts_pre = parser_pre.parse_known_args(stub_argv())[0]

data_path = cmd_opts_pre.data_dir
models_path = cmd_opts_pre.models_dir if cmd_opts_pre.models_dir else os.path.join(data_path, "models")
extensions_dir = os.path.join(data_path, "extensions")
extensions_builtin_dir = os.path.join(script_path, "extensions-builtin")
default_output_dir = os.path.join(data_path, "outputs")
