"""glibc's heap, told to stay small: pyflanneld's threads would each get a malloc arena of their own, and a large
listing freed after start stays in the process unless the heap is trimmed. Nothing happens without glibc."""
from __future__ import annotations

import ctypes

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
    """Hand the heap that a large listing freed back to the system (glibc keeps it otherwise)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
