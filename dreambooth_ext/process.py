"""Settings for a process that is the engine's own (`python -m dreambooth_ext`: the command line, the standalone
page, the processes of a launch on several GPUs); never made in the WebUI's process or any other host's."""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_MAX = -4
TRIM_THRESHOLD = 2**31 - 1  # the largest mallopt takes: free memory at the heap's top beyond 2 GiB still goes back


def keep_freed_memory() -> bool:
    """Serve large blocks from malloc's heap and keep freed memory there, so that a CPU run's steps reuse it.

    glibc gives every block over 32 MiB (a weight's gradient, a large activation) a mapping of its own and unmaps
    it when freed, so every training step gets its gradients and large activations as fresh pages, which the
    kernel maps and zeroes one 4 KiB page fault at a time (at SD1.5's real widths on 2 CPU cores: 18.1 s per step,
    14.2 s with this; bench/speed.py). GPU memory is not malloc's: this only matters to runs on the CPU. The peak
    memory stays what the run needs (measured the same); memory the run freed is kept for its next step instead of
    going back to the system. Returns False where the C library is not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
