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
    """Checkpoints in `models_dir/Stable-diffusion`, LoRAs in `models_dir/Lora` (each folder can be given
    instead), run folders in `work_root`; a run stops after its step when `stop_file` appears."""

    def __init__(self, models_dir: str | Path, work_root: str | Path | None = None, *,
                 checkpoint_dir: str | Path | None = None, lora_dir: str | Path | None = None,
                 stop_file: str | Path | None = None):
        self.models_dir = Path(models_dir)
        self.work_root = Path(work_root) if work_root else self.models_dir / "dreambooth"
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else self.models_dir / "Stable-diffusion"
        self.lora_dir = Path(lora_dir) if lora_dir else self.models_dir / "Lora"
        self.stop_file = Path(stop_file) if stop_file else None

    def cancel_requested(self) -> bool:
        return self.stop_file is not None and self.stop_file.exists()

    def check(self, config: Config) -> BaseFacts | None:
        if not config.base_model:
            raise DreamboothError("base_model is empty: give the checkpoint to train (base_model in the config, "
                                  "--training_model or --model on the command line).")
        return super().check(config)

    def load_base(self, config: Config) -> ModelBundle:
        return load_bundle_from_file(config.base_model, vae_path=config.vae or None,
                                     prediction_type=config.prediction_type)

    def checkpoint_path(self, project: str, step: int) -> Path:
        return self.checkpoint_dir / project / f"{project}_{step}.safetensors"

    def lora_path(self, project: str, step: int) -> Path:
        return self.lora_dir / project / f"{project}_{step}.safetensors"

    def work_dir(self, project: str) -> Path:
        return self.work_root / project

    def publish(self, path: Path) -> None:
        log.debug("Published %s", path)
