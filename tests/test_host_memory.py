"""host_memory: freed heap pages leave the resident set (release_free_memory); a compiled step's
temporaries are reused from run to run instead of faulted in again (reuse_step_memory). glibc."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from mpt_jax import host_memory


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and glibc's malloc_trim")
def test_release_returns_freed_heap_pages():
    # 256 MiB in 64 KiB blocks: below glibc's mmap threshold, so they live in the heap, and a block
    # allocated after them keeps the heap's top in place: glibc's own trimming of the top cannot
    # return them when they are freed, only a full trim can.
    blocks = [np.ones(1 << 14, np.float32) for _ in range(4096)]
    pin = np.ones(1 << 14, np.float32)
    del blocks
    before = resident_bytes()
    assert host_memory.release_free_memory() is True
    after = resident_bytes()
    assert before - after > 128 << 20, (before, after)
    assert pin.sum() == 1 << 14


# Runs a jitted function whose 256 MiB temporary ([8192, 8192] float32, the first of two products)
# XLA allocates at every call, and counts the page faults of its fourth call.
_FAULTS = textwrap.dedent(
    """
    import json, resource, sys
    import jax, jax.numpy as jnp
    from mpt_jax import host_memory

    applied = host_memory.reuse_step_memory() if sys.argv[1] == "reuse" else False
    f = jax.jit(lambda x: jnp.sum((x @ x.T) @ x, axis=0))
    x = jnp.ones((8192, 64), jnp.float32) * 0.01
    for _ in range(3):
        f(x).block_until_ready()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    y = f(x).block_until_ready()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert host_memory.reusing_step_memory() == applied
    print(json.dumps({"applied": applied, "faults": faults, "sum": float(y.sum()),
                      "async": jax.config.read("jax_cpu_enable_async_dispatch")}))
    """
)


def _faults(mode: str) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    out = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _huge_pages_always() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[always]" in f.read()
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt and getrusage's page faults")
def test_reuse_step_memory_stops_refaulting_temporaries():
    pages = (8192 * 8192 * 4) // os.sysconf("SC_PAGE_SIZE")
    plain, reuse = _faults("plain"), _faults("reuse")
    assert not plain["applied"] and plain["async"]
    assert reuse["applied"] and not reuse["async"]
    if not _huge_pages_always():  # with 2 MiB pages a fresh mapping costs few faults
        assert plain["faults"] > pages // 2, plain  # a fresh mapping every call
    assert reuse["faults"] < pages // 20, reuse  # the same pages again
    assert reuse["sum"] == plain["sum"]


def test_reuse_step_memory_changes_nothing_once_jax_has_started():
    import jax

    jax.numpy.zeros(1).block_until_ready()  # the backends exist now
    async_before = jax.config.read("jax_cpu_enable_async_dispatch")
    assert host_memory.reuse_step_memory() is False
    assert not host_memory.reusing_step_memory()
    assert jax.config.read("jax_cpu_enable_async_dispatch") == async_before
