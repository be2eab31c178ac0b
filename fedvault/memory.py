"""Keep large freed buffers for reuse in the processes that run a party (glibc malloc).

Every round a party allocates and frees buffers of the same sizes: the model's arrays, sealed
chunks and opened frames. glibc serves an allocation above its mmap threshold (128 KiB, rising
only as far as the largest block freed so far) with a fresh ``mmap`` and returns it on free, and
trims the top of its heap beyond the trim threshold; memory handed back costs a page fault per
4 KiB the next time, which for a 100 MB update takes as long as AES-GCM itself
(``benchmarks/encryption_overhead.py``, level ``cipher-fresh``). :func:`keep_freed_buffers` raises
both thresholds (``mallopt(3)``: ``M_MMAP_THRESHOLD`` to 64 MiB, ``M_TRIM_THRESHOLD`` to 1 GiB), so
buffers up to 64 MiB come from the heap and freed ones are reused warm; the price is up to 1 GiB of
freed memory a process keeps instead of returning it. Elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

_M_TRIM_THRESHOLD = -1  # <malloc.h>
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 64 << 20
TRIM_THRESHOLD = 1 << 30


@functools.cache
def keep_freed_buffers() -> bool:
    """Raise glibc's mmap and trim thresholds for this process (once); False where that is not glibc."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
