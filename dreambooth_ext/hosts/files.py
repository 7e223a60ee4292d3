"""The host for the command line and tests: checkpoints in a folder laid out like the WebUI's models/."""

from __future__ import annotations

import logging
from pathlib import Path

from ..config import Config
from ..errors import DreamboothError
from ..models.bundle import BaseFacts, ModelBundle, load_bundle_from_file
from .base import Host

log = logging.getLogger(__name__)


class FolderHost(Host):
    def __init__(self, models_dir: str | Path, work_root: str | Path | None = None):
        self.models_dir = Path(models_dir)
        self.work_root = Path(work_root) if work_root else self.models_dir / "dreambooth"

    def check(self, config: Config) -> BaseFacts | None:
        if not config.base_model:
            raise DreamboothError("base_model is empty: give the checkpoint to train (base_model in the config, "
                                  "--training_model or --model on the command line).")
        return super().check(config)

    def load_base(self, config: Config) -> ModelBundle:
        return load_bundle_from_file(config.base_model, vae_path=config.vae or None,
                                     prediction_type=config.prediction_type)

    def checkpoint_path(self, project: str, step: int) -> Path:
        return self.models_dir / "Stable-diffusion" / project / f"{project}_{step}.safetensors"

    def lora_path(self, project: str, step: int) -> Path:
        return self.models_dir / "Lora" / project / f"{project}_{step}.safetensors"

    def work_dir(self, project: str) -> Path:
        return self.work_root / project

    def publish(self, path: Path) -> None:
        log.debug("Published %s", path)
