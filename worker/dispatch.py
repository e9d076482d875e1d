"""How a worker takes jobs: as many as it has Prefect call slots free, the moment one frees.

arq runs the process: its signals, the grace period on SIGTERM, the start-up and
shut-down hooks, the poll loop. Its per-job protocol is not used: a payload key,
an in-progress key and a retry key per job, and a walk of the queue's head on
every poll by every worker, cost a worker 30 Redis commands per job and grew
with the number of workers. Instead (see `worker.lua`):

- one TAKE script claims a batch of due jobs and leases them: a job's queue score
  moves to the end of its lease, so no other worker sees it meanwhile;
- one DUE command per lease third renews every lease this worker holds;
- a job's last transition takes it out of the queue, and requeues it if it waits;
- an idle worker sleeps until the next job is due (TAKE says when) or an enqueue
  wakes it (`listen_for_work`), at most `worker_poll_delay_s`: polling every
  0.05 s cost an idle worker 16 ms of CPU a second, and 60 Redis commands.

Prefect never waits on this worker's bookkeeping. A worker takes jobs for its
free call slots and, beyond them, a few more (half its slots, at least one)
that wait claimed, in memory, for a slot: when a call comes back, the next one
goes out at once, without a round trip to Redis (`Dispatcher.wake` hands the
slot over), and the take that refills the reserve runs while Prefect works.
Without them, every call waited for a take first: a worker of 2 slots kept
Prefect busy 1.5 of them (0.75x of a 2-process PostgreSQL Prefect's ceiling,
bench/b2_throughput.py). A call slot is freed as soon as Prefect answers,
before the outcome is written, and the outcome goes with the take that
refills the reserve (`Dispatcher.transition`).
At Prefect's pace, a round trip costs a worker more CPU than the rest of a job
(each one wakes the process from idle: bench/b6_queue_ceiling.py --service-ms),
so one per change instead of two is most of what a worker can save.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from arq.worker import Worker
from redis.asyncio import Redis
from redis.exceptions import RedisError

from worker.concurrency import AdaptiveLimit
from worker.contract import ENQUEUED_CHANNEL
from worker.durability import NotDurable
from worker.settings import Settings
from worker.store import JobStore, Taken, TakeNotConfirmed, Transition, Write
from worker.subscription import receive

log = logging.getLogger(__name__)

# A paced worker (a limit below one call) writes its outcomes with the take at the
# end of a pause this short: one round trip, not two, for a wait callers barely see.
_SHORT_PAUSE_S = 0.1
_RESUBSCRIBE_S = 1.0


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
        self._woken = asyncio.Event()
        self._next_due_s: float | None = None  # from the last take that found too few
        # Claimed jobs waiting for a call slot, oldest first (see the module's text).
        self._ready: collections.deque[asyncio.Future[Slot]] = collections.deque()
        # Status changes waiting for the next take, in the order they were made.
        self._writes: list[tuple[Write, asyncio.Future[Transition]]] = []

    async def transition(self, job_id: str, **change: Any) -> Transition:
        """`JobStore.transition`, written with the next take.

        Only for a job whose call slot is free already: the take waits for slots, so
        a job holding one while it waits here could wait for itself. The write is
        queued before this first yields, so a slot released just before it (and the
        take that follows) carries it.
        """
        future: asyncio.Future[Transition] = asyncio.get_running_loop().create_future()
        future.add_done_callback(_retrieved)  # its job may have been cut off meanwhile
        self._writes.append((self.store.transition_write(job_id, **change), future))
        self.wake()
        # Shielded: a job cut off by its timeout while waiting here still has its
        # outcome written (in order, before whatever it writes next).
        return await asyncio.shield(future)

    def wake(self) -> None:
        """A slot freed, the limit grew or jobs were enqueued: give the free slots to the
        jobs ready for them, and take more now, not at the next poll."""
        self._hand_over()
        self._woken.set()
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
        """Write the status changes waiting, and take jobs until the free slots are used
        or nothing more is due: one round trip per step."""
        async with self._lock:
            while True:
                self._again = False
                plan = self._plan()
                if plan is None:
                    return  # the writes waiting go with the take when those calls are back
                reserved, ahead = plan
                writes, self._writes = self._writes, []
                if not reserved and not ahead and not writes:
                    return
                taken = await self._take(reserved, ahead, writes)
                if taken is None:
                    return  # the next poll tries again
                if not self._again and (not reserved + ahead or len(taken) < reserved + ahead):
                    return

    def _hand_over(self) -> None:
        """Give free call slots to the jobs ready for them, oldest first: at once, so that
        Prefect's next call never waits for a take."""
        while self._ready:
            if self._ready[0].done():  # its job was cancelled (the worker is stopping)
                self._ready.popleft()
            elif self.concurrency.reserve(1):
                self._ready.popleft().set_result(Slot(self.concurrency, self.wake))
            else:
                return

    def _plan(self) -> tuple[int, int] | None:
        """How many jobs to take now: (into call slots reserved for them, to wait ready
        for a slot); None: wait."""
        if not self.may_take():
            return 0, 0
        if 0 < self.concurrency.paused_for_s <= _SHORT_PAUSE_S:
            return None  # the pause's end takes, with the writes waiting
        self._hand_over()
        slots = self.concurrency.slots
        ready = len(self._ready)
        # Jobs whose outcome waits for this take are done but for it: not counted.
        running = len(self.tasks) - len(self._writes) - ready
        free = min(slots - self.concurrency.in_flight, self.settings.worker_concurrency - running)
        wanted = max(0, max(1, slots // 2) - ready)
        # With many calls in flight, wait for a quarter of them to come back and take
        # those jobs in one step: a take's own commands (the queue read, the lease, the
        # counters) are then shared, and so is the round trip of their outcomes. With
        # few, never wait. Calls in flight always come back (their slots are released
        # before their outcomes wait here), so the writes waiting are sent then.
        if free + wanted < max(1, slots // 4) and self.concurrency.in_flight > 0:
            return None
        return max(0, self.concurrency.reserve(free)), wanted

    async def _take(
        self, reserved: int, ahead: int, writes: list[tuple[Write, asyncio.Future[Transition]]]
    ) -> list[Taken] | None:
        """One take with the writes waiting; None when it took nothing and should stop."""
        claimed = 0  # the reserved slots not claimed go back, whatever happens
        try:
            try:
                took = await self.store.take(
                    reserved + ahead,
                    lease_s=self.settings.worker_lease_s,
                    writes=[w for w, _ in writes],
                )
            except TakeNotConfirmed as exc:
                _resolve(writes, exc.took.written)
                await self.give_back(exc.took.taken, exc.cause)
                return None
            except NotDurable as exc:  # refused before anything was written
                _fail(writes, exc)
                log.error("cannot take jobs: %s", exc)
                return None
            except BaseException as exc:
                _fail(writes, exc)
                raise
            _resolve(writes, took.written)
            if took.failed is not None:
                raise took.failed
            if reserved + ahead:  # None when all were taken: a slot's release wakes it
                self._next_due_s = took.next_due_s
            claimed = min(reserved, sum(1 for job in took.taken if job.claimed))
        finally:
            await self.concurrency.release(reserved - claimed)
        slots = claimed
        for job in took.taken:
            if not job.claimed:
                self._start(job, None)
            elif slots:
                slots -= 1
                self._start(job, Slot(self.concurrency, self.wake))
            else:
                ready: asyncio.Future[Slot] = asyncio.get_running_loop().create_future()
                self._ready.append(ready)
                self._start(job, ready)
        self._hand_over()  # a call that came back meanwhile left its slot free
        return took.taken

    def _start(self, job: Taken, slot: Slot | asyncio.Future[Slot] | None) -> None:
        job_id = job.record.job_id
        self.tasks[job_id] = asyncio.create_task(self._run(job, slot), name=f"job {job_id}")

    async def _run(self, job: Taken, slot: Slot | asyncio.Future[Slot] | None) -> None:
        try:
            if isinstance(slot, asyncio.Future):
                slot = await slot  # claimed, waiting for a call slot: see `_hand_over`
            await self.run(job, slot)
        finally:
            if isinstance(slot, asyncio.Future):  # cancelled while waiting
                if slot.done() and not slot.cancelled():
                    await slot.result().release()  # handed over as the cancel came
            elif slot is not None:
                await slot.release()
            # Out of `tasks` now, not at the next poll: the room for a new job counts them.
            self.tasks.pop(job.record.job_id, None)
            self.wake()

    async def until_work(self, max_s: float) -> None:
        """Between polls: wait for a wake-up, or until the next job is due, at most `max_s`."""
        due_s = self._next_due_s
        wait_s = max_s if due_s is None else min(max_s, due_s)
        self._woken.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._woken.wait(), wait_s)

    async def listen_for_work(self, redis: Redis, silence_s: float) -> None:
        """Wake on every enqueue (ENQUEUE publishes how many jobs it made), for as long
        as the worker runs. A lost subscription is made again; meanwhile the polls find
        the work, later."""
        while True:
            try:
                async with redis.pubsub() as pubsub:
                    await pubsub.subscribe(ENQUEUED_CHANNEL)
                    self.wake()  # what was enqueued while unsubscribed
                    await receive(pubsub, silence_s, lambda _channel, _data: self.wake())
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("enqueue subscription lost (%r); polling until it is back", exc)
                await asyncio.sleep(_RESUBSCRIBE_S)

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


def _retrieved(future: asyncio.Future[Transition]) -> None:
    if not future.cancelled():
        future.exception()


def _resolve(
    writes: list[tuple[Write, asyncio.Future[Transition]]], results: list[Transition | Exception]
) -> None:
    for (_, future), result in zip(writes, results, strict=True):
        if future.done():
            continue
        if isinstance(result, Exception):
            future.set_exception(result)
        else:
            future.set_result(result)


def _fail(writes: list[tuple[Write, asyncio.Future[Transition]]], exc: BaseException) -> None:
    # Not sent, or sent without an answer: each job handles it as a Redis error (it
    # is requeued and settled from Prefect's history).
    error = exc if isinstance(exc, RedisError) else RedisError(f"write not confirmed: {exc!r}")
    for _, future in writes:
        if not future.done():
            future.set_exception(error)


class QueueWorker(Worker):
    """arq's Worker with the dispatcher in place of arq's own job taking."""

    async def _poll_iteration(self) -> None:
        dispatcher: Dispatcher = self.ctx["dispatcher"]
        await dispatcher.fill()  # a Redis error ends the run: see worker.app.run_worker
        await dispatcher.renew_leases()
        await self.heart_beat()
        await dispatcher.until_work(self.ctx["settings"].worker_poll_delay_s)
