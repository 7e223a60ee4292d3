"""Faults lose nothing: a second run of a project is refused, unwritable folders are found before the model
loads, and a full disk while saving leaves the last good state and results, with a plain message."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import SafetensorError
from test_train import class_dir, instance_dir, make_config, tiny_sd1  # noqa: F401 - fixtures

from dreambooth_ext.errors import DreamboothError
from dreambooth_ext.hosts.files import FolderHost
from dreambooth_ext.train.run import Progress, TrainingRun

ROOT = Path(__file__).resolve().parents[1]
NO_SPACE = "Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No space left on device\" })"


class CountingHost(FolderHost):
    loads = 0

    def load_base(self, config):
        self.loads += 1
        return super().load_base(config)


def stop_at(step: int, holder: dict):
    def hook(progress: Progress) -> None:
        if progress.phase == "training" and progress.step == step:
            holder["run"].cancel()
    return hook


def test_a_second_run_of_the_project_is_refused_naming_the_first(tiny_sd1, instance_dir, tmp_path):  # noqa: F811
    work = tmp_path / "models" / "dreambooth" / "t"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path\n"
         "from dreambooth_ext.train.guard import project_lock\n"
         f"with project_lock(Path({str(work)!r}), 't'):\n    print('holding', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "holding"
        host = CountingHost(tmp_path / "models")
        with pytest.raises(DreamboothError, match=rf"being trained already \(process {holder.pid} on "):
            TrainingRun(make_config(tiny_sd1, instance_dir), host).run()
        assert host.loads == 0
    finally:
        holder.kill()
        holder.wait(30)
    # Its process is gone (killed, not cleaned up): the lock went with it.
    result = TrainingRun(make_config(tiny_sd1, instance_dir, max_train_steps=1), FolderHost(tmp_path / "models")).run()
    assert result.status == "finished"
    assert not (work / ".run.lock").exists()  # a finished run leaves no lock file behind


def test_an_unwritable_class_folder_is_refused_before_the_model_loads(tiny_sd1, instance_dir, tmp_path):  # noqa: F811
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where a folder should be")  # unwritable even for root, unlike chmod
    config = make_config(tiny_sd1, instance_dir, blocker / "class", concept={"num_class_images": 2})
    host = CountingHost(tmp_path / "models")
    with pytest.raises(DreamboothError, match=r"Cannot write generated class images to .*not_a_folder/class"):
        TrainingRun(config, host).run()
    assert host.loads == 0


def test_an_unwritable_models_folder_is_refused_before_the_model_loads(tiny_sd1, instance_dir, tmp_path):  # noqa: F811
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "Stable-diffusion").write_text("a file")
    host = CountingHost(tmp_path / "models")
    with pytest.raises(DreamboothError, match="Cannot write the trained model.*--models-dir"):
        TrainingRun(make_config(tiny_sd1, instance_dir), host).run()
    assert host.loads == 0


def test_disk_full_while_saving_the_state_keeps_the_last_good_one(tiny_sd1, instance_dir, tmp_path,  # noqa: F811
                                                                    monkeypatch):
    from dreambooth_ext.train import state as state_module

    config = make_config(tiny_sd1, instance_dir, max_train_steps=6, save_every_n_steps=2)
    holder: dict = {}
    run = TrainingRun(config, FolderHost(tmp_path / "models"), on_progress=stop_at(3, holder))
    holder["run"] = run
    real_save = state_module.save_file

    def full_disk(tensors, path, *args, **kwargs):
        if "optimizer" in str(path) and run.cancelled:  # the save at the cancel, after the one at step 2
            raise SafetensorError(NO_SPACE)
        return real_save(tensors, path, *args, **kwargs)

    monkeypatch.setattr(state_module, "save_file", full_disk)
    with pytest.raises(DreamboothError, match="Could not save the training state at step 3 to .*: .*No space left"
                                              ".*the state saved earlier is kept"):
        run.run()
    work = tmp_path / "models" / "dreambooth" / "t"
    assert state_module.load_state(work / "state").step == 2
    assert not (work / "state.partial").exists()

    monkeypatch.setattr(state_module, "save_file", real_save)  # space freed: resume from step 2
    result = TrainingRun(config, FolderHost(tmp_path / "models"), resume=True).run()
    assert result.status == "finished" and result.losses[0][0] == 3


def test_disk_full_while_saving_the_model_leaves_no_half_file(tiny_sd1, instance_dir, tmp_path,  # noqa: F811
                                                               monkeypatch):
    import safetensors.torch

    def full_disk(tensors, path, *args, **kwargs):
        Path(path).write_bytes(b"half")
        raise SafetensorError(NO_SPACE)

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(DreamboothError, match=r"Could not save the trained model to .*t_2\.safetensors: .*No space"):
        TrainingRun(make_config(tiny_sd1, instance_dir, max_train_steps=2), FolderHost(tmp_path / "models")).run()
    folder = tmp_path / "models" / "Stable-diffusion" / "t"
    assert list(folder.iterdir()) == []


def test_the_command_line_says_it_in_one_paragraph(tiny_sd1, instance_dir, tmp_path, capsys):  # noqa: F811
    from dreambooth_ext import cli

    blocker = tmp_path / "file"
    blocker.write_text("x")
    code = cli.main(["train", "--project_name", "p", "--training_model", str(tiny_sd1), "--training_images",
                     str(instance_dir), "--class_dir", str(blocker / "reg"), "--resolution", "64",
                     "--models-dir", str(tmp_path / "models")])
    err = capsys.readouterr().err
    assert code == 2 and "Cannot write generated class images" in err and "Traceback" not in err
