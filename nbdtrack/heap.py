"""Keep freed buffers in the heap for the next request, instead of the kernel's.

glibc serves an allocation of 128 KiB or more (a large WRITE's payload, a large READ's
data, a 256 KiB ``recv``) with a fresh ``mmap``, and gives memory back to the kernel once
more than twice that is free at the top of the heap. A server with sixteen 1 MiB requests
in flight therefore faulted in most of every request's pages anew: ~80 minor faults per
1 MiB WRITE, which on a virtual machine (each fault a trip through the hypervisor) cost
~40% of the server's CPU on sequential writes (bench/README.md); a backup's client paid
the same on every 256 KiB it received. Raising both thresholds lets the heap keep what
requests in flight used, up to ``KEEP_BYTES``, and hand it to the next ones.
"""

from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's largest: allocations below it come from the heap
KEEP_BYTES = 64 * 1024 * 1024  # free memory the heap keeps (a connection's bytes in flight)
ENVIRONMENT = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds; False where they were not changed: not
    glibc, or the environment sets them (the administrator's values are kept)."""
    if any(name in os.environ for name in ENVIRONMENT):
        return False
    try:
        # The process's own symbols, libc's among them: ctypes.util.find_library would
        # run ``ldconfig -p`` (and import shutil and tempfile) for the same answer.
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(M_TRIM_THRESHOLD, KEEP_BYTES)
    )
