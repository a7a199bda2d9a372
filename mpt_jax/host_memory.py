"""How the host process's C heap holds memory: return its free pages, or keep them for the next step.

XLA runs in the host process and takes its memory from glibc's ``malloc``. Two habits of glibc
cost a CPU trainer:

- Compiling the train step (and the init function) leaves a few hundred MiB of freed compiler
  memory in the heap: free, but still counted in the resident set until the heap is trimmed, and
  glibc trims only the top of its heap on its own. ``release_free_memory`` asks for a full trim
  (``malloc_trim(0)``); the trainer calls it once the state exists and once the step is compiled.
  On the 125m float32 step (remat ``full``) that took the peak resident memory from 2.73 to 2.54
  GiB (docs/performance.md).
- XLA:CPU allocates a step's temporaries at every run (1.4 GiB for the 125m bfloat16 step).
  glibc serves a block that size with a fresh ``mmap`` and unmaps it when it is freed, so every
  step faults its temporaries in again page by page, zeroed by the kernel: about 455,000 page
  faults and 1.2 s of kernel CPU time a step. ``reuse_step_memory`` has the next step reuse the
  same pages instead.

Elsewhere than glibc both do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import importlib.metadata
import importlib.util
import sys

# mallopt's parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

_reusing = False  # set once reuse_step_memory has applied its settings in this process


@functools.cache
def _libc():
    """glibc, or None where the C library is another (macOS, musl, Windows)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
        libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


def release_free_memory() -> bool:
    """Return the heap's free pages to the OS; True when the C library could (glibc)."""
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


def _cpu_only_host() -> bool:
    """True when jax will run on the CPU alone: JAX_PLATFORMS says so, or no accelerator plugin
    (CUDA, ROCm: ``jax_plugins``) and no TPU runtime (``libtpu``) is installed."""
    import jax

    platforms = jax.config.jax_platforms
    if platforms:
        return {p.strip() for p in platforms.split(",")} == {"cpu"}
    if importlib.util.find_spec("libtpu") is not None or importlib.util.find_spec("jax_plugins") is not None:
        return False
    return not list(importlib.metadata.entry_points(group="jax_plugins"))


def _backends_started() -> bool:
    from jax._src import xla_bridge

    try:
        return bool(xla_bridge.backends_are_initialized())
    except AttributeError:  # a jax without it: assume started, and change nothing
        return True


def reuse_step_memory() -> bool:
    """Let each run of a compiled step reuse the memory the previous run freed; True when applied.

    Three settings together, none of which changes a result:

    - jax's CPU client runs each computation in the calling thread
      (``jax_cpu_enable_async_dispatch=False``), so that a step's temporaries are freed before the
      next step allocates its own (with asynchronous dispatch the next step often starts first,
      and a second block of temporaries would stay resident);
    - glibc serves every thread from its main heap and never with ``mmap``
      (``M_ARENA_MAX=1``, ``M_MMAP_MAX=0``): blocks above 32 MiB would otherwise be mapped and
      unmapped whole at each step;
    - glibc keeps the heap's freed top instead of trimming it (``M_TRIM_THRESHOLD``); the trainer's
      explicit ``release_free_memory`` calls still return free pages.

    On the 125m bfloat16 step this takes the page faults from about 455,000 a step to none, with
    the same peak resident memory (docs/performance.md). It applies only where nothing can be lost
    by it: glibc, a host where jax runs on the CPU alone, and before jax has started its backends
    (the client reads the dispatch setting once, when it is made). ``python -m mpt_jax.train``
    calls it first thing; from Python, call it before the first jax computation.
    """
    libc = _libc()
    if libc is None or not _cpu_only_host() or _backends_started():
        return False
    import jax

    jax.config.update("jax_cpu_enable_async_dispatch", False)
    libc.mallopt(_M_ARENA_MAX, 1)
    libc.mallopt(_M_MMAP_MAX, 0)
    # glibc takes the threshold as a size_t: -1 is the largest, so the heap's top is never trimmed
    # by free() itself.
    libc.mallopt(_M_TRIM_THRESHOLD, -1)
    global _reusing
    _reusing = True
    return True


def reusing_step_memory() -> bool:
    """Whether ``reuse_step_memory`` has applied its settings in this process."""
    return _reusing
