"""Micro-batching: many callers, one device call per batch, a bounded queue in front.

The service's request handlers reserve room for a request's images (`reserve`), decode them,
then `submit` them; one worker thread takes what is waiting, up to `batch_size` items, and runs
them in one call of `run_batch`. When fewer are waiting it waits for more, but never longer than
`max_wait_s` after the oldest waiting item arrived, so a lone request pays at most that much
extra latency while a busy server fills whole batches. Items that waited while the device was
busy go out at once.

What can go wrong, and what the batcher does about it:

- too much work: the queue holds at most `max_queue` items, reserved or waiting; a request that
  does not fit is refused whole (`QueueFull`) before any of its images is decoded, so a caller
  can answer "busy, retry" instead of letting latency or memory grow without bound;
- a slow or hung device call: every item may carry a deadline (on `clock`); a watchdog thread
  fails the items whose deadline passed (`DeadlineExceeded`, naming the wait), queued or in the
  call, and the batcher reports itself unhealthy (`health`) and refuses new work (`Stalled`)
  while one call has run longer than `stall_s`;
- a failing batch: its items are run again one by one, so only the items that fail alone get
  the error;
- a dead worker (an exception that is not an `Exception`, e.g. SystemExit from inside the
  device call): every waiting item fails at once (`WorkerStopped`), the batcher is unhealthy and
  refuses new work; the process should be restarted.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
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
    """The batcher was closed (or its worker stopped); no more items are taken."""


class WorkerStopped(BatcherClosed):
    """The worker thread died; the message says of what. Nothing more will be served."""


class Stalled(RuntimeError):
    """A device call has run longer than `stall_s`; new work is refused until it returns."""


class DeadlineExceeded(TimeoutError):
    """An item was not served before its deadline; the message says where it waited."""


@dataclasses.dataclass
class _Job:
    item: Any
    future: concurrent.futures.Future
    arrived: float  # on the batcher's clock
    deadline: float | None  # on the batcher's clock
    since: float  # time.monotonic() at arrival: how long a batch may wait to fill


@dataclasses.dataclass(frozen=True)
class BatchInfo:
    """How an item was served: `size` items shared its call, `wait_s` queued, `run_s` the call.
    `retried`: its batch failed and it was run again alone."""

    size: int
    wait_s: float
    run_s: float
    retried: bool = False


def _settle(
    future: concurrent.futures.Future, result: Any = None, error: BaseException | None = None
) -> None:
    """Set a future's outcome unless it already has one (expired or cancelled meanwhile)."""
    try:
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)
    except concurrent.futures.InvalidStateError:
        pass


class Reservation:
    """Room for up to `n` items in the queue, held until `submit` or `release` (or the end of
    a `with` block); see `Batcher.reserve`."""

    _tokens = itertools.count()

    def __init__(self, batcher: Batcher, n: int):
        self._batcher = batcher
        self.n = n
        self.token = next(self._tokens)

    def submit(self, items: Sequence[Any], deadline: float | None = None):
        """Queue `items` (at most the reserved number) in the reserved room: one future each."""
        items = list(items)
        if len(items) > self.n:
            raise ValueError(f"{len(items)} items for a reservation of {self.n}")
        return self._batcher._enqueue(items, deadline, self)

    def release(self) -> None:
        """Give back what was not submitted (idempotent)."""
        self._batcher._release(self)

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class Batcher:
    """Runs `run_batch(items) -> results` (one result per item, same order) on a worker thread.

    `submit(items)` (or `reserve(n)` then `Reservation.submit`) returns one
    `concurrent.futures.Future` per item; each resolves to `(result, BatchInfo)`, or to the
    exception of its item (`DeadlineExceeded`, `WorkerStopped`, or what `run_batch` raised for
    that item when run alone).

    clock: the time source of arrivals, deadlines and stalls (monotonic seconds; tests pass a
    fake one). stall_s: a device call longer than this makes the batcher unhealthy (None:
    never). tick_s: how often the watchdog looks for missed deadlines.
    """

    def __init__(
        self,
        run_batch: Callable[[list[Any]], Sequence[Any]],
        batch_size: int,
        max_wait_s: float = 0.01,
        max_queue: int = 64,
        name: str = "batcher",
        clock: Callable[[], float] = time.monotonic,
        stall_s: float | None = None,
        tick_s: float = 0.05,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if max_queue < batch_size:
            raise ValueError(f"max_queue ({max_queue}) must be at least batch_size ({batch_size})")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must not be negative, got {max_wait_s}")
        if stall_s is not None and stall_s <= 0:
            raise ValueError(f"stall_s must be positive, got {stall_s}")
        self.run_batch = run_batch
        self.batch_size = int(batch_size)
        self.max_wait_s = float(max_wait_s)
        self.max_queue = int(max_queue)
        self.clock = clock
        self.stall_s = stall_s
        self._jobs: deque[_Job] = deque()
        self._reserved: dict[int, int] = {}  # reservation token -> slots still held
        self._running: tuple[list[_Job], float] | None = None  # the call in progress, its start
        self._cond = threading.Condition()
        self._closed = False
        self._died: BaseException | None = None
        self.batches = 0  # device calls made
        self.items = 0  # items served
        self.expired = 0  # items failed by their deadline
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()
        self._stop = threading.Event()
        self._tick_s = float(tick_s)
        self._watchdog = threading.Thread(target=self._watch, name=f"{name}-watchdog", daemon=True)
        self._watchdog.start()

    # ---------------------------------------------------------------------------- callers

    def reserve(self, n: int) -> Reservation:
        """Hold room for `n` items (all or none) before preparing them; QueueFull if there is
        none now, WorkerStopped, BatcherClosed or Stalled if no work is taken at all."""
        if n > self.max_queue:
            raise ValueError(f"{n} items at once; the queue holds at most {self.max_queue}")
        reservation = Reservation(self, n)
        with self._cond:
            self._check_taking()
            used = len(self._jobs) + sum(self._reserved.values())
            if used + n > self.max_queue:
                room = self.max_queue - used
                raise QueueFull(f"{used} items queued or reserved, room for {room}")
            self._reserved[reservation.token] = n
        return reservation

    def submit(self, items: Sequence[Any], deadline: float | None = None):
        """Queue `items` together (all or none) with an optional deadline (on `clock`); QueueFull
        if they do not fit now."""
        items = list(items)
        with self.reserve(len(items)) as reservation:
            return reservation.submit(items, deadline)

    def _check_taking(self) -> None:
        """Raise why no new work is taken, if so (call with the lock held)."""
        if self._died is not None:
            raise WorkerStopped(self._died_reason())
        if self._closed:
            raise BatcherClosed("the batcher is closed")
        stalled = self._stalled_for()
        if stalled is not None:
            raise Stalled(self._stall_reason(stalled))

    def _enqueue(self, items, deadline, reservation) -> list[concurrent.futures.Future]:
        now, since = self.clock(), time.monotonic()
        jobs = [_Job(item, concurrent.futures.Future(), now, deadline, since) for item in items]
        with self._cond:
            held = self._reserved.get(reservation.token)
            if held is None:
                raise ValueError("this reservation was released")
            self._check_taking()
            self._reserved[reservation.token] = held - len(jobs)
            self._jobs.extend(jobs)
            self._cond.notify_all()
        return [job.future for job in jobs]

    def _release(self, reservation: Reservation) -> None:
        with self._cond:
            self._reserved.pop(reservation.token, None)

    @property
    def waiting(self) -> int:
        """Items queued and not yet taken by the worker."""
        with self._cond:
            return len(self._jobs)

    @property
    def reserved(self) -> int:
        """Queue room held for items being prepared."""
        with self._cond:
            return sum(self._reserved.values())

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def health(self) -> tuple[bool, str]:
        """(healthy, 'ok' or why not): the worker died, the batcher is closed, or a device call
        has run longer than `stall_s`."""
        with self._cond:
            try:
                self._check_taking()
            except (BatcherClosed, Stalled) as why:
                return False, str(why)
        if not self._thread.is_alive():
            return False, "the batching worker stopped"
        return True, "ok"

    def close(self, timeout: float | None = 10.0) -> None:
        """Stop taking items, serve those already queued, and join the worker."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)
        self._stop.set()
        self._watchdog.join(timeout)

    # ---------------------------------------------------------------------------- deadlines

    def expire(self) -> int:
        """Fail every item, queued or in the device call, whose deadline has passed; returns
        how many. The watchdog calls this every `tick_s`."""
        now = self.clock()
        failed: list[tuple[_Job, str]] = []
        with self._cond:
            kept: deque[_Job] = deque()
            for job in self._jobs:
                if job.deadline is not None and now >= job.deadline:
                    failed.append((job, f"waited {now - job.arrived:.3g} s in the queue"))
                else:
                    kept.append(job)
            self._jobs = kept
            if self._running is not None:
                jobs, start = self._running
                for job in jobs:
                    if job.deadline is not None and now >= job.deadline and not job.future.done():
                        failed.append(
                            (
                                job,
                                f"waited {start - job.arrived:.3g} s in the queue and "
                                f"{now - start:.3g} s in a device call that has not returned",
                            )
                        )
        for job, where in failed:
            limit = job.deadline - job.arrived
            _settle(
                job.future,
                error=DeadlineExceeded(f"no result within the deadline of {limit:.3g} s: {where}"),
            )
        self.expired += len(failed)
        return len(failed)

    def _stalled_for(self) -> float | None:
        """How long the call in progress has run, when that is over `stall_s` (lock held)."""
        if self.stall_s is None or self._running is None:
            return None
        ran = self.clock() - self._running[1]
        return ran if ran > self.stall_s else None

    def _stall_reason(self, ran: float) -> str:
        return (
            f"the model has been in one device call for {ran:.3g} s, over the limit of "
            f"{self.stall_s:.3g} s; no new work is taken until it returns"
        )

    def _died_reason(self) -> str:
        err = self._died
        return f"the batching worker stopped ({type(err).__name__}: {err}); restart the service"

    def _watch(self) -> None:
        while not self._stop.wait(self._tick_s):
            try:
                self.expire()
            except Exception:  # noqa: BLE001 - the watchdog must outlive any one failure
                log.exception("the batcher's watchdog failed")

    # ---------------------------------------------------------------------------- the worker

    def _take(self) -> list[_Job] | None:
        """The next batch, or None when closed and drained."""
        with self._cond:
            while True:
                while not self._jobs:
                    if self._closed:
                        return None
                    self._cond.wait()
                oldest = self._jobs[0].since
                while len(self._jobs) < self.batch_size and not self._closed and self._jobs:
                    left = oldest + self.max_wait_s - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                if not self._jobs:  # all expired while waiting for more
                    continue
                n = min(self.batch_size, len(self._jobs))
                jobs = [self._jobs.popleft() for _ in range(n)]
                jobs = [j for j in jobs if j.future.set_running_or_notify_cancel()]
                if jobs:
                    self._running = (jobs, self.clock())
                    return jobs

    def _loop(self) -> None:
        try:
            while True:
                jobs = self._take()
                if jobs is None:
                    return
                try:
                    self._serve(jobs)
                finally:
                    with self._cond:
                        self._running = None
        except BaseException as err:
            with self._cond:
                self._died = err
                orphans, self._jobs = list(self._jobs), deque()
            log.critical("the batching worker stopped: %s: %s", type(err).__name__, err)
            stopped = WorkerStopped(self._died_reason())
            for job in orphans:
                _settle(job.future, error=stopped)
            # The thread ends here; the batcher reports it (`health`) and refuses new work.

    def _serve(self, jobs: list[_Job]) -> None:
        start = self.clock()
        try:
            results = list(self.run_batch([j.item for j in jobs]))
            if len(results) != len(jobs):
                raise RuntimeError(f"run_batch gave {len(results)} results for {len(jobs)}")
        except Exception as err:  # noqa: BLE001 - every failure goes to the callers
            if len(jobs) == 1:
                log.error("an item failed: %s: %s", type(err).__name__, err)
                _settle(jobs[0].future, error=err)
                return
            log.warning(
                "a batch of %d failed (%s: %s); running its items one by one",
                len(jobs), type(err).__name__, err,
            )  # fmt: skip
            for job in jobs:
                self._serve_alone(job)
            return
        except BaseException as err:
            for job in jobs:
                _settle(job.future, error=WorkerStopped(f"{type(err).__name__}: {err}"))
            raise
        run_s = self.clock() - start
        self.batches += 1
        self.items += len(jobs)
        for job, result in zip(jobs, results, strict=True):
            _settle(job.future, (result, BatchInfo(len(jobs), start - job.arrived, run_s)))

    def _serve_alone(self, job: _Job) -> None:
        """Run one item of a failed batch by itself: its own result, or its own error."""
        if job.future.done():  # expired meanwhile
            return
        start = self.clock()
        with self._cond:
            self._running = ([job], start)
        try:
            (result,) = list(self.run_batch([job.item]))
        except Exception as err:  # noqa: BLE001
            log.error("an item failed alone: %s: %s", type(err).__name__, err)
            _settle(job.future, error=err)
            return
        except BaseException as err:
            _settle(job.future, error=WorkerStopped(f"{type(err).__name__}: {err}"))
            raise
        self.batches += 1
        self.items += 1
        info = BatchInfo(1, start - job.arrived, self.clock() - start, retried=True)
        _settle(job.future, (result, info))
