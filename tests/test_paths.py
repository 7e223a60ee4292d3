"""Where a run reads and writes, checked before any model loads: a class folder apart from the training images, and
every name and path the run writes within the file system's limits (the tab, the API and the command line)."""

from __future__ import annotations

import os

import pytest
import torch
from test_api import api  # noqa: F401 - fixture
from test_faults import CountingHost
from test_train import class_dir, instance_dir, make_config, tiny_sd1  # noqa: F401 - fixtures
from test_ui import form_for, tab_factory  # noqa: F401 - fixture
from ui_helpers import quick_run_data

from dreambooth_ext import config as cfg
from dreambooth_ext.errors import ConfigError, DreamboothError
from dreambooth_ext.hosts.files import FolderHost
from dreambooth_ext.train import guard
from dreambooth_ext.train.run import TrainingRun
from dreambooth_ext.ui import projects
from dreambooth_ext.ui.api import PREFIX
from dreambooth_ext.ui.tab import DEFAULT_PICK


def concepts_config(*concepts: dict, **options) -> cfg.Config:
    return cfg.from_dict({"concepts": [{"num_class_images": 3, **c} for c in concepts], **options})


def problems_of(config: cfg.Config) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        cfg.validate(config)
    return caught.value.problems


# -- a class folder apart from the training images ---------------------------------------------------------


def test_class_dir_equal_to_instance_dir_is_refused_naming_both(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    [problem] = problems_of(concepts_config({"instance_dir": str(photos), "class_dir": str(photos) + "/"}))
    assert "concepts[0].class_dir" in problem and "concepts[0].instance_dir" in problem
    assert str(photos) in problem and "same folder" in problem and "a folder of its own" in problem


def test_class_dir_inside_instance_dir_is_refused_through_a_relative_path_and_a_symlink(tmp_path, monkeypatch):
    photos = tmp_path / "photos"
    (photos / "reg").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    [problem] = problems_of(concepts_config({"instance_dir": str(photos), "class_dir": "photos/./reg"}))
    assert "'photos/./reg' (" + str(photos / "reg") + ")" in problem and "inside the training images" in problem
    (tmp_path / "link").symlink_to(photos / "reg")
    [problem] = problems_of(concepts_config({"instance_dir": "photos", "class_dir": str(tmp_path / "link")}))
    assert str(photos / "reg") in problem and str(photos) in problem


def test_instance_dir_inside_class_dir_is_refused(tmp_path):
    [problem] = problems_of(concepts_config({"instance_dir": str(tmp_path / "reg" / "me"),
                                             "class_dir": str(tmp_path / "reg")}))
    assert "your subject's photos would count as class images" in problem


def test_a_concepts_class_dir_inside_another_concepts_instance_dir_is_refused(tmp_path):
    problems = problems_of(concepts_config({"instance_dir": str(tmp_path / "anna")},
                                           {"instance_dir": str(tmp_path / "bob"),
                                            "class_dir": str(tmp_path / "anna" / "people")}))
    assert len(problems) == 1
    assert "concepts[1].class_dir" in problems[0] and "concepts[0].instance_dir" in problems[0]


def test_separate_folders_and_unused_class_folders_are_accepted(tmp_path):
    # A name that merely starts like the other is not inside it; a class folder that is never read harms nothing.
    cfg.validate(concepts_config({"instance_dir": str(tmp_path / "photos"), "class_dir": str(tmp_path / "photos2")}))
    cfg.validate(concepts_config({"instance_dir": str(tmp_path), "class_dir": str(tmp_path / "reg")},
                                 prior_preservation=False))
    cfg.validate(concepts_config({"instance_dir": str(tmp_path), "class_dir": str(tmp_path), "token_only": True}))


def test_a_run_with_its_class_dir_there_stops_before_the_model_loads(tiny_sd1, instance_dir, tmp_path):  # noqa: F811
    host = CountingHost(tmp_path / "models")
    with pytest.raises(ConfigError, match="same folder"):
        TrainingRun(make_config(tiny_sd1, instance_dir, instance_dir), host).run()
    with pytest.raises(ConfigError, match="inside the training images"):
        TrainingRun(make_config(tiny_sd1, instance_dir, instance_dir / "reg"), host).run()
    assert host.loads == 0 and not (instance_dir / "reg").exists()


def test_a_work_folder_inside_the_training_folder_is_refused_before_the_model_loads(tiny_sd1, tmp_path):  # noqa: F811
    # The photos sit in the folder that holds the project's work folder: class images generated there (class_dir
    # empty) would be trained as the subject next time.
    photos = tmp_path / "photos"
    photos.mkdir()
    from PIL import Image

    for i in range(2):
        Image.new("RGB", (64, 64), (200, 40 * i, 30)).save(photos / f"img{i}.png")
    host = CountingHost(tmp_path / "models", photos)
    config = make_config(tiny_sd1, photos, prior_preservation=True)
    with pytest.raises(DreamboothError, match=r"concepts\[0\].instance_dir = .* holds the project's work folder"):
        TrainingRun(config, host).run()
    assert host.loads == 0 and not (photos / "t").exists()


def test_a_work_folder_inside_the_held_out_folder_is_refused_before_the_model_loads(tiny_sd1, instance_dir,  # noqa: F811
                                                                                   tmp_path):
    held_out = tmp_path / "held_out"
    held_out.mkdir()
    from PIL import Image

    Image.new("RGB", (64, 64), (20, 200, 30)).save(held_out / "other.png")
    host = CountingHost(tmp_path / "models", held_out)
    config = make_config(tiny_sd1, instance_dir, prior_preservation=True, validation_dir=str(held_out))
    with pytest.raises(DreamboothError, match=r"validation_dir = .* holds the project's work folder"):
        TrainingRun(config, host).run()
    assert host.loads == 0 and not (held_out / "t").exists()


def test_the_command_line_refuses_it_in_one_paragraph(tiny_sd1, instance_dir, tmp_path, capsys):  # noqa: F811
    from dreambooth_ext import cli

    code = cli.main(["train", "--project_name", "p", "--training_model", str(tiny_sd1), "--training_images",
                     str(instance_dir), "--class_dir", str(instance_dir), "--resolution", "64",
                     "--models-dir", str(tmp_path / "models")])
    err = capsys.readouterr().err
    assert code == 2 and "same folder" in err and str(instance_dir) in err and "Traceback" not in err


def test_the_api_answers_422_for_class_dir_inside_instance_dir(api, ui_images):  # noqa: F811
    data = quick_run_data("", ui_images, prior_preservation=True,
                          concept={"class_dir": str(ui_images / "reg"), "num_class_images": 2})
    response = api.post(f"{PREFIX}/start", json=data, params={"checkpoint": "tiny.safetensors"})
    assert response.status_code == 422, response.text
    [problem] = response.json()["detail"]["problems"]
    assert str(ui_images) in problem and str(ui_images / "reg") in problem
    assert api.jobs.active is None


# -- names and paths within the file system's limits -------------------------------------------------------


@pytest.mark.parametrize("length", [300, 240])
def test_a_long_project_name_is_refused_before_the_model_loads(tiny_sd1, instance_dir, tmp_path, length):  # noqa: F811
    # 240: the folder and <name>_1.safetensors fit in 255 bytes, the hidden name the result is written under first
    # does not (the run used to train, then fail at the save with disk-space advice).
    host = CountingHost(tmp_path / "models")
    config = make_config(tiny_sd1, instance_dir, project_name="n" * length, max_train_steps=1)
    with pytest.raises(ConfigError, match=r"at most 255 bytes: use a project name of at most 223 characters"):
        TrainingRun(config, host).run()
    assert host.loads == 0 and not (tmp_path / "models").exists()


def test_a_name_just_under_the_limit_trains(tiny_sd1, instance_dir, tmp_path):  # noqa: F811
    name = "n" * 223  # '.<name>_1.safetensors.XXXXXXXX.partial' is 255 bytes
    config = make_config(tiny_sd1, instance_dir, project_name=name, max_train_steps=1)
    result = TrainingRun(config, FolderHost(tmp_path / "models")).run()
    assert result.status == "finished"
    assert [p.name for p in result.checkpoints] == [f"{name}_1.safetensors"] and result.checkpoints[0].is_file()


def test_the_last_step_decides_the_longest_name():
    def fits(name: str, **options) -> bool:
        return guard.project_name_problem(cfg.default_config(project_name=name, **options)) is None

    assert fits("n" * 223, max_train_steps=9) and not fits("n" * 223, max_train_steps=10)
    # Without the images an epoch counts as one step (the run itself counts them all before it starts).
    assert fits("n" * 219, max_train_steps=0, num_train_epochs=99999)
    assert not fits("n" * 220, max_train_steps=0, num_train_epochs=99999)


def test_a_smaller_name_limit_of_the_file_system_is_used(tiny_sd1, instance_dir, tmp_path, monkeypatch):  # noqa: F811
    # eCryptfs takes names of at most 143 bytes: what pathconf says is the limit, not 255.
    real = os.pathconf
    monkeypatch.setattr(os, "pathconf", lambda path, key: 143 if key == "PC_NAME_MAX" else real(path, key))
    host = CountingHost(tmp_path / "models")
    config = make_config(tiny_sd1, instance_dir, project_name="n" * 120, max_train_steps=1)
    with pytest.raises(DreamboothError, match=r"names of at most 143 bytes\. Use a shorter project name: at most "
                                              r"111 characters here"):
        TrainingRun(config, host).run()
    assert host.loads == 0 and not (tmp_path / "models").exists()


def test_a_path_over_the_systems_limit_is_refused_naming_it(tiny_sd1, instance_dir, tmp_path):  # noqa: F811
    path_max = guard.limits(tmp_path)[1]
    deep = tmp_path
    while len(os.fsencode(str(deep))) < path_max - 300:  # a models folder within the limit, its results beyond
        deep = deep / ("d" * 200)
    deep.mkdir(parents=True)
    host = CountingHost(deep)
    config = make_config(tiny_sd1, instance_dir, project_name="p" * 150, max_train_steps=1)
    with pytest.raises(DreamboothError, match=rf"paths of at most {path_max - 1} bytes\. Use a shorter project "
                                              r"name: at most \d+ characters here"):
        TrainingRun(config, host).run()
    assert host.loads == 0 and not (deep / "Stable-diffusion").exists()
    fit = guard._longest_fitting_project(config, host, 1)
    assert guard._first_path_problem(make_config(tiny_sd1, instance_dir, project_name="p" * fit), host, 1) is None


def test_the_command_line_says_a_name_is_too_long(tiny_sd1, instance_dir, tmp_path, capsys):  # noqa: F811
    from dreambooth_ext import cli

    code = cli.main(["train", "--project_name", "n" * 300, "--training_model", str(tiny_sd1), "--training_images",
                     str(instance_dir), "--resolution", "64", "--max_train_steps", "5",
                     "--models-dir", str(tmp_path / "models")])
    err = capsys.readouterr().err
    assert code == 2 and "at most 255 bytes" in err and "at most 223 characters" in err and "Traceback" not in err


def test_the_api_answers_422_for_a_long_project_name(api, ui_images):  # noqa: F811
    for length in (300, 240):
        data = quick_run_data("", ui_images, project="n" * length)
        response = api.post(f"{PREFIX}/start", json=data, params={"checkpoint": "tiny.safetensors"})
        assert response.status_code == 422, response.text
        assert any("at most 255 bytes" in p for p in response.json()["detail"]["problems"])
    assert api.jobs.active is None
    assert api.get(f"{PREFIX}/projects/{'n' * 300}").status_code == 422


def test_the_api_answers_422_for_a_name_over_its_hosts_file_system_limit(api, ui_images, monkeypatch):  # noqa: F811
    """The checks that need the host's folders (here a file system with shorter names) refuse before a run starts,
    as those of the options alone do."""
    real = os.pathconf
    monkeypatch.setattr(os, "pathconf", lambda path, key: 143 if key == "PC_NAME_MAX" else real(path, key))
    data = quick_run_data("", ui_images, project="n" * 120)
    response = api.post(f"{PREFIX}/start", json=data, params={"checkpoint": "tiny.safetensors"})
    assert response.status_code == 422, response.text
    assert "names of at most 143 bytes" in response.text
    assert api.jobs.active is None


def test_the_tab_shows_both_refusals_and_starts_nothing(tab_factory, ui_models, ui_images):  # noqa: F811
    tab, base = tab_factory(), ui_models / "Stable-diffusion" / "tiny.safetensors"
    values = form_for(tab, quick_run_data(base, ui_images, project="n" * 240))
    status = tab.start("task(n)", DEFAULT_PICK, None, *values)[-1]
    assert "dreambooth-error" in status and "at most 255 bytes" in status and "at most 223 characters" in status
    assert "Not saved" in tab.save(False, "", "", *values)[-1]
    values = form_for(tab, quick_run_data(base, ui_images, prior_preservation=True,
                                          concept={"class_dir": str(ui_images), "num_class_images": 2}))
    status = tab.start("task(c)", DEFAULT_PICK, None, *values)[-1]
    assert "dreambooth-error" in status and "same folder" in status
    assert tab.jobs.active is None and tab.jobs.status()["state"] == "idle"


def test_a_project_whose_runs_could_not_save_is_not_saved(tmp_path):
    with pytest.raises(DreamboothError, match="at most 255 bytes"):
        projects.save_project(tmp_path, cfg.default_config(project_name="n" * 240))
    with pytest.raises(DreamboothError, match="folder names can have at most 255 bytes"):
        projects.project_file(tmp_path, "n" * 300)
    assert list(tmp_path.iterdir()) == []


# -- the polynomial schedule's floor (issue 29) --------------------------------------------------------------


def lr_scheduler_for(config: cfg.Config):
    from dreambooth_ext.train.optim import make_lr_scheduler

    unet, text = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([{"params": [unet], "lr": config.learning_rate},
                                   {"params": [text], "lr": config.text_encoder_lr}], lr=config.learning_rate)
    return make_lr_scheduler(config, optimizer, 10)


def test_polynomial_with_a_rate_at_its_floor_is_refused_by_validate():
    for rate in (1e-8, 1e-7):
        config = cfg.default_config(lr_scheduler="polynomial", learning_rate=rate, concepts=[{"instance_dir": "x"}])
        [problem] = problems_of(config)
        assert problem.startswith(f"learning_rate = {rate:g} with lr_scheduler polynomial") and "above that" in problem
        with pytest.raises(ValueError, match="lr_end"):  # what diffusers raised once the model had loaded
            lr_scheduler_for(config)
    lora = cfg.default_config(lr_scheduler="polynomial", train_mode="lora", lora_learning_rate=1e-8,
                              concepts=[{"instance_dir": "x"}])
    assert problems_of(lora)[0].startswith("lora_learning_rate = 1e-08 with lr_scheduler polynomial")


def test_polynomial_runs_with_a_rate_above_its_floor_and_any_text_encoder_rate():
    # diffusers decays from the UNet's rate and scales the text encoder's by the same factor: only the UNet's counts.
    config = cfg.validate(cfg.default_config(lr_scheduler="polynomial", learning_rate=2e-7, train_text_encoder=True,
                                             text_encoder_lr=1e-8, concepts=[{"instance_dir": "x"}]))
    lr_scheduler_for(config)
    cfg.validate(cfg.default_config(lr_scheduler="linear", learning_rate=1e-8, concepts=[{"instance_dir": "x"}]))
