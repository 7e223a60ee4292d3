"""Faults lose nothing: a second run of a project is refused, unwritable folders are found before the model
loads, and a full disk while saving leaves the last good state and results, with a plain message."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from test_train import class_dir, instance_dir, make_config, tiny_sd1  # noqa: F401 - fixtures

from dreambooth_ext.errors import DreamboothError
from dreambooth_ext.hosts.files import FolderHost
from dreambooth_ext.models.checkpoint import read_checkpoint
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
                                              ".*The training state saved at step 2 is kept: free some disk space "
                                              "and Resume, which continues from step 2"):
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


RESULTS, STATE = "Stable-diffusion/t/", "dreambooth/t/state"


def full_disk_for(*targets: str):
    """safetensors' save_file failing with a full disk for the files whose path holds one of `targets`."""
    import safetensors.torch

    real = safetensors.torch.save_file

    def save_file(tensors, path, *args, **kwargs):
        if any(target in str(path) for target in targets):
            raise SafetensorError(NO_SPACE)
        return real(tensors, path, *args, **kwargs)
    return save_file


def test_disk_full_at_the_final_save_keeps_the_steps_and_resume_saves_them(tiny_sd1, instance_dir, tmp_path,  # noqa: F811
                                                                          monkeypatch):
    import safetensors.torch

    from dreambooth_ext.train import state as state_module

    config = make_config(tiny_sd1, instance_dir, max_train_steps=3)
    straight = TrainingRun(config, FolderHost(tmp_path / "straight")).run()
    monkeypatch.setattr(safetensors.torch, "save_file", full_disk_for(RESULTS))
    with pytest.raises(DreamboothError, match=r"Could not save the trained model to .*t_3\.safetensors: .*No space.*"
                                              r"The training state at step 3 is saved in .*: free some disk space "
                                              "and Resume, which saves the model without training again"):
        TrainingRun(config, FolderHost(tmp_path / "models")).run()
    with pytest.raises(DreamboothError, match="has a run stopped at step 3 of 3.*Resume continues it"):
        TrainingRun(config, FolderHost(tmp_path / "models")).run()  # Start says the same

    monkeypatch.undo()  # space freed
    assert state_module.load_state(tmp_path / "models" / "dreambooth" / "t" / "state").step == 3
    resumed = TrainingRun(config, FolderHost(tmp_path / "models"), resume=True).run()
    assert resumed.status == "finished" and resumed.losses == []  # nothing trained again
    saved, expected = read_checkpoint(resumed.checkpoints[-1]), read_checkpoint(straight.checkpoints[-1])
    assert saved.keys() == expected.keys() and all(torch.equal(saved[k], expected[k]) for k in saved)


def test_disk_full_for_the_result_and_the_state_says_truly_that_start_is_left(tiny_sd1, instance_dir,  # noqa: F811
                                                                             tmp_path, monkeypatch):
    import safetensors.torch

    from dreambooth_ext.train import state as state_module

    config = make_config(tiny_sd1, instance_dir, max_train_steps=2)
    monkeypatch.setattr(safetensors.torch, "save_file", full_disk_for(RESULTS))
    monkeypatch.setattr(state_module, "save_file", full_disk_for(STATE))
    with pytest.raises(DreamboothError, match=r"Could not save the trained model .*No training state could be "
                                              "saved, so these steps cannot be resumed. Free some disk space and "
                                              r"Start the run again\.$"):
        TrainingRun(config, FolderHost(tmp_path / "models")).run()
    with pytest.raises(DreamboothError, match="has no stopped run to resume"):  # Resume agrees
        TrainingRun(config, FolderHost(tmp_path / "models"), resume=True).run()
    monkeypatch.undo()
    assert TrainingRun(config, FolderHost(tmp_path / "models")).run().status == "finished"  # and Start works


def test_disk_full_after_periodic_results_names_them_and_what_start_needs(tiny_sd1, instance_dir, tmp_path,  # noqa: F811
                                                                         monkeypatch):

    from dreambooth_ext.train import state as state_module

    config = make_config(tiny_sd1, instance_dir, max_train_steps=4, save_every_n_steps=2)
    monkeypatch.setattr(state_module, "save_file", full_disk_for(STATE))  # after t_2.safetensors, its state fails
    with pytest.raises(DreamboothError, match=r"the training state at step 2 .*No training state could be saved.*"
                                              r"start again "
                                              r"under another project name: this one has the results saved so far "
                                              r"\(t_2\.safetensors, in .*Start refuses it until they are moved"):
        TrainingRun(config, FolderHost(tmp_path / "models")).run()
    monkeypatch.undo()
    with pytest.raises(DreamboothError, match=r"results of an earlier run .*t_2\.safetensors"):  # as it said
        TrainingRun(config, FolderHost(tmp_path / "models")).run()


@pytest.mark.parametrize("flag", ["--models-dir", "--work-dir"])
def test_a_read_only_output_folder_is_named_before_the_lock_and_the_model(flag, tiny_sd1, instance_dir,  # noqa: F811
                                                                          tmp_path):
    """A read-only bind mount (in a mount namespace of the test's own, so no privilege is needed beyond user
    namespaces) for the folder the flag names: one plain message, rc 2, nothing written, no model loaded."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    train = [sys.executable, "-m", "dreambooth_ext", "train", "--project_name", "p", "--training_model",
             str(tiny_sd1), "--training_images", str(instance_dir), "--resolution", "64", flag, str(folder)]
    done = subprocess.run(["unshare", "--map-root-user", "--mount", "sh", "-c",
                           f"mount --bind -o ro '{folder}' '{folder}' && exec \"$@\"", "sh", *train],
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          timeout=300)
    what = "the trained model" if flag == "--models-dir" else "training state"
    assert done.returncode == 2, done.stderr
    assert f"Cannot write {what} to {folder}" in done.stderr and "Read-only file system" in done.stderr
    assert "Traceback" not in done.stderr and "Loading the base model" not in done.stdout + done.stderr
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
