"""host_memory.release_free_memory: freed heap pages leave the resident set (glibc)."""

import os
import sys

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
