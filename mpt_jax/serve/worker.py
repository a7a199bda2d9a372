"""The model thread: one ``Batcher`` driven by one thread, fed through a bounded queue.

JAX is called from this thread only. The HTTP side hands over ``Job``s (``submit``: all of a
request's prompts or none, so a full queue refuses the request whole) and asks for cancellations
(``cancel``); this thread moves queued jobs into the batcher when it has a free row for them (so
the queue holds exactly the requests waiting for a row, and its bound is the server's
backpressure), runs ``Batcher.step`` and sends each event to its job's asyncio queue on the
event loop (``call_soon_threadsafe``). A failure in a step fails the jobs it held with a 500 and
the thread goes on: a request never takes the server down.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import threading
import time
from typing import Any

from absl import logging

from mpt_jax.generate import Batcher, Request, StreamEvent
from mpt_jax.sampling import SamplingParams
from mpt_jax.serve.metrics import ServerMetrics
from mpt_jax.serve.protocol import APIError


class QueueFull(Exception):
    """The queue has no room for the request (answered 429)."""


@dataclasses.dataclass(eq=False)
class Job:
    """One prompt of an HTTP request on its way through the model thread.

    ``events`` (an ``asyncio.Queue`` of the request's event loop) receives ``(choice, StreamEvent)``
    for each token, or ``(choice, APIError)`` when the job failed; several jobs of one request
    (a list of prompts) share it. ``sampling`` holds checked ``SamplingParams.make`` arguments:
    the arrays are made on the model thread."""

    prompt: list[int]
    max_tokens: int
    sampling: dict[str, float]
    seed: int
    stop_ids: frozenset[int]
    stop: tuple[str, ...]
    choice: int
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    arrived: float = dataclasses.field(default_factory=time.perf_counter)
    cancelled: bool = False
    id: int | None = None  # the batcher's, once it holds the job
    last: float | None = None  # when the previous token came

    def request(self) -> Request:
        sampling = SamplingParams.make(1, **self.sampling)
        return Request(self.prompt, self.max_tokens, sampling, self.seed, self.stop_ids, self.stop)


class ModelWorker:
    """Runs ``batcher`` in a background thread; at most ``max_queue`` jobs wait for a row."""

    def __init__(self, batcher: Batcher, metrics: ServerMetrics, *, max_queue: int):
        if max_queue < 1:
            raise ValueError(f"max_queue={max_queue} must be positive")
        self.batcher, self.metrics, self.max_queue = batcher, metrics, max_queue
        self._cond = threading.Condition()
        self._inbox: collections.deque[Job] = collections.deque()
        self._cancels: list[Job] = []
        self._jobs: dict[int, Job] = {}  # batcher id -> job
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="mpt-jax-model", daemon=True)
        metrics.queue_depth.read_from(self.queue_depth)
        metrics.rows_busy.read_from(lambda: len(self.batcher.active))
        metrics.rows.set(batcher.engine.rows)

    # -- the HTTP side (any thread) --

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)

    def alive(self) -> bool:
        return self._thread.is_alive()

    def queue_depth(self) -> int:
        """Jobs waiting for a row: queued here, or admitted to the batcher but not yet prefilled."""
        return len(self._inbox) + len(self.batcher.waiting)

    def submit(self, jobs: list[Job]) -> None:
        """Queues all of ``jobs`` or, when they do not fit, none (raises ``QueueFull``)."""
        with self._cond:
            if len(self._inbox) + len(jobs) > self.max_queue:
                raise QueueFull(f"{len(self._inbox)} requests are waiting (at most {self.max_queue})")
            self._inbox.extend(jobs)
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """Drops ``job``: from the queue, or from its row (freed before the next step)."""
        with self._cond:
            if job.cancelled:
                return
            job.cancelled = True
            self._cancels.append(job)
            self._cond.notify()

    # -- the model thread --

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._stopping or self._inbox or self._cancels or self.batcher.has_work()):
                    self._cond.wait()
                if self._stopping:
                    break
                cancels, self._cancels = self._cancels, []
                for job in cancels:
                    if job.id is not None and self._jobs.pop(job.id, None) is not None:
                        self.batcher.cancel(job.id)
                        self.metrics.requests.inc(reason="cancelled")
                room = len(self.batcher.free_rows()) - len(self.batcher.waiting)
                taken = []
                while self._inbox and len(taken) < room:
                    job = self._inbox.popleft()
                    if job.cancelled:
                        self.metrics.requests.inc(reason="cancelled")
                    else:
                        taken.append(job)
            for job in taken:
                try:
                    job.id = self.batcher.submit(job.request())
                except ValueError as e:  # the HTTP side checks first; this is the last line
                    self._send(job, APIError(400, str(e)))
                    continue
                self._jobs[job.id] = job
                self.metrics.prompt_tokens.inc(len(job.prompt))
            try:
                events = self.batcher.step()
            except Exception as e:  # noqa: BLE001 - any failure of a step fails its jobs, not the server
                logging.exception("serve: a model step failed")
                self._fail_all(e)
                continue
            self._deliver(events)

    def _deliver(self, events: list[StreamEvent]) -> None:
        t = time.perf_counter()
        for ev in events:
            job = self._jobs.get(ev.index)
            if job is None:
                continue
            if ev.token_id is not None:
                self.metrics.generation_tokens.inc()
                if job.last is None:
                    self.metrics.ttft.observe(t - job.arrived)
                else:
                    self.metrics.per_token.observe(t - job.last)
                job.last = t
            if ev.finish_reason is not None:
                del self._jobs[ev.index]
                self.metrics.requests.inc(reason=ev.finish_reason)
            self._send(job, ev)

    def _fail_all(self, error: Exception) -> None:
        failure = APIError(500, f"the model step failed: {type(error).__name__}: {error}", code="model_error")
        for job_id, job in list(self._jobs.items()):
            self.batcher.cancel(job_id)
            self.metrics.requests.inc(reason="error")
            self._send(job, failure)
        self._jobs.clear()

    @staticmethod
    def _send(job: Job, item: Any) -> None:
        try:
            job.loop.call_soon_threadsafe(job.events.put_nowait, (job.choice, item))
        except RuntimeError:  # the request's event loop is closed: nobody is listening
            pass
