"""Give the C heap's free pages back to the operating system.

XLA compiles in the host process, and compiling the train step (and the init function) leaves a
few hundred MiB of freed compiler memory in glibc's heap: free, but still counted in the
process's resident set until the heap is trimmed. glibc trims only the top of its heap on its own,
so the trainer asks for a full trim (``malloc_trim(0)``) once the state exists and once the step is
compiled. On the 125m float32 step (remat ``full``) that took the peak resident memory from 2.73
to 2.54 GiB (docs/performance.md). Elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None where the C library has none (macOS, musl, Windows)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_free_memory() -> bool:
    """Return the heap's free pages to the OS; True when the C library could (glibc)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
