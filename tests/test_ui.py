"""The Dreambooth tab: built from the schema under gradio 3.41, its handlers run real (tiny) training."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from pathlib import Path

import gradio as gr
import pytest
import safetensors.torch
import torch
from ui_helpers import BlockingHost, page_texts, quick_run_data, wording_problems

from dreambooth_ext import config as schema
from dreambooth_ext.errors import DreamboothError
from dreambooth_ext.train.optim import group_options
from dreambooth_ext.ui import JobManager, folder_adapter
from dreambooth_ext.ui.jobs import CANCELLED, FAILED, FINISHED
from dreambooth_ext.ui.tab import DEFAULT_PICK, build_tab
from dreambooth_ext.ui.widgets import slider_step, widget_kind

WIDGET_TYPES = {"checkbox": gr.Checkbox, "dropdown": gr.Dropdown, "textarea": gr.Textbox, "textbox": gr.Textbox,
                "slider": gr.Slider, "number": gr.Number}

@pytest.fixture
def tab_factory(tmp_path):
    def make(adapter=None, jobs=None, **kwargs):
        adapter = adapter or folder_adapter(tmp_path / "models", tmp_path / "work")
        return build_tab(adapter, jobs or JobManager(), **kwargs)

    return make


def form_for(tab, data: dict) -> list:
    return tab.form_values(schema.from_dict(data))


def value_of(component):
    return component.value


# -- built from the schema --------------------------------------------------------------------------------


def test_every_option_has_a_widget_of_its_kind_with_its_help(tab_factory):
    tab = tab_factory()
    assert set(tab.widgets) == {o.name for o in schema.OPTIONS}
    for option in schema.OPTIONS:
        widget = tab.widgets[option.name]
        assert isinstance(widget, WIDGET_TYPES[widget_kind(option)]), option.name
        assert widget.info == option.info and widget.label == option.label
    assert len(tab.concept_widgets) == 3
    for slot in tab.concept_widgets:
        assert set(slot) == {o.name for o in schema.CONCEPT_OPTIONS}
    assert tab.widgets["sample_prompts"].lines > 1  # 'text' options are multi-line
    assert tab.widgets["optimizer"].choices == [(c, c) for c in schema.OPTIONS_BY_NAME["optimizer"].choices] or \
        list(tab.widgets["optimizer"].choices) == list(schema.OPTIONS_BY_NAME["optimizer"].choices)


# Labels that are the option's name with its underscores as spaces, and a phrase of their own all the same.
REAL_PHRASES = {"Token", "Class word", "Class prompt", "Project name", "Base model", "Prediction type", "Train mode",
                "Resolution", "Learning rate", "Gradient accumulation steps", "Optimizer", "Prior preservation",
                "Prior loss weight", "Noise offset", "Seed", "Class image steps", "Device", "Mixed precision",
                "Gradient checkpointing", "Precompute text embeddings", "Sample prompts", "Sample negative prompt",
                "Sample seed", "Sample steps"}


def test_every_label_and_help_text_of_the_tab_reads_as_words(tab_factory):
    tab = tab_factory()
    choice_values = {c for o in schema.OPTIONS + schema.CONCEPT_OPTIONS for c in o.choices}
    texts = page_texts(tab.blocks.get_config_file()) + [("checkpoint pick default", DEFAULT_PICK)]
    assert len(texts) > 2 * len(schema.OPTIONS)  # the options' labels and help, the groups, the buttons
    assert wording_problems(texts, choice_values) == []
    labels = {o.name: tab.widgets[o.name].label for o in schema.OPTIONS}
    labels.update({o.name: tab.concept_widgets[0][o.name].label for o in schema.CONCEPT_OPTIONS})
    made_from_names = {label for name, label in labels.items() if label == name.replace("_", " ").capitalize()}
    assert made_from_names <= REAL_PHRASES
    assert not {"Vae", "Ema", "Ema on cpu", "Flip p", "Lr scheduler", "Min snr gamma", "Compile unet"} & set(
        labels.values())
    assert labels["vae"] == "VAE" and labels["min_snr_gamma"] == "Min-SNR gamma"
    assert labels["compile_unet"] == "Compile the UNet" and labels["flip_p"] == "Flip probability"
    # A help text that points at another option names it as the tab shows it.
    assert '"Epochs"' in tab.widgets["max_train_steps"].info and "num_train_epochs" not in tab.widgets[
        "max_train_steps"].info


def test_the_wording_check_catches_option_names():
    bad = [("a", "Vae"), ("b", "Used when max_train_steps is 0."), ("c", "Flip p"), ("d", "Ema on cpu"),
           ("e", "Lr scheduler"), ("f", "Empty: `base_model`."), ("g", "Train a lora")]
    assert all(wording_problems([text], set()) for text in bad)
    good = [("a", "adamw_8bit: 2 bytes; 'lora' uses <lora:name:1> and {token}"), ("b", "The UNet's VAE on the CPU")]
    assert wording_problems(good, {"adamw_8bit"}) == []


def test_only_the_learning_rates_of_the_train_mode_are_shown(tab_factory, tmp_path):
    tab = tab_factory()
    full, lora = ["learning_rate", "text_encoder_lr"], ["lora_learning_rate", "lora_text_encoder_lr"]
    assert all(tab.widgets[name].visible for name in full)
    assert not any(tab.widgets[name].visible for name in lora)
    # Train mode's change event (also fired when Load or a page reload sets it) swaps them.
    config = tab.blocks.get_config_file()
    ids = {c["id"]: c["props"].get("elem_id") for c in config["components"]}
    mode_id = tab.widgets["train_mode"]._id
    wired = [d for d in config["dependencies"] if d["trigger"] == "change" and d["targets"] == [mode_id]]
    assert len(wired) == 1 and {ids[i] for i in wired[0]["outputs"]} == {f"dreambooth_{n}" for n in full + lora}
    for mode, shown in (("lora", lora), ("full", full)):
        updates = dict(zip([o.name for o in tab._mode_bound()], tab.mode_options(mode), strict=True))
        assert {name for name, change in updates.items() if change["visible"]} == set(shown)
        # The field shown says its rate's default, the one the run uses when it is left alone.
        for name in shown:
            option = schema.OPTIONS_BY_NAME[name]
            assert f"Default {option.default:.0e}".replace("e-0", "e-") in option.info
    # A hidden rate keeps its value in the form, and the run uses the rate of its mode.
    data = quick_run_data(tmp_path / "m.safetensors", tmp_path / "a", train_mode="lora", learning_rate=0.01,
                          lora_learning_rate=3e-4)
    config = tab.collect(form_for(tab, data))
    assert (config.learning_rate, config.lora_learning_rate) == (0.01, 3e-4)
    assert getattr(config, group_options(config)["unet"]["lr"]) == 3e-4


def test_widget_kinds_follow_the_ranges():
    by_name = schema.OPTIONS_BY_NAME
    assert widget_kind(by_name["learning_rate"]) == "number"  # 2e-6 on a 0..1 slider is unusable
    assert widget_kind(by_name["adam_epsilon"]) == "number"
    assert widget_kind(by_name["max_train_steps"]) == "number"
    assert widget_kind(by_name["flip_p"]) == "slider" and slider_step(by_name["flip_p"]) == 0.01
    assert widget_kind(by_name["sample_steps"]) == "slider" and slider_step(by_name["sample_steps"]) == 1
    assert widget_kind(by_name["train_text_encoder"]) == "checkbox"
    assert widget_kind(by_name["lr_scheduler"]) == "dropdown"
    assert widget_kind(by_name["base_model"]) == "textbox"


def test_changing_the_schema_changes_the_tab(tab_factory, monkeypatch):
    extra = schema.Option(name="brand_new_switch", kind="bool", default=True, text="A new option.", group="saving")
    other = schema.Option(name="groupless", kind="int", default=3, text="No known group.", group="elsewhere")
    monkeypatch.setattr(schema, "OPTIONS", schema.OPTIONS + (extra, other))
    tab = tab_factory()
    assert isinstance(tab.widgets["brand_new_switch"], gr.Checkbox) and tab.widgets["brand_new_switch"].value is True
    assert isinstance(tab.widgets["groupless"], gr.Number)
    assert tab.form[len(schema.OPTIONS) - 2:len(schema.OPTIONS)] == [tab.widgets["brand_new_switch"],
                                                                      tab.widgets["groupless"]]


def test_collecting_the_untouched_form_gives_the_defaults(tab_factory):
    tab = tab_factory()
    config = tab.collect([value_of(c) for c in tab.form])
    assert config == schema.default_config()
    assert schema.to_dict(config) == schema.to_dict(schema.default_config())


def test_form_values_round_trip_with_several_concepts(tab_factory, tmp_path):
    tab = tab_factory()
    data = quick_run_data(tmp_path / "m.safetensors", tmp_path / "a", learning_rate=3e-6, flip_p=0.5)
    data["concepts"].append({"instance_dir": str(tmp_path / "b"), "token": "zwx", "class_word": "dog"})
    config = schema.from_dict(data)
    assert tab.collect(tab.form_values(config)) == config
    too_many = dataclasses.replace(config, concepts=config.concepts * 2)
    with pytest.raises(DreamboothError, match="up to 3"):
        tab.form_values(too_many)


# -- running --------------------------------------------------------------------------------------------


def test_start_trains_with_the_picked_checkpoint_and_reports_it(tab_factory, ui_models, ui_images, tmp_path):
    calls = []
    adapter = folder_adapter(ui_models, tmp_path / "work")

    def foreground(fn, extra_outputs):
        def wrapped(*args):
            calls.append((args[0], len(extra_outputs)))
            return fn(*args)
        return wrapped

    adapter.foreground = foreground
    tab = tab_factory(adapter)
    values = form_for(tab, quick_run_data("", ui_images, project="tabrun", sample_every_n_steps=1))
    assert "tiny.safetensors" in tab.checkpoint_pick.choices or \
        ("tiny.safetensors", "tiny.safetensors") in tab.checkpoint_pick.choices
    outputs = tab.start("task(abc123)", "tiny.safetensors", None, *values)

    assert calls == [("task(abc123)", 8)]  # the task id reaches the host's wrapper; extra outputs fit
    chart, gallery, seen, load_button, monitor_chart, load_best, pick, token, status = outputs
    result = ui_models / "Stable-diffusion" / "tabrun" / "tabrun_2.safetensors"
    assert result.is_file()
    assert "data-state='finished'" in status and str(result) in status, status
    assert list(chart["value"]["step"]) == [1, 2] and chart["value"]["loss"].notna().all() and chart["visible"]
    assert len(gallery) == 2 and all(caption.endswith(".png") for _, caption in gallery)  # samples at steps 1, 2
    assert load_button["visible"] is False and load_best["visible"] is False  # no loaded model to replace here
    assert "tabrun/tabrun_2.safetensors" in pick["choices"]  # the new model is listed at once
    assert tab.jobs.status()["checkpoints"] == [str(result)]
    # Polling afterwards sends the chart and gallery only when they changed.
    again = tab.refresh(seen)
    assert again[0] == gr.update() and again[1] == gr.update()
    assert again[-2] == gr.update()  # nor the unchanged status (the host's "Time taken" under it stays)
    assert "No model is loaded here" in again[-1]  # the page's first poll draws the model box
    assert tab.refresh(again[2])[-1] == gr.update()  # then only when the host loads another model


def test_interrupt_cancels_with_resumable_state_and_resume_finishes(tab_factory, ui_models, ui_images, tmp_path):
    interrupted = threading.Event()
    adapter = folder_adapter(ui_models, tmp_path / "work")
    host = adapter.prepare(schema.default_config(), None)[1]
    host.cancel_requested = interrupted.is_set  # what the WebUI's Interrupt button sets
    tab = tab_factory(adapter)
    data = quick_run_data(str(ui_models / "Stable-diffusion" / "tiny.safetensors"), ui_images, project="resumable",
                          max_train_steps=4)
    values = form_for(tab, data)
    steps_seen = []
    original = tab.jobs.claim

    def claim(config, *, resume=False):  # interrupt as soon as step 1 is reported, like the host's Interrupt
        job = original(config, resume=resume)
        apply = job.status.apply

        def spy(progress):
            apply(progress)
            if progress.phase == "training":
                steps_seen.append(progress.step)
                interrupted.set()
        job.status.apply = spy
        return job

    tab.jobs.claim = claim
    outputs = tab.start("task(x)", DEFAULT_PICK, None, *values)
    status = tab.jobs.status()
    assert status["state"] == CANCELLED and status["step"] == 1, outputs[-1]
    assert "Resume" in outputs[-1]
    assert (tmp_path / "work" / "resumable" / "state").is_dir()

    interrupted.clear()
    tab.jobs.claim = original
    tab.resume("task(y)", DEFAULT_PICK, None, *values)
    status = tab.jobs.status()
    assert status["state"] == FINISHED and status["step"] == 4 and status["resume"] is True
    assert status["losses"][0][0] == 2  # continued after step 1, not from scratch


def test_a_second_start_while_one_is_active_is_refused(tab_factory, ui_images, tmp_path):
    jobs = JobManager()
    tab = tab_factory(jobs=jobs)
    blocking = BlockingHost(tmp_path / "other")
    config = schema.from_dict(quick_run_data(tmp_path / "x.safetensors", ui_images, project="first"))
    jobs.start_background(config, blocking)
    assert blocking.entered.wait(30)
    try:
        values = form_for(tab, quick_run_data(tmp_path / "y.safetensors", ui_images, project="second"))
        status = tab.start("task(2)", DEFAULT_PICK, None, *values)[-1]
        assert "A training run (project &#x27;first&#x27;) is already active; cancel it or wait" in status
        assert "data-state='running'" in status  # the page keeps following the active run
        with pytest.raises(DreamboothError, match="already active"):
            jobs.claim(config)
    finally:
        blocking.release.set()
        jobs.wait(30)
    assert jobs.status()["state"] == FAILED and "blocking host released" in jobs.status()["error"]
    assert jobs.active is None


def test_errors_appear_plainly_in_the_status(tab_factory, ui_images, tmp_path):
    tab = tab_factory()
    # Invalid form: each problem is listed, nothing starts.
    values = form_for(tab, quick_run_data("", ui_images, resolution=100, concept={"instance_dir": ""}))
    status = tab.start("task(e)", DEFAULT_PICK, None, *values)[-1]
    assert "resolution = 100: must be a multiple of 64" in status
    assert "instance_dir = &#x27;&#x27;: give the folder of the training images" in status
    assert tab.jobs.active is None
    # A base model that does not exist: refused before any run starts, in the error box.
    missing = tmp_path / "no_such_model.safetensors"
    values = form_for(tab, quick_run_data(missing, ui_images, project="broken"))
    status = tab.start("task(f)", DEFAULT_PICK, None, *values)[-1]
    assert "dreambooth-error" in status and "no_such_model.safetensors" in status and "does not exist" in status
    assert tab.jobs.status()["state"] == "idle" and tab.jobs.active is None
    # A run that fails once started: the exception becomes the status' error, the slot is free again.
    broken = tmp_path / "broken.safetensors"  # the keys of an SD1 checkpoint, but not its tensors
    safetensors.torch.save_file({"model.diffusion_model.out.2.weight": torch.zeros(1),
                                 "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(1)},
                                str(broken))
    values = form_for(tab, quick_run_data(broken, ui_images, project="broken"))
    status = tab.start("task(g)", DEFAULT_PICK, None, *values)[-1]
    assert "data-state='failed'" in status and "dreambooth-error" in status, status
    assert "UNet is missing" in tab.jobs.status()["error"]
    assert tab.jobs.active is None


def test_cancel_without_a_run_says_so(tab_factory):
    tab = tab_factory()
    assert "No training run is active" in tab.cancel(None)[-1]


# -- projects --------------------------------------------------------------------------------------------


def test_save_asks_before_overwriting_and_load_restores_the_form(tab_factory, ui_images, tmp_path):
    tab = tab_factory()
    data = quick_run_data(tmp_path / "m.safetensors", ui_images, project="anna v1", learning_rate=5e-6)
    values = form_for(tab, data)
    pick, existing, message = tab.save(False, "[]", "anna v1", *values)
    saved = tmp_path / "work" / "anna v1" / "project.json"
    assert saved.is_file() and "Saved" in message and json.loads(existing) == ["anna v1"]
    assert pick["value"] == "anna v1" and pick["choices"] == ["anna v1"]
    assert schema.load_json(saved) == schema.from_dict(data)

    changed = form_for(tab, dict(data, learning_rate=9e-6))
    message = tab.save(False, existing, "anna v1", *changed)[-1]  # the page's confirm was declined
    assert "exists already; not overwritten" in message and schema.load_json(saved).learning_rate == 5e-6
    tab.save(True, existing, "anna v1", *changed)
    assert schema.load_json(saved).learning_rate == 9e-6

    loaded = tab.load("anna v1")
    assert tab.collect(loaded[:-1]) == schema.from_dict(dict(data, learning_rate=9e-6))
    assert "Loaded project" in loaded[-1]


def test_after_a_restart_the_stopped_run_loads_into_the_form_and_start_on_it_is_refused(
        tab_factory, ui_models, ui_images, tmp_path):
    """A run cancelled and never saved as a project: a new page (or a restarted host) lists it, Load brings back
    its options for Resume, and Start on it says why not instead of replacing its state."""
    from dreambooth_ext.train.run import TrainingRun

    adapter = folder_adapter(ui_models, tmp_path / "work")
    data = quick_run_data(str(ui_models / "Stable-diffusion" / "tiny.safetensors"), ui_images, project="stopped",
                          max_train_steps=3, learning_rate=3e-5)
    config, host = adapter.prepare(schema.from_dict(data), None)
    holder = {}
    holder["run"] = TrainingRun(config, host, on_progress=lambda p: p.step == 1 and holder["run"].cancel())
    assert holder["run"].run().status == "cancelled"

    tab = tab_factory(adapter, JobManager())  # a restarted host: no last run in memory
    assert tab.refresh_projects()[0]["choices"] == ["stopped"]
    loaded = tab.load("stopped")
    assert tab.collect(loaded[:-1]) == config
    assert "stopped at step 1 of 3: Resume continues it" in loaded[-1]
    outputs = tab.start("task(s)", DEFAULT_PICK, None, *loaded[:-1])
    assert "Resume continues it" in outputs[-1] and tab.jobs.status()["state"] == "idle"
    tab.resume("task(r)", DEFAULT_PICK, None, *loaded[:-1])
    assert tab.jobs.status()["state"] == FINISHED and tab.jobs.status()["step"] == 3

    bad = list(loaded[:-1])
    bad[[o.name for o in schema.OPTIONS].index("resolution")] = 100
    shown = tab.start("task(b)", DEFAULT_PICK, None, *bad)[-1]
    # The refusal, then the last run under a line that says it is not about this refusal.
    assert shown.index("multiple of 64") < shown.index("unchanged by this") < shown.index("<b>stopped</b>: finished")


def test_the_chart_gets_the_steps_whose_loss_was_read_not_a_point_per_report():
    from dreambooth_ext.train.run import Progress
    from dreambooth_ext.ui.jobs import JobStatus

    status = JobStatus()
    status.apply(Progress("training", step=1, total_steps=20, loss=0.5, losses=((1, 0.5),)))
    for step in range(2, 10):  # the loss is not read at these steps: the last read value is not repeated
        status.apply(Progress("training", step=step, total_steps=20, loss=0.5))
    status.apply(Progress("training", step=10, total_steps=20, loss=0.4,
                          losses=tuple((s, 0.5 - s / 100) for s in range(2, 11))))
    assert status.losses == [(1, 0.5)] + [(s, 0.5 - s / 100) for s in range(2, 11)]
    assert status.loss == 0.4


@pytest.mark.parametrize("name", ["..", "../escape", "/etc/passwd", "a\\b", "C:evil", "bad|name"])
def test_project_names_that_are_paths_are_refused(tab_factory, ui_images, tmp_path, name):
    tab = tab_factory()
    values = form_for(tab, quick_run_data(tmp_path / "m.safetensors", ui_images))
    values[[o.name for o in schema.OPTIONS].index("project_name")] = name
    message = tab.save(True, "[]", name, *values)[-1]
    assert "dreambooth-error" in message
    assert not any((tmp_path / "work").rglob("project.json")) and not (tmp_path / "escape").exists()
    outputs = tab.load(name)
    assert "dreambooth-error" in outputs[-1] and all(o == gr.update() for o in outputs[:-1])


def test_the_blocks_render_to_a_gradio_config(tab_factory):
    tab = tab_factory()
    config = tab.blocks.get_config_file()
    ids = {c["props"].get("elem_id") for c in config["components"]}
    for elem_id in ("dreambooth_start", "dreambooth_cancel", "dreambooth_resume", "dreambooth_status",
                    "dreambooth_refresh", "dreambooth_loss_chart", "dreambooth_gallery", "dreambooth_project_save"):
        assert elem_id in ids
    js = {d.get("js") for d in config["dependencies"]}
    assert {"dreambooth_start", "dreambooth_confirm_save"} <= js
    script = (Path(__file__).parent.parent / "javascript" / "dreambooth.js").read_text()
    assert "function dreambooth_start(" in script and "function dreambooth_confirm_save(" in script


def test_no_event_with_page_js_takes_a_state(tab_factory):
    """gradio 4's page hands an event's JS its inputs and outputs, and fills a State input only when the JS returns
    exactly as many values as inputs: with a State among Start's inputs, every value after it landed one field
    further on (the project name in the base model, "full" in the resolution) and no run started."""
    tab = tab_factory()
    config = tab.blocks.get_config_file()
    states = {c["id"] for c in config["components"] if c["type"] == "state"}
    with_js = [d for d in config["dependencies"] if d.get("js")]
    assert {"dreambooth_start", "dreambooth_confirm_save"} <= {d["js"] for d in with_js}
    assert all(not states & set(d["inputs"]) for d in with_js), [d["js"] for d in with_js if states & set(d["inputs"])]


def test_closing_the_page_is_bounded_when_a_connection_stays_open(ui_models, tmp_path):
    from dreambooth_ext.ui.standalone import serve

    app = serve(ui_models, tmp_path / "work", port=None)

    class StuckConnection:  # a client that never lets go: uvicorn waits for every open connection on shutdown
        def shutdown(self) -> None:
            pass

    app.blocks.server.server_state.connections.add(StuckConnection())
    started = time.monotonic()
    app.close(grace=1.0)
    assert time.monotonic() - started < 10
    assert not app.blocks.server.thread.is_alive()


def test_the_standalone_page_needs_the_api_credentials_too(ui_models, tmp_path):
    import base64
    import urllib.error
    import urllib.parse
    import urllib.request

    from dreambooth_ext.ui.standalone import serve

    app = serve(ui_models, tmp_path / "work", port=None, api_auth="me:secret")
    base = app.url.rstrip("/")
    try:
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(base + "/config", timeout=30)  # what the page loads before it can do anything
        assert refused.value.code == 401
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(base + "/dreambooth/v1/status", timeout=30)
        assert refused.value.code == 401

        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor())
        form = urllib.parse.urlencode({"username": "me", "password": "secret"}).encode()
        opener.open(base + "/login", data=form, timeout=30)
        with opener.open(base + "/config", timeout=30) as config:
            assert config.status == 200
        token = base64.b64encode(b"me:secret").decode()
        request = urllib.request.Request(base + "/dreambooth/v1/status", headers={"Authorization": f"Basic {token}"})
        with urllib.request.urlopen(request, timeout=30) as status:
            assert status.status == 200
    finally:
        app.close()


def test_an_error_stays_above_the_status_until_the_next_action(tab_factory, ui_images):
    tab = tab_factory()
    values = form_for(tab, quick_run_data("", ui_images, resolution=100))
    outputs = tab.start("task(e)", DEFAULT_PICK, None, *values)
    seen, shown = outputs[2], outputs[-1]
    assert "must be a multiple of 64" in shown
    for _ in range(3):  # the page polls the status once a second
        polled = tab.refresh(seen)
        seen, shown = polled[2], shown_status(shown, polled[-2])
        assert "must be a multiple of 64" in shown
    cancelled = tab.cancel(seen)  # the next action clears it
    assert "must be a multiple of 64" not in cancelled[-1]
    assert "must be a multiple of 64" not in shown_status(cancelled[-1], tab.refresh(cancelled[2])[-2])


def shown_status(shown: str, sent) -> str:
    """What the page's status area shows after a poll sent `sent` (an update without a value keeps it)."""
    return shown if sent == gr.update() else sent


def test_a_reloaded_page_gets_the_last_runs_form_back(tab_factory, ui_models, ui_images, tmp_path):
    tab = tab_factory(folder_adapter(ui_models, tmp_path / "work"))
    assert all(v == gr.update() for v in tab.restore_form())  # no run yet: the form stays as it is
    data = quick_run_data(str(ui_models / "Stable-diffusion" / "tiny.safetensors"), ui_images, project="again",
                          max_train_steps=1, learning_rate=3e-5)
    tab.start("task(r)", DEFAULT_PICK, None, *form_for(tab, data))
    restored = tab.collect(tab.restore_form())
    assert restored.project_name == "again" and restored.learning_rate == 3e-5
    assert restored.concepts[0].instance_dir == str(ui_images)


def test_the_status_shows_the_learning_monitors_verdict_remedy_and_best_step():
    import html

    from dreambooth_ext.train.monitor import LEARNED, REMEDIES
    from dreambooth_ext.ui import render

    monitor = {"points": [], "verdict": LEARNED, "remedy": REMEDIES[LEARNED], "best_step": 40}
    shown = html.unescape(render.status_html({"state": "running", "project": "p", "monitor": monitor}))
    assert f"Learning monitor: learned. {REMEDIES[LEARNED]} Best saved step so far: 40." in shown
    assert "dreambooth-monitor" not in render.status_html({"state": "running", "project": "p", "monitor": None})
