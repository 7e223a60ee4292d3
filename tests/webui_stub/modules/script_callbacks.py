"""Stand-in for modules.script_callbacks: registration by category, invocation with errors reported (not raised),
and removal of a script's callbacks. Callbacks run in registration order (no user sorting)."""

import dataclasses
import inspect
import os
from typing import Any

from modules import errors


@dataclasses.dataclass
class ScriptCallback:
    script: str
    callback: Any
    name: str = "unnamed"


CATEGORIES = ("app_started", "model_loaded", "ui_tabs", "ui_train_tabs", "ui_settings", "before_image_saved",
              "image_saved", "extra_noise", "cfg_denoiser", "cfg_denoised", "cfg_after_cfg", "before_component",
              "after_component", "image_grid", "infotext_pasted", "script_unloaded", "before_ui", "on_reload",
              "list_optimizers", "list_unets", "before_token_counter")
callback_map = {"callbacks_" + c: [] for c in CATEGORIES}
ordered_callbacks_map = {}


def report_exception(c, job):
    errors.report(f"Error executing callback {job} for {c.script}", exc_info=True)


def _extension_name(filename):
    """The host names callbacks after their extension's folder; scripts live in <extension>/scripts/."""
    parent = os.path.dirname(os.path.dirname(os.path.abspath(filename)))
    return os.path.basename(parent) or "base"


def add_callback(callbacks, fun, *, name=None, category="unknown", filename=None):
    if filename is None:
        stack = [x for x in inspect.stack() if x.filename != __file__]
        filename = stack[0].filename if stack else "unknown file"
    callback_name = f"{_extension_name(filename)}/{os.path.basename(filename)}/{category}"
    if name is not None:
        callback_name += f"/{name}"
    unique_callback_name = callback_name
    for index in range(1000):
        if not any(x.name == unique_callback_name for x in callbacks):
            break
        unique_callback_name = f"{callback_name}-{index + 1}"
    callbacks.append(ScriptCallback(filename, fun, unique_callback_name))


def ordered_callbacks(category, unordered_callbacks=None, *, enable_user_sort=True):
    if unordered_callbacks is None:
        unordered_callbacks = callback_map.get("callbacks_" + category, [])
    callbacks = ordered_callbacks_map.get(category)
    if callbacks is not None and len(callbacks) == len(unordered_callbacks):
        return callbacks
    callbacks = list(unordered_callbacks)
    ordered_callbacks_map[category] = callbacks
    return callbacks


def enumerate_callbacks():
    for category, callbacks in callback_map.items():
        yield category[len("callbacks_"):], callbacks


def clear_callbacks():
    for callback_list in callback_map.values():
        callback_list.clear()
    ordered_callbacks_map.clear()


def _call_each(category, *args, reverse=False):
    callbacks = ordered_callbacks(category)
    for c in (reversed(callbacks) if reverse else list(callbacks)):
        try:
            c.callback(*args)
        except Exception:
            report_exception(c, f"{category}_callback")


def app_started_callback(demo, app):
    _call_each("app_started", demo, app)


def app_reload_callback():
    _call_each("on_reload")


def model_loaded_callback(sd_model):
    _call_each("model_loaded", sd_model)


def ui_tabs_callback():
    res = []
    for c in ordered_callbacks("ui_tabs"):
        try:
            res += c.callback() or []
        except Exception:
            report_exception(c, "ui_tabs_callback")
    return res


def before_component_callback(component, **kwargs):
    _call_each_with_kwargs("before_component", component, **kwargs)


def after_component_callback(component, **kwargs):
    _call_each_with_kwargs("after_component", component, **kwargs)


def _call_each_with_kwargs(category, component, **kwargs):
    for c in ordered_callbacks(category):
        try:
            c.callback(component, **kwargs)
        except Exception:
            report_exception(c, f"{category}_callback")


def ui_settings_callback():
    _call_each("ui_settings")


def script_unloaded_callback():
    _call_each("script_unloaded", reverse=True)


def before_ui_callback():
    _call_each("before_ui", reverse=True)


def remove_current_script_callbacks():
    stack = [x for x in inspect.stack() if x.filename != __file__]
    filename = stack[0].filename if stack else "unknown file"
    if filename == "unknown file":
        return
    for callback_list in list(callback_map.values()) + list(ordered_callbacks_map.values()):
        for callback_to_remove in [cb for cb in callback_list if cb.script == filename]:
            callback_list.remove(callback_to_remove)


def remove_callbacks_for_function(callback_func):
    for callback_list in list(callback_map.values()) + list(ordered_callbacks_map.values()):
        for callback_to_remove in [cb for cb in callback_list if cb.callback == callback_func]:
            callback_list.remove(callback_to_remove)


def _register(category):
    def on(callback, *, name=None):
        add_callback(callback_map["callbacks_" + category], callback, name=name, category=category)
    on.__name__ = "on_" + category
    return on


on_app_started = _register("app_started")
on_before_reload = _register("on_reload")
on_model_loaded = _register("model_loaded")
on_ui_tabs = _register("ui_tabs")
on_ui_train_tabs = _register("ui_train_tabs")
on_ui_settings = _register("ui_settings")
on_before_image_saved = _register("before_image_saved")
on_image_saved = _register("image_saved")
on_extra_noise = _register("extra_noise")
on_cfg_denoiser = _register("cfg_denoiser")
on_cfg_denoised = _register("cfg_denoised")
on_cfg_after_cfg = _register("cfg_after_cfg")
on_before_component = _register("before_component")
on_after_component = _register("after_component")
on_image_grid = _register("image_grid")
on_infotext_pasted = _register("infotext_pasted")
on_script_unloaded = _register("script_unloaded")
on_before_ui = _register("before_ui")
on_list_optimizers = _register("list_optimizers")
on_list_unets = _register("list_unets")
on_before_token_counter = _register("before_token_counter")
