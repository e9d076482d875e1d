"""How a worker takes jobs: as many as it has Prefect call slots free, the moment one frees.

arq runs the process: its signals, the grace period on SIGTERM, the start-up and
shut-down hooks, the poll loop. Its per-job protocol is not used: a payload key,
an in-progress key and a retry key per job, and a walk of the queue's head on
every poll by every worker, cost a worker 30 Redis commands per job and grew
with the number of workers. Instead (see `worker.lua`):

- one TAKE script claims a batch of due jobs and leases them: a job's queue score
  moves to the end of its lease, so no other worker sees it meanwhile;
- one DUE command per lease third renews every lease this worker holds;
- a job's last transition takes it out of the queue, and requeues it if it waits.

A job's call slot is reserved before it is taken and freed as soon as Prefect
answers, before its outcome is written: the next call goes out at once, and
Prefect never waits on this worker's bookkeeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from arq.worker import Worker

from worker.concurrency import AdaptiveLimit
from worker.durability import NotDurable
from worker.settings import Settings
from worker.store import JobStore, Taken, TakeNotConfirmed

log = logging.getLogger(__name__)


class Slot:
    """One reserved call slot, given back once however often `release` is called."""

    def __init__(self, limit: AdaptiveLimit, on_release: Callable[[], None]) -> None:
        self._limit = limit
        self._on_release = on_release
        self._held = True

    async def release(self) -> None:
        if self._held:
            self._held = False
            await self._limit.release()
            self._on_release()


JobRunner = Callable[[Taken, Slot | None], Awaitable[None]]
GiveBack = Callable[[list[Taken], NotDurable], Awaitable[None]]


class Dispatcher:
    """Takes jobs into `tasks` (arq's, so that its shutdown waits for them) and runs them."""

    def __init__(
        self,
        *,
        store: JobStore,
        concurrency: AdaptiveLimit,
        settings: Settings,
        run: JobRunner,
        give_back: GiveBack,
        tasks: dict[str, asyncio.Task[Any]],
        may_take: Callable[[], bool],
    ) -> None:
        self.store = store
        self.concurrency = concurrency
        self.settings = settings
        self.run = run
        self.give_back = give_back
        self.tasks = tasks
        self.may_take = may_take
        self._lock = asyncio.Lock()
        self._again = False  # a slot freed while a take was in flight
        self._filler: asyncio.Task[None] | None = None
        self._renewed_at = time.monotonic()

    def wake(self) -> None:
        """A slot freed or the limit grew: take more now, not at the next poll."""
        if self._filler is None or self._filler.done():
            self._filler = asyncio.create_task(self._fill_quietly())
        else:
            self._again = True

    async def _fill_quietly(self) -> None:
        # Errors here are the poll loop's to raise (it restarts the worker on a lost
        # Redis); this only saves the wait for the next poll.
        try:
            await self.fill()
        except Exception as exc:
            log.debug("take between polls failed (the next poll tries again): %r", exc)

    async def fill(self) -> None:
        """Take jobs until the free slots are used or nothing more is due."""
        async with self._lock:
            while self.may_take():
                self._again = False
                limit = int(self.concurrency.limit)
                room = min(
                    limit - self.concurrency.in_flight,
                    self.settings.worker_concurrency - len(self.tasks),
                )
                # With many calls in flight, wait for a quarter of them to come back and
                # take those jobs in one step: a take's own commands (the queue read, the
                # lease, the counters) are then shared. With few, never wait.
                if room < max(1, limit // 4) and self.concurrency.in_flight > 0:
                    return
                reserved = self.concurrency.reserve(room)
                if reserved <= 0:
                    return
                try:
                    taken = await self.store.take(reserved, lease_s=self.settings.worker_lease_s)
                except TakeNotConfirmed as exc:
                    await self.concurrency.release(reserved)
                    await self.give_back(exc.taken, exc.cause)
                    return  # the next poll tries again
                except NotDurable as exc:  # refused before anything was written
                    await self.concurrency.release(reserved)
                    log.error("cannot take jobs: %s", exc)
                    return
                except BaseException:
                    await self.concurrency.release(reserved)
                    raise
                claimed = sum(1 for job in taken if job.claimed)
                await self.concurrency.release(reserved - claimed)
                for job in taken:
                    self._start(job)
                if len(taken) < reserved and not self._again:
                    return

    def _start(self, job: Taken) -> None:
        slot = Slot(self.concurrency, self.wake) if job.claimed else None
        job_id = job.record.job_id
        self.tasks[job_id] = asyncio.create_task(self._run(job, slot), name=f"job {job_id}")

    async def _run(self, job: Taken, slot: Slot | None) -> None:
        try:
            await self.run(job, slot)
        finally:
            if slot is not None:
                await slot.release()
            # Out of `tasks` now, not at the next poll: the room for a new job counts them.
            self.tasks.pop(job.record.job_id, None)
            self.wake()

    async def renew_leases(self) -> None:
        """Every third of a lease, extend the leases of all jobs held, in one command."""
        lease_s = self.settings.worker_lease_s
        if time.monotonic() - self._renewed_at < lease_s / 3:
            return
        self._renewed_at = time.monotonic()
        await self.store.renew(list(self.tasks), lease_s=lease_s)

    async def stop(self) -> None:
        if self._filler is not None:
            self._filler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._filler


class QueueWorker(Worker):
    """arq's Worker with the dispatcher in place of arq's own job taking."""

    async def _poll_iteration(self) -> None:
        dispatcher: Dispatcher = self.ctx["dispatcher"]
        if self.allow_pick_jobs:
            await dispatcher.fill()  # a Redis error ends the run: see worker.app.run_worker
        await dispatcher.renew_leases()
        await self.heart_beat()
