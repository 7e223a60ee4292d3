"""Load an extension into the stand-in host the way the WebUI does at start (and on "Reload UI")."""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)


def script_files(extension_dir: str | os.PathLike) -> list[Path]:
    return sorted(Path(extension_dir, "scripts").glob("*.py"))


def load_scripts(extension_dir: str | os.PathLike, *, strict: bool = True) -> list[ModuleType]:
    """Import every scripts/*.py as the host does (modules.scripts.load_scripts + script_loading.load_module).

    Each file becomes a module named after the file (not put in sys.modules); the extension folder is first on
    sys.path and `scripts.basedir()` returns it only while that file is imported. The host reports an error and
    carries on; with `strict` the stand-in re-raises so a test sees it.
    """
    from modules import errors, paths, script_loading, scripts

    extension_dir = str(Path(extension_dir).resolve())
    loaded = []
    for path in script_files(extension_dir):
        syspath = sys.path
        try:
            sys.path = [extension_dir] + sys.path
            scripts.current_basedir = extension_dir
            loaded.append(script_loading.load_module(str(path)))
        except Exception:
            errors.report(f"Error loading script: {path.name}", exc_info=True)
            if strict:
                raise
        finally:
            sys.path = syspath
            scripts.current_basedir = paths.script_path
    return loaded


def build_ui() -> list:
    """What the host's create_ui does with extension callbacks, in its order: before_ui, settings, its own txt2img
    and img2img tabs (their extra-networks pages), the extension tabs (built on their own), then the page: the
    quicksettings row (the checkpoint dropdown, announced through the after-component callback as the host's
    patched gradio does) and the tabs rendered into it.
    Each tab's components take the values saved in ui-config.json (modules.ui_loadsave), as in the host.
    The page is `shared.demo`; returns the extension tabs."""
    import gradio as gr
    from modules import script_callbacks, shared, ui_loadsave

    loadsave = ui_loadsave.UiLoadsave(shared.cmd_opts.ui_config_file)
    script_callbacks.before_ui_callback()
    script_callbacks.ui_settings_callback()
    host_tabs = [(_generation_tab(name), name, name) for name in ("txt2img", "img2img")]
    interfaces = script_callbacks.ui_tabs_callback()
    with gr.Blocks(analytics_enabled=False, title="Stable Diffusion") as demo:
        with gr.Row(elem_id="quicksettings"):
            shared.settings_components["sd_model_checkpoint"] = _checkpoint_dropdown()
        with gr.Tabs(elem_id="tabs"):
            for interface, label, ifid in host_tabs + interfaces:
                with gr.TabItem(label, id=ifid, elem_id=f"tab_{ifid}"):
                    interface.render()
                loadsave.add_block(interface, ifid)
    loadsave.dump_defaults()
    shared.demo = demo
    return interfaces


def _checkpoint_dropdown():
    """The checkpoint dropdown of the quicksettings row: the WebUI's setting component, or, on the Forge stand-in,
    Forge's own (modules_forge.main_entry.make_checkpoint_manager_ui, which its add_quicksettings calls there)."""
    import gradio as gr
    from modules import script_callbacks, sd_models, shared

    if importlib.util.find_spec("modules_forge") is not None:
        from modules_forge import main_entry

        return main_entry.make_checkpoint_manager_ui()
    dropdown = gr.Dropdown(label="Stable Diffusion checkpoint", choices=sd_models.checkpoint_tiles(),
                           value=shared.opts.sd_model_checkpoint, elem_id="setting_sd_model_checkpoint")
    script_callbacks.after_component_callback(dropdown, label="Stable Diffusion checkpoint",
                                              elem_id="setting_sd_model_checkpoint")
    return dropdown


def _generation_tab(tabname: str):
    """The host's txt2img or img2img interface, reduced to its extra-networks pages (Lora, Checkpoints, ...)."""
    import gradio as gr
    from modules import ui_extra_networks

    with gr.Blocks(analytics_enabled=False) as interface:
        ui_extra_networks.create_ui(interface, [], tabname)
    return interface


def start_app(app, demo=None) -> None:
    from modules import script_callbacks

    script_callbacks.app_started_callback(demo, app)


def reload_ui() -> None:
    """The host's "Reload UI": script_unloaded callbacks run, then every callback is cleared."""
    from modules import script_callbacks

    script_callbacks.script_unloaded_callback()
    script_callbacks.clear_callbacks()
