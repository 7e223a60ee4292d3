"""Registers the Dreambooth tab, its setting, its HTTP API and its cleanup with the WebUI.

Everything else lives in the `dreambooth_ext` package; `dreambooth_ext.hosts.webui` is its only other module
that talks to the WebUI.
"""

import sys
from pathlib import Path

# The WebUI puts the extension folder on sys.path only while it imports this file; callbacks that run later
# (and the package's own lazy imports) need it too.
_EXTENSION_DIR = str(Path(__file__).resolve().parent.parent)
if _EXTENSION_DIR not in sys.path:
    sys.path.append(_EXTENSION_DIR)

from modules import call_queue, script_callbacks, shared  # noqa: E402

from dreambooth_ext.hosts import webui  # noqa: E402
from dreambooth_ext.ui import HostAdapter, JobManager  # noqa: E402
from dreambooth_ext.ui.api import register_api  # noqa: E402
from dreambooth_ext.ui.tab import build_tab  # noqa: E402

SECTION = ("dreambooth", "Dreambooth")
CHECKPOINT_DROPDOWN = "setting_sd_model_checkpoint"  # the elem_id of the host's checkpoint quicksetting
FORGE_CHECKPOINT_DROPDOWN = "model_selection"  # Forge's dropdown has no elem_id, this elem_classes (main_entry.py)

jobs = JobManager()
tabs = []  # the tab built by on_ui_tabs, waiting for the host's checkpoint dropdown
model_loads = [0]  # counts the host's model loads: the tab redraws its model box when this changes


def _in_host_queue(body):
    """Around an API run's thread: wait for the WebUI's queue like a generation would, and show as its job."""

    def run_in_queue():
        with call_queue.queue_lock:
            shared.state.begin(job="dreambooth")
            try:
                return body()
            finally:
                shared.state.end()
                shared.state.interrupted = False

    return run_in_queue


def _adapter() -> HostAdapter:
    return HostAdapter(
        prepare=lambda config, title: (config, webui.WebUIHost(title)),
        projects_dir=webui.dreambooth_dir,
        model_summary=webui.loaded_model_summary,
        checkpoint_titles=webui.checkpoint_titles,
        foreground=lambda fn, extra_outputs: call_queue.wrap_gradio_gpu_call(fn, extra_outputs=extra_outputs),
        background=_in_host_queue,
        queued=call_queue.wrap_queued_call,
        load_checkpoint=webui.load_checkpoint_now,
        checkpoint_selection=webui.checkpoint_selection,
        loaded_file=webui.loaded_file,
        # a load, or a selection that changed without one (the model box then names the selection a run loads)
        model_version=lambda: (model_loads[0], shared.opts.sd_model_checkpoint,
                               tuple(getattr(shared.opts, "forge_additional_modules", None) or ())),  # Forge's VAE / TE
        load_after_training=lambda: bool(getattr(shared.opts, "dreambooth_load_after_training", False)),
    )


def on_ui_tabs():
    tab = build_tab(_adapter(), jobs)
    tabs[:] = [tab]
    return [(tab.blocks, "Dreambooth", "dreambooth")]


def on_after_component(component, **kwargs):
    """The host creates its checkpoint dropdown after the extension tabs: connect the tab to it then. Not to the
    copies Forge announces too: its gradio 4 makes a new one (render=False, outside the page) at every update."""
    if kwargs.get("render") is False:
        return
    classes = kwargs.get("elem_classes") or ()
    forge_dropdown = FORGE_CHECKPOINT_DROPDOWN in ([classes] if isinstance(classes, str) else classes)
    if (kwargs.get("elem_id") == CHECKPOINT_DROPDOWN or forge_dropdown) and tabs:
        tabs[0].attach_checkpoint_dropdown(component)


def on_model_loaded(sd_model):
    model_loads[0] += 1


def on_ui_settings():
    shared.opts.add_option("dreambooth_load_after_training", shared.OptionInfo(
        False, "Load the trained model when a run started from the Dreambooth tab finishes", section=SECTION))


def on_app_started(demo, app):
    register_api(app, jobs, _adapter(), getattr(shared.cmd_opts, "api_auth", None))


def on_script_unloaded():
    jobs.shutdown(timeout=10)  # a reload must not leave a run holding the device; it keeps its resumable state


script_callbacks.on_ui_tabs(on_ui_tabs)
script_callbacks.on_ui_settings(on_ui_settings)
script_callbacks.on_app_started(on_app_started)
script_callbacks.on_after_component(on_after_component)
script_callbacks.on_model_loaded(on_model_loaded)
script_callbacks.on_script_unloaded(on_script_unloaded)
