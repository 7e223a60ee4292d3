"""Several processes through `accelerate launch` (torch.distributed's gloo on the CPU): the steps of one process
with the same global batch, one set of files, and a stopped run resumes on any number of processes."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from dreambooth_ext.models.checkpoint import read_checkpoint
from dreambooth_ext.models.tiny import save_tiny_checkpoint
from dreambooth_ext.train.launch import child_environment, launch_command
from dreambooth_ext.train.run import Progress, RunResult

ROOT = Path(__file__).resolve().parents[1]
UNET = "model.diffusion_model."
STEPS = 8


@pytest.fixture(scope="module", autouse=True)
def launcher_logs(tmp_path_factory):
    """torch's launcher keeps its log folders in pytest's folder (as it does in the engine's own launches), not
    one more torchelastic_ folder in the system's temporary folder per launch."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PET_LOG_DIR", str(tmp_path_factory.mktemp("launcher")))
        yield


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("data")
    base = save_tiny_checkpoint(folder / "tiny.safetensors", family="sd1", seed=0)
    for kind, green in (("instance", 160), ("class", 40)):
        (folder / kind).mkdir()
        for i in range(3):
            Image.new("RGB", (64, 64), (70 * i, green, 30)).save(folder / kind / f"{kind}{i}.png")
    return {"base": base, "instance": folder / "instance", "class": folder / "class"}


def flags(data: dict[str, Path], out: Path, *extra: str) -> list[str]:
    """Batch 2 plus 2 class samples; AdamW with epsilon 1 and no weight decay makes each update nearly linear in
    the gradient, so a wrongly weighted average between processes would show in the weights."""
    return ["train", "--project_name", "p", "--base_model", str(data["base"]), "--instance_dir",
            str(data["instance"]), "--class_dir", str(data["class"]), "--num_class_images", "3",
            "--prior_preservation", "true", "--resolution", "64", "--max_train_steps", str(STEPS),
            "--train_batch_size", "2", "--learning_rate", "1", "--adam_epsilon", "1", "--weight_decay", "0",
            "--seed", "5", "--save_precision", "fp32", "--models-dir", str(out),
            "--mixed_precision", "no",  # fp32, whose sums agree to 1e-5 however the batch is split (auto is bf16
            *extra]                     # on a CPU that computes it natively)


def command(processes: int, args: list[str]) -> list[str]:
    """One process as a plain command; several through `accelerate launch --multi_gpu` (the engine's own)."""
    if processes == 1:
        return [sys.executable, "-m", "dreambooth_ext", *args]
    return launch_command(processes, args)


def environment() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def train(processes: int, args: list[str], launch=command) -> subprocess.CompletedProcess:
    done = subprocess.run(launch(processes, args), capture_output=True, text=True, env=environment(), timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def train_until_stopped(processes: int, args: list[str], stop_file: Path, launch=command) -> int:
    """Start, ask it to stop once training has begun (the tab's way: a stop file), return the step it saved."""
    proc = subprocess.Popen(launch(processes, [*args, "--progress-json", "--stop-file", str(stop_file)]),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment())
    last = None
    try:
        for line in proc.stdout:
            progress = Progress.from_line(line)
            if progress is None:
                continue
            last = progress
            if last.phase == "training":
                stop_file.touch()
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert last is not None and last.phase == "cancelled", proc.stderr.read()[-3000:]
    assert 1 <= last.step < STEPS
    return last.step


def unet(path: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in read_checkpoint(path).items() if k.startswith(UNET)}


def largest_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def one_process(data, tmp_path_factory) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("one")
    train(1, flags(data, out))
    return unet(out / "Stable-diffusion" / "p" / f"p_{STEPS}.safetensors")


def test_two_processes_take_the_steps_of_one(data, one_process, tmp_path):
    train(2, flags(data, tmp_path))
    written = sorted(p.name for p in (tmp_path / "Stable-diffusion" / "p").iterdir())
    assert written == [f"p_{STEPS}.safetensors"]  # one set of files, no half-written one
    assert not (tmp_path / "dreambooth" / "p" / "state").exists()
    result = unet(tmp_path / "Stable-diffusion" / "p" / f"p_{STEPS}.safetensors")
    moved = largest_difference(result, unet(data["base"]))
    assert moved > 1e-2  # it trained
    assert largest_difference(result, one_process) < 1e-5 * max(1.0, moved)

    # A different global batch gives different weights: the comparison above can fail.
    other = tmp_path / "batch1"
    train(1, flags(data, other, "--train_batch_size", "1"))
    assert largest_difference(unet(other / "Stable-diffusion" / "p" / f"p_{STEPS}.safetensors"), one_process) > 1e-3


def test_a_batch_smaller_than_the_processes_takes_the_steps_of_one(data, tmp_path):
    """One sample per step on two processes: the second has none, runs no backward pass, and contributes zeros
    (the exchange waits until after the pass, as the processes do not all run it)."""
    args = ("--train_batch_size", "1", "--prior_preservation", "false", "--max_train_steps", "4")
    train(1, flags(data, tmp_path / "one", *args))
    done = train(2, flags(data, tmp_path / "two", *args))
    assert "some processes wait idle" in done.stderr
    one, two = (unet(tmp_path / out / "Stable-diffusion" / "p" / "p_4.safetensors") for out in ("one", "two"))
    assert largest_difference(one, unet(data["base"])) > 1e-2 and largest_difference(one, two) < 1e-5


def test_a_run_stopped_on_two_processes_resumes_on_one_and_on_two(data, one_process, tmp_path):
    stopped = tmp_path / "stopped"
    step = train_until_stopped(2, flags(data, stopped), tmp_path / "stop")
    assert (stopped / "dreambooth" / "p" / "state").is_dir()
    assert not (stopped / "Stable-diffusion" / "p").exists() or not any((stopped / "Stable-diffusion" / "p").iterdir())
    copy = tmp_path / "copy"
    shutil.copytree(stopped, copy)

    for processes, out in ((1, stopped), (2, copy)):
        done = train(processes, flags(data, out, "--resume"))
        assert f"Resuming p at step {step}" in done.stderr
        result = unet(out / "Stable-diffusion" / "p" / f"p_{STEPS}.safetensors")
        assert largest_difference(result, one_process) < 1e-5, processes


def test_gradients_are_exchanged_in_buckets_and_come_back_whole(monkeypatch, tmp_path):
    """In a group of one process (nothing to average), every gradient comes back as it was whatever the bucket
    size; a weight nobody has a gradient for keeps none."""
    import torch.distributed as dist

    from dreambooth_ext.train import parallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        class State:
            num_processes, process_index, is_main_process, device = 1, 0, True, torch.device("cpu")

        processes = parallel.DataParallel(State())
        params = [torch.nn.Parameter(torch.randn(shape)) for shape in ((3, 5), (7,), (2, 2, 2), (4, 4))]
        for param in params[:3]:
            param.grad = torch.randn_like(param)
        expected = [p.grad.clone() for p in params[:3]]
        monkeypatch.setattr(parallel, "BUCKET_ELEMENTS", 16)
        assert [len(b) for b in parallel._buckets([p.grad for p in params[:3]])] == [1, 2]
        processes.average_gradients(params)
        assert all(torch.equal(p.grad, e) for p, e in zip(params, expected, strict=False))
        assert params[3].grad is None
        assert processes.share(list("abcde")) == list("abcde") and processes.any(True)
    finally:
        dist.destroy_process_group()


def test_gradients_are_exchanged_while_the_backward_pass_runs(monkeypatch, tmp_path):
    """Around a backward pass every process runs, each bucket's exchange starts as soon as the pass has completed
    its gradients (the output layer's first), while the pass goes on; average_gradients waits for them and the
    gradients come back whole. Other passes exchange nothing; a weight without a gradient keeps none."""
    import torch.distributed as dist

    from dreambooth_ext.train import parallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        class State:
            num_processes, process_index, is_main_process, device = 1, 0, True, torch.device("cpu")

        processes = parallel.DataParallel(State())
        monkeypatch.setattr(parallel, "BUCKET_ELEMENTS", 5)
        monkeypatch.setattr(parallel, "IN_FLIGHT", 2)  # each holds a copy of its gradients: at most 2 at once
        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 4), torch.nn.Tanh(),
                                    torch.nn.Linear(4, 1))
        unused = torch.nn.Parameter(torch.zeros(3))
        hooks = processes.watch([list(model.parameters()), [unused]])
        completed, started = [], []  # gradients the pass has completed; how many there were at each exchange
        hooks += [p.register_post_accumulate_grad_hook(completed.append) for p in model.parameters()]
        exchange, in_flight = dist.all_reduce, []

        class Work:  # counts the exchanges not yet waited for
            def __init__(self, work):
                self.work = work
                in_flight.append(in_flight[-1] + 1 if in_flight else 1)

            def wait(self):
                in_flight.append(in_flight[-1] - 1)
                return self.work.wait()

        def recording(tensor, *args, **kwargs):
            started.append(len(completed))
            return Work(exchange(tensor, *args, **kwargs))

        monkeypatch.setattr(dist, "all_reduce", recording)
        x = torch.randn(8, 4)
        model(x).sum().backward()  # an earlier micro-batch: nothing exchanged
        assert started == []
        expected = [2 * p.grad for p in model.parameters()]
        completed.clear()
        with processes.exchanging():
            model(x).sum().backward()
        assert started and started[0] <= 2  # the output layer's bucket left before the other layers' gradients
        assert len(started) == 5 and max(in_flight) == 2
        processes.average_gradients([*model.parameters(), unused])
        assert all(torch.allclose(p.grad, e) for p, e in zip(model.parameters(), expected, strict=True))
        assert unused.grad is None
        for hook in hooks:
            hook.remove()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("fails", [False, True])
def test_each_process_leaves_its_group_when_its_run_ends(data, tmp_path, monkeypatch, fails):
    """A run's process closes its process group before Python shuts down, finished or failed: left to the
    interpreter's shutdown, gloo's threads can abort a process whose run has finished (SIGABRT), and the launcher
    then calls the run failed."""
    import torch.distributed as dist

    from dreambooth_ext import cli
    from dreambooth_ext.errors import DreamboothError
    from dreambooth_ext.train import launch, parallel

    class State:
        num_processes, process_index, is_main_process, device = 1, 0, True, torch.device("cpu")

    class Run:
        cancelled = False

        def run(self):
            assert dist.is_initialized()  # the group is there for the whole run
            if fails:
                raise DreamboothError("the run failed")
            return RunResult(status="cancelled", step=0, total_steps=STEPS)

    def join(device_option):
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
        return parallel.DataParallel(State())

    monkeypatch.setattr(parallel, "join_processes", join)
    monkeypatch.setattr(launch, "training_run", lambda *args, **kwargs: Run())
    try:
        assert cli.main(flags(data, tmp_path)) == (2 if fails else 3)
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_the_gpus_option_launches_the_processes_itself(data, one_process, tmp_path, capsys, monkeypatch):
    """`train --gpus 0,1` from a plain command: the engine starts `accelerate launch` on those GPUs (here, with
    no GPU, the processes train on the CPU), shows its progress, and ends with the same weights; the launch
    leaves nothing in the system's temporary folder."""
    from dreambooth_ext import cli

    system_temp = tmp_path / "system-temp"
    system_temp.mkdir()
    monkeypatch.setenv("TMPDIR", str(system_temp))
    assert cli.main(flags(data, tmp_path, "--gpus", "0,1")) == 0
    assert list(system_temp.iterdir()) == []
    err = capsys.readouterr().err
    assert "Starting 2 training processes (GPUs 0, 1)" in err and f"step {STEPS}/{STEPS}" in err
    result = unet(tmp_path / "Stable-diffusion" / "p" / f"p_{STEPS}.safetensors")
    assert largest_difference(result, one_process) < 1e-5
    assert (tmp_path / "dreambooth" / "p" / "launch.log").is_file()
    assert not (tmp_path / "dreambooth" / "p" / "launcher").exists()


def test_the_launch_ignores_the_users_accelerate_defaults_and_runs_on_the_gpus_chosen(tmp_path, monkeypatch):
    """accelerate's own processing of the engine's launch (the WebUI's accelerate 0.21): a default configuration
    of the user's (CPU, fp16, a dynamo backend, other GPUs) does not reach it, and its processes see exactly the
    GPUs chosen, mapped through this process's CUDA_VISIBLE_DEVICES (0.21 leaves --gpu_ids out of it)."""
    import accelerate.commands.config.config_args as config_args
    import accelerate.commands.launch as accelerate_launch
    from accelerate.utils.launch import prepare_multi_gpu_env

    defaults = tmp_path / "default_config.yaml"
    defaults.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\nuse_cpu: true\n"
                        "mixed_precision: fp16\nnum_processes: 8\ngpu_ids: 4,5\n"
                        "dynamo_config:\n  dynamo_backend: INDUCTOR\n")
    monkeypatch.setattr(accelerate_launch, "default_config_file", str(defaults))
    monkeypatch.setattr(config_args, "default_config_file", str(defaults))
    launches = {}
    for zero in (False, True):
        args = accelerate_launch.launch_command_parser().parse_args(launch_command(2, ["train"], zero=zero)[3:])
        accelerate_launch._validate_launch_command(args)
        assert (args.use_deepspeed, args.multi_gpu or args.use_deepspeed) == (zero, True)
        assert (args.use_cpu, args.mixed_precision, args.dynamo_backend.lower()) == (False, "no", "no")
        assert args.num_processes == 2
        launches[zero] = args
    for name, value in child_environment([1, 3], {"CUDA_VISIBLE_DEVICES": "4,5,6,7"}).items():
        monkeypatch.setenv(name, value)
    assert prepare_multi_gpu_env(launches[False])["CUDA_VISIBLE_DEVICES"] == "5,7"
    assert child_environment([0, 2], {})["CUDA_VISIBLE_DEVICES"] == "0,2"


# -- DeepSpeed ZeRO stage 2 with the optimizer on the CPU ------------------------------------------------------


def zero_command(processes: int, args: list[str]) -> list[str]:
    """`accelerate launch` with dreambooth_ext/configs/accelerate_deepspeed_zero2_offload.yaml: ZeRO stage 2,
    optimizer on the CPU."""
    return launch_command(processes, args, zero=True)


def test_the_deepspeed_offload_option_launches_deepspeed_on_one_gpu(data, one_process, tmp_path, capsys):
    """`train --deepspeed_offload` from a plain command: the engine starts `accelerate launch` with the shipped
    ZeRO-2 configuration on one GPU (here the CPU) and ends with the weights of a plain run."""
    from dreambooth_ext import cli

    assert cli.main(flags(data, tmp_path, "--deepspeed_offload")) == 0
    err = capsys.readouterr().err
    assert "Starting 1 training process (GPU 0, through DeepSpeed ZeRO-2 with the optimizer in RAM)" in err
    log = (tmp_path / "dreambooth" / "p" / "launch.log").read_text()
    assert "DeepSpeed ZeRO stage 2 on 1 process(es), the optimizer on the CPU" in log
    result = unet(tmp_path / "Stable-diffusion" / "p" / f"p_{STEPS}.safetensors")
    assert largest_difference(result, one_process) < 1e-5


def test_the_weights_deepspeed_starts_from_are_kept_exactly_in_half_the_memory_where_they_fit_fp16():
    from dreambooth_ext.train.zero import _kept

    from_fp16 = torch.randn(64).half().float()
    kept = _kept(from_fp16)
    assert kept.dtype == torch.float16 and torch.equal(kept.float(), from_fp16)
    trained = torch.randn(64)
    kept = _kept(trained)
    assert kept.dtype == torch.float32 and torch.equal(kept, trained) and kept.data_ptr() != trained.data_ptr()


@pytest.mark.parametrize("ema", ["false", "true"])
def test_deepspeed_in_bf16_starts_from_and_exports_the_fp32_weights(data, tmp_path, ema):
    """DeepSpeed's bf16 mode computes with bf16 copies of the weights and keeps fp32 ones in its optimizer: those
    start from the model's own fp32 weights (not from the bf16 copies) and are what the run exports, or what the
    EMA averages. With a negligible learning rate the result is the base model to fp32 precision, not the base
    rounded to bf16 (two processes: each holds half of the fp32 weights)."""
    out = tmp_path / "bf16"
    train(2, flags(data, out, "--mixed_precision", "bf16", "--learning_rate", "1e-12", "--max_train_steps", "2",
                   "--ema", ema), launch=zero_command)
    base = unet(data["base"])
    assert largest_difference(base, {k: v.bfloat16().float() for k, v in base.items()}) > 1e-4  # it can tell
    assert largest_difference(unet(out / "Stable-diffusion" / "p" / "p_2.safetensors"), base) < 1e-6


def test_deepspeed_zero2_offload_takes_the_steps_of_one_process_and_resumes(data, one_process, tmp_path):
    out = tmp_path / "zero"
    done = train(2, flags(data, out, "--save_every_n_steps", "4"), launch=zero_command)
    assert "DeepSpeed ZeRO stage 2 on 2 process(es), the optimizer on the CPU" in done.stderr
    result = unet(out / "Stable-diffusion" / "p" / f"p_{STEPS}.safetensors")
    assert largest_difference(result, unet(data["base"])) > 1e-2
    assert largest_difference(result, one_process) < 1e-5

    stopped = tmp_path / "stopped"
    step = train_until_stopped(2, flags(data, stopped), tmp_path / "stop", launch=zero_command)
    refused = subprocess.run(command(1, flags(data, stopped, "--resume")), capture_output=True, text=True,
                             env=environment(), timeout=600)
    assert refused.returncode != 0 and "made by 2 DeepSpeed process(es)" in refused.stderr
    assert "Traceback" not in refused.stderr
    done = train(2, flags(data, stopped, "--resume"), launch=zero_command)
    assert f"Resuming p at step {step}" in done.stderr
    resumed = unet(stopped / "Stable-diffusion" / "p" / f"p_{STEPS}.safetensors")
    assert largest_difference(resumed, one_process) < 1e-5


def test_what_deepspeed_cannot_do_is_refused_with_its_fix(data, tmp_path, monkeypatch):
    from dreambooth_ext.config import ConfigError, from_dict, validate
    from dreambooth_ext.errors import DreamboothError
    from dreambooth_ext.train import zero
    from dreambooth_ext.train.parallel import SingleProcess

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    with pytest.raises(DreamboothError, match="use --zero_stage 2"):
        zero.zero_launch()
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "cpu")
    assert zero.zero_launch() == zero.ZeroSettings(2, "cpu")

    config = from_dict({"project_name": "p", "base_model": str(data["base"]), "optimizer": "adafactor",
                        "fused_backward": True, "max_grad_norm": 0.0,
                        "concepts": [{"instance_dir": str(data["instance"]), "token": "zwx", "class_word": "toy"}]})
    with pytest.raises(DreamboothError) as refused:
        zero.check_zero(config, SingleProcess())
    assert "turn fused_backward off" in str(refused.value) and "use adamw" in str(refused.value)
    monkeypatch.setattr(zero, "deepspeed_installed", lambda: False)
    with pytest.raises(DreamboothError, match="pip install"):
        zero.check_zero(config, SingleProcess())

    with pytest.raises(ConfigError, match="deepspeed_offload with optimizer = adafactor"):
        validate(dataclasses.replace(config, deepspeed_offload=True))

    with pytest.raises(DreamboothError, match="made without DeepSpeed"):
        zero.check_zero_resume({"state": {}, "param_groups": []}, SingleProcess())
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    with pytest.raises(DreamboothError, match="--num_processes 2"):
        zero.check_zero_resume({"zero_parts": [{}, {}]}, SingleProcess())
    zero.check_zero_resume({"state": {}, "param_groups": []}, SingleProcess())  # plain state, plain run
