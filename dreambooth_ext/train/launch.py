"""A run on several GPUs, or through DeepSpeed, from a process that holds one GPU (the WebUI's, or a plain command
line): the `gpus` and `deepspeed_offload` options.

The run is the same command a user types, `accelerate launch -m dreambooth_ext train`, started as a child
process on the base model's file (not a model in memory), with its progress read back from JSON lines and shown
as this process's own; Cancel (or the host's Interrupt) asks it to stop through a stop file, and it saves its
state for Resume as any run does. Its files are published here when it ends.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from ..config import Config, gpu_list, to_dict, validate
from ..errors import DreamboothError
from ..hosts.base import Host
from .devices import device_name
from .parallel import SingleProcess, launched_processes
from .run import Progress, RunControl, RunResult, TrainingRun
from .zero import ZERO_CONFIG, require_deepspeed, zero_launch

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding dreambooth_ext


def training_run(config: Config, host: Host, *, resume: bool = False,
                 on_progress: Callable[[Progress], None] | None = None,
                 processes: SingleProcess | None = None) -> TrainingRun | ChildRun:
    """The run for `config`: in this process (one of `processes` when a launcher started several), or in
    processes of its own when it names several GPUs or DeepSpeed and no launcher started this one."""
    processes = processes or SingleProcess()
    several = config.gpus.strip() or config.deepspeed_offload
    if several and processes.count == 1 and launched_processes() <= 1 and zero_launch() is None:
        return ChildRun(config, host, resume=resume, on_progress=on_progress)
    return TrainingRun(config, host, resume=resume, on_progress=on_progress if processes.is_main else None,
                       processes=processes)


def gpu_ids(config: Config) -> list[int]:
    """The GPUs of the gpus option, checked against the ones torch sees here (none: a CPU machine, where the
    processes train on the CPU, as the tests do)."""
    import torch

    wanted = gpu_list(config.gpus)
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if wanted is None:
        if count < 2:
            raise DreamboothError(f"gpus = all, but this machine has {count} CUDA GPU(s): several GPUs need two or "
                                  "more. Leave gpus empty to train on one device.")
        return list(range(count))
    missing = [n for n in wanted if count and n >= count]
    if missing:
        raise DreamboothError(f"gpus = {config.gpus}, but this machine has no GPU {missing[0]} (it has {count}: "
                              f"0 .. {count - 1}).")
    return wanted


MULTI_GPU_CONFIG = ZERO_CONFIG.parent / "accelerate_multi_gpu.yaml"


def launch_command(processes: int, train_args: list[str], *, zero: bool = False) -> list[str]:
    """`accelerate launch` of `python -m dreambooth_ext train_args...` in `processes` processes, one per visible GPU
    (child_environment chooses them); `zero`: through DeepSpeed ZeRO stage 2 with the optimizer offloaded. Always
    with a configuration file of ours, so the user's default accelerate configuration is not read."""
    with socket.socket() as free:  # a free port for the processes to meet on
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    config = ZERO_CONFIG if zero else MULTI_GPU_CONFIG
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_machines", "1",
            "--num_processes", str(processes), "--gpu_ids", "all", "--main_process_port", str(port),
            "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "dreambooth_ext", *train_args]


def child_environment(gpus: list[int], environ: dict[str, str] | None = None, *,
                      launcher_logs: Path | None = None) -> dict[str, str]:
    """This process's environment for the launch on `gpus` (numbered as torch sees them here): the engine on the
    import path, and CUDA_VISIBLE_DEVICES naming those GPUs, mapped through this process's own
    CUDA_VISIBLE_DEVICES. (accelerate 0.21, the WebUI's, puts --gpu_ids in ZE_AFFINITY_MASK, not here.)
    `launcher_logs`: the folder for torch's launcher's own (PET_LOG_DIR; without one it leaves a torchelastic_
    folder in the system's temporary folder at every launch)."""
    environ = dict(os.environ if environ is None else environ)
    visible = [part.strip() for part in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if part.strip()]
    chosen = [visible[n] if n < len(visible) else str(n) for n in gpus]
    if launcher_logs is not None:
        environ["PET_LOG_DIR"] = str(launcher_logs)
    return dict(environ, CUDA_VISIBLE_DEVICES=",".join(chosen), PYTHONUNBUFFERED="1",
                PYTHONPATH=os.pathsep.join([str(PACKAGE_ROOT), environ.get("PYTHONPATH", "")]))


def one_gpu(config: Config) -> list[int]:
    """The GPU of the device option (cuda:N), for a run in a process of its own on one GPU."""
    name = device_name(config.device)
    return [int(name.partition(":")[2] or 0)] if name.startswith("cuda") else [0]


class ChildRun(RunControl):
    """A run in child processes with TrainingRun's interface: `run()`, `cancel()`, progress to the host and to
    `on_progress`, stops the host asks for."""

    def __init__(self, config: Config, host: Host, *, resume: bool = False,
                 on_progress: Callable[[Progress], None] | None = None):
        super().__init__(host, on_progress)
        self.config, self.resume = config, resume
        self.stop_file: Path | None = None

    def cancel(self) -> None:
        """The child processes stop after their step (the main one sees the stop file and tells the others)."""
        super().cancel()
        if self.stop_file is not None:
            self.stop_file.touch()

    def run(self) -> RunResult:
        config = validate(self.config)
        gpus = gpu_ids(config) if config.gpus.strip() else one_gpu(config)
        if config.deepspeed_offload:
            require_deepspeed()
        base, vae = self.host.base_files(config)
        work_dir = self.host.work_dir(config.project_name)
        work_dir.mkdir(parents=True, exist_ok=True)
        self.stop_file = work_dir / "stop"
        self.stop_file.unlink(missing_ok=True)
        if self.cancelled:
            self.stop_file.touch()
        child = dataclasses.replace(config, base_model=str(base), vae=str(vae or ""), gpus="", device="auto",
                                    deepspeed_offload=False)  # the launch itself brings DeepSpeed to the child
        how = ", through DeepSpeed ZeRO-2 with the optimizer in RAM" if config.deepspeed_offload else ""
        several = len(gpus) > 1
        self._emit(Progress("loading", message=f"Starting {len(gpus)} training process{'es' if several else ''} "
                                               f"(GPU{'s' if several else ''} {', '.join(map(str, gpus))}{how}) "
                                               f"on {base.name}"))
        self.host.release_device(None)  # the host's GPU is likely one of them
        launcher_logs = work_dir / "launcher"  # empty unless a process fails; the errors are in launch.log
        try:
            command = launch_command(len(gpus), self._train_args(child, work_dir), zero=config.deepspeed_offload)
            return self._follow(command, child_environment(gpus, launcher_logs=launcher_logs),
                                work_dir / "launch.log")
        finally:
            shutil.rmtree(launcher_logs, ignore_errors=True)
            self.host.restore_device()

    def _train_args(self, child: Config, work_dir: Path) -> list[str]:
        """`train` with the child's config file, writing where this host's files go and reporting to us."""
        config_file = work_dir / "launch.json"
        config_file.write_text(json.dumps(to_dict(child), indent=1), encoding="utf-8")
        project = child.project_name
        args = ["train", "--config", str(config_file), "--progress-json", "--stop-file", str(self.stop_file),
                "--work-dir", str(work_dir.parent), "--models-dir", str(work_dir.parent),
                "--checkpoint-dir", str(self.host.checkpoint_path(project, 0).parent.parent),
                "--lora-dir", str(self.host.lora_path(project, 0).parent.parent)]
        return [*args, "--resume"] if self.resume else args

    def _follow(self, command: list[str], env: dict[str, str], log_path: Path) -> RunResult:
        result = RunResult("failed", 0, 0)
        with open(log_path, "w", encoding="utf-8") as log_file:
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log_file, text=True, env=env)
            try:
                for line in process.stdout:
                    progress = Progress.from_line(line)
                    if progress is not None:
                        self._take(progress, result)
                    else:
                        log_file.write(line)
            finally:
                code = process.wait()
        if result.status not in ("finished", "cancelled"):
            raise DreamboothError(f"The training processes stopped (exit code {code}): {_last_error(log_path)} "
                                  f"The whole log: {log_path}")
        return result

    def _take(self, progress: Progress, result: RunResult) -> None:
        """One progress line of the child's main process: shown here, and kept for the result."""
        if progress.phase in ("finished", "cancelled"):
            result.status = progress.phase
        if progress.total_steps:
            result.step, result.total_steps = progress.step, progress.total_steps
        if progress.phase == "training" and progress.loss is not None:
            result.losses.append((progress.step, progress.loss))
        result.samples.extend(progress.samples)
        for path, kept, publish in ((progress.checkpoint, result.checkpoints, self.host.publish),
                                    (progress.lora, result.loras, self.host.publish_lora)):
            if path is not None and path not in kept:
                kept.append(path)
                publish(path)
        self._emit(progress)


def _last_error(log_path: Path) -> str:
    """The child's own error paragraph ("Error: ..."), else the last line of its log."""
    lines = [line.strip() for line in log_path.read_text(encoding="utf-8", errors="replace").splitlines()
             if line.strip()]
    for line in reversed(lines):
        if line.startswith("Error: "):
            return line[len("Error: "):]
    return lines[-1] if lines else "no output."
