"""Host memory that torch has freed but the process keeps (``run.release_host_memory``).

On the CPU, torch allocates tensors with the C library's ``malloc``. glibc serves a large request from
its heap unless it is above a threshold that it raises as large blocks are freed (up to 32 MiB on
64-bit), and keeps freed heap memory for reuse rather than returning it. An update churns through
hundreds of GiB of short-lived tensors of many sizes (the Wan 2.1 1.3B update of four videos: 187k
allocations, 239 GiB in all, never more than 0.45 GiB above what was alive at its start), so the resident
set grows by what the heap could not reuse: from 3.97 to 7.25 GiB in that update
(``tools/bench/update_memory.py``, ``docs/benchmarks.md``).

:func:`release_freed_memory` fixes the threshold low, so every block of at least ``threshold`` bytes is
mapped on its own and returned to the system when freed, and the heap is trimmed down to the same
margin: the resident set then follows torch's live tensors (that update: 4.18 GiB, the planner's 3.86
plus the runtime; a ZeRO-3 rank 3.70 GiB, not 9.28). The cost is a page fault per page of each new large
block: the one-process iteration took half as long again, a ZeRO-3 iteration 2.4 times as long. GPU runs
keep their activations in the device allocator and gain nothing.
"""

from __future__ import annotations

import ctypes

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3      # glibc's mallopt parameters (malloc.h)
DEFAULT_THRESHOLD = 128 * 1024                    # glibc's own starting threshold, kept fixed


def release_freed_memory(threshold: int = DEFAULT_THRESHOLD) -> bool:
    """Have glibc map every allocation of ``threshold`` bytes or more on its own (returned to the system
    when freed) and trim its heap above ``threshold``. Returns False, changing nothing, where the C
    library is not glibc (musl, macOS)."""
    if threshold < 1:
        raise ValueError(f"threshold must be >= 1 byte, got {threshold}")
    try:
        libc = ctypes.CDLL(None)                  # the C library this process already runs on (no ldconfig)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    if not hasattr(libc, "gnu_get_libc_version"):   # another libc's mallopt takes other parameters
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, threshold)) and bool(mallopt(M_TRIM_THRESHOLD, threshold))
