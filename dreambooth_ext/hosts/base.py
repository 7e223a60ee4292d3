"""What the engine needs from whoever runs it: base weights, folders, publishing, the device."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from ..config import Config
from ..errors import DreamboothError
from ..models.bundle import BaseFacts, ModelBundle, check_checkpoint_file


class Host(ABC):
    """One host is the WebUI (its loaded model and folders); another is a plain folder of checkpoints."""

    @abstractmethod
    def load_base(self, config: Config) -> ModelBundle:
        """The model to train, with clean base weights."""

    def check(self, config: Config) -> BaseFacts | None:
        """Refuse, before a run starts, what would make it fail at once (cheap: no weights are read), and say what
        the base model is when that is known without loading it (None otherwise).

        Raises DreamboothError with the user's fix; the tab shows it in its error box, the API answers 422.
        """
        return check_checkpoint_file(config.base_model) if config.base_model else None

    def base_files(self, config: Config) -> tuple[Path, Path | None]:
        """The base model's checkpoint file and separate VAE file (None: its own), for a run in processes of its
        own, which read files rather than this process's memory."""
        if not config.base_model:
            raise DreamboothError("base_model is empty: several GPUs train a checkpoint file; give one.")
        return Path(config.base_model), Path(config.vae) if config.vae else None

    @abstractmethod
    def checkpoint_path(self, project: str, step: int) -> Path:
        """Where the model saved at `step` goes."""

    @abstractmethod
    def work_dir(self, project: str) -> Path:
        """The project's folder for training state, generated class images and samples."""

    @abstractmethod
    def lora_path(self, project: str, step: int) -> Path:
        """Where the LoRA saved at `step` goes."""

    def publish(self, path: Path) -> None:  # noqa: B027 - optional hook
        """A finished model file exists at `path`: make it visible (e.g. refresh the checkpoint list)."""

    def publish_lora(self, path: Path) -> None:  # noqa: B027 - optional hook
        """A finished LoRA file exists at `path`: make it visible (e.g. refresh the Lora list)."""

    def release_device(self, device: Any = None) -> None:  # noqa: B027 - optional hook
        """Free the accelerator for training: `device` (a torch.device), or None for the host's own (the WebUI moves
        its model off its GPU when the run trains there)."""

    def restore_device(self) -> None:  # noqa: B027 - optional hook
        """Undo `release_device`; called after success, error or cancel."""

    # Progress and cancel: a TrainingRun reports every train.run.Progress here and, after each report, stops
    # within a step once `cancel_requested` says so. This is the one path for both; callers that want the
    # progress too pass TrainingRun(on_progress=...).

    def report(self, progress: Any) -> None:  # noqa: B027 - optional hook
        """Show a train.run.Progress the host's own way (the WebUI: its progress bar and /sdapi/v1/progress)."""

    def cancel_requested(self) -> bool:
        """Whether the host asked the run to stop (the WebUI: its Interrupt button or /sdapi/v1/interrupt)."""
        return False
