"""What the engine needs from whoever runs it: base weights, folders, publishing, the device."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

from ..config import Config
from ..models.bundle import ModelBundle


class Host(ABC):
    """One host is the WebUI (its loaded model and folders); another is a plain folder of checkpoints."""

    @abstractmethod
    def load_base(self, config: Config) -> ModelBundle:
        """The model to train, with clean base weights."""

    @abstractmethod
    def checkpoint_path(self, project: str, step: int) -> Path:
        """Where the model saved at `step` goes."""

    @abstractmethod
    def work_dir(self, project: str) -> Path:
        """The project's folder for training state, generated class images and samples."""

    def publish(self, path: Path) -> None:  # noqa: B027 - optional hook
        """A finished model file exists at `path`: make it visible (e.g. refresh the checkpoint list)."""

    def release_device(self) -> None:  # noqa: B027 - optional hook
        """Free the accelerator for training (the WebUI moves its own model off the GPU)."""

    def restore_device(self) -> None:  # noqa: B027 - optional hook
        """Undo `release_device`; called after success, error or cancel."""
