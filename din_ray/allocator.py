"""Keep freed memory in the process instead of handing it back to the kernel after every op.

torch on CPU allocates each intermediate tensor with malloc. glibc serves a block of a few MB
(a (C·L, 80) float activation of one serving request is 3.2 MB; a training batch's are larger)
with a fresh mmap and unmaps it on free, so the next op's buffer is new memory again and its first
write takes a page fault per 4 kB page. In DIN's attention unit, a chain of such elementwise
passes, that doubled the model time of a request of 200 candidates x 50 behaviours on this
machine (docs/benchmarks.md). Raising glibc's mmap and trim thresholds makes these blocks come
from, and return to, the heap, where the next op reuses them; the process keeps its high-water
mark of memory, which a replica or a training worker reaches on every batch anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

# mallopt parameters (glibc malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# Blocks below this come from the heap (glibc caps the setting at 32 MB on 64-bit systems).
MMAP_THRESHOLD = 32 * 2**20
# Free memory at the top of the heap kept for reuse rather than returned to the kernel.
TRIM_THRESHOLD = 1 * 2**30

_done = False


def keep_freed_memory() -> bool:
    """Set glibc's thresholds (once per process). Returns whether they are in effect: False
    where the C library is not glibc (musl, macOS), which then runs as before."""
    global _done
    if _done:
        return True
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        log.debug("no glibc mallopt here; malloc keeps its defaults")
        return False
    _done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _done
