"""Forge's backend.memory_management, as far as the extension sees it: unloading every model (counted)."""

import torch

cpu = torch.device("cpu")
unload_calls = 0


def unload_all_models():
    global unload_calls
    unload_calls += 1


def soft_empty_cache(force=False):
    pass
