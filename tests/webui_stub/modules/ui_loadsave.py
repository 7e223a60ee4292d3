"""Stand-in for modules.ui_loadsave: the host's ui-config.json.

At start the host walks every tab's blocks (`add_block(interface, tab_id)`), keying each component by
"<tab id>/<label>/<field>" (a button by its text). A key already in the file sets the component's field to the
saved value (a textbox gets it as text, a number as a float; a dropdown or radio only one of its choices); a key
not in the file gets the component's current value, and the file is written back when it changed. A component
with `do_not_save_to_config = True` is skipped both ways. Fields: `visible` (of a visible slider, radio,
checkbox, textbox, number, dropdown or button), `value`, and for a slider `minimum`, `maximum` and `step`.
"""

from __future__ import annotations

import json
import os

import gradio as gr

FIELD_KINDS = (gr.Slider, gr.Radio, gr.Checkbox, gr.Textbox, gr.Number, gr.Dropdown, gr.Button)


def _choices(component) -> list:
    return [c[0] if isinstance(c, (tuple, list)) else c for c in (component.choices or [])]


class UiLoadsave:
    def __init__(self, filename: str):
        self.filename = filename
        self.ui_settings: dict = {}
        if os.path.exists(filename):
            with open(filename, encoding="utf8") as f:
                self.ui_settings = json.load(f)
        self.loaded = dict(self.ui_settings)

    def add_component(self, path: str, component) -> None:
        def apply(field: str, allowed=None) -> None:
            if getattr(component, "do_not_save_to_config", False):
                return
            key = f"{path}/{field}"
            saved = self.ui_settings.get(key)
            if saved is None:
                self.ui_settings[key] = getattr(component, field)
                return
            if allowed is not None and not allowed(saved):
                return
            if field == "value" and type(component) is gr.Textbox:
                saved = str(saved)
            elif field == "value" and type(component) is gr.Number:
                saved = float(saved)
            setattr(component, field, saved)

        kind = type(component)
        if kind in FIELD_KINDS and component.visible:
            apply("visible")
        if kind is gr.Slider:
            for field in ("value", "minimum", "maximum", "step"):
                apply(field)
        elif kind in (gr.Radio, gr.Dropdown):
            many = getattr(component, "multiselect", False)
            apply("value", lambda v: all(x in _choices(component) for x in v) if many else v in _choices(component))
        elif kind in (gr.Checkbox, gr.Textbox, gr.Number):
            apply("value")

    def add_block(self, block, path: str = "") -> None:
        if hasattr(block, "children"):
            for child in block.children:
                self.add_block(child, path)
        elif getattr(block, "label", None) is not None:
            self.add_component(f"{path}/{block.label}", block)
        elif type(block) is gr.Button and block.value is not None:
            self.add_component(f"{path}/{block.value}", block)

    def dump_defaults(self) -> None:
        if self.ui_settings != self.loaded:
            with open(self.filename, "w", encoding="utf8") as f:
                json.dump(self.ui_settings, f, indent=4, ensure_ascii=False)
