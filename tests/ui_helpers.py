"""Shared pieces of the UI, API and browser tests: a tiny checkpoint, training images, quick run settings."""

from __future__ import annotations

import threading
from pathlib import Path

from PIL import Image

from dreambooth_ext.config import default_config, to_dict
from dreambooth_ext.errors import DreamboothError
from dreambooth_ext.hosts.base import Host
from dreambooth_ext.hosts.files import FolderHost
from dreambooth_ext.models.tiny import save_tiny_checkpoint


def make_instance_images(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, color in enumerate([(200, 30, 30), (30, 200, 30)]):
        image = Image.new("RGB", (64, 64), color)
        image.paste((250, 250, 0), (10 + 5 * i, 10, 40, 40))
        image.save(folder / f"img{i}.png")
    return folder


def make_models_dir(root: Path) -> Path:
    """A WebUI-like models folder with one tiny SD1 checkpoint, `Stable-diffusion/tiny.safetensors`."""
    models = root / "models"
    save_tiny_checkpoint(models / "Stable-diffusion" / "tiny.safetensors", family="sd1", seed=0)
    return models


def quick_run_data(base_model: Path | str, instance_dir: Path, project: str = "quick", **overrides) -> dict:
    """A run that finishes in seconds on CPU: 64 px, 2 steps, no class images, fp32 result."""
    data = to_dict(default_config())
    data.update({"project_name": project, "base_model": str(base_model), "resolution": 64, "max_train_steps": 2,
                 "learning_rate": 1e-4, "prior_preservation": False, "save_precision": "fp32",
                 "device": "cpu", "mixed_precision": "no", "sample_steps": 2})
    data["concepts"] = [dict(data["concepts"][0], instance_dir=str(instance_dir), num_class_images=0)]
    concept = overrides.pop("concept", {})
    data["concepts"][0].update(concept)
    data.update(overrides)
    return data


class BlockingHost(Host):
    """A host whose load_base waits until released, then fails: keeps a run 'active' for as long as a test needs."""

    def __init__(self, root: Path):
        self.inner = FolderHost(root)
        self.entered = threading.Event()
        self.release = threading.Event()

    def check(self, config):
        pass  # the refusals come from load_base, once the run is active

    def load_base(self, config):
        self.entered.set()
        self.release.wait(30)
        raise DreamboothError("blocking host released: no model here")

    def checkpoint_path(self, project, step):
        return self.inner.checkpoint_path(project, step)

    def lora_path(self, project, step):
        return self.inner.lora_path(project, step)

    def work_dir(self, project):
        return self.inner.work_dir(project)


def run_until_cancelled(config, host: Host, step: int):
    """Start a run and cancel it once it has made `step` optimizer steps; returns its result (state saved)."""
    from dreambooth_ext.train.run import TrainingRun

    holder = {}

    def stop(progress) -> None:
        if progress.phase == "training" and progress.step == step:
            holder["run"].cancel()

    holder["run"] = TrainingRun(config, host, on_progress=stop)
    return holder["run"].run()
