"""A training run: an object that loads the base model from its host, prepares data, trains, saves and
reports progress. Nothing about a run lives at module level, so two runs can exist in one process."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import Config, fill_prompt, to_dict, validate
from ..data.checks import check_dataset
from ..data.class_images import generate_class_images, plan_class_images
from ..data.dataset import BatchPlan, Example, collect_class_examples, collect_examples, tag_frequency
from ..errors import DreamboothError
from ..hosts.base import Host
from ..models.bundle import BaseFacts, ModelBundle
from ..models.export import (
    remove_partial_files,
)
from .autocast import autocast
from .batches import (
    Feeder,
    LatentCache,
    Samples,
    TextConditioning,
    derive_seed,
    generator_for,
    seeded_global_generators,
)
from .devices import (
    Precision,
    device_name,
    memory_in_use,
    release_memory,
    require_8bit_adam,
    require_compile,
    resolve_device,
    resolve_precision,
)
from .ema import EMA
from .guard import SaveFailed, check_where_it_writes, check_writable, output_error, project_lock, write_errors
from .loss import dreambooth_loss, min_snr_weights, per_sample_mse, training_target
from .monitor import CLASS_PICTURES, COPYING, FIT_PICTURES, Monitor, is_point, monitor_pictures
from .optim import group_options, param_groups
from .parallel import SingleProcess, check_parallel
from .resuming import (
    STATE_FOLDER,
    check_no_earlier_results,
    check_run_choice,
    check_same_base,
    earlier_results,
    forget_state,
    remove_partial_state,
    saved_state_meta,
)
from .sampling import generate_images, placed
from .state import (
    TrainingState,
    load_state,
    restore_weights,
    save_state,
    trainable_weights,
)
from .stepper import make_stepper
from .trained import Saving, result_folders, trained_kind
from .zero import check_zero, check_zero_resume, zero_launch

log = logging.getLogger(__name__)

# Each read of the loss waits for the device to finish its queue, so it is read every few steps: at most every 10,
# a tenth of a short run, and whenever LOSS_READ_SECONDS have passed (about as often as the page asks for progress).
LOSS_READ_EVERY = 10
LOSS_READ_SECONDS = 1.0


def clock(seconds: float) -> str:
    """A duration as m:ss, or h:mm:ss from an hour on."""
    hours, rest = divmod(int(seconds), 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


@dataclass
class Progress:
    """What a run reports: the phase, and during training the step, loss, learning rate, speed and ETA."""

    phase: str  # during "training" the step counts; during "class_images" and "caching" done and total do
    step: int = 0
    total_steps: int = 0
    loss: float | None = None
    lr: float | None = None
    it_per_s: float | None = None  # steps (or class images) per second
    eta_s: float | None = None
    memory_gib: float | None = None  # memory in use: the GPU's (memory_kind "GPU") or the process's ("RAM")
    memory_kind: str = ""
    message: str = ""
    done: int = 0
    total: int = 0
    samples: tuple[Path, ...] = ()
    checkpoint: Path | None = None
    lora: Path | None = None
    warnings: tuple[str, ...] = ()  # each reported once: the dataset check's findings, a resume's changed options
    # The smoothed loss at each step whose loss was read since the last report (read every LOSS_READ_EVERY steps)
    losses: tuple[tuple[int, float], ...] = ()
    # The learning monitor's series, verdict and best step (train/monitor.py), with each of its points
    monitor: dict | None = None

    LINE_PREFIX = "dreambooth-progress "  # marks progress lines among whatever else reaches a child's stdout

    def to_line(self) -> str:
        """The progress line a run in another process prints (`--progress-json`): the prefix, then JSON."""
        data = dataclasses.asdict(self)
        data["samples"] = [str(p) for p in self.samples]
        for key in ("checkpoint", "lora"):
            data[key] = str(data[key]) if data[key] is not None else None
        return self.LINE_PREFIX + json.dumps(data)

    @classmethod
    def from_line(cls, line: str) -> Progress | None:
        """The progress of a line from `to_line`; None for any other line."""
        if not line.startswith(cls.LINE_PREFIX):
            return None
        data = json.loads(line[len(cls.LINE_PREFIX):])
        known = {f.name for f in dataclasses.fields(cls)}
        data = {k: v for k, v in data.items() if k in known}
        data["samples"] = tuple(Path(p) for p in data.get("samples", ()))
        data["warnings"] = tuple(data.get("warnings", ()))
        data["losses"] = tuple((int(step), float(loss)) for step, loss in data.get("losses", ()))
        for key in ("checkpoint", "lora"):
            data[key] = Path(data[key]) if data.get(key) else None
        return cls(**data)


def cancelled_message(step: int, resumed: bool) -> str:
    """What a cancelled run says of what is left to resume."""
    if step:
        return f"Cancelled at step {step}; Resume continues from there"
    if resumed:
        return "Cancelled before its first step; Resume continues from the saved state"
    return "Cancelled before the first step: nothing was saved, so Start begins again"


@dataclass
class RunResult:
    status: str  # "finished" or "cancelled"
    step: int
    total_steps: int
    checkpoints: list[Path] = field(default_factory=list)
    loras: list[Path] = field(default_factory=list)
    samples: list[Path] = field(default_factory=list)
    losses: list[tuple[int, float]] = field(default_factory=list)


class RunControl:
    """What every kind of run shares: `cancel()` from any thread, and progress reported to the host and to the
    caller, after which a stop the host asked for is honoured (the one path for both)."""

    def __init__(self, host: Host, on_progress: Callable[[Progress], None] | None):
        self.host = host
        self.on_progress = on_progress
        self._cancel = threading.Event()

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def _emit(self, progress: Progress) -> None:
        self.host.report(progress)
        if self.on_progress:
            self.on_progress(progress)
        if not self.cancelled and self.host.cancel_requested():
            log.info("Stop requested by the host: the run stops after this step and keeps its state")
            self.cancel()


class TrainingRun(RunControl):
    """Create with a config and a host, call `run()`; `cancel()` from any thread stops it within one step."""

    def __init__(self, config: Config, host: Host, *, resume: bool = False,
                 on_progress: Callable[[Progress], None] | None = None, processes: SingleProcess | None = None):
        super().__init__(host, on_progress)
        self.config = config
        self.resume = resume
        self.processes = processes or SingleProcess()  # several: this is one of them (see parallel.py)
        self.result: RunResult | None = None

    def _emit(self, progress: Progress) -> None:
        """Reported by the main process only: the others follow its stops."""
        if self.processes.is_main:
            super()._emit(progress)

    # -- the run ----------------------------------------------------------------------------------------

    def run(self) -> RunResult:
        """Check everything that can be checked cheaply, take the project's lock, then load and train."""
        config = settled_config(validate(self.config), self.host)
        # Bad image folders fail here, before any model loads; the held-out photos are not trained on.
        instances, held_out = collect_examples(config)
        self._check_dataset(config, instances, held_out)
        check_where_it_writes(config, self.host, len(instances))  # before the lock makes its folder
        check_parallel(config, self.processes)
        if zero_launch() is not None:
            check_zero(config, self.processes)
        device = self.processes.device or resolve_device(config.device)
        precision = resolve_precision(config.mixed_precision, device, deepspeed=zero_launch() is not None)
        if config.fused_backward and precision.use_grad_scaler:
            raise DreamboothError(f"fused_backward cannot run with fp16 loss scaling (mixed_precision "
                                  f"{config.mixed_precision} is fp16 on {device}): set mixed_precision to bf16")
        if config.optimizer == "adamw_8bit":
            require_8bit_adam(device)
        if config.compile_unet:
            require_compile()
        work_dir = self.host.work_dir(config.project_name)
        main = self.processes.is_main
        if main:
            self._check_outputs(config, work_dir, instances)  # before the lock, a file in the work folder
        with project_lock(work_dir, config.project_name) if main else contextlib.nullcontext():
            if main:
                check_run_choice(config.project_name, work_dir, resume=self.resume)
                if not self.resume:
                    check_no_earlier_results(config.project_name, result_folders(self.host, config))
                self._remove_leftovers(config, work_dir)
            self.processes.wait_for_all()
            state = load_state(work_dir / STATE_FOLDER) if self.resume else None
            if state is not None:
                check_zero_resume(state.optimizer, self.processes)
            return self._train(config, (instances, held_out), device, precision, work_dir, state)

    def _train(self, config: Config, examples: tuple[list[Example], list[Example]], device: torch.device,
               precision: Precision, work_dir: Path, state: TrainingState | None) -> RunResult:
        self._emit(Progress("loading", message="Loading the base model"))
        # "auto" trains where the host's model is; a device the user picked may be another one.
        self.host.release_device(None if device_name(config.device) == "auto" else device)
        try:
            return self._train_loaded(config, examples, device, precision, work_dir, state)
        except BaseException as exc:
            traceback.clear_frames(exc.__traceback__)  # its frames let go of the run's model before it is freed
            raise
        finally:
            release_memory(device)  # before the host's model comes back to the device
            self.host.restore_device()

    def _train_loaded(self, config: Config, examples: tuple[list[Example], list[Example]], device: torch.device,
                      precision: Precision, work_dir: Path, state: TrainingState | None) -> RunResult:
        """Load the base model, make the class images, train. Everything it loads is unreachable when it returns."""
        instances, held_out = examples
        bundle = self.host.load_base(config)
        warnings = tuple(w for w in (*bundle.notes, resolution_warning(config, bundle)) if w)
        for warning in warnings:
            log.warning(warning)
        if warnings:
            self._emit(Progress("loading", message="Loaded the base model", warnings=warnings))
        class_dirs = self._class_images(config, bundle, work_dir, device, precision, instances)
        if self.processes.any(self.cancelled):  # also where the others wait for the main process's images
            self.result = RunResult("cancelled", 0, 0)
            return self.result
        classes = (collect_class_examples(config, class_dirs, trained_concepts(instances))
                   if config.prior_preservation else [])
        _check_class_images(config, classes)
        loop = _Loop(self, config, bundle, instances, classes, device, precision, work_dir, held_out)
        self.result = loop.train(state)
        return self.result

    def _check_dataset(self, config: Config, instances: list[Example], held_out: list[Example]) -> None:
        report = check_dataset(config, instances, held_out=held_out)
        report.raise_errors()
        for warning in report.warnings:
            log.warning("Dataset check: %s", warning)
        message = (f"Dataset check: {len(report.warnings)} warning(s)" if report.warnings
                   else "Dataset check: no problems found")
        self._emit(Progress("checking", message=message, warnings=tuple(report.warnings)))

    def _check_outputs(self, config: Config, work_dir: Path, instances: list[Example]) -> None:
        """Every folder the run will write to, tried now rather than after the model has loaded; every one that
        cannot be written is named in one message."""
        checks = [(work_dir, "training state", "Give a work folder you can write to (--work-dir on the command "
                   "line, --dreambooth-dir in the WebUI).")]
        checks += [(folder, what, "Give a models folder you can write to (--models-dir; in the WebUI --ckpt-dir, "
                    "--lora-dir).") for folder, what in trained_kind(config).folders(self.host, config)]
        checks += [(job.folder, "generated class images", f"class_dir of concept {job.concept + 1} must be a "
                    "folder you can write to (or already hold num_class_images images).")
                   for job in plan_class_images(config, work_dir, trained_concepts(instances))[1] if job.missing]
        problems = []
        for folder, what, fix in checks:
            try:
                check_writable(folder, what, fix)
            except DreamboothError as exc:
                problems.append(str(exc))
        if problems:
            raise DreamboothError(" ".join(problems))

    def _remove_leftovers(self, config: Config, work_dir: Path) -> None:
        """What a killed save of this project left half-written: hidden model files and a partial state."""
        for folder in result_folders(self.host, config):
            remove_partial_files(folder, f"{config.project_name}_")
        remove_partial_state(work_dir / STATE_FOLDER)

    def _class_images(self, config: Config, bundle: ModelBundle, work_dir: Path, device: torch.device,
                      precision: Precision, instances: list[Example]) -> list[Path]:
        folders, jobs = plan_class_images(config, work_dir, trained_concepts(instances))
        missing = sum(job.missing for job in jobs)
        if not missing or not self.processes.is_main:
            return folders
        self._emit(Progress("class_images", total=missing, message=f"Generating {missing} class images"))
        size = config.resolution

        def render(prompt: str, n: int):
            seed = derive_seed(config.seed, "class image", prompt, n)
            return generate_images(bundle, [prompt], steps=config.class_image_steps,
                                   guidance=config.class_image_guidance, seed=seed, width=size, height=size,
                                   autocast_dtype=precision.autocast_dtype)[0]

        started = time.perf_counter()

        def on_image(done: int, total: int) -> None:
            rate = done / max(time.perf_counter() - started, 1e-9)
            eta = (total - done) / rate
            self._emit(Progress("class_images", done=done, total=total, it_per_s=rate, eta_s=eta,
                                message=f"Generated class image {done}/{total}, {rate:.2f} images/s, "
                                        f"ETA {clock(eta)}"))

        # The UNet renders in its own dtype (its trained weights are fp32 from the start); the text encoders as
        # they encode the captions for training.
        vae_dtype = precision.vae_dtype(bundle.family.vae_fp16_safe)
        with placed([bundle.unet], device), placed(list(bundle.text_encoders), device, precision.frozen_dtype), \
                placed([bundle.vae], device, vae_dtype):
            generate_class_images(jobs, render, on_image=on_image, should_stop=lambda: self.cancelled)
        return folders


def _every(n: int, step: int) -> bool:
    """Whether an every-N-steps option (0: never) acts at `step`."""
    return bool(n) and step % n == 0


def trained_concepts(instances: list[Example]) -> set[int]:
    """The concepts that have training images (one whose folder has none is not trained)."""
    return {example.concept for example in instances}


def settled_config(config: Config, host: Host) -> Config:
    """The config a run trains with: checked by its host, resolution 0 replaced by the base model's own size."""
    return _with_resolution(config, host.check(config))


def _with_resolution(config: Config, facts: BaseFacts | None) -> Config:
    """resolution 0 is the base model's own size, known from its header (512 when it cannot be known before the
    model loads: a pickled .ckpt)."""
    if config.resolution:
        return config
    size = facts.native_resolution if facts else 512
    if facts is None:
        why = "the size of SD 1.x models (a .ckpt's family is known only once it loads; set resolution otherwise)"
    elif facts.declared_resolution:
        why = "the size the checkpoint declares (modelspec.resolution)"
    else:
        why = f"the size {facts.family.title} models are made for"
    log.info("Resolution: %dpx, %s", size, why)
    return dataclasses.replace(config, resolution=size)


def resolution_warning(config: Config, bundle: ModelBundle) -> str | None:
    """What to tell a user who trains at another size than the model's own (None when it is the same)."""
    if config.resolution == bundle.native_resolution:
        return None
    return (f"Training at {config.resolution}px a model made for {bundle.native_resolution}px ({bundle.family}, "
            f"{bundle.prediction_type}). That works, but {bundle.native_resolution}px usually gives better results.")


def sample_prompts(config: Config) -> list[str]:
    """Each line of sample_prompts for each concept (lines without {token}/{class} once)."""
    prompts: list[str] = []
    for line in config.sample_prompts.splitlines():
        for concept in config.concepts if line.strip() else ():
            prompt = fill_prompt(line, concept)
            if prompt not in prompts:
                prompts.append(prompt)
    return prompts


def _check_resumable(config: Config, state: TrainingState) -> None:
    """What a saved state cannot follow: a different set of trained modules."""
    saved = state.meta.get("config", {})
    structure = ("train_mode",) + (("lora_rank", "lora_conv_rank") if config.train_mode == "lora" else ())
    for name in structure:
        was = saved.get(name, "full" if name == "train_mode" else None)
        if was is not None and was != getattr(config, name):
            raise DreamboothError(f"The saved training state was made with {name} = {was}; a resumed run must keep "
                                  f"it (the saved weights and optimizer state have that shape). Set {name} back to "
                                  f"{was}, or start again without resume.")
    if saved.get("train_text_encoder", config.train_text_encoder) != config.train_text_encoder:
        was = "on" if saved["train_text_encoder"] else "off"
        raise DreamboothError(f"The saved training state was made with train_text_encoder {was}; a resumed run must "
                              f"keep it {was} (the optimizer state covers exactly the modules that were trained). "
                              "Set it back, or start again without resume.")


def _changed_options(saved: dict, now: dict) -> str:
    """'name: old -> new' for each option that differs between a stopped run's config and the resumed one's."""
    changes = [f"{name}: {saved[name]!r} -> {value!r}" for name, value in now.items()
               if name in saved and saved[name] != value and name != "concepts"]
    if "concepts" in saved and saved["concepts"] != now.get("concepts"):
        changes.append("concepts (the folders, prompts or class images)")
    return "; ".join(changes)


def _check_class_images(config: Config, classes: list[Example]) -> None:
    wanted = [c for c in config.concepts if config.prior_preservation and not c.token_only and c.num_class_images]
    if wanted and not classes:
        raise DreamboothError("prior_preservation is on but no class images could be read. Check class_dir, or "
                              "turn prior_preservation off.")


class _Loop:
    """The training loop proper, for one run (split from TrainingRun to keep each piece short)."""

    def __init__(self, run: TrainingRun, config: Config, bundle: ModelBundle, instances: list[Example],
                 classes: list[Example], device: torch.device, precision: Precision, work_dir: Path,
                 held_out: list[Example] | None = None):
        self.run, self.config, self.bundle = run, config, bundle
        self.held_out = held_out or []  # photos of the subject never trained on: the monitor's held-out gap
        self.processes = run.processes
        self.device, self.precision, self.work_dir = device, precision, work_dir
        self.vae_dtype = precision.vae_dtype(bundle.family.vae_fp16_safe)
        self.instances, self.classes = instances, classes
        self.instance_plan = BatchPlan([e.size for e in instances], config.train_batch_size,
                                       derive_seed(config.seed, "instance order"))
        self.class_plan = (BatchPlan([e.size for e in classes], config.train_batch_size,
                                     derive_seed(config.seed, "class order")) if classes else None)
        self.total_steps = self._total_steps()
        self.result = RunResult("finished", 0, self.total_steps)
        self.fresh_losses: list[tuple[int, float]] = []  # read since the last report
        self.kind = trained_kind(config)
        self.started_at = time.time()

    def _total_steps(self) -> int:
        if self.config.max_train_steps:
            return self.config.max_train_steps
        micro = self.config.num_train_epochs * self.instance_plan.steps_per_epoch
        return max(1, math.ceil(micro / self.config.gradient_accumulation_steps))

    # -- setup ------------------------------------------------------------------------------------------

    def _setup_modules(self) -> None:
        self.trained = self.kind.prepare(self.bundle, self.config, self.device, self.precision)

    def _setup_data(self) -> None:
        config, bundle, device, dtype = self.config, self.bundle, self.device, self.precision.frozen_dtype
        captions = [e.caption for e in self.instances + self.classes]
        if not config.train_text_encoder and config.precompute_text_embeddings:
            self.run._emit(Progress("caching", message=f"Encoding {len(set(captions))} captions"))
            with placed(list(bundle.text_encoders), device, dtype):
                self.text = TextConditioning.precompute(bundle, captions)
        else:
            if not config.train_text_encoder:
                for text_encoder in bundle.text_encoders:
                    text_encoder.to(device, dtype)
            self.text = TextConditioning(bundle)
        cache = None
        if config.cache_latents and config.crop == "random":
            log.info("Not caching latents: crop = random needs a new crop every step.")
        elif config.cache_latents:
            cache = self._cache_latents()
        else:
            bundle.vae.to(device, self.vae_dtype)
        common = {"seed": config.seed, "flip_p": config.flip_p, "crop": config.crop, "cache": cache}
        self.instance_feed = Feeder(bundle.vae, self.instances, is_class=False, **common)
        self.class_feed = Feeder(bundle.vae, self.classes, is_class=True, **common) if self.classes else None

    def _cache_latents(self) -> LatentCache:
        cache = LatentCache()
        total = len(self.instances) + len(self.classes)
        done = 0

        def tick() -> None:
            nonlocal done
            done += 1
            self.run._emit(Progress("caching", done=done, total=total, message=f"Caching latents {done}/{total}"))

        with placed([self.bundle.vae], self.device, self.vae_dtype):
            for examples, is_class in ((self.instances, False), (self.classes, True)):
                cache.fill(self.bundle.vae, examples, is_class=is_class, flip_p=self.config.flip_p,
                           crop=self.config.crop, on_item=tick)
        return cache

    def _setup_optimization(self, state: TrainingState | None) -> int:
        config = self.config
        text_encoders = self.bundle.text_encoders if config.train_text_encoder else ()
        groups = param_groups(config, self.bundle.unet, text_encoders)
        self.stepper = make_stepper(config, groups, self.trained, self.device, self.precision, self.total_steps,
                                    self.processes)
        self.ema = None
        if config.ema:
            self.ema = EMA(self.bundle.unet, config.ema_decay, "cpu" if config.ema_on_cpu else self.device)
        if state is None:
            return 0
        _check_resumable(config, state)
        if self.processes.is_main:  # the file's hash: once
            source = self.bundle.source
            check_same_base(config.project_name, state.meta.get("base"), source.name, source.sha256)
        restore_weights(self.trained, state.weights)
        changed = self.stepper.load_state_dict(state.optimizer, state.lr_scheduler, state.scaler)
        if changed:
            log.info("Resuming with changed options (used from here on): %s", "; ".join(changed))
        changed_options = _changed_options(state.meta.get("config", {}), json.loads(json.dumps(to_dict(config))))
        if changed_options:
            self.run._emit(Progress("loading", message=f"Resuming at step {state.step}", warnings=(
                "Resumed with options changed since the run stopped (used from here on): " + changed_options,)))
        if self.ema is not None:
            if state.ema is None:
                raise DreamboothError("ema is on but the saved training state has no EMA weights; turn ema off "
                                      "to resume this run, or start again without resume.")
            self.ema.load_state_dict(state.ema)
            self.ema.updates = state.step  # one update per optimizer step: the warm-up continues where it was
        log.info("Resuming %s at step %d of %d", config.project_name, state.step, self.total_steps)
        return state.step

    # -- training ---------------------------------------------------------------------------------------

    def train(self, state: TrainingState | None) -> RunResult:
        self._setup_modules()
        self._setup_data()
        stepper = None
        try:
            if self.processes.any(self.run.cancelled):  # cancelled while it cached: no base to measure first
                return self._cancel(state.step if state is not None else 0, trained=False)
            self.monitor = self._start_monitor(state)  # the base's predictions: before trained weights load
            step = self._setup_optimization(state)
            stepper = self.stepper
            return self._train_from(step)
        finally:
            if stepper is not None:
                stepper.close()
            for feed in (self.instance_feed, self.class_feed):
                if feed is not None:
                    feed.close()

    def _train_from(self, step: int) -> RunResult:
        started, start_step, self.smoothed, self.fresh_losses = time.perf_counter(), step, None, []
        read_every = max(1, min(LOSS_READ_EVERY, self.total_steps // 10))
        self.losses_read_at = started
        pending: list[tuple[int, torch.Tensor]] = []
        te_stop = (math.ceil(self.config.stop_text_encoder * self.total_steps)
                   if self.config.train_text_encoder else 0)
        while step < self.total_steps:
            if self.processes.any(self.run.cancelled):
                self._read_losses(pending)
                return self._cancel(step)
            train_text = step < te_stop
            for text_encoder in self.bundle.text_encoders if not train_text else ():
                if text_encoder.training:  # its training stopped: no dropout, no checkpointed frozen pass
                    text_encoder.eval()
            pending.append((step + 1, self._optimizer_step(step, train_text=train_text)))
            step += 1
            if step == start_step + 1 or step % read_every == 0 or step == self.total_steps or self._loss_is_stale():
                self._read_losses(pending)
            self._report(step, self.smoothed, started, start_step)
            if step < self.total_steps:
                self._periodic(step)
                if self._copying(step):
                    break
        return self._finish(step)

    def _finish(self, step: int) -> RunResult:
        """The end of a run: at its last step, or earlier where stop_when_memorizing stopped it (then what the
        step's periodic work already did, its samples, monitor point and save, is not done again)."""
        config, stopped = self.config, step < self.total_steps
        self.result.step = step
        self._whole_ema()
        if self.processes.is_main:
            if not (stopped and _every(config.sample_every_n_steps, step)):
                self._sample(step)
            if not stopped:
                self._monitor_point(step)
        if not (stopped and _every(config.save_every_n_steps, step)):
            self._save_result(step)
        if self.processes.is_main:
            forget_state(self.work_dir / STATE_FOLDER)  # finished: the state is no longer needed
        message = "Training finished"
        if stopped and self.monitor is not None:
            message = (f"Stopped: the monitor found the renders copying the training photos at step {step}; the "
                       f"best saved step is {self.monitor.best_step}")
            log.warning("%s (stop_when_memorizing).", message)
        self.run._emit(Progress("finished", step=step, total_steps=self.total_steps,
                                checkpoint=self.result.checkpoints[-1] if self.result.checkpoints else None,
                                lora=self.result.loras[-1] if self.result.loras else None,
                                message=message))
        return self.result

    def _copying(self, step: int) -> bool:
        """stop_when_memorizing: whether the monitor's point at `step` called the renders copies of the photos
        (every process asks, at the same steps; the main one, which measures, answers for all)."""
        if not self.config.stop_when_memorizing or not is_point(self.config, step, self.total_steps):
            return False
        last = self.monitor.points[-1] if self.monitor is not None and self.monitor.points else None
        return self.processes.any(last is not None and last["step"] == step and last["verdict"] == COPYING)

    def _loss_is_stale(self) -> bool:
        """Whether the last read loss is LOSS_READ_SECONDS old (one process only: several must all read together,
        and their clocks differ)."""
        return self.processes.count == 1 and time.perf_counter() - self.losses_read_at >= LOSS_READ_SECONDS

    def _read_losses(self, pending: list[tuple[int, torch.Tensor]]) -> None:
        """Bring the steps' losses to the host (one wait for the device for all of them) and record them."""
        self.losses_read_at = time.perf_counter()
        if not pending:
            return
        values = self.processes.mean(torch.stack([loss for _, loss in pending]).float()).cpu().tolist()
        for (step, _), value in zip(pending, values, strict=True):
            self.smoothed = value if self.smoothed is None else 0.9 * self.smoothed + 0.1 * value
            self.result.losses.append((step, value))
            self.fresh_losses.append((step, self.smoothed))
        pending.clear()

    def _optimizer_step(self, step: int, *, train_text: bool) -> torch.Tensor:
        """One optimizer step; its loss stays on the device (reading it would wait for the device every step)."""
        accumulation = self.config.gradient_accumulation_steps
        total = torch.zeros((), device=self.device)
        for k in range(accumulation):
            micro = step * accumulation + k
            with seeded_global_generators(self.device, self.config.seed, "forward", micro, self.processes.index):
                loss = self._micro_batch_loss(micro, train_text=train_text)
            if loss is None:
                continue  # this process has no sample in this micro-batch (several processes, a short batch)
            loss = loss / accumulation
            self.stepper.backward(loss, last=k == accumulation - 1, every_process=self._every_process_has(micro))
            total = total + loss.detach()
        self.stepper.step()
        if self.ema is not None:
            self.ema.update(self.bundle.unet, self.stepper.fp32_parts())
        return total

    def _micro_batch_loss(self, micro: int, *, train_text: bool) -> torch.Tensor | None:
        """This process's instance and class samples of one micro-batch (all of them with one process); one
        UNet pass when their sizes match. None when the process has no sample in it."""
        groups, counts = self._my_samples(micro)
        if not groups:
            return None
        per_sample, kinds = [], []
        shapes_match = len(groups) == 2 and groups[0][0].latents.shape[1:] == groups[1][0].latents.shape[1:]
        for members in ([groups] if shapes_match else [[g] for g in groups]):
            samples = Samples(torch.cat([g.latents for g, _ in members]),
                              [c for g, _ in members for c in g.captions], [f for g, _ in members for f in g.fits])
            places = [place for _, group_places in members for place in group_places]
            per_sample.append(self._denoising_error(samples, places, micro, train_text=train_text))
            kinds.extend(kind for kind, _ in places)
        loss = dreambooth_loss(torch.cat(per_sample), torch.tensor(kinds, device=self.device),
                               self.config.prior_loss_weight, counts=counts)
        return loss * self.processes.count  # the processes' gradients are averaged: this makes them add up

    def _my_samples(self, micro: int) -> tuple[list[tuple[Samples, list[tuple[bool, int]]]], tuple[int, int]]:
        """This process's share of the micro-batch: per kind (instance, class), its samples and each one's (kind,
        position in the whole batch); and how many instance and class samples the whole batch has. The next
        micro-batch's pictures are read meanwhile (without a latent cache)."""
        picks, counts = self._my_picks(micro)
        if self.instance_feed.cache is None:  # pictures are read every step: read the next step's now
            for kind, picked in self._my_picks(micro + 1)[0].items():
                self._feed(kind).prefetch([index for _, index in picked], micro + 1)
        groups = []
        for kind, picked in picks.items():
            positions = [position for position, _ in picked]
            samples = self._feed(kind).latents([index for _, index in picked], positions, micro, self.device)
            groups.append((samples, [(kind, position) for position in positions]))
        return groups, counts

    def _every_process_has(self, micro: int) -> bool:
        """Whether every process has samples in this micro-batch (each has a contiguous share of it)."""
        return sum(self._my_picks(micro)[1]) >= self.processes.count

    def _my_picks(self, micro: int) -> tuple[dict[bool, list[tuple[int, int]]], tuple[int, int]]:
        """Per kind (False: instance, True: class), this process's (position, example index) pairs of the
        micro-batch; and how many instance and class samples the whole micro-batch has."""
        batches = {False: self.instance_plan.batch(micro)}
        if self.class_feed is not None and self.config.prior_preservation:
            batches[True] = self.class_plan.batch(micro)
        mine = self.processes.share([(kind, position, index) for kind, batch in batches.items()
                                     for position, index in enumerate(batch)])
        picks: dict[bool, list[tuple[int, int]]] = {}
        for kind, position, index in mine:
            picks.setdefault(kind, []).append((position, index))
        return picks, (len(batches[False]), len(batches.get(True, ())))

    def _feed(self, is_class: bool) -> Feeder:
        return self.class_feed if is_class else self.instance_feed

    def _noise(self, shape: torch.Size, places: list[tuple[bool, int]],
               micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise and timestep of each sample, drawn per (step, kind, position in the whole batch): adding class
        samples to a batch leaves the instance samples' randomness unchanged, and so does splitting the batch
        between processes."""
        noises, timesteps = [], []
        for is_class, position in places:
            generator = generator_for(self.config.seed, "noise", micro, is_class, position)
            noise = torch.randn(shape[1:], generator=generator)
            if self.config.noise_offset:
                noise += self.config.noise_offset * torch.randn((shape[1], 1, 1), generator=generator)
            noises.append(noise)
            timesteps.append(torch.randint(0, self.bundle.noise_scheduler.config.num_train_timesteps, (1,),
                                           generator=generator))
        return torch.stack(noises).to(self.device), torch.cat(timesteps).to(self.device)

    def _denoising_error(self, samples: Samples, places: list[tuple[bool, int]], micro: int, *,
                         train_text: bool) -> torch.Tensor:
        scheduler, latents = self.bundle.noise_scheduler, samples.latents
        noise, timesteps = self._noise(latents.shape, places, micro)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        sizes = self.bundle.family.size_conditioning(samples.fits)
        with self._autocast():
            conditioning = self.text.encode(samples.captions, self.device, grad=train_text)
            conditioning = conditioning.with_added(sizes and {k: v.to(self.device) for k, v in sizes.items()})
            prediction = self.bundle.unet(noisy, timesteps, **conditioning.unet_kwargs()).sample
        error = per_sample_mse(prediction, training_target(scheduler, latents, noise, timesteps))
        if self.config.min_snr_gamma:
            error = error * min_snr_weights(scheduler, timesteps, self.config.min_snr_gamma)
        return error

    def _autocast(self):
        # A compiled UNet's graph decides itself what it keeps for the backward pass.
        return autocast(self.device.type, self.precision.autocast_dtype, recast=not self.config.compile_unet)

    # -- reporting, saving, sampling --------------------------------------------------------------------

    def _report(self, step: int, loss: float, started: float, start_step: int) -> None:
        elapsed = time.perf_counter() - started
        rate = (step - start_step) / elapsed if elapsed > 0 else None
        eta = (self.total_steps - step) / rate if rate else None
        lr = self.stepper.learning_rate
        memory, where = memory_in_use(self.device)
        fresh, self.fresh_losses = tuple(self.fresh_losses), []
        self.run._emit(Progress("training", step=step, total_steps=self.total_steps, loss=loss, lr=lr,
                                it_per_s=rate, eta_s=eta, memory_gib=memory, memory_kind=where, losses=fresh))

    def _periodic(self, step: int) -> None:
        """Samples and saves, by the main process (the others go on to the next step, and wait there for it)."""
        config = self.config
        main = self.processes.is_main
        sample = config.sample_every_n_steps and step % config.sample_every_n_steps == 0
        save = config.save_every_n_steps and step % config.save_every_n_steps == 0
        point = self.monitor is not None and is_point(config, step, self.total_steps)
        if sample or save or is_point(config, step, self.total_steps):
            self._whole_ema()
        if main and sample:
            self._sample(step)
        if main and point:
            self._monitor_point(step)
        if save:
            self._save_result(step)
            self._save_state(step)

    def _save_result(self, step: int) -> None:
        """Every process (DeepSpeed gathers its fp32 weights from all of them); the main one writes. A write that
        fails (a full disk) keeps the steps resumable where it can, and says how to go on."""
        with self.stepper.exact_weights():
            if self.processes.is_main:
                try:
                    self._save_model(step)
                except SaveFailed as failed:
                    raise failed.then(self._keep_state_instead(step)) from failed

    def _keep_state_instead(self, step: int) -> str:
        """After the result of `step` failed to save: its training state saved instead (with one process; under
        several, each holds a part of it and they are elsewhere now), so Resume saves the result without training
        again. Returns what the user can do next."""
        if self.processes.count == 1:
            try:
                self._write_state(step)
                return (f"The training state at step {step} is saved in {self.work_dir / STATE_FOLDER}: free some "
                        f"disk space and Resume, which saves the model without training again.")
            except SaveFailed:
                pass
        return self._what_is_kept()

    def _what_is_kept(self) -> str:
        """What the user can do after a failed save, from what is on disk (Resume and Start say the same)."""
        meta = saved_state_meta(self.work_dir / STATE_FOLDER)
        if meta:
            return (f"The training state saved at step {meta.get('step')} is kept: free some disk space and Resume, "
                    f"which continues from step {meta.get('step')}.")
        lost = "No training state could be saved, so these steps cannot be resumed."
        results = earlier_results(self.config.project_name, result_folders(self.run.host, self.config))
        if results:
            return (f"{lost} Free some disk space, then start again under another project name: this one has the "
                    f"results saved so far ({', '.join(p.name for p in results[:3])}, in {results[0].parent}), "
                    "which a new run would write over, so Start refuses it until they are moved elsewhere.")
        return f"{lost} Free some disk space and Start the run again."

    def _whole_ema(self) -> None:
        """Every process: the EMA made whole where each process averaged only its part of DeepSpeed's weights."""
        parts = self.stepper.fp32_parts()
        if self.ema is not None and parts is not None and self.processes.count > 1:
            self.ema.made_whole(self.bundle.unet, parts, self.processes.device or self.device)

    def _cancel(self, step: int, *, trained: bool = True) -> RunResult:
        """Stop at `step`, saving the state to resume from where this run trained (not where it stopped before its
        first step: a resumed run's saved state is kept as it was)."""
        if trained and step > 0:
            self._whole_ema()
            self._save_state(step)
        self.result.status, self.result.step = "cancelled", step
        fresh, self.fresh_losses = tuple(self.fresh_losses), []
        self.run._emit(Progress("cancelled", step=step, total_steps=self.total_steps, losses=fresh,
                                message=cancelled_message(step, self.run.resume)))
        return self.result

    def _base_record(self) -> dict:
        """The model this run trains, as a resume checks it: its name, and its hash once known (a cancel soon after
        the start does not wait for the file's hash)."""
        source = self.bundle.source
        return {"name": source.name, "sha256": source.known_sha256}

    def _save_state(self, step: int) -> None:
        """Called by every process (under DeepSpeed each holds a part of the optimizer); the main one writes."""
        try:
            self._write_state(step)
        except SaveFailed as failed:
            raise failed.then(self._what_is_kept()) from failed

    def _write_state(self, step: int) -> None:
        optimizer, lr_scheduler, scaler = self.stepper.state_dict()
        if not self.processes.is_main:
            return
        self.run._emit(Progress("saving", step=step, total_steps=self.total_steps, message="Saving training state"))
        state = TrainingState(
            step=step, weights=trainable_weights(self.trained),
            ema={k: v.cpu() for k, v in self.ema.state_dict().items()} if self.ema else None,
            optimizer=optimizer, lr_scheduler=lr_scheduler, scaler=scaler,
            meta={"project": self.config.project_name, "total_steps": self.total_steps,
                  "config": to_dict(self.config), "base": self._base_record()})
        folder = self.work_dir / STATE_FOLDER
        try:
            save_state(folder, state)
        except write_errors() as exc:
            raise output_error(exc, f"the training state at step {step}", folder) from exc

    def _save_model(self, step: int) -> None:
        config, bundle = self.config, self.bundle
        self.run._emit(Progress("saving", step=step, total_steps=self.total_steps, message="Saving the result"))
        concept = config.concepts[0]
        concepts = [{"token": c.token, "class_word": c.class_word, "instance_prompt": fill_prompt(c.instance_prompt, c),
                     "class_prompt": fill_prompt(c.class_prompt, c)} for c in config.concepts]
        extra = {"dreambooth.token": concept.token, "dreambooth.class_word": concept.class_word,
                 "dreambooth.concepts": json.dumps(concepts),
                 "dreambooth.learning_rate": str(getattr(config, group_options(config)["unet"]["lr"])),
                 "dreambooth.resolution": str(config.resolution), "dreambooth.ema": str(bool(self.ema)),
                 "dreambooth.train_mode": config.train_mode}
        if self.monitor is not None:
            self.monitor.mark_saved(step)
            extra.update(self.monitor.metadata())
        saving = Saving(step=step, config_json=json.dumps(to_dict(config)), extra=extra,
                        unet_state=self.ema.weights_for_export(bundle.unet) if self.ema else None,
                        num_images=len(self.instances), tag_frequency=tag_frequency(self.instances),
                        started_at=self.started_at, cover=self.result.samples[-1] if self.result.samples else None)
        saved = self.kind.save(bundle, config, self.run.host, saving)
        self.result.checkpoints.extend(saved.checkpoints)
        self.result.loras.extend(saved.loras)
        monitor = self.monitor.summary() if self.monitor is not None else None  # this step now among the saved
        for path in saved.checkpoints:
            self.run._emit(Progress("saving", step=step, total_steps=self.total_steps, checkpoint=path,
                                    message=f"Saved {path.name}", monitor=monitor))
        for path in saved.loras:
            self.run._emit(Progress("saving", step=step, total_steps=self.total_steps, lora=path,
                                    message=f"Saved {path.name}", monitor=monitor))

    def _start_monitor(self, state: TrainingState | None) -> Monitor | None:
        """The learning monitor (main process; none with monitor_every_n_steps -1), its base point measured now."""
        config, bundle = self.config, self.bundle
        if not self.processes.is_main or config.monitor_every_n_steps < 0:
            return None
        self.run._emit(Progress("monitoring", message="Measuring the base model for the learning monitor"))
        cache = self.instance_feed.cache
        common = {"cache": cache, "vae": bundle.vae, "crop": config.crop, "seed": config.seed}
        encoding = cache is None or self.held_out  # the cache holds no held-out photo
        vae = placed([bundle.vae], self.device, self.vae_dtype) if encoding else contextlib.nullcontext()
        with vae:
            instances = monitor_pictures(self.instances, is_class=False, **common)
            classes = monitor_pictures(self.classes, is_class=True, count=CLASS_PICTURES, **common)
            held_out = monitor_pictures(self.held_out, is_class=False, count=FIT_PICTURES,
                                        **{**common, "cache": None})
        frozen = [] if config.train_text_encoder else list(bundle.text_encoders)
        monitor = Monitor(config=config, bundle=bundle, instances=instances, classes=classes, device=self.device,
                          autocast=self._autocast, text_trained=config.train_text_encoder,
                          text_placed=lambda: placed(frozen, self.device, self.precision.frozen_dtype),
                          work_dir=self.work_dir, total_steps=self.total_steps, held_out=held_out)
        point = monitor.start(state.step if state is not None else None)
        self._report_monitor(monitor, 0 if point is not None else state.step)
        return monitor

    def _monitor_point(self, step: int) -> None:
        """A point of the learning monitor, on the weights that are exported (the EMA's when it is on)."""
        if self.monitor is None:
            return
        averaged = self.ema.applied_to(self.bundle.unet) if self.ema else contextlib.nullcontext()
        with averaged:
            self.monitor.measure(step)
        self._report_monitor(self.monitor, step)

    def _report_monitor(self, monitor: Monitor, step: int) -> None:
        self.run._emit(Progress("monitoring", step=step, total_steps=self.total_steps, message=monitor.line(),
                                monitor=monitor.summary()))

    @torch.no_grad()
    def _sample(self, step: int) -> None:
        config, bundle = self.config, self.bundle
        if not config.sample_every_n_steps:
            return
        prompts = sample_prompts(config)
        if not prompts:
            return
        self.run._emit(Progress("sampling", step=step, total_steps=self.total_steps, message="Rendering samples"))
        folder = self.work_dir / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        frozen = [] if config.train_text_encoder else list(bundle.text_encoders)
        # With EMA on, the samples show the averaged weights: those are what gets exported.
        averaged = self.ema.applied_to(bundle.unet) if self.ema else contextlib.nullcontext()
        with placed(frozen, self.device, self.precision.frozen_dtype), placed([bundle.vae], self.device,
                                                                               self.vae_dtype), averaged:
            for i, prompt in enumerate(prompts):
                image = generate_images(bundle, [prompt], negative_prompt=config.sample_negative_prompt,
                                        steps=config.sample_steps, guidance=config.sample_guidance,
                                        seed=config.sample_seed, width=config.resolution,
                                        height=config.resolution, autocast_dtype=self.precision.autocast_dtype)[0]
                path = folder / f"step{step:06d}_{i}.png"
                image.save(path)
                paths.append(path)
        self.result.samples.extend(paths)
        self.run._emit(Progress("sampling", step=step, total_steps=self.total_steps, samples=tuple(paths)))
