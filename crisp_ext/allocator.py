"""glibc's heap thresholds for torch on the CPU.

Each convolution of the network allocates and frees buffers of tens of MiB. Above glibc's mmap threshold a buffer
gets fresh pages from the kernel every time, and each page faults on first touch: in a Dask worker, whose nanny sets
``MALLOC_TRIM_THRESHOLD_=65536`` (which also freezes the mmap threshold at 128 KiB), predicting one EMPIAR-10017
micrograph at one thread took 2.7 s instead of 2.1 s with glibc's defaults, and 1.6 s with the thresholds set here
(64 MiB mmap, 256 MiB trim: the buffers stay in the heap and are reused); one training step at two threads 2.5 s ->
1.7 s. The cost is up to 256 MiB of freed memory the process keeps (peak RSS +3 % on that prediction).

Threads other than the main one (a Dask worker predicts in its executor thread) get glibc arenas of their own,
whose heaps are at most 64 MiB and are unmapped as they empty: predicting in such a thread took 1.96 s per
micrograph instead of 1.66 s in the main thread. One arena for every thread (``M_ARENA_MAX`` = 1, unless
``MALLOC_ARENA_MAX`` is set) brought it to 1.60 s. That works only for threads that have not yet allocated: a Dask
worker's executor thread has its arena before its first task can call :func:`keep_large_buffers`, so the workers
crisp-ext starts get the same settings as environment variables (:func:`glibc_environment`), which glibc reads at
its first allocation: 1.56 million page faults -> 0.17 million in a worker picking 96 micrographs, network 0.257 ->
0.242 s per micrograph at one thread (one process: 0.241 s).
"""

from __future__ import annotations

import ctypes
import os
import platform

MMAP_THRESHOLD = 64 << 20
TRIM_THRESHOLD = 256 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8  # glibc's mallopt parameter numbers
_done = False


def glibc_environment() -> dict[str, int]:
    """These settings as glibc's environment variables, for a process started from here (a Dask worker)."""
    return {"MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD, "MALLOC_TRIM_THRESHOLD_": TRIM_THRESHOLD, "MALLOC_ARENA_MAX": 1}


def keep_large_buffers() -> bool:
    """Raise glibc's mmap and trim thresholds and keep one arena in this process (once); False where the C library
    is not glibc or the user set ``MALLOC_MMAP_THRESHOLD_`` themselves."""
    global _done
    if _done:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    _done = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    if "MALLOC_ARENA_MAX" not in os.environ:
        mallopt(_M_ARENA_MAX, 1)
    return _done
