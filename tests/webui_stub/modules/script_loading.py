"""Stand-in for modules.script_loading: a script is exec'd as a module named after its file (not in sys.modules)."""

import importlib.util
import os

from modules import errors

loaded_scripts = {}


def load_module(path):
    module_spec = importlib.util.spec_from_file_location(os.path.basename(path), path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    loaded_scripts[path] = module
    return module


def preload_extensions(extensions_dir, parser, extension_list=None):
    if not os.path.isdir(extensions_dir):
        return
    extensions = extension_list if extension_list is not None else os.listdir(extensions_dir)
    for dirname in sorted(extensions):
        preload_one(os.path.join(extensions_dir, dirname), parser)


def preload_one(extension_dir, parser):
    """The body of the host's loop for one extension folder."""
    preload_script = os.path.join(extension_dir, "preload.py")
    if not os.path.isfile(preload_script):
        return
    try:
        module = load_module(preload_script)
        if hasattr(module, "preload"):
            module.preload(parser)
    except Exception:
        errors.report(f"Error running preload() for {preload_script}", exc_info=True)
