"""The one options schema: types, ranges, cross-field checks, files in three formats."""

from __future__ import annotations

import json
import re

import pytest

from dreambooth_ext import config as cfg
from dreambooth_ext.errors import ConfigError

# JoePenna's example configuration file (seed 000, "Example Configuration File"), shortened image list.
JOEPENNA_EXAMPLE = {
    "class_word": "woman",
    "config_date_time": "2023-04-08T16-54-00",
    "debug": False,
    "flip_percent": 0.0,
    "gpu": 0,
    "learning_rate": 1e-06,
    "max_training_steps": 3500,
    "model_path": "D:\\stable-diffusion\\models\\v1-5-pruned-emaonly-pruned.ckpt",
    "model_repo_id": "",
    "project_config_filename": "my-config.json",
    "project_name": "<token> project",
    "regularization_images_folder_path": "D:\\regularization_images\\person_ddim",
    "save_every_x_steps": 250,
    "schema": 1,
    "seed": 23,
    "token": "<token>",
    "token_only": False,
    "training_images": ["001@a photo of <token> looking down.png"],
    "training_images_count": 24,
    "training_images_folder_path": "D:\\stable-diffusion\\training_images\\24 Images - captioned",
}


def test_every_option_is_complete_and_its_default_valid():
    for option in cfg.OPTIONS + cfg.CONCEPT_OPTIONS:
        assert option.group in cfg.GROUPS, option.name
        assert option.help.strip(), option.name
        assert cfg.check(option, option.default) is None, option.name
        if option.kind == "choice":
            assert option.default in option.choices
    names = [o.name for o in cfg.OPTIONS]
    assert len(names) == len(set(names))


def test_help_names_other_options_by_flag_on_the_command_line_and_by_label_in_the_tab():
    every = {o.name for o in cfg.OPTIONS + cfg.CONCEPT_OPTIONS}
    for option in cfg.OPTIONS + cfg.CONCEPT_OPTIONS:
        assert set(re.findall(r"`(\w+)`", option.text)) <= every, option.name  # each reference is an option
        assert "`" not in option.help and "`" not in option.info, option.name
    epochs = cfg.OPTIONS_BY_NAME["num_train_epochs"]
    assert "used when --max_train_steps is 0" in epochs.help
    assert 'used when "Training steps" is 0' in epochs.info


def test_each_learning_rate_belongs_to_the_train_mode_whose_run_uses_it():
    from dreambooth_ext.train.optim import group_options

    modes = cfg.OPTIONS_BY_NAME["train_mode"].choices
    bound = [o for o in cfg.OPTIONS if o.mode]
    assert {o.name for o in bound} == {"learning_rate", "text_encoder_lr", "lora_learning_rate",
                                       "lora_text_encoder_lr"}
    for mode in modes:
        used = {names["lr"] for names in group_options(cfg.default_config(train_mode=mode)).values()}
        assert used == {o.name for o in bound if o.mode == mode}, mode
    # A project saved before the rates were tied to a mode (both rates, any order) loads as it was.
    old = {"train_mode": "lora", "lora_text_encoder_lr": 2e-5, "lora_learning_rate": 3e-4, "learning_rate": 0.01,
           "text_encoder_lr": 1e-6, "concepts": [{"instance_dir": "photos"}]}
    config = cfg.from_dict(old)
    assert (config.learning_rate, config.lora_learning_rate, config.lora_text_encoder_lr) == (0.01, 3e-4, 2e-5)


def test_defaults_validate_once_a_folder_is_given():
    config = cfg.default_config(concepts=[{"instance_dir": "photos"}])
    assert cfg.validate(config) is config
    assert config.concepts[0].instance_prompt == "photo of {token} {class}"


def test_one_error_lists_every_bad_field_with_its_value():
    with pytest.raises(ConfigError) as info:
        cfg.from_dict({"learning_rate": "fast", "resolution": 10, "optimizer": "sgd", "lr_sheduler": "cosine",
                       "concepts": [{"num_class_images": -1, "token_only": "maybe"}]})
    problems = info.value.problems
    assert len(problems) == 7
    text = str(info.value)
    for expected in ("learning_rate = 'fast'", "resolution = 10", "optimizer = 'sgd'", "lr_sheduler",
                     "concepts[0].num_class_images = -1", "concepts[0].token_only = 'maybe'",
                     "concepts[0].instance_dir = ''"):  # the checks of the fields together, in the same reply
        assert expected in text


def test_the_checks_of_fields_together_come_with_the_bad_fields_not_after_them():
    with pytest.raises(ConfigError) as info:
        cfg.from_dict({"resolution": 65, "max_train_steps": -1, "ema": "x", "concepts": [{"instance_dir": "p"}]})
    # resolution is a valid number alone; a bad field is judged once, not again through the default it would take
    assert info.value.problems == ["max_train_steps = -1: must be between 0 and 1e+07",
                                   "ema = 'x': expected true or false",
                                   "resolution = 65: must be a multiple of 64 (e.g. 512 or 768)"]


def test_cross_field_checks_are_reported_together():
    config = cfg.from_dict({"resolution": 500, "max_train_steps": 0, "num_train_epochs": 0,
                            "project_name": "../evil",
                            "concepts": [{"instance_dir": "", "token": "", "class_word": ""}]})
    with pytest.raises(ConfigError) as info:
        cfg.validate(config)
    text = str(info.value)
    assert "resolution = 500" in text and "multiple of 64" in text
    assert "max_train_steps = 0" in text
    assert "project_name = '../evil'" in text
    assert "instance_dir" in text
    assert "set a token" in text and "set a class word" in text


def test_values_from_forms_and_flags_are_coerced():
    config = cfg.from_dict({"max_train_steps": "800", "learning_rate": "5e-6", "train_text_encoder": "true",
                            "flip_p": 0, "concepts": [{"num_class_images": 50.0}]})
    assert config.max_train_steps == 800 and config.learning_rate == 5e-6
    assert config.train_text_encoder is True and config.flip_p == 0.0
    assert config.concepts[0].num_class_images == 50


def test_json_round_trip_keeps_everything(tmp_path):
    config = cfg.from_dict({"project_name": "anna", "learning_rate": 3e-6, "ema": True,
                            "concepts": [{"instance_dir": "a", "token": "zwx"}, {"instance_dir": "b"}]})
    path = cfg.save_json(config, tmp_path / "p" / "project.json")
    data = json.loads(path.read_text())
    assert data["schema_version"] == cfg.SCHEMA_VERSION
    assert cfg.load_json(path) == config
    assert not list(path.parent.glob(".*tmp"))


def test_unknown_schema_version_is_refused(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"schema_version": 99}))
    with pytest.raises(ConfigError, match="schema_version = 99"):
        cfg.load_json(path)


def test_broken_json_names_the_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="broken.json"):
        cfg.load_json(path)


def test_joepenna_config_is_imported(tmp_path):
    path = tmp_path / "my-config.json"
    path.write_text(json.dumps(JOEPENNA_EXAMPLE))
    config = cfg.load_json(path)
    assert config.base_model == JOEPENNA_EXAMPLE["model_path"]
    assert config.max_train_steps == 3500 and config.save_every_n_steps == 250
    assert config.learning_rate == 1e-6 and config.seed == 23 and config.flip_p == 0.0
    assert config.device == "auto"  # his "gpu": 0 is the default GPU: the CPU where there is none
    assert config.project_name == "token_project"
    assert config.prior_preservation is True
    concept = config.concepts[0]
    assert concept.instance_dir == JOEPENNA_EXAMPLE["training_images_folder_path"]
    assert concept.class_dir == JOEPENNA_EXAMPLE["regularization_images_folder_path"]
    assert concept.generate_class_images is False  # his folder is used as it is, never written to
    assert (concept.token, concept.class_word) == ("<token>", "woman")
    assert cfg.fill_prompt(concept.instance_prompt, concept) == "<token> woman"
    cfg.validate(config)


def test_joepenna_hub_model_is_refused_clearly():
    with pytest.raises(ConfigError, match="cannot be downloaded"):
        cfg.from_joepenna({**JOEPENNA_EXAMPLE, "model_path": "", "model_repo_id": "runwayml/sd-1-5"})


def test_shivam_concepts_list_is_imported(tmp_path):
    items = [{"instance_prompt": "photo of zwx dog", "class_prompt": "photo of a dog",
              "instance_data_dir": "data/zwx", "class_data_dir": "data/dog"},
             {"instance_prompt": "photo of ukj person", "class_prompt": "photo of a person",
              "instance_data_dir": "data/ukj", "class_data_dir": "data/person"}]
    path = tmp_path / "concepts_list.json"
    path.write_text(json.dumps(items))
    config = cfg.load_json(path)
    assert config.prior_preservation is True
    assert [(c.instance_dir, c.instance_prompt, c.class_dir, c.class_prompt) for c in config.concepts] == [
        ("data/zwx", "photo of zwx dog", "data/dog", "photo of a dog"),
        ("data/ukj", "photo of ukj person", "data/person", "photo of a person")]
    assert [(c.token, c.class_word) for c in config.concepts] == [("zwx", "dog"), ("ukj", "person")]
    cfg.validate(config)


def test_token_only_drops_the_class_word():
    concept = cfg.Concept(token="zwx", class_word="dog", token_only=True)
    assert cfg.fill_prompt("photo of {token} {class}", concept) == "photo of zwx"


def test_the_monitors_options_need_the_monitor():
    photos = [{"instance_dir": "photos"}]
    for name in ("stop_when_memorizing", "hold_out_photos"):
        (problem,) = cfg.config_problems(cfg.default_config(concepts=photos, monitor_every_n_steps=-1,
                                                            **{name: True}))
        assert problem.startswith(f"{name} with monitor_every_n_steps = -1: ")
        assert "set monitor_every_n_steps" in problem
        assert not cfg.config_problems(cfg.default_config(concepts=photos, **{name: True}))


def test_a_validation_dir_must_hold_photos_outside_the_training_and_class_images(tmp_path):
    photos, classes, held = tmp_path / "photos", tmp_path / "classes", tmp_path / "held"
    for folder in (photos, classes, held, photos / "sub"):
        folder.mkdir()
    for folder in (photos, classes, held, photos / "sub"):
        (folder / "a.png").write_bytes(b"")

    def problems(validation_dir, **concept) -> list[str]:
        concepts = [{"instance_dir": str(photos), **concept}]
        return cfg.config_problems(cfg.default_config(concepts=concepts, validation_dir=str(validation_dir)))

    assert problems(held) == []
    (missing,) = problems(tmp_path / "nowhere")
    assert "does not exist" in missing and "leave it empty" in missing
    (tmp_path / "empty").mkdir()
    (empty,) = problems(tmp_path / "empty")
    assert "holds no image" in empty
    for inside in (photos, photos / "sub", tmp_path):
        (overlap,) = problems(inside)
        assert "concepts[0].instance_dir" in overlap and "overlap" in overlap and "a folder of its own" in overlap
    (overlap,) = cfg.config_problems(cfg.default_config(
        concepts=[{"instance_dir": str(photos), "class_dir": str(held)}], prior_preservation=True,
        validation_dir=str(held)))
    assert "concepts[0].class_dir" in overlap
    assert not cfg.config_problems(cfg.default_config(  # a class folder prior preservation does not read
        concepts=[{"instance_dir": str(photos), "class_dir": str(held)}], prior_preservation=False,
        validation_dir=str(held)))
