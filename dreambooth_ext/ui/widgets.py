"""Schema options -> gradio widgets, and the little that differs between gradio 3.41 (WebUI) and 4.40 (Forge)."""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import Any

import gradio as gr

from ..config import Option

GRID_COLUMNS = 3  # options side by side in a group, so the form is not one long column
GRADIO_MAJOR = int(gr.__version__.split(".")[0])

HIDDEN = ["dreambooth-hidden"]  # CSS-hidden: unlike visible=False, gradio 4 still puts it in the page for the JS


def js_kwarg(code: str) -> dict[str, str]:
    """The keyword that attaches page JavaScript to an event: `_js` in gradio 3, `js` in gradio 4."""
    return {"_js": code} if GRADIO_MAJOR < 4 else {"js": code}


def line_plot_options(**options: Any) -> dict[str, Any]:
    """The LinePlot options the installed gradio takes. gradio 4.40's LinePlot (a native plot: Forge's) names the
    legend's title `color_title` and has no `overlay_point` or `tooltip`; given them it warns that they are deprecated
    (and Forge's gradio, that they are unexpected)."""
    takes = inspect.signature(gr.LinePlot.__init__).parameters
    if "color_legend_title" in options and "color_legend_title" not in takes and "color_title" in takes:
        options["color_title"] = options.pop("color_legend_title")
    return {name: value for name, value in options.items() if name in takes}


def update(**kwargs: Any) -> dict:
    """`gr.update` exists in both gradio 3 and 4 (`Component.update` is gone in 4)."""
    return gr.update(**kwargs)


def enable_queue(blocks: gr.Blocks, concurrency: int) -> gr.Blocks:
    if GRADIO_MAJOR < 4:
        return blocks.queue(concurrency_count=concurrency)
    return blocks.queue(default_concurrency_limit=concurrency)


def widget_kind(option: Option) -> str:
    """Which widget an option gets: checkbox, dropdown, textarea, textbox, slider or number."""
    if option.kind == "bool":
        return "checkbox"
    if option.kind == "choice":
        return "dropdown"
    if option.kind == "text":
        return "textarea"
    if option.kind in ("str", "path"):
        return "textbox"
    return "slider" if slider_step(option) is not None else "number"


def slider_step(option: Option) -> float | None:
    """A slider step when a slider makes sense (a small range the default sits on), else None: a learning rate
    of 2e-6 on a 0..1 slider, or a step count up to ten million, is better typed."""
    if option.kind not in ("int", "float") or option.min is None or option.max is None:
        return None
    span = option.max - option.min
    if option.kind == "int":
        return 1 if span <= 1000 else None
    if span > 100:
        return None
    step = 0.01
    on_grid = math.isclose(round(option.default / step) * step, option.default, abs_tol=1e-12)
    return step if on_grid and math.isclose(round(option.max / step) * step, option.max) else None


def make_widget(option: Option, *, value: Any = None, elem_id: str | None = None,
                suggestions: list[str] | None = None, visible: bool = True) -> gr.components.Component:
    """The widget for one option, with the schema's help text as its info line. `suggestions`: values the host
    can list for a free-text option (a dropdown that still takes any value). `visible`: False for an option
    that cannot do anything here (it still carries its value)."""
    kind = widget_kind(option)
    value = option.default if value is None else value
    common = {"label": option.label, "info": option.info, "elem_id": elem_id, "visible": visible}
    if suggestions:
        choices = suggestions if value in suggestions else [value, *suggestions]
        return gr.Dropdown(choices=choices, value=value, allow_custom_value=True, **common)
    if kind == "checkbox":
        return gr.Checkbox(value=bool(value), **common)
    if kind == "dropdown":
        return gr.Dropdown(choices=list(option.choices), value=value, **common)
    if kind == "textarea":
        return gr.Textbox(value=value, lines=3, **common)
    if kind == "textbox":
        placeholder = "a folder or file path" if option.kind == "path" else None
        return gr.Textbox(value=value, lines=1, placeholder=placeholder, **common)
    if kind == "slider":
        return gr.Slider(minimum=option.min, maximum=option.max, step=slider_step(option), value=value, **common)
    # No minimum/maximum here: out-of-range values reach the schema's check, whose message names the option.
    return gr.Number(value=value, precision=0 if option.kind == "int" else None, **common)


def option_grid(options: Sequence[Option], id_prefix: str, values: dict[str, Any] | None = None,
                suggestions: dict[str, list[str]] | None = None,
                hidden: frozenset[str] = frozenset(),
                inactive: frozenset[str] = frozenset()) -> dict[str, gr.components.Component]:
    """Widgets for `options` in their order, GRID_COLUMNS to a row; a multi-line text takes a row of its own.
    Each widget's elem_id is id_prefix + the option's name. The options named in `hidden` are never shown (they go
    last); those in `inactive` are not shown for now but keep their place, for the tab to show them later."""
    values = values or {}
    suggestions = suggestions or {}
    options = [o for o in options if o.name not in hidden] + [o for o in options if o.name in hidden]
    widgets: dict[str, gr.components.Component] = {}
    row: list[Option] = []

    def flush() -> None:
        if row:
            with gr.Row():
                for option in row:
                    widgets[option.name] = make_widget(option, value=values.get(option.name),
                                                       elem_id=id_prefix + option.name,
                                                       suggestions=suggestions.get(option.name),
                                                       visible=option.name not in hidden | inactive)
            row.clear()

    for option in options:
        if widget_kind(option) == "textarea":
            flush()
            row.append(option)
            flush()
        else:
            row.append(option)
            if len(row) == GRID_COLUMNS:
                flush()
    flush()
    return widgets
