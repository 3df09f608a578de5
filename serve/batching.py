"""Dynamic micro-batching: concurrent requests coalesced into one forward pass.

Requests enqueue *jobs*; one worker task takes the oldest job and, for prediction jobs, keeps
adding queued prediction jobs until the batch holds ``max_batch_size`` query rows (a curve with
three query epochs is three rows) or the oldest
job has waited ``max_wait_us``. It does not wait at all when no other prediction request is
being received (``arriving == 0``): a lone client pays no batching latency. The batch runs on a
single inference thread (onnxruntime releases the GIL, so the event loop keeps accepting and
parsing requests meanwhile); the next batch accumulates while this one computes.

The queue is bounded in query rows: a job that would exceed ``max_queue_size`` is refused at once
(``QueueFull`` → HTTP 503 with ``Retry-After``), so overload never grows memory or latency
without bound.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from pfn.errors import CurvecastError

log = logging.getLogger("curvecast.serve")


class QueueFull(CurvecastError):
    """The server is at capacity; retry after a moment."""

    status_code = 503


class ShuttingDown(CurvecastError):
    status_code = 503


@dataclass(eq=False)
class Job:
    kind: str  # "predict": coalescable; "call": runs alone
    payload: Any  # predict: whatever the batch function takes; call: a zero-arg callable
    size: int  # query rows (predict) or a cost estimate (call)
    future: asyncio.Future[Any]
    enqueued: float = field(default_factory=time.perf_counter)


@dataclass
class BatchStats:
    """Hooks for metrics; the batcher calls them from the event loop."""

    on_batch: Callable[[int, int, float], None] = lambda rows, jobs, seconds: None
    on_queue: Callable[[int], None] = lambda rows: None
    on_reject: Callable[[], None] = lambda: None


class MicroBatcher:
    def __init__(
        self,
        run_batch: Callable[[list[Any]], list[Any]],
        *,
        max_batch_size: int = 256,
        max_wait_us: int = 1000,
        max_queue_size: int = 4096,
        enabled: bool = True,
        stats: BatchStats | None = None,
    ) -> None:
        """``run_batch(payloads) -> results`` (one per payload; an Exception instance fails
        only its own job) runs on the inference thread."""
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_us / 1e6
        self.max_queue_size = max_queue_size
        self.enabled = enabled
        self.stats = stats or BatchStats()
        self.queue: collections.deque[Job] = collections.deque()
        self.queued = 0
        self.arriving = 0  # prediction requests being received/parsed, not yet enqueued
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="curvecast-infer")
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._worker(), name="batcher")

    async def close(self) -> None:
        """Refuse new jobs, finish the queued ones, stop the worker and the thread."""
        self._closing = True
        if self._task is not None:
            assert self._wake is not None
            self._wake.set()
            await self._task
        self.executor.shutdown(wait=True)

    # --- submitting -------------------------------------------------------------------------

    def check_room(self, size: int) -> None:
        """Raise QueueFull/ShuttingDown now if a job of this size would be refused (lets a
        route shed load before doing any per-request work)."""
        if self._closing or self._task is None:
            raise ShuttingDown("the server is shutting down; retry on another replica")
        if self.queued + size > self.max_queue_size:
            self.stats.on_reject()
            raise QueueFull(
                f"queue: {self.queued} query rows are waiting and {size} more would exceed "
                f"the limit of {self.max_queue_size}; retry after the Retry-After delay"
            )

    async def submit(self, kind: str, payload: Any, size: int) -> Any:
        self.check_room(size)
        job = Job(kind, payload, size, asyncio.get_running_loop().create_future())
        self.queue.append(job)
        self.queued += size
        self.stats.on_queue(self.queued)
        assert self._wake is not None
        self._wake.set()
        return await job.future

    async def call(self, fn: Callable[[], Any], size: int = 1) -> Any:
        """Run ``fn`` alone on the inference thread, in queue order."""
        return await self.submit("call", fn, size)

    # --- the worker ---------------------------------------------------------------------------

    def _pop(self) -> Job:
        job = self.queue.popleft()
        self.queued -= job.size
        return job

    async def _collect(self) -> list[Job]:
        """The next batch: the oldest job plus, for predictions, what may join it."""
        first = self._pop()
        batch, n = [first], first.size
        if first.kind != "predict" or not self.enabled:
            return batch
        deadline = first.enqueued + self.max_wait
        assert self._wake is not None
        while n < self.max_batch_size:
            if self.queue:
                nxt = self.queue[0]
                if nxt.kind != "predict" or n + nxt.size > self.max_batch_size:
                    break
                batch.append(self._pop())
                n += nxt.size
                continue
            remaining = deadline - time.perf_counter()
            if remaining <= 0 or self.arriving <= 0 or self._closing:
                break
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
            except TimeoutError:
                break
        return batch

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wake is not None
        while True:
            if not self.queue:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            batch = await self._collect()
            self.stats.on_queue(self.queued)
            live = [j for j in batch if not j.future.done()]  # drop jobs of gone clients
            if not live:
                continue
            t0 = time.perf_counter()
            try:
                if live[0].kind == "call":
                    results = [await loop.run_in_executor(self.executor, live[0].payload)]
                else:
                    payloads = [j.payload for j in live]
                    results = await loop.run_in_executor(self.executor, self.run_batch, payloads)
            except Exception as e:  # a bug, or a call job's own error: fail these jobs only
                if not isinstance(e, CurvecastError):
                    log.exception("inference batch failed")
                results = [e] * len(live)
            self.stats.on_batch(sum(j.size for j in live), len(live),
                                time.perf_counter() - t0)
            for j, r in zip(live, results, strict=True):
                if j.future.done():
                    continue
                if isinstance(r, BaseException):
                    j.future.set_exception(r)
                else:
                    j.future.set_result(r)
