"""The server's metrics in the Prometheus text exposition format (version 0.0.4), written here.

Counters, gauges and histograms with labels, safe to update from the model thread while the
HTTP side renders them. A gauge may be read from a function at render time (queue depth, busy
rows), so it is never stale. Names follow Prometheus' conventions: a counter ``x`` is exposed
as ``x_total`` (its HELP and TYPE lines too), a histogram as ``x_bucket{le=...}``, ``x_sum`` and ``x_count``.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Seconds: from a few ms (a decode step of a small model) to a minute (a long queue).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(str(v))}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _number(x: float) -> str:
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    return repr(float(x)) if not float(x).is_integer() else str(int(x))


class _Metric:
    kind = ""

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()):
        self.name, self.help, self.label_names = name, help_text, tuple(labels)
        self._lock = threading.Lock()

    def _key(self, labels: dict[str, str]) -> tuple[str, ...]:
        if set(labels) != set(self.label_names):
            raise ValueError(f"metric {self.name}: labels {sorted(labels)} != {sorted(self.label_names)}")
        return tuple(str(labels[n]) for n in self.label_names)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()):
        super().__init__(name, help_text, labels)
        self._values: dict[tuple[str, ...], float] = {}

    def header(self) -> list[str]:  # the text format names a counter as its samples: x_total
        return [f"# HELP {self.name}_total {self.help}", f"# TYPE {self.name}_total {self.kind}"]

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        if amount < 0:
            raise ValueError(f"counter {self.name} only goes up (got {amount})")
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        if not items and not self.label_names:
            items = [((), 0.0)]
        return self.header() + [f"{self.name}_total{_labels(self.label_names, k)} {_number(v)}" for k, v in items]


class Gauge(_Metric):
    """A value set by the code, or read from ``read()`` when rendered."""

    kind = "gauge"

    def __init__(self, name: str, help_text: str, read: Callable[[], float] | None = None):
        super().__init__(name, help_text)
        self._value, self._read = 0.0, read

    def set(self, value: float) -> None:
        with self._lock:
            self._value = float(value)

    def read_from(self, read: Callable[[], float]) -> None:
        self._read = read

    def value(self) -> float:
        if self._read is not None:
            return float(self._read())
        with self._lock:
            return self._value

    def render(self) -> list[str]:
        return self.header() + [f"{self.name} {_number(self.value())}"]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help_text: str, buckets: Sequence[float] = LATENCY_BUCKETS):
        super().__init__(name, help_text)
        if list(buckets) != sorted(buckets) or not buckets:
            raise ValueError(f"histogram {name}: buckets {buckets} must be increasing")
        self.buckets = tuple(float(b) for b in buckets) + (math.inf,)
        self._counts = [0] * len(self.buckets)
        self._sum, self._count = 0.0, 0

    def observe(self, value: float) -> None:
        with self._lock:
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    self._counts[i] += 1
                    break
            self._sum += value
            self._count += 1

    def count(self) -> int:
        with self._lock:
            return self._count

    def render(self) -> list[str]:
        with self._lock:
            counts, total, n = list(self._counts), self._sum, self._count
        lines, running = self.header(), 0
        for bound, c in zip(self.buckets, counts, strict=True):
            running += c
            lines.append(f'{self.name}_bucket{{le="{_number(bound)}"}} {running}')
        return lines + [f"{self.name}_sum {_number(total)}", f"{self.name}_count {n}"]


class ServerMetrics:
    """Every metric the server exports (``prefix`` on each name)."""

    def __init__(self, prefix: str = "mpt_jax"):
        p = prefix
        self.http_requests = Counter(
            f"{p}_http_requests", "HTTP requests answered, by path and status", ("path", "code")
        )
        self.requests = Counter(f"{p}_requests", "generation requests (one per prompt) ended, by reason", ("reason",))
        self.prompt_tokens = Counter(f"{p}_prompt_tokens", "prompt tokens admitted into cache rows")
        self.generation_tokens = Counter(f"{p}_generation_tokens", "tokens generated")
        self.queue_depth = Gauge(f"{p}_queue_depth", "requests waiting for a cache row")
        self.rows_busy = Gauge(f"{p}_batch_rows_busy", "cache rows holding a request")
        self.rows = Gauge(f"{p}_batch_rows", "cache rows (--max_batch)")
        self.ttft = Histogram(f"{p}_time_to_first_token_seconds", "arrival to first generated token")
        self.per_token = Histogram(f"{p}_time_per_output_token_seconds", "time between a request's tokens")

    def all(self) -> list[_Metric]:
        return [v for v in vars(self).values() if isinstance(v, _Metric)]

    def render(self) -> str:
        return "\n".join(line for m in self.all() for line in m.render()) + "\n"
