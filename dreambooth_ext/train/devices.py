"""Which device and number formats a run uses, decided once from the config."""

from __future__ import annotations

import gc
import importlib.util
import os
from dataclasses import dataclass

import torch

from ..errors import DreamboothError, MissingFeatureError


@dataclass(frozen=True)
class Precision:
    """How a run computes: autocast dtype (None: plain fp32), dtype of frozen parts, fp16 loss scaling."""

    autocast_dtype: torch.dtype | None
    frozen_dtype: torch.dtype
    use_grad_scaler: bool

    def vae_dtype(self, fp16_safe: bool) -> torch.dtype:
        """The frozen parts' dtype, but fp32 for a VAE that overflows in fp16 (SDXL's: NaNs, black images)."""
        return torch.float32 if self.frozen_dtype == torch.float16 and not fp16_safe else self.frozen_dtype

    @property
    def name(self) -> str:
        return {None: "no", torch.float16: "fp16", torch.bfloat16: "bf16"}[self.autocast_dtype]


def gpus() -> list[tuple[int, str, float, float]]:
    """(index, name, free GiB, total GiB) of every CUDA GPU torch sees here."""
    found = []
    for index in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        free, total = torch.cuda.mem_get_info(index)
        found.append((index, torch.cuda.get_device_name(index), free / 1024 ** 3, total / 1024 ** 3))
    return found


def device_choices() -> list[str]:
    """The device option's values where there is a GPU to choose, each described after its name: "cuda:1 (NVIDIA
    ..., 20.1 of 24.0 GiB free)" (resolve_device reads the name before the parenthesis); [] without a GPU."""
    found = [f"cuda:{index} ({name}, {free:.1f} of {total:.1f} GiB free)" for index, name, free, total in gpus()]
    return ["auto", *found, "cpu"] if found else []


def device_name(value: str) -> str:
    """The device option's name: "auto" when empty, without a description after it ("cuda:1 (name, ...)")."""
    return (value or "auto").split("(")[0].strip().lower() or "auto"


def resolve_device(name: str) -> torch.device:
    """'auto' picks the first CUDA GPU, else the CPU; anything else must exist here. A description after the name
    (the tab's "cuda:1 (name, free memory)") is ignored."""
    name = device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DreamboothError(f"device = {name!r} is not a device name; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DreamboothError(f"device = {name!r} but no CUDA GPU is available here; use device = cpu or auto "
                                  "(JoePenna's \"gpu\" setting and --gpu N ask for CUDA GPU N)")
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise DreamboothError(f"device = {name!r} but this machine has {torch.cuda.device_count()} CUDA "
                                  f"GPU(s) (cuda:0 .. cuda:{torch.cuda.device_count() - 1}); pick one of those")
    elif device.type != "cpu":
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise DreamboothError(f"device = {name!r} is not available here; use auto or cpu")
    return device


def cpu_computes_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX-512 BF16 or AMX), where bf16 autocast makes a step faster;
    elsewhere torch emulates it, which is slower than fp32."""
    checks = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(check is not None and check() for check in checks)


def cpu_trains_bf16() -> bool:
    """Whether this torch can train in bf16 on the CPU: before 2.2 its CPU attention's bf16 backward pass writes
    out of bounds (oneDNN) and the process aborts ("double free or corruption")."""
    return torch.__version__ >= "2.2"


def resolve_precision(mode: str, device: torch.device, *, deepspeed: bool = False) -> Precision:
    """fp16 needs CUDA; bf16 needs a GPU that supports it (or the CPU); 'auto' is fp16 on CUDA, bf16 on a CPU that
    computes it natively (but fp32 for DeepSpeed there: the CPU's gloo cannot exchange bf16), fp32 elsewhere."""
    if mode == "auto":
        native = device.type == "cpu" and not deepspeed and cpu_computes_bf16() and cpu_trains_bf16()
        mode = "fp16" if device.type == "cuda" else "bf16" if native else "no"
    if mode == "no":
        return Precision(None, torch.float32, False)
    if mode == "fp16":
        if device.type != "cuda":
            raise DreamboothError(f"mixed_precision = 'fp16' needs a CUDA GPU, but the device is {device}; "
                                  "use mixed_precision = bf16 or no")
        return Precision(torch.float16, torch.float16, True)
    if mode == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise DreamboothError("mixed_precision = 'bf16' is not supported by this GPU; use fp16")
        if device.type == "cpu" and not cpu_trains_bf16():
            raise DreamboothError(f"mixed_precision = 'bf16' on the CPU needs torch 2.2 or newer: torch "
                                  f"{torch.__version__}'s attention corrupts memory in a bf16 backward pass on the "
                                  "CPU, which ends the whole process. Use mixed_precision = no (with weights_dtype "
                                  "fp32), or train on a GPU")
        return Precision(torch.bfloat16, torch.bfloat16, False)
    raise DreamboothError(f"mixed_precision = {mode!r}: use auto, no, fp16 or bf16")


def deepspeed_installed() -> bool:
    return importlib.util.find_spec("deepspeed") is not None


def bitsandbytes_problem(device: torch.device) -> str | None:
    """Why 8-bit AdamW cannot run here, or None when it can."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return "the bitsandbytes package is not installed"
    if device.type != "cuda":
        return f"8-bit AdamW runs on CUDA GPUs only and the device is {device}"
    return None


def require_8bit_adam(device: torch.device) -> None:
    problem = bitsandbytes_problem(device)
    if problem:
        raise MissingFeatureError(f"optimizer = 'adamw_8bit' cannot be used: {problem}. Use optimizer = adamw "
                                  "(needs about 1.5 GB more memory on SD1.5), or install bitsandbytes for your "
                                  "torch and train on a CUDA GPU.")


def compile_problem() -> str | None:
    """Why compile_unet cannot run with this torch, or None when it can."""
    if not hasattr(torch.nn.Module, "compile"):
        return f"it needs torch 2.2 or newer (nn.Module.compile) and this environment has torch {torch.__version__}"
    return None


def require_compile() -> None:
    problem = compile_problem()
    if problem:
        raise MissingFeatureError(f"compile_unet cannot be used: {problem}. Turn compile_unet off.")


def release_memory(device: torch.device) -> None:
    """Free what an ended run held: collect its unreachable objects first (a model held in reference cycles, which
    Python's automatic collection may not reach for a long time in a host that keeps running), then return the
    device's cached blocks."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def memory_in_use(device: torch.device) -> tuple[float, str]:
    """(GiB, what): the GPU memory the run's tensors hold on a CUDA device, else the process's resident memory."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 1024 ** 3, "GPU"
    try:
        with open("/proc/self/statm") as statm:
            pages = int(statm.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 1024 ** 3, "RAM"
    except (OSError, ValueError, IndexError):
        return 0.0, ""
