"""Process-level settings that entry points (the CLI, the benchmarks) apply once at start-up; library code never
calls them, so importing the package changes nothing about the process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

import torch.distributed as dist

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 1 << 31) -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of returning it to the system at once.

    Inference frees each large activation as soon as the next layer has read it. By default glibc serves such
    blocks with fresh `mmap`s or gives the top of the heap back, so every diffusion step page-faults its
    activations in again. Keeping the memory raised batch-16 generation of the `tiny` model on the 2-core CPU from
    1.87-2.02 to 2.36-2.80 images/s (`python benchmarks/generate.py`, back-to-back runs), and leaves training
    unchanged. The cost is that resident memory stays at its peak.

    This is what PyTorch's CPU tuning guide gets from swapping in jemalloc or tcmalloc, without a preloaded
    library. Done by hand because no maintained package sets it. Skipped (returns False) off glibc, or when
    the user set any `MALLOC_*` variable, so their own setting wins.
    """
    if not sys.platform.startswith("linux") or any(k.startswith("MALLOC_") for k in os.environ):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))


def end_process_group() -> None:
    """Tear down the process group a multi-process launch (`accelerate launch`) started, on every process.

    Left to the interpreter's exit, gloo's threads can outlive the store the main process hosts, and a process then
    aborts ("terminate called without an active exception") after its work is done, failing the whole launch.
    A no-op in a single process.
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
