"""At most one training run at a time, in the caller's thread (the tab) or a background thread (the API),
with a JSON-able status that the tab, the API and the page's polling all read.

Nothing here imports the WebUI: host-specific wrapping (the WebUI's queue lock, `shared.state.begin/end`) is
passed in as a callable; the host's progress display and stop requests go through the Host itself.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import Config
from ..errors import DreamboothError
from ..hosts.base import Host
from ..train.launch import ChildRun, training_run
from ..train.run import Progress, RunResult, TrainingRun, cancelled_message

log = logging.getLogger(__name__)

MAX_LOSS_POINTS = 2000  # the chart keeps this many points; older ones are thinned, not dropped

# Job states; "running" covers loading, caching, class images, training and saving.
IDLE, WAITING, RUNNING, FINISHED, CANCELLED, FAILED = "idle", "waiting", "running", "finished", "cancelled", "failed"
TERMINAL = (FINISHED, CANCELLED, FAILED)


def log_failure(exc: BaseException, what: str) -> None:
    """An expected refusal (our own error, worded for users) is one log line; anything else keeps its traceback."""
    if isinstance(exc, DreamboothError):
        log.warning("%s stopped: %s", what, exc)
    else:
        log.error("%s failed", what, exc_info=exc)


def error_message(exc: BaseException) -> str:
    """The text a user sees for an exception: our errors are already worded for users; others get their type."""
    if isinstance(exc, DreamboothError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


@dataclass
class JobStatus:
    """Everything the page and the API show about the current or last run (`to_dict` is JSON-able)."""

    project: str = ""
    state: str = IDLE
    phase: str = ""
    message: str = ""
    step: int = 0
    total_steps: int = 0
    loss: float | None = None
    lr: float | None = None
    it_per_s: float | None = None
    eta_s: float | None = None
    memory_gib: float | None = None
    memory_kind: str = ""
    done: int = 0
    total: int = 0
    losses: list[tuple[int, float]] = field(default_factory=list)
    samples: list[str] = field(default_factory=list)
    checkpoints: list[str] = field(default_factory=list)
    loras: list[str] = field(default_factory=list)  # LoRA files written (in the host's Lora folder)
    warnings: list[str] = field(default_factory=list)  # the dataset check's findings, then the run's own
    monitor: dict | None = None  # the learning monitor: its points, last verdict and remedy, best step
    error: str | None = None
    resume: bool = False
    started_at: float | None = None
    finished_at: float | None = None

    @property
    def active(self) -> bool:
        return self.state in (WAITING, RUNNING)

    def to_dict(self) -> dict[str, Any]:
        data = {k: (list(v) if isinstance(v, list) else v) for k, v in self.__dict__.items()}
        data["losses"] = [[s, v] for s, v in self.losses]
        data["active"] = self.active
        return data

    def apply(self, progress: Progress) -> None:
        self.phase = progress.phase
        if progress.message:
            self.message = progress.message
        if progress.total_steps:
            self.step, self.total_steps = progress.step, progress.total_steps
        self.done, self.total = progress.done, progress.total
        if progress.phase == "training":
            self.loss, self.lr = progress.loss, progress.lr
            self.it_per_s, self.eta_s = progress.it_per_s, progress.eta_s
            self.memory_gib, self.memory_kind = progress.memory_gib, progress.memory_kind
            self.message = f"Training step {progress.step}/{progress.total_steps}"
        for step, loss in progress.losses:  # the steps whose loss has been read: not a point per report
            self._add_loss(step, loss)
        if progress.monitor is not None:  # the whole series each time: a resumed run's earlier points too
            self.monitor = progress.monitor
        self.samples.extend(str(p) for p in progress.samples)
        self.warnings.extend(progress.warnings)
        if progress.checkpoint is not None and str(progress.checkpoint) not in self.checkpoints:
            self.checkpoints.append(str(progress.checkpoint))
        if progress.lora is not None and str(progress.lora) not in self.loras:
            self.loras.append(str(progress.lora))

    def _add_loss(self, step: int, loss: float) -> None:
        self.losses.append((step, float(loss)))
        if len(self.losses) > MAX_LOSS_POINTS:
            self.losses = self.losses[::2]


class Job:
    """One claimed slot: created by `JobManager.claim`, run once with `run`, then released."""

    def __init__(self, manager: JobManager, config: Config, resume: bool):
        self.manager = manager
        self.config = config
        self.resume = resume
        self.status = JobStatus(project=config.project_name, state=WAITING, resume=resume,
                                message="Waiting for the device", started_at=time.time())
        self.result: RunResult | None = None
        self.host: Host | None = None  # the host it runs with, which names its saved files
        self._run: TrainingRun | ChildRun | None = None
        self._cancel_requested = False
        self._lock = threading.Lock()

    def cancel(self) -> None:
        with self._lock:
            self._cancel_requested = True
            run = self._run
        if run is not None:
            run.cancel()
        if self.status.active:
            self.status.message = ("Cancelling: the run stops after the current step and saves its state for Resume"
                                   if self.status.step or self.resume else
                                   "Cancelling: the run stops before its first step (nothing to resume: Start "
                                   "begins again)")

    def run(self, host: Host) -> JobStatus:
        """Train in this thread. Never raises: an error becomes `status.error`; an expected refusal (a
        DreamboothError) is logged as one line, anything else with its traceback."""
        status = self.status
        self.host = host
        try:
            with self._lock:
                if self._cancel_requested:
                    status.state, status.message = CANCELLED, "Cancelled before it started"
                    return status
                self._run = training_run(self.config, host, resume=self.resume, on_progress=self.status.apply)
            status.state, status.message = RUNNING, "Starting"
            self.result = self._run.run()
            self._finish(self.result)
        except Exception as exc:  # noqa: BLE001 - every failure must reach the user as a message
            log_failure(exc, f"Dreambooth run of project {self.config.project_name!r}")
            status.state, status.error = FAILED, error_message(exc)
            status.message = "Training failed"
        finally:
            status.finished_at = time.time()
            self.manager._release(self)
        return status

    def saved_model(self, step: int | str) -> Path:
        """The model file this run saved at `step` ("best": the learning monitor's best saved step), named as the
        host names it (a resumed run's earlier saves too). Raises DreamboothError saying why there is none: a run
        that saves only LoRA files has no model file to load; a step that was not saved has none either."""
        status, project = self.status, self.config.project_name
        monitor = status.monitor or {}
        if step == "best":
            step = monitor.get("best_step")
            if step is None:
                raise DreamboothError(f"The last run (project {project!r}) has no best step: "
                                      + ("no step of it was saved yet." if monitor else
                                         "its learning monitor was off (monitor_every_n_steps -1)."))
        if not status.checkpoints:
            raise DreamboothError(f"The last run (project {project!r}) wrote no model file to load"
                                  + (" (a LoRA run writes LoRA files; add them to a prompt instead)."
                                     if status.loras else "."))
        path = self.host.checkpoint_path(project, step) if self.host is not None else None
        if path is None or not path.is_file():
            steps = self.saved_steps()
            saved = (f"its saved steps: {', '.join(map(str, steps))}" if steps else
                     f"the model files it wrote: {', '.join(status.checkpoints)}")
            raise DreamboothError(f"The last run (project {project!r}) has no saved model at step {step}; {saved}.")
        return path

    def saved_steps(self) -> list[int]:
        """The steps the learning monitor marked saved whose model file exists (none without the monitor)."""
        points = (self.status.monitor or {}).get("points") or []
        project = self.config.project_name
        return [p["step"] for p in points
                if p.get("saved") and self.host is not None and self.host.checkpoint_path(project, p["step"]).is_file()]

    def _finish(self, result: RunResult) -> None:
        status = self.status
        status.step, status.total_steps = result.step, result.total_steps
        for paths, listed in ((result.checkpoints, status.checkpoints), (result.loras, status.loras)):
            listed.extend(str(path) for path in paths if str(path) not in listed)
        if result.status == "cancelled":
            status.state = CANCELLED
            status.message = cancelled_message(result.step, self.resume)
        else:
            status.state, status.message = FINISHED, f"Finished: {result.step} steps"


class JobManager:
    """Holds the one active job and the last finished one. Thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self._active: Job | None = None
        self._last: Job | None = None
        self._thread: threading.Thread | None = None

    # -- claiming and running ---------------------------------------------------------------------------

    def check_free(self) -> None:
        """Raise DreamboothError when a run is active (say so before looking at a new run's other problems)."""
        active = self._active
        if active is not None:
            raise DreamboothError(f"A training run (project {active.config.project_name!r}) is already "
                                  "active; cancel it or wait for it to finish.")

    def claim(self, config: Config, *, resume: bool = False) -> Job:
        """Reserve the single slot for `config`; raises DreamboothError when a run is already active."""
        with self._lock:
            self.check_free()
            job = Job(self, config, resume)
            self._active = self._last = job
            return job

    def run(self, config: Config, host: Host, *, resume: bool = False) -> JobStatus:
        """Claim and train in the caller's thread; returns the final status (errors are in `status.error`)."""
        return self.claim(config, resume=resume).run(host)

    def start_background(self, config: Config, host: Host, *, resume: bool = False,
                         wrap: Callable[[Callable[[], Any]], Callable[[], Any]] | None = None) -> Job:
        """Claim, then train in a daemon thread. `wrap` adds host work around the whole thread body (the WebUI's
        queue lock and job state)."""
        job = self.claim(config, resume=resume)

        def body() -> None:
            job.run(host)

        target = wrap(body) if wrap is not None else body
        thread = threading.Thread(target=_guard(target, job, self), name=f"dreambooth-{config.project_name}",
                                  daemon=True)
        self._thread = thread
        thread.start()
        return job

    def _release(self, job: Job) -> None:
        with self._lock:
            if self._active is job:
                self._active = None

    # -- control and status -----------------------------------------------------------------------------

    @property
    def active(self) -> Job | None:
        return self._active

    @property
    def last_config(self) -> Config | None:
        """The config of the active or last run, None before the first."""
        job = self._last
        return job.config if job is not None else None

    def cancel(self) -> bool:
        """Ask the active run to stop after the current step (it saves resumable state). False when none runs."""
        job = self._active
        if job is None:
            return False
        job.cancel()
        return True

    @property
    def last(self) -> Job | None:
        """The active or last run's job, None before the first."""
        return self._last

    def saved_model(self, step: int | str) -> Path:
        """The model file the last run saved at `step` or "best" (see Job.saved_model); DreamboothError when there
        is none, or no run yet."""
        job = self._last
        if job is None:
            raise DreamboothError("No training run yet since the start: there is no saved step to load. Give the "
                                  "file to load instead.")
        return job.saved_model(step)

    def status(self) -> dict[str, Any]:
        job = self._last
        return (job.status if job is not None else JobStatus()).to_dict()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the background thread (tests, shutdown). True when no run is active afterwards."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return self._active is None

    def shutdown(self, timeout: float = 30.0) -> None:
        """Cancel the active run and wait a little for it (the host is reloading its scripts)."""
        if self.cancel():
            self.wait(timeout)


def _guard(target: Callable[[], Any], job: Job, manager: JobManager) -> Callable[[], None]:
    """A failure in the host's wrapper itself (e.g. its lock) must still end up in the status."""

    def guarded() -> None:
        try:
            target()
        except Exception as exc:  # noqa: BLE001
            log.exception("Dreambooth background job failed outside the run")
            if job.status.active:
                job.status.state, job.status.error = FAILED, error_message(exc)
                job.status.finished_at = time.time()
            manager._release(job)

    return guarded
