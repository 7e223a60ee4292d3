"""Stand-in for modules.devices: the device globals and torch_gc (counted, for tests)."""

import torch

cpu: torch.device = torch.device("cpu")
fp8: bool = False
device: torch.device = None
dtype: torch.dtype = torch.float16
dtype_vae: torch.dtype = torch.float16
dtype_unet: torch.dtype = torch.float16
dtype_inference: torch.dtype = torch.float16
unet_needs_upcast = False
gc_calls = 0


def get_cuda_device_string():
    return "cuda"


def get_optimal_device_name():
    return get_cuda_device_string() if torch.cuda.is_available() else "cpu"


def get_optimal_device():
    return torch.device(get_optimal_device_name())


def torch_gc():
    global gc_calls
    gc_calls += 1
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
