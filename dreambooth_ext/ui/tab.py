"""The Dreambooth tab, built from the schema: every option in `config.OPTIONS` / `CONCEPT_OPTIONS` becomes a
widget in its group; nothing here defines an option. The handlers are methods, so tests call them directly."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import gradio as gr

from .. import config as schema
from ..data.checks import check_dataset
from ..errors import DreamboothError
from ..train.devices import compile_problem
from . import projects, render
from .adapter import HostAdapter
from .jobs import FINISHED, TERMINAL, JobManager, error_message, log_failure
from .widgets import HIDDEN, js_kwarg, line_plot_options, option_grid, update

log = logging.getLogger(__name__)

CONCEPT_SLOTS = 3
DEFAULT_PICK = "(default: the Base model field, else the loaded model)"
GROUP_TITLES = {"model": "Model", "concepts": "Concepts", "training": "Training", "lora": "LoRA",
                "memory": "Memory and speed",
                "saving": "Saving", "samples": "Sample images"}
OPEN_GROUPS = ("model", "concepts")
CHART_MIN_WIDTH = 320  # the loss and monitor charts side by side from twice this width, else one below the other


class DreamboothTab:
    def __init__(self, adapter: HostAdapter, jobs: JobManager, *, concept_slots: int = CONCEPT_SLOTS):
        self.adapter, self.jobs, self.concept_slots = adapter, jobs, concept_slots
        self.options = tuple(schema.OPTIONS)  # read at build time, so a changed schema changes the tab
        self.concept_options = tuple(schema.CONCEPT_OPTIONS)
        self.widgets: dict[str, gr.components.Component] = {}
        self.concept_widgets: list[dict[str, gr.components.Component]] = []
        self.blocks: gr.Blocks | None = None

    # -- the form <-> a Config --------------------------------------------------------------------------

    @property
    def form(self) -> list[gr.components.Component]:
        """Every option widget in a fixed order: the options, then each concept slot's options."""
        return [self.widgets[o.name] for o in self.options] + [
            slot[o.name] for slot in self.concept_widgets for o in self.concept_options]

    def collect(self, values: Sequence[Any]) -> schema.Config:
        """The form's values as a Config (checked per field by the schema). A concept slot with an empty image
        folder is unused; the first slot always counts, so an empty form says which folder is missing."""
        values = list(values)
        n = len(self.options)
        data: dict[str, Any] = dict(zip([o.name for o in self.options], values[:n], strict=True))
        size = len(self.concept_options)
        concepts = []
        for i in range(self.concept_slots):
            chunk = values[n + i * size: n + (i + 1) * size]
            concept = dict(zip([o.name for o in self.concept_options], chunk, strict=True))
            if i == 0 or str(concept.get("instance_dir") or "").strip():
                concepts.append(concept)
        data["concepts"] = concepts
        return schema.from_dict(data)

    def form_values(self, config: schema.Config) -> list[Any]:
        """The values that show `config` in the form (the inverse of `collect`)."""
        if len(config.concepts) > self.concept_slots:
            raise DreamboothError(f"Project {config.project_name!r} has {len(config.concepts)} concepts; this tab "
                                  f"edits up to {self.concept_slots}. Train it with the API or the command line.")
        values = [getattr(config, o.name) for o in self.options]
        for i in range(self.concept_slots):
            concept = config.concepts[i] if i < len(config.concepts) else None
            for o in self.concept_options:
                values.append(getattr(concept, o.name) if concept else ("" if o.name == "instance_dir" else o.default))
        return values

    # -- building ---------------------------------------------------------------------------------------

    def build(self) -> gr.Blocks:
        with gr.Blocks(analytics_enabled=False) as blocks:
            with gr.Row(equal_height=False):
                with gr.Column(scale=3):
                    self._project_row()
                    for group in schema.GROUPS:
                        with gr.Accordion(GROUP_TITLES.get(group, group.capitalize()), open=group in OPEN_GROUPS,
                                          elem_id=f"dreambooth_group_{group}"):
                            if group == "model":
                                self._model_info()
                            if group == "concepts":
                                self._concept_slots()
                            self.widgets.update(option_grid(
                                [o for o in self.options if o.group == group], "dreambooth_",
                                suggestions=self._device_suggestions(), hidden=self._hidden_options(),
                                inactive=self._other_mode_options(schema.OPTIONS_BY_NAME["train_mode"].default)))
                            if group == "memory":
                                self.lowest_memory_button = gr.Button(
                                    "Lowest memory", elem_id="dreambooth_lowest_memory", size="sm")
                    self._ungrouped_options()
                with gr.Column(scale=2):
                    self._run_panel()
            self._wire()
            # When the page loads (also after a reload), the form of the last run comes back. A load event, not a
            # click from the page's JS: in the WebUI that click came before gradio had wired the button.
            blocks.load(self.restore_form, [], self.form)
        for block in blocks.blocks.values():
            # The options schema is the one source of the form's defaults: the host's ui-config.json would keep
            # the first ones it saw (and sliders' ranges) over any later version's.
            block.do_not_save_to_config = True
        self.blocks = blocks
        return blocks

    def _device_suggestions(self) -> dict[str, list[str]]:
        """The devices a run can use, and sets of several GPUs where there are two or more."""
        devices = self.adapter.device_choices()
        count = sum(choice.startswith("cuda:") for choice in devices)
        sets = [",".join(map(str, range(n))) for n in range(2, count + 1)]
        return {"device": devices, "gpus": ["", "all", *sets] if count >= 2 else []}

    def _hidden_options(self) -> frozenset[str]:
        """Options that can do nothing on this machine: several GPUs without two of them, DeepSpeed where it is
        not installed, compiling the UNet with a torch that cannot."""
        hidden = set() if self._device_suggestions()["gpus"] else {"gpus"}
        if not self.adapter.deepspeed_installed():
            hidden.add("deepspeed_offload")
        if compile_problem():
            hidden.add("compile_unet")
        return frozenset(hidden)

    def _other_mode_options(self, train_mode: str) -> frozenset[str]:
        """The options of the other train mode (its learning rates): hidden, so that no field shows a rate the run
        would not use."""
        return frozenset(o.name for o in self.options if o.mode and o.mode != train_mode)

    def mode_options(self, train_mode: str) -> list:
        """Show the options `train_mode` uses and hide the other mode's (their values stay in the form)."""
        return [update(visible=o.mode == train_mode) for o in self._mode_bound()]

    def _mode_bound(self) -> list[schema.Option]:
        """The options that belong to one train mode, in form order (those hidden on this machine left out)."""
        hidden = self._hidden_options()
        return [o for o in self.options if o.mode and o.name not in hidden]

    def _ungrouped_options(self) -> None:
        rest = [o for o in self.options if o.name not in self.widgets]
        if rest:  # an option whose group the tab has no place for still gets a widget
            with gr.Accordion("Other", open=False):
                self.widgets.update(option_grid(rest, "dreambooth_"))

    def _project_row(self) -> None:
        names = projects.list_projects(self.adapter.projects_dir())
        with gr.Row(elem_id="dreambooth_project_row"):
            self.project_pick = gr.Dropdown(choices=names, value=None, label="Saved projects",
                                            elem_id="dreambooth_project_pick")
            self.project_refresh = gr.Button("Refresh list", elem_id="dreambooth_project_refresh")
            self.project_load = gr.Button("Load", elem_id="dreambooth_project_load")
            self.project_save = gr.Button("Save", elem_id="dreambooth_project_save")
        self.project_message = gr.HTML(elem_id="dreambooth_project_message")
        # For the page's JS: which names exist (to confirm an overwrite), and the answer it got.
        self.existing_projects = gr.Textbox(json.dumps(names), visible=False, elem_id="dreambooth_existing_projects")
        self.overwrite = gr.Checkbox(False, visible=False, elem_id="dreambooth_overwrite")

    def _model_info(self) -> None:
        self.model_html = gr.HTML(self._summary_html(), elem_id="dreambooth_model_info")
        with gr.Row():
            self.checkpoint_pick = gr.Dropdown(
                choices=[DEFAULT_PICK] + self._titles(), value=DEFAULT_PICK, label="Train another checkpoint",
                info='Train this checkpoint instead of the one in "Base model" (or the loaded model).',
                elem_id="dreambooth_checkpoint_pick")
            self.model_refresh = gr.Button("Refresh", elem_id="dreambooth_model_refresh")

    def _concept_slots(self) -> None:
        for i in range(self.concept_slots):
            with gr.Accordion(f"Concept {i + 1}" + ("" if i == 0 else " (optional)"), open=i == 0):
                values = {"instance_dir": ""} if i else {}
                self.concept_widgets.append(option_grid(self.concept_options, f"dreambooth_c{i}_", values))

    def _run_panel(self) -> None:
        with gr.Row():
            self.start_button = gr.Button("Start training", variant="primary", elem_id="dreambooth_start")
            self.resume_button = gr.Button("Resume", elem_id="dreambooth_resume")
            self.cancel_button = gr.Button("Cancel", variant="stop", elem_id="dreambooth_cancel")
            self.check_button = gr.Button("Check dataset", elem_id="dreambooth_check")
        self.dataset_report = gr.HTML(elem_id="dreambooth_dataset_report")
        self.task_id = gr.Textbox(visible=False, elem_id="dreambooth_task_id")
        gr.HTML("<div id='dreambooth_progressbar'></div>", elem_id="dreambooth_progress_container")
        status = self.jobs.status()
        self.status = gr.HTML(render.status_html(status), elem_id="dreambooth_status")
        with gr.Row(elem_id="dreambooth_charts"):  # side by side where the column is wide enough, else one below
            self.chart = gr.LinePlot(render.loss_frame(status), x="step", y="loss", title="Loss (smoothed)",
                                     height=220, min_width=CHART_MIN_WIDTH, visible=bool(status.get("losses")),
                                     elem_id="dreambooth_loss_chart")
            monitor = status.get("monitor")
            frame = render.monitor_frame(monitor)
            self.monitor_chart = gr.LinePlot(frame, **line_plot_options(
                x="step", y="value", color="signal", title="Learning monitor", y_title="relative value",
                color_legend_title="signal", tooltip=["step", "signal", "value", "verdict"], overlay_point=True,
                caption=render.monitor_caption(monitor), height=220, min_width=CHART_MIN_WIDTH,
                visible=frame is not None, elem_id="dreambooth_monitor_chart"))
        self.gallery = gr.Gallery(label="Sample images", columns=4, elem_id="dreambooth_gallery")
        with gr.Row(elem_id="dreambooth_load_row"):
            self.load_model_button = gr.Button("Load this model now", visible=False, elem_id="dreambooth_load_model")
            self.load_best_button = gr.Button("Load best", visible=False, elem_id="dreambooth_load_best")
        # Changed after each action that may change the host's checkpoint list or selection (CSS-hidden, not
        # visible=False: a component that is not rendered fires no change event).
        self.selection_token = gr.Textbox("", elem_id="dreambooth_selection_token", elem_classes=HIDDEN)
        self.seen = gr.State(None)  # what the page already shows, so polling sends the chart/gallery only on change
        self.refresh_button = gr.Button("refresh", elem_id="dreambooth_refresh", elem_classes=HIDDEN)

    def _wire(self) -> None:
        form = self.form
        view = self.view_components
        # the status HTML last: the host appends its timing to it
        start_outputs = view + [self.checkpoint_pick, self.selection_token, self.status]
        # No gr.State among the inputs of an event with page JS: gradio 4's page hands the JS the inputs and the
        # outputs, and fills a State input only when the JS returns exactly as many values as inputs, so every value
        # after a State would land one field further on.
        run_inputs = [self.task_id, self.checkpoint_pick] + form
        self._gpu_run = self.adapter.foreground(self._run_job, [update()] * (len(start_outputs) - 1))
        quiet = {"show_progress": "hidden"}  # progress shows in the status area and the host's progress bar
        self.start_button.click(self.start_clicked, run_inputs, start_outputs, **quiet,
                                **js_kwarg("dreambooth_start"))
        self.resume_button.click(self.resume_clicked, run_inputs, start_outputs, **quiet,
                                 **js_kwarg("dreambooth_start"))
        self.load_model_button.click(self.load_model, [], [self.project_message, self.selection_token])
        self.load_best_button.click(self.load_best, [], [self.project_message, self.selection_token])
        self.cancel_button.click(self.cancel, [self.seen], view + [self.status], **quiet)
        self.check_button.click(self.check_dataset, [self.checkpoint_pick] + form, [self.dataset_report])
        for button in (self.start_button, self.resume_button):  # a run's status has its own dataset check
            button.click(lambda: "", [], [self.dataset_report], queue=False, **quiet)
        self.lowest_memory_button.click(self.lowest_memory, [], [self.widgets[n] for n in schema.LOWEST_MEMORY])
        # `change` also fires when Load or a page reload sets the mode, so the rates shown always match it.
        self.widgets["train_mode"].change(self.mode_options, [self.widgets["train_mode"]],
                                          [self.widgets[o.name] for o in self._mode_bound()], **quiet)
        self.refresh_button.click(self.refresh, [self.seen, self.checkpoint_pick],
                                  view + [self.status, self.model_html], **quiet)
        self.model_refresh.click(self.refresh_model, [self.checkpoint_pick], [self.model_html, self.checkpoint_pick])
        self.checkpoint_pick.change(self.model_box, [self.checkpoint_pick], [self.model_html], show_progress="hidden")
        self.project_refresh.click(self.refresh_projects, [], [self.project_pick, self.existing_projects])
        save_inputs = [self.overwrite, self.existing_projects, self.widgets["project_name"]] + form
        self.project_save.click(self.save, save_inputs,
                                [self.project_pick, self.existing_projects, self.project_message],
                                **js_kwarg("dreambooth_confirm_save"))
        self.project_load.click(self.load, [self.project_pick], form + [self.project_message])

    @property
    def view_components(self) -> list[gr.components.Component]:
        """What `_view` returns values for, in its order (the status HTML, which follows, aside)."""
        return [self.chart, self.gallery, self.seen, self.load_model_button, self.monitor_chart,
                self.load_best_button]

    def attach_checkpoint_dropdown(self, dropdown: gr.components.Component) -> None:
        """Keep the host's checkpoint dropdown in step with what Start, Resume and "Load this model now" did.

        The WebUI creates that dropdown (a quicksetting) after the extension tabs, so it is attached when it
        appears (the host's after-component callback, inside its page's Blocks), not while the tab is built. Those
        handlers end by changing `selection_token`; its change event redraws the dropdown.
        """
        self.selection_token.change(self.checkpoint_dropdown_update, [], [dropdown], show_progress="hidden")

    def checkpoint_dropdown_update(self) -> dict:
        """The host's dropdown with its fresh choices and the host's selected checkpoint."""
        if self.adapter.checkpoint_selection is None:
            return update()
        try:
            choices, selected = self.adapter.checkpoint_selection()
        except Exception:  # noqa: BLE001 - the dropdown keeps what it shows; the log says why
            log.exception("Reading the host's checkpoint list failed")
            return update()
        return update(choices=choices, value=selected)

    # -- handlers ---------------------------------------------------------------------------------------

    def start(self, task_id: str, pick: str | None, seen: Any, *values: Any, resume: bool = False) -> list:
        try:
            config = schema.validate(self.collect(values))
            self.jobs.check_free()
            config, host = self.adapter.prepare_checked(config, None if pick in (None, "", DEFAULT_PICK) else pick,
                                                        resume=resume)
            job = self.jobs.claim(config, resume=resume)
        except DreamboothError as exc:
            return self._start_outputs(self.jobs.status(), seen, error=error_message(exc))
        outputs = list(self._gpu_run(task_id, job, host))
        status = job.status
        if (status.state == FINISHED and status.checkpoints and self.adapter.load_checkpoint
                and self.adapter.load_after_training()):
            note = self._load_checkpoint(status.checkpoints[-1])
            outputs[-1] = render.message_html(note) + outputs[-1]
        return outputs

    def resume(self, task_id: str, pick: str | None, seen: Any, *values: Any) -> list:
        return self.start(task_id, pick, seen, *values, resume=True)

    def start_clicked(self, task_id: str, pick: str | None, *values: Any) -> list:
        """Start from the page, whose inputs carry no `seen` (see `_wire`): a refusal draws the view afresh."""
        return self.start(task_id, pick, None, *values)

    def resume_clicked(self, task_id: str, pick: str | None, *values: Any) -> list:
        return self.start(task_id, pick, None, *values, resume=True)

    def _run_job(self, task_id: str, job, host) -> list:
        status = job.run(host)
        return self._start_outputs(status.to_dict(), None)

    def _start_outputs(self, status: dict, seen: Any, error: str = "") -> list:
        *view, status_html = self._view(status, with_notice(seen, error))
        return [*view, update(choices=[DEFAULT_PICK] + self._titles()), new_token(), status_html]

    def _view(self, status: dict, seen: Any) -> list:
        """Values for `view_components` (loss chart, gallery, what the page now shows (`seen`), the Load button,
        the monitor's chart, the Load best button), then the status HTML.

        `seen` = [run start, loss points, samples, model version, notice, status HTML, monitor points]: the charts
        and gallery are sent only when they changed; the model version is the one `refresh` last drew the model box
        for; the notice (the last action's error) stays above the status until the next action, however often the
        page polls; the status HTML is what was last sent (`refresh` leaves the page's as it is when it is
        unchanged)."""
        valid = is_seen(seen)
        monitor = status.get("monitor")
        key = [status.get("started_at"), len(status.get("losses") or []), len(status.get("samples") or []),
               seen[3] if valid else None, seen[4] if valid else "", None, monitor_key(monitor)]
        same_run = valid and seen[0] == key[0]
        chart = update() if same_run and seen[1] == key[1] else update(value=render.loss_frame(status),
                                                                       visible=key[1] > 0)
        gallery = update() if same_run and seen[2] == key[2] else render.gallery_items(status)
        monitor_chart = update() if same_run and seen[6] == key[6] else self._monitor_chart(monitor)
        result = (status.get("checkpoints") or [None])[-1] if status.get("state") == FINISHED else None
        in_use = result is not None and self._in_use(result)
        can_load = bool(self.adapter.load_checkpoint and result and not in_use)
        if key[4]:  # the refusal first; an earlier run's error below it must not read as this action's
            earlier = "The current or last run, unchanged by this:" if status.get("state", "idle") != "idle" else ""
            status_html = render.message_html(key[4], error=True) + render.status_html(status, note=earlier,
                                                                                        in_use=in_use)
        else:
            status_html = render.status_html(status, in_use=in_use)
        key[5] = status_html
        return [chart, gallery, key, update(visible=can_load), monitor_chart, self._load_best_button(status),
                status_html]

    @staticmethod
    def _monitor_chart(monitor: dict | None) -> dict:
        frame = render.monitor_frame(monitor)
        return update(value=frame, caption=render.monitor_caption(monitor), visible=frame is not None)

    def best_model(self, status: dict) -> str | None:
        """The file of the learning monitor's best saved step, when the run has ended, the host can load it and has
        not loaded it already (then "Load best" offers it); None otherwise."""
        if not self.adapter.load_checkpoint or status.get("state") not in TERMINAL or not status.get("monitor"):
            return None
        try:
            path = str(self.jobs.saved_model("best"))
        except DreamboothError:
            return None
        return None if self._in_use(path) else path

    def _load_best_button(self, status: dict) -> dict:
        path = self.best_model(status)
        if path is None:
            return update(visible=False)
        return update(value=f"Load best (step {status['monitor']['best_step']})", visible=True)

    def _in_use(self, path: str) -> bool:
        """Whether the host has this file loaded now (then "Load this model now" has nothing left to do)."""
        try:
            loaded = self.adapter.loaded_file()
        except Exception:  # noqa: BLE001 - the Load button stays; the log says why
            log.exception("Reading the host's loaded checkpoint failed")
            return False
        return loaded is not None and os.path.normcase(os.path.abspath(loaded)) == os.path.normcase(
            os.path.abspath(path))

    def refresh(self, seen: Any = None, pick: str | None = None) -> list:
        """The polled view, plus the model box when the host loaded another model since it was drawn (also on
        the page's first poll: the box built with the tab predates the host's model)."""
        outputs = self._view(self.jobs.status(), seen)
        if is_seen(seen) and seen[5] == outputs[-1]:
            outputs[-1] = update()  # unchanged: what the host appended to it (time taken, peak VRAM) stays
        version = self.adapter.model_version()
        if outputs[SEEN][3] == version:
            return outputs + [update()]
        outputs[SEEN][3] = version
        return outputs + [self.model_box(pick)]

    def cancel(self, seen: Any = None) -> list:
        stopping = self.jobs.cancel()  # the status then says what stops when, and what is kept
        outputs = self._view(self.jobs.status(), with_notice(seen, ""))
        if not stopping:
            outputs[-1] = render.message_html("No training run is active.") + outputs[-1]
        return outputs

    def lowest_memory(self) -> list:
        """The memory options set for the lowest peak memory (the rest of the form is left as it is)."""
        return [update(value=value) for value in schema.LOWEST_MEMORY.values()]

    def check_dataset(self, pick: str | None, *values: Any) -> str:
        """The dataset check a run starts with, on the form as it is (no model is loaded)."""
        from ..train.run import settled_config

        try:
            config = schema.validate(self.collect(values))
            config, host = self.adapter.prepare(config, None if pick in (None, "", DEFAULT_PICK) else pick)
            report = check_dataset(settled_config(config, host))
        except DreamboothError as exc:
            return render.message_html(error_message(exc), error=True)
        return render.dataset_report_html(report.warnings, report.errors)

    def refresh_model(self, pick: str | None = None) -> list:
        return [self.model_box(pick), update(choices=[DEFAULT_PICK] + self._titles())]

    def model_box(self, pick: str | None = None) -> str:
        """What Start trains: the loaded model, or the checkpoint picked in "Train another checkpoint" (read from
        its file's header; its weights load when the run starts)."""
        if pick in (None, "", DEFAULT_PICK):
            return self._summary_html()
        try:
            config, host = self.adapter.prepare(schema.default_config(), pick)
            facts = host.check(config)
        except DreamboothError as exc:
            return render.model_summary_html({"problem": f"{pick}: {error_message(exc)}"})
        except Exception as exc:  # noqa: BLE001 - shown in the box; the log has the traceback
            log.exception("Reading the picked checkpoint %s failed", pick)
            return render.model_summary_html({"problem": f"Could not read {pick}: {error_message(exc)}"})
        return render.model_summary_html({
            "title": pick, "family": facts.family.name if facts else "", "picked": True,
            "prediction": (facts.prediction_type or "") if facts else ""})

    def load_model(self) -> list:
        """Load the last run's result and make it the host's selected checkpoint (its dropdown follows)."""
        checkpoints = self.jobs.status().get("checkpoints") or []
        if not checkpoints or not self.adapter.load_checkpoint:
            return [render.message_html("No finished model to load.", error=True), update()]
        note = self._load_checkpoint(checkpoints[-1])
        return [render.message_html(note, error=note.startswith("Could not")), new_token()]

    def load_best(self) -> list:
        """Load the model of the learning monitor's best saved step, as "Load this model now" loads the last one."""
        if not self.adapter.load_checkpoint:
            return [render.message_html("This host has no loaded model to replace.", error=True), update()]
        try:
            path = self.jobs.saved_model("best")
        except DreamboothError as exc:
            return [render.message_html(error_message(exc), error=True), update()]
        note = self._load_checkpoint(str(path))
        return [render.message_html(note, error=note.startswith("Could not")), new_token()]

    def _load_checkpoint(self, path: str) -> str:
        try:
            return "Loaded " + self.adapter.queued(self.adapter.load_checkpoint)(path)
        except Exception as exc:  # noqa: BLE001 - shown to the user; unexpected ones with a traceback in the log
            log_failure(exc, f"Loading {path}")
            return f"Could not load {path}: {error_message(exc)}"

    def restore_form(self) -> list:
        """The form of the active or last run (after a page reload the page would show the defaults, and Resume
        would resume a project the user did not mean); unchanged when there was no run."""
        config = self.jobs.last_config
        if config is None:
            return [update() for _ in self.form]
        try:
            return self.form_values(config)
        except DreamboothError:  # more concepts than the tab has slots
            return [update() for _ in self.form]

    def refresh_projects(self) -> list:
        names = projects.list_projects(self.adapter.projects_dir())
        return [update(choices=names), json.dumps(names)]

    def save(self, overwrite: bool, existing: str, name: str, *values: Any) -> list:
        try:
            config = self.collect(values)
            path = projects.project_file(self.adapter.projects_dir(), config.project_name)
            if path.exists() and not overwrite:
                raise DreamboothError(f"Project {config.project_name!r} exists already; not overwritten. Save again "
                                      "and confirm, or change the project name.")
            projects.save_project(self.adapter.projects_dir(), config)
            message, is_error = f"Saved {path}", False
        except DreamboothError as exc:
            message, is_error, config = error_message(exc), True, None
        names = projects.list_projects(self.adapter.projects_dir())
        value = config.project_name if config is not None else update()
        return [update(choices=names, value=value), json.dumps(names), render.message_html(message, error=is_error)]

    def load(self, name: str | None) -> list:
        try:
            if not name:
                raise DreamboothError("Pick a saved project in the list first.")
            config = projects.load_project(self.adapter.projects_dir(), name)
            values = self.form_values(config)
            stopped = projects.stopped_run(self.adapter.projects_dir(), name)
        except DreamboothError as exc:
            return [update() for _ in self.form] + [render.message_html(error_message(exc), error=True)]
        note = (f"Loaded the options of project {name!r}'s run stopped at step {stopped.get('step')} of "
                f"{stopped.get('total_steps')}: Resume continues it." if stopped else f"Loaded project {name!r}")
        return values + [render.message_html(note)]

    # -- host information -------------------------------------------------------------------------------

    def _titles(self) -> list[str]:
        try:
            return list(self.adapter.checkpoint_titles())
        except Exception:  # noqa: BLE001 - a listing failure must not break the tab
            log.exception("Listing checkpoints failed")
            return []

    def _summary_html(self) -> str:
        try:
            return render.model_summary_html(self.adapter.model_summary())
        except Exception as exc:  # noqa: BLE001
            log.exception("Reading the loaded model failed")
            return render.message_html(f"Could not read the loaded model: {error_message(exc)}", error=True)


SEEN_FIELDS = 7
SEEN = 2  # where `_view` puts `seen` among its values


def is_seen(seen: Any) -> bool:
    """Whether `seen` is what `_view` recorded (a fresh page sends None; an older version's page, a shorter list)."""
    return isinstance(seen, list) and len(seen) == SEEN_FIELDS


def with_notice(seen: Any, notice: str) -> list:
    """`seen` with the notice replaced (an action clears the previous action's error, or sets its own)."""
    if is_seen(seen):
        return [*seen[:4], notice, None, seen[6]]
    return [None, None, None, None, notice, None, None]


def monitor_key(monitor: dict | None) -> list | None:
    """What the monitor's chart shows, in brief: its points (each with whether it was saved) and the best step."""
    if not monitor:
        return None
    return [[p.get("step"), bool(p.get("saved"))] for p in monitor.get("points") or []] + [monitor.get("best_step")]


def new_token() -> str:
    """A value `selection_token` has never had, so its change event fires."""
    return str(time.time_ns())


def build_tab(adapter: HostAdapter, jobs: JobManager, *, concept_slots: int = CONCEPT_SLOTS) -> DreamboothTab:
    """Build the tab's gr.Blocks (in `.blocks`); returns the tab object with its widgets and handlers."""
    tab = DreamboothTab(adapter, jobs, concept_slots=concept_slots)
    tab.build()
    return tab
