"""The heap, told to stay small: pyflanneld's threads would each get a malloc arena of their own, and what a large
listing or a full diff freed stays in the process unless it is collected and the heap trimmed. Without glibc, only
the collection happens."""
from __future__ import annotations

import ctypes
import gc

M_ARENA_MAX = -8  # mallopt's parameter (malloc.h)
ARENAS = 2


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def limit_arenas() -> None:
    """At most ARENAS malloc arenas, whatever the number of threads (before the threads start)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(M_ARENA_MAX, ARENAS)


def release_freed() -> None:
    """Hand back to the system the heap a large listing or a full diff's dumps freed: pyroute2's decoded messages are
    cycles, which wait for a full garbage collection (until then they hold the heap, and glibc keeps the rest)."""
    gc.collect()
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
