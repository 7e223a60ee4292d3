"""The learning monitor on the tiny model: its own generator, its signals along a run, resume, and where it reports
(progress, the status, the command line, monitor.json, the result's metadata)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_exact import assert_identical, result_tensors, run_stopped_at
from test_train import class_dir, instance_dir, make_config, read_metadata, tiny_sd1, train  # noqa: F401 (fixtures)

from dreambooth_ext.cli import ConsoleProgress
from dreambooth_ext.hosts.files import FolderHost
from dreambooth_ext.train import batches as feeding
from dreambooth_ext.train import monitor as monitor_module
from dreambooth_ext.train.monitor import (
    COPYING,
    LEARNED,
    MONITOR_FILE,
    STILL_LEARNING,
    best_step,
    is_point,
    learned_fit,
    verdict,
)
from dreambooth_ext.train.run import Progress, TrainingRun
from dreambooth_ext.ui import jobs as jobs_module
from dreambooth_ext.ui.jobs import JobManager


def monitored(root: Path, project: str = "t") -> dict:
    return json.loads((FolderHost(root / "models").work_dir(project) / MONITOR_FILE).read_text())


def series(root: Path) -> list[dict]:
    return monitored(root)["points"]


def test_the_monitor_draws_from_its_own_generator_and_changes_nothing_it_judges(tiny_sd1, instance_dir,  # noqa: F811
                                                                              class_dir, tmp_path):  # noqa: F811
    config = make_config(tiny_sd1, instance_dir, class_dir, max_train_steps=4, monitor_every_n_steps=2)
    results, points = [], []
    for host_seed in (1, 2):
        torch.manual_seed(host_seed)
        before = torch.random.get_rng_state()
        results.append(result_tensors(train(config, tmp_path / str(host_seed))[1]))
        assert torch.equal(torch.random.get_rng_state(), before)
        points.append(series(tmp_path / str(host_seed)))
    assert points[0] == points[1]
    assert [p["step"] for p in points[0]] == [0, 2, 4]
    assert all(p["class_drift"] is not None and p["prompt_response"] is not None for p in points[0])
    # a render (the costliest signal) at the base, the saves and the end only
    assert [p["memorization"] is not None for p in points[0]] == [True, False, True]
    assert points[0][0]["class_drift"] == 0 and points[0][0]["prompt_response"] == pytest.approx(1.0)
    unmonitored = make_config(tiny_sd1, instance_dir, class_dir, max_train_steps=4, monitor_every_n_steps=-1)
    assert_identical(results[0], result_tensors(train(unmonitored, tmp_path / "off")[1]))
    assert not (FolderHost(tmp_path / "off" / "models").work_dir("t") / MONITOR_FILE).exists()


def test_a_run_that_fits_its_photos_is_no_longer_called_still_learning(tiny_sd1, instance_dir, tmp_path):  # noqa: F811
    config = make_config(tiny_sd1, instance_dir, max_train_steps=60, learning_rate=3e-3, monitor_every_n_steps=20)
    train(config, tmp_path)
    points = series(tmp_path)
    assert [p["step"] for p in points] == [0, 20, 40, 60]
    assert points[0]["verdict"] == STILL_LEARNING
    assert points[-1]["fit"] < 0.9 * points[0]["fit"], points
    assert points[-1]["verdict"] != STILL_LEARNING, points


def test_a_resumed_run_continues_the_same_series(tiny_sd1, instance_dir, class_dir, tmp_path):  # noqa: F811
    config = make_config(tiny_sd1, instance_dir, class_dir, max_train_steps=6, monitor_every_n_steps=2,
                         save_every_n_steps=4)
    train(config, tmp_path / "straight")
    assert run_stopped_at(config, tmp_path / "stopped", 3).status == "cancelled"
    assert [p["step"] for p in series(tmp_path / "stopped")] == [0, 2]
    shown = []
    train(config, tmp_path / "stopped", resume=True, on_progress=lambda p: p.monitor and shown.append(p.monitor))
    assert series(tmp_path / "stopped") == series(tmp_path / "straight")
    assert [p["step"] for p in shown[0]["points"]] == [0, 2]  # the earlier points reach the page at once
    assert [p["step"] for p in series(tmp_path / "straight") if p["saved"]] == [4, 6]


def test_status_command_line_metadata_and_file_carry_the_monitor(tiny_sd1, instance_dir, tmp_path,  # noqa: F811
                                                                  monkeypatch):
    config = make_config(tiny_sd1, instance_dir, max_train_steps=4, save_every_n_steps=2)
    console, relayed = io.StringIO(), []
    show = ConsoleProgress(console)

    def also_shown(config, host, *, on_progress, **kwargs):
        def report(p: Progress) -> None:
            on_progress(p)  # the job's status, which the API returns
            show(p)  # the command line's
            relayed.append(Progress.from_line(p.to_line()))  # as a run in another process reports it
        return TrainingRun(config, host, on_progress=report, **kwargs)

    monkeypatch.setattr(jobs_module, "training_run", also_shown)
    jobs = JobManager()
    status = jobs.run(config, FolderHost(tmp_path / "models"))
    assert status.state == "finished", status.error
    monitor = jobs.status()["monitor"]
    # the default: every tenth of the run (here every step), the base, every save
    assert [p["step"] for p in monitor["points"]] == [0, 1, 2, 3, 4]
    assert monitor["verdict"] == monitor["points"][-1]["verdict"] and monitor["remedy"]
    assert [p["step"] for p in monitor["points"] if p["saved"]] == [2, 4] and monitor["best_step"] in (2, 4)
    assert json.loads(json.dumps(jobs.status()))["monitor"] == monitor
    assert sum("Monitor at step" in line for line in console.getvalue().splitlines()) == 5
    assert [p.monitor for p in relayed if p.monitor][-1] == monitor
    assert monitored(tmp_path) == {"version": 1, **monitor}
    for path, step in zip(status.checkpoints, (2, 4), strict=True):
        meta = read_metadata(path)
        assert json.loads(meta["dreambooth.monitor"]) == next(p for p in monitor["points"] if p["step"] == step)
        earlier = [dict(p, saved=p["saved"] and p["step"] <= step) for p in monitor["points"] if p["step"] <= step]
        assert meta["dreambooth.monitor_best_step"] == str(best_step(earlier))


def test_the_schedule_and_the_rules():
    config = make_config(Path("base"), Path("photos"), max_train_steps=1000, save_every_n_steps=250)
    assert {s for s in range(1001) if is_point(config, s, 1000)} == set(range(0, 1001, 100)) | {250, 750}
    off = make_config(Path("base"), Path("photos"), monitor_every_n_steps=-1)
    assert not any(is_point(off, s, 4) for s in range(5))
    base = {"step": 0, "fit": 1.0, "memorization": 2.0, "class_drift": 0.0, "prompt_response": 1.0}
    assert verdict(base, None) == STILL_LEARNING
    assert verdict({**base, "fit": 0.2}, 1.0) == STILL_LEARNING  # a low fit, but renders still far from the photos
    assert verdict({**base, "memorization": 1.2}, None) == LEARNED  # renders near the photos, not nearer than they are
    assert verdict({**base, "fit": 0.8, "memorization": 0.1}, None) == "copying the photos"
    assert verdict({**base, "class_drift": 0.6}, None) == "forgetting the class"
    assert verdict({**base, "prompt_response": 0.2}, None) == "ignoring prompts"
    # without renders: learned once the fit is as low as where this run's renders came near the photos
    unrendered = {**base, "fit": 0.8, "memorization": None}
    assert verdict(unrendered, None) == STILL_LEARNING and verdict(unrendered, 0.85) == LEARNED
    assert verdict({**unrendered, "fit": 0.9}, 0.85) == STILL_LEARNING
    series_ = [base, {**base, "step": 2, "fit": 0.9, "memorization": 1.5}, {**base, "step": 4, "fit": 0.85,
                                                                               "memorization": 1.1},
               {**base, "step": 6, "fit": 0.7, "memorization": 1.2}, {**base, "step": 7, "fit": 0.6,
                                                                      "memorization": None}]
    assert learned_fit(series_[:2]) is None and learned_fit(series_) == 0.85
    assert learned_fit([{**base, "memorization": 1.0}]) is None  # the base is no evidence of learning
    points = [{"step": 2, "fit": 0.8, "verdict": LEARNED, "saved": True},
              {"step": 4, "fit": 0.7, "verdict": LEARNED, "saved": True},
              {"step": 6, "fit": 0.5, "verdict": "copying the photos", "saved": True},
              {"step": 5, "fit": 0.6, "verdict": LEARNED, "saved": False}]
    assert best_step(points) == 4


@pytest.mark.parametrize("copying_from, saved", [(6, [4, 6]), (4, [4])])
def test_stop_when_memorizing_ends_the_run_at_the_first_copying_point(tiny_sd1, instance_dir, tmp_path,  # noqa: F811
                                                                      monkeypatch, copying_from, saved):
    """A point called 'copying' stops the run there as a finished one: its result saved once (at a save step too),
    no state kept, the reason and the best saved step said, the best step in the result's metadata."""
    def rule(point: dict, base_fit: float | None) -> str:
        return COPYING if point["step"] >= copying_from and point["memorization"] is not None else STILL_LEARNING

    monkeypatch.setattr(monitor_module, "verdict", rule)
    config = make_config(tiny_sd1, instance_dir, max_train_steps=10, monitor_every_n_steps=2, save_every_n_steps=4,
                         stop_when_memorizing=True)
    shown = []
    run, result = train(config, tmp_path, on_progress=shown.append)
    assert (result.status, result.step) == ("finished", copying_from)
    points = series(tmp_path)
    assert [p["step"] for p in points] == list(range(0, copying_from + 1, 2))
    assert all(p["memorization"] is not None for p in points)  # a render at every point: the stop can see it
    assert [p["step"] for p in points if p["saved"]] == saved
    assert [int(path.stem.rsplit("_", 1)[-1]) for path in result.checkpoints] == saved
    assert shown[-1].phase == "finished" and shown[-1].message == (
        f"Stopped: the monitor found the renders copying the training photos at step {copying_from}; the best "
        f"saved step is 4")
    assert read_metadata(result.checkpoints[-1])["dreambooth.monitor_best_step"] == "4"
    assert not (FolderHost(tmp_path / "models").work_dir("t") / "state").exists()


def test_without_stop_when_memorizing_a_copying_run_goes_on(tiny_sd1, instance_dir, tmp_path,  # noqa: F811
                                                           monkeypatch):
    monkeypatch.setattr(monitor_module, "verdict", lambda point, base_fit: COPYING)
    config = make_config(tiny_sd1, instance_dir, max_train_steps=4, monitor_every_n_steps=2)
    assert train(config, tmp_path)[1].step == 4
    assert [p["memorization"] is not None for p in series(tmp_path)] == [True, False, True]


@pytest.fixture(scope="module")
def held_out_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("held_out")
    for i, color in enumerate([(180, 60, 60), (60, 180, 60)]):
        image = Image.new("RGB", (64, 64), color)
        image.paste((250, 250, 0), (20, 12 + 6 * i, 44, 40))
        image.save(folder / f"other{i}.png")
    return folder


def test_the_held_out_gap_is_measured_on_photos_never_trained_on(tiny_sd1, instance_dir, held_out_dir,  # noqa: F811
                                                                 tmp_path, monkeypatch):
    read = []
    prepare = feeding.prepare_picture

    def spy(path, *args, **kwargs):
        read.append(Path(path))
        return prepare(path, *args, **kwargs)

    monkeypatch.setattr(feeding, "prepare_picture", spy)
    config = make_config(tiny_sd1, instance_dir, max_train_steps=4, monitor_every_n_steps=2,
                         validation_dir=str(held_out_dir), cache_latents=False)
    lines = []
    result = train(config, tmp_path, on_progress=lambda p: p.phase == "monitoring" and lines.append(p.message))[1]
    points = series(tmp_path)
    for point in points:
        assert point["held_out_fit"] > 0
        assert point["held_out_gap"] == pytest.approx(point["held_out_fit"] / point["fit"])
    assert all("held-out gap" in line for line in lines if line.startswith("Monitor at step"))
    assert monitored(tmp_path)["held_out_gap"] == points[-1]["held_out_gap"]
    assert json.loads(read_metadata(result.checkpoints[-1])["dreambooth.monitor"])["held_out_gap"] == \
        points[-1]["held_out_gap"]
    assert not {p for p in read if p.parent == held_out_dir}  # the training feed never read a held-out photo
    assert {p.parent for p in read} == {instance_dir}
    without = make_config(tiny_sd1, instance_dir, max_train_steps=4, monitor_every_n_steps=2)
    train(without, tmp_path / "without")
    assert [p["fit"] for p in series(tmp_path / "without")] == [p["fit"] for p in points]
    assert all(p["held_out_gap"] is None for p in series(tmp_path / "without"))
