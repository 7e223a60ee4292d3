"""The learning monitor on the tiny model: its own generator, its signals along a run, resume, and where it reports
(progress, the status, the command line, monitor.json, the result's metadata)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from test_exact import assert_identical, result_tensors, run_stopped_at
from test_train import class_dir, instance_dir, make_config, read_metadata, tiny_sd1, train  # noqa: F401 (fixtures)

from dreambooth_ext.cli import ConsoleProgress
from dreambooth_ext.hosts.files import FolderHost
from dreambooth_ext.train.monitor import LEARNED, MONITOR_FILE, STILL_LEARNING, best_step, is_point, verdict
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
    base = {"fit": 1.0, "memorization": 2.0, "class_drift": 0.0, "prompt_response": 1.0}
    assert verdict(base, 1.0) == STILL_LEARNING
    assert verdict({**base, "fit": 0.8}, 1.0) == LEARNED
    assert verdict({**base, "fit": 0.8, "memorization": 0.1}, 1.0) == "copying the photos"
    assert verdict({**base, "class_drift": 0.6}, 1.0) == "forgetting the class"
    assert verdict({**base, "prompt_response": 0.2}, 1.0) == "ignoring prompts"
    points = [{"step": 2, "fit": 0.8, "verdict": LEARNED, "saved": True},
              {"step": 4, "fit": 0.7, "verdict": LEARNED, "saved": True},
              {"step": 6, "fit": 0.5, "verdict": "copying the photos", "saved": True},
              {"step": 5, "fit": 0.6, "verdict": LEARNED, "saved": False}]
    assert best_step(points) == 4
