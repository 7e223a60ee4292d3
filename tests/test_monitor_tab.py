"""The learning monitor in the tab and the API: its chart (the signals over the steps, the verdict, the best saved
step), which saved step "Load best" and `POST /load {"step": ...}` choose, and the refusals when there is none."""

from __future__ import annotations

from pathlib import Path

import gradio as gr
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from ui_helpers import quick_run_data

from dreambooth_ext import config as schema
from dreambooth_ext.errors import DreamboothError
from dreambooth_ext.hosts.files import FolderHost
from dreambooth_ext.train.monitor import COPYING, LEARNED, REMEDIES, STILL_LEARNING
from dreambooth_ext.ui import JobManager, folder_adapter, render
from dreambooth_ext.ui.api import PREFIX, register_api
from dreambooth_ext.ui.jobs import FINISHED, Job
from dreambooth_ext.ui.tab import build_tab


def point(step, fit, verdict, saved=False, **signals):
    values = {"memorization": None, "class_drift": None, "prompt_response": None, **signals}
    return {"step": step, "fit": fit, **values, "saved": saved, "verdict": verdict}


def monitor_of(points, best_step, base_fit=0.2):
    return {"points": points, "verdict": points[-1]["verdict"], "remedy": REMEDIES[points[-1]["verdict"]],
            "best_step": best_step, "base_fit": base_fit}


SERIES = monitor_of([point(0, 0.2, STILL_LEARNING, memorization=2.0, prompt_response=1.0),
                     point(5, 0.15, LEARNED, prompt_response=0.9),
                     point(10, 0.1, LEARNED, saved=True, memorization=1.2, prompt_response=0.8),
                     point(20, 0.05, COPYING, saved=True, memorization=0.3, prompt_response=0.6, held_out_gap=0.4)],
                    best_step=10)


# -- the chart's data and caption -------------------------------------------------------------------------


def rows(frame, signal):
    part = frame[frame["signal"] == signal]
    return list(zip(part["step"], part["value"].round(6), strict=True))


def test_the_chart_shows_each_measured_signal_relative_and_the_best_step_as_a_line():
    frame = render.monitor_frame(SERIES)
    assert rows(frame, "fit (of the base's)") == [(0, 1.0), (5, 0.75), (10, 0.5), (20, 0.25)]  # fit / base fit
    assert rows(frame, "memorization") == [(0, 2.0), (10, 1.2), (20, 0.3)]  # not measured at step 5: no row
    assert rows(frame, "prompt response") == [(0, 1.0), (5, 0.9), (10, 0.8), (20, 0.6)]
    assert rows(frame, "held-out gap") == [(20, 0.4)]  # a signal the chart has no name for keeps its own
    assert "class drift" not in set(frame["signal"])  # never measured (no class pictures)
    assert rows(frame, "best saved step (10)") == [(10, 0.0), (10, 2.0)]  # from 0 to the top of the chart
    assert set(frame[frame["step"] == 20]["verdict"]) == {COPYING}  # each row carries its point's verdict


def test_the_caption_says_the_last_verdict_and_the_best_saved_step():
    assert render.monitor_caption(SERIES) == "Verdict at step 20: copying the photos. Best saved step: 10."
    unsaved = monitor_of([point(0, 0.2, STILL_LEARNING)], best_step=None)
    assert render.monitor_caption(unsaved) == "Verdict at step 0: still learning. No step saved yet."
    assert render.monitor_caption(None) == ""


def test_without_points_or_a_base_fit_there_is_nothing_to_draw_or_no_fit_line():
    assert render.monitor_frame(None) is None and render.monitor_frame({"points": []}) is None
    frame = render.monitor_frame({**SERIES, "base_fit": None})
    assert "fit (of the base's)" not in set(frame["signal"])  # an absolute loss would not share the scale


def test_the_charts_data_is_accepted_by_gr_lineplot(tab_factory):
    tab = tab_factory()
    plot = tab.monitor_chart.postprocess(render.monitor_frame(SERIES))
    assert plot is not None and "best saved step (10)" in str(plot)


# -- the tab sends the chart only when the monitor changed -------------------------------------------------


@pytest.fixture
def tab_factory(tmp_path):
    def make(adapter=None, jobs=None):
        return build_tab(adapter or folder_adapter(tmp_path / "models", tmp_path / "work"), jobs or JobManager())

    return make


def running(monitor, losses=1):
    return {"state": "running", "project": "p", "started_at": 1.0, "losses": [[1, 0.5]] * losses,
            "monitor": monitor}


def test_the_monitor_chart_appears_with_its_first_point_and_is_sent_only_when_it_changes(tab_factory):
    tab = tab_factory()
    first = tab._view(running(None), None)
    assert first[4]["visible"] is False  # no point yet: hidden
    seen = first[2]
    base = monitor_of(SERIES["points"][:1], best_step=None)
    shown = tab._view(running(base), seen)
    assert shown[4]["visible"] is True and shown[4]["caption"].startswith("Verdict at step 0")
    assert list(shown[4]["value"]["step"]) == [0, 0, 0]
    polled = tab._view(running(base, losses=2), shown[2])  # the loss moved on, the monitor did not
    assert polled[4] == gr.update() and polled[0] != gr.update()
    marked = monitor_of([dict(SERIES["points"][0], saved=True)], best_step=0)  # the same point, now saved
    assert tab._view(running(marked), polled[2])[4]["value"] is not None


def test_the_chart_is_beside_the_loss_chart_in_the_page(tab_factory):
    config = tab_factory().blocks.get_config_file()
    by_id = {c["id"]: c for c in config["components"]}
    ids = {c["props"].get("elem_id"): c["id"] for c in config["components"]}

    def parent_of(node, wanted, parent=None):
        if node["id"] == wanted:
            return parent
        for child in node.get("children", []):
            found = parent_of(child, wanted, node)
            if found is not None:
                return found
        return None

    row = parent_of(config["layout"], ids["dreambooth_monitor_chart"])
    assert row is not None and by_id[row["id"]]["props"].get("elem_id") == "dreambooth_charts"
    assert ids["dreambooth_loss_chart"] in [child["id"] for child in row["children"]]
    row = parent_of(config["layout"], ids["dreambooth_load_best"])
    assert ids["dreambooth_load_model"] in [child["id"] for child in row["children"]]


# -- which file "Load best" and POST /load {"step": ...} choose --------------------------------------------


def job_with_saves(tmp_path, monitor, steps, *, loras=False) -> Job:
    """A finished job of project "p" whose saves at `steps` exist as the folder host names them."""
    host = FolderHost(tmp_path / "models", tmp_path / "work")
    job = Job(JobManager(), schema.default_config(), resume=False)
    job.host = host
    for step in steps:
        path = (host.lora_path if loras else host.checkpoint_path)(job.config.project_name, step)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
        (job.status.loras if loras else job.status.checkpoints).append(str(path))
    job.status.state, job.status.monitor = FINISHED, monitor
    return job


def test_the_best_step_and_a_saved_step_load_the_file_saved_there(tmp_path):
    job = job_with_saves(tmp_path, SERIES, [10, 20])
    assert job.saved_model("best") == job.host.checkpoint_path(job.config.project_name, 10)
    assert job.saved_model(20) == job.host.checkpoint_path(job.config.project_name, 20)
    assert job.saved_steps() == [10, 20]


def test_a_step_without_a_saved_file_is_refused_naming_the_saved_steps(tmp_path):
    job = job_with_saves(tmp_path, SERIES, [10, 20])
    with pytest.raises(DreamboothError, match=r"no saved model at step 5; its saved steps: 10, 20\."):
        job.saved_model(5)
    job.host.checkpoint_path(job.config.project_name, 10).unlink()  # deleted since
    with pytest.raises(DreamboothError, match=r"no saved model at step 10; its saved steps: 20\."):
        job.saved_model("best")


def test_no_best_step_without_the_monitor_or_without_a_save_and_no_model_from_a_lora_run(tmp_path):
    with pytest.raises(DreamboothError, match=r"monitor was off \(monitor_every_n_steps -1\)"):
        job_with_saves(tmp_path, None, [20]).saved_model("best")
    with pytest.raises(DreamboothError, match="no step of it was saved yet"):
        job_with_saves(tmp_path, monitor_of(SERIES["points"][:2], None), [20]).saved_model("best")
    with pytest.raises(DreamboothError, match="wrote no model file to load .a LoRA run writes LoRA files"):
        job_with_saves(tmp_path / "lora", SERIES, [10, 20], loras=True).saved_model("best")
    with pytest.raises(DreamboothError, match="No training run yet"):
        JobManager().saved_model("best")


# -- a real run with saves: the tab's chart and "Load best", the API's load of a step ----------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, ui_models, ui_images):
    """A tiny run from the tab with a save at every step, on a folder host whose "load" records the file."""
    root = tmp_path_factory.mktemp("monitor_run")
    loaded = []
    adapter = folder_adapter(ui_models, root / "work")
    adapter.load_checkpoint = lambda path: loaded.append(path) or Path(path).name
    adapter.loaded_file = lambda: loaded[-1] if loaded else None
    tab = build_tab(adapter, JobManager())
    data = quick_run_data(str(ui_models / "Stable-diffusion" / "tiny.safetensors"), ui_images, project="monitored",
                          max_train_steps=2, save_every_n_steps=1)
    outputs = tab.start("task(m)", None, None, *tab.form_values(schema.from_dict(data)))
    return tab, adapter, loaded, outputs


def test_after_a_run_the_chart_shows_the_monitor_and_load_best_loads_the_best_steps_file(finished_run):
    tab, adapter, loaded, outputs = finished_run
    status = tab.jobs.status()
    assert status["state"] == FINISHED, outputs[-1]
    monitor = status["monitor"]
    best = monitor["best_step"]
    assert [p["step"] for p in monitor["points"]] == [0, 1, 2] and best in (1, 2)
    chart = outputs[4]
    assert chart["visible"] and f"Best saved step: {best}." in chart["caption"]
    assert set(chart["value"]["step"]) == {0, 1, 2}
    assert rows(chart["value"], f"best saved step ({best})")[0] == (best, 0.0)
    best_file = adapter.prepare(schema.default_config(), None)[1].checkpoint_path("monitored", best)
    assert outputs[5] == gr.update(value=f"Load best (step {best})", visible=True)

    loaded.clear()
    message, token = tab.load_best()
    assert loaded == [str(best_file)] and f"Loaded {best_file.name}" in message and token
    polled = tab.refresh(None)
    assert polled[5]["visible"] is False  # the host has it loaded now: nothing left to do
    assert polled[3]["visible"] is (best != 2)  # "Load this model now" offers the last step's file


def test_api_loads_the_best_or_a_saved_step_and_refuses_a_step_without_a_file(finished_run):
    tab, adapter, loaded, _ = finished_run
    app = FastAPI()
    register_api(app, tab.jobs, adapter, None)
    api = TestClient(app)
    best = tab.jobs.status()["monitor"]["best_step"]
    host = adapter.prepare(schema.default_config(), None)[1]
    loaded.clear()
    for step, expected in (("best", best), (1, 1), (2, 2)):
        response = api.post(f"{PREFIX}/load", json={"step": step})
        assert response.status_code == 200, response.text
        assert loaded[-1] == str(host.checkpoint_path("monitored", expected))
    response = api.post(f"{PREFIX}/load", json={"step": 3})
    assert response.status_code == 422
    assert "no saved model at step 3; its saved steps: 1, 2." in response.json()["detail"]["problems"][0]
    for body in ({"step": "last"}, {"step": -1}, {"step": True}, {"step": 2, "checkpoint": "x"}):
        response = api.post(f"{PREFIX}/load", json=body)
        assert response.status_code == 422 and '"step"' in response.json()["detail"]["problems"][0], body
    assert len(loaded) == 3  # none of the refusals loaded anything
