"""Micro-batching: many callers, one device call per batch, a bounded queue in front.

The service's request handlers `submit` images one request at a time; one worker thread takes
what is waiting, up to `batch_size` items, and runs them in one call of `run_batch`. When fewer
are waiting it waits for more, but never longer than `max_wait_s` after the oldest waiting item
arrived, so a lone request pays at most that much extra latency while a busy server fills whole
batches. Items that waited while the device was busy go out at once.

The queue holds at most `max_queue` items: a request that does not fit is refused whole
(`QueueFull`), so a caller can answer "busy, retry" instead of letting latency grow without bound.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """The queue cannot take the items now; retry later."""


class BatcherClosed(RuntimeError):
    """The batcher was closed; no more items are taken."""


@dataclasses.dataclass
class _Job:
    item: Any
    future: concurrent.futures.Future
    arrived: float


@dataclasses.dataclass(frozen=True)
class BatchInfo:
    """How an item was served: `size` items shared its call, `wait_s` queued, `run_s` the call."""

    size: int
    wait_s: float
    run_s: float


class Batcher:
    """Runs `run_batch(items) -> results` (one result per item, same order) on a worker thread.

    `submit(items)` returns one `concurrent.futures.Future` per item; each resolves to
    `(result, BatchInfo)`, or to the exception `run_batch` raised for that batch.
    """

    def __init__(
        self,
        run_batch: Callable[[list[Any]], Sequence[Any]],
        batch_size: int,
        max_wait_s: float = 0.01,
        max_queue: int = 64,
        name: str = "batcher",
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if max_queue < batch_size:
            raise ValueError(f"max_queue ({max_queue}) must be at least batch_size ({batch_size})")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must not be negative, got {max_wait_s}")
        self.run_batch = run_batch
        self.batch_size = int(batch_size)
        self.max_wait_s = float(max_wait_s)
        self.max_queue = int(max_queue)
        self._jobs: deque[_Job] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self.batches = 0  # device calls made
        self.items = 0  # items served
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------------------- callers

    def submit(self, items: Sequence[Any]) -> list[concurrent.futures.Future]:
        """Queue `items` together (all or none); QueueFull if they do not fit now."""
        items = list(items)
        if len(items) > self.max_queue:
            raise ValueError(
                f"{len(items)} items at once; the queue holds at most {self.max_queue}"
            )
        now = time.monotonic()
        jobs = [_Job(item, concurrent.futures.Future(), now) for item in items]
        with self._cond:
            if self._closed:
                raise BatcherClosed("the batcher is closed")
            if len(self._jobs) + len(jobs) > self.max_queue:
                raise QueueFull(
                    f"{len(self._jobs)} items waiting, room for {self.max_queue - len(self._jobs)}"
                )
            self._jobs.extend(jobs)
            self._cond.notify_all()
        return [job.future for job in jobs]

    @property
    def waiting(self) -> int:
        """Items queued and not yet taken by the worker."""
        with self._cond:
            return len(self._jobs)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self, timeout: float | None = 10.0) -> None:
        """Stop taking items, serve those already queued, and join the worker."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)

    # ---------------------------------------------------------------------------- the worker

    def _take(self) -> list[_Job] | None:
        """The next batch, or None when closed and drained."""
        with self._cond:
            while not self._jobs:
                if self._closed:
                    return None
                self._cond.wait()
            deadline = self._jobs[0].arrived + self.max_wait_s
            while len(self._jobs) < self.batch_size and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            n = min(self.batch_size, len(self._jobs))
            return [self._jobs.popleft() for _ in range(n)]

    def _loop(self) -> None:
        while True:
            jobs = self._take()
            if jobs is None:
                return
            jobs = [j for j in jobs if j.future.set_running_or_notify_cancel()]
            if not jobs:
                continue
            start = time.monotonic()
            try:
                results = list(self.run_batch([j.item for j in jobs]))
                if len(results) != len(jobs):
                    raise RuntimeError(f"run_batch gave {len(results)} results for {len(jobs)}")
            except BaseException as err:  # noqa: BLE001 - every failure goes to the callers
                log.exception("a batch of %d failed", len(jobs))
                for job in jobs:
                    job.future.set_exception(err)
                if not isinstance(err, Exception):
                    raise
                continue
            run_s = time.monotonic() - start
            self.batches += 1
            self.items += len(jobs)
            for job, result in zip(jobs, results, strict=True):
                job.future.set_result((result, BatchInfo(len(jobs), start - job.arrived, run_s)))
