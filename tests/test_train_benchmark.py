"""benchmarks/train_throughput.py's own bookkeeping: the VM's stolen share printed beside each
round, and the per-step records every table reads."""

import sys

import pytest

from benchmarks import train_throughput as bench


def test_stolen_share_is_steal_over_all_ticks():
    # user, nice, system, idle, iowait, irq, softirq, steal
    before = [100, 0, 10, 50, 0, 0, 0, 5]
    after = [160, 0, 10, 70, 0, 0, 0, 25]  # 100 ticks passed, 20 of them stolen
    assert bench.stolen_share(before, after) == pytest.approx(0.2)
    assert bench.stolen_share(before, before) is None  # no time passed
    assert bench.stolen_share(None, after) is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/stat is Linux's")
def test_host_cpu_ticks_reads_eight_growing_counters():
    first = bench.host_cpu_ticks()
    sum(i * i for i in range(200_000))  # some CPU time passes
    second = bench.host_cpu_ticks()
    assert len(first) == len(second) == 8
    assert all(b >= a >= 0 for a, b in zip(first, second, strict=True))


def test_run_steps_records_each_timed_step():
    losses = iter([3.0, 2.0, 1.0])
    out = bench.run_steps(lambda: next(losses), 2)
    assert out["losses"] == [3.0, 2.0, 1.0]  # the warm-up step's loss first
    for key in ("times", "faults", "system", "stolen"):
        assert len(out[key]) == 2, key
    assert all(s is None or 0.0 <= s <= 1.0 for s in out["stolen"])
