"""How many Prefect calls one worker keeps in flight: AIMD, as TCP does.

More calls in flight than Prefect can serve only queue inside Prefect: the
throughput stays flat and every call waits longer (a 2-core SQLite server
applies ~110 set_state/s whether 1 or 16 calls are in flight, but at 16 its
p99 is 2 s; see bench/b2_throughput.py). A Prefect of several API processes,
on PostgreSQL, serves more calls at once, and applies more of them per second
with 4 to 8 in flight than with 1 or 2.

So the limit is judged per round (at least its slots' worth of calls and
`round_s`). It starts at a quarter of a call, so that the first rounds measure
Prefect's no-load latency even when a whole fleet starts at once, and doubles
per round (slow start) until the first slow round; then it grows by one slot
(a quarter, below one) per `increase_every_s` while the rounds come back fast
and every slot is busy. It is cut by `decrease_ratio` when a round is slow:
its 90th percentile latency is more than `latency_tolerance` times the
no-load latency and above `latency_floor_s`. The no-load latency is the
fastest round's seen, let rise by `no_load_drift` per round: a Prefect that
became slower for good (a bigger database) is followed, and the limit's own
sawtooth never is (judged against its own lowest point, the limit would creep
up a third per cut). The 90th percentile, not the median: a SQLite Prefect
answers most calls fast at 4-8 in flight and some in over a second (its
writers wait on one lock), so a median kept the limit there and p99 at 1 s
(bench/b2_throughput.py). Not single calls: one slow call (a pause for garbage
collection, a checkpoint) says nothing about queueing, and cutting on it kept
the limit at 1-3 where Prefect served 4 at once. A call overloaded (429, 5xx)
or unanswered (timeout) cuts at once, at most once per round trip.

Below one, the limit is a duty cycle: one call in flight, then a pause of
(1 / limit - 1) times that call's latency. That is what lets a fleet share a
Prefect that serves one or two calls at once: four workers of at least one
call each kept four in flight on a SQLite Prefect, and its p99 at 1.5 s.

Each worker process adapts on its own. They see the same signal (Prefect's
latency) and, like TCP flows sharing a link, converge to a fair share of
what Prefect can take without talking to each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from prometheus_client import Gauge

LIMIT = Gauge("pmq_prefect_concurrency_limit", "Prefect calls this worker allows in flight.")
IN_FLIGHT = Gauge("pmq_prefect_in_flight", "Prefect calls this worker has in flight.")


class SlotTimeout(Exception):
    """No call slot came free in time; the job should go back to the queue."""


@dataclass(frozen=True)
class LimitSettings:
    maximum: int
    adaptive: bool = True
    initial: float = 0.25
    minimum: float = 0.25  # below 1: one call at a time, paced (see the module's text)
    latency_tolerance: float = 2.0
    latency_floor_s: float = 0.025
    decrease_ratio: float = 0.7
    increase_every_s: float = 0.5
    round_s: float = 0.2
    round_calls: int = 10
    no_load_drift: float = 0.002  # per round: doubles in ~350 rounds (a minute or more)
    quantile: float = 0.9  # of a round's latencies, the one judged
    max_pause_s: float = 1.0  # between paced calls: a timeout must not idle a worker long


class AdaptiveLimit:
    """A semaphore whose size follows Prefect's latency (additive up, multiplicative down).

    A job holds a slot from claiming its change to recording the outcome;
    every Prefect call it makes meanwhile is reported to `observe`. With
    `adaptive=False` it is a plain semaphore of `maximum` slots.
    """

    def __init__(
        self, settings: LimitSettings, on_change: Callable[[int], None] | None = None
    ) -> None:
        self.settings = settings
        self.on_change = on_change  # told the new number of slots, or that the pause is over
        initial = settings.initial if settings.adaptive else settings.maximum
        self.limit = float(min(max(initial, settings.minimum), settings.maximum))
        self.in_flight = 0
        self.no_load_s: float | None = None
        self._slow_start = True
        self._round: list[float] = []  # latencies of this round's calls
        self._round_started = time.monotonic()
        self._busy = False  # every slot was in use at some call of this round
        self._last_cut = 0.0
        self._last_raise = time.monotonic()
        self._changed = asyncio.Condition()
        self._paused_until = 0.0  # monotonic; below a limit of 1, no call starts before it
        self._unpause: asyncio.TimerHandle | None = None
        self._notifier: asyncio.Task[None] | None = None  # held: the loop keeps weak refs
        LIMIT.set(self.limit)

    @property
    def slots(self) -> int:
        """Calls allowed in flight at once: at least one (a lower limit paces that one)."""
        return max(1, int(self.limit))

    @property
    def paused_for_s(self) -> float:
        """How long until a paced call may start (0: now)."""
        return max(0.0, self._paused_until - time.monotonic())

    def _free(self) -> bool:
        return self.in_flight < self.slots and time.monotonic() >= self._paused_until

    @contextlib.asynccontextmanager
    async def slot(self, timeout_s: float) -> AsyncIterator[None]:
        """Hold one slot; raise SlotTimeout if none comes free within `timeout_s`."""
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(self._free), timeout_s)
            except TimeoutError:
                raise SlotTimeout from None
            self.in_flight += 1
            IN_FLIGHT.set(self.in_flight)
        try:
            yield
        finally:
            async with self._changed:
                self.in_flight -= 1
                IN_FLIGHT.set(self.in_flight)
                self._changed.notify_all()

    def reserve(self, wanted: int) -> int:
        """Take up to `wanted` free slots at once, without waiting; returns how many.

        Each must be given back with `release`. The dispatcher reserves them before
        it takes jobs, so that every job it claims has its call slot already.
        """
        if time.monotonic() < self._paused_until:
            return 0  # the pause's end wakes the caller (on_change)
        granted = max(0, min(wanted, self.slots - self.in_flight))
        self.in_flight += granted
        IN_FLIGHT.set(self.in_flight)
        return granted

    async def release(self, count: int = 1) -> None:
        if count <= 0:
            return
        async with self._changed:
            self.in_flight -= count
            IN_FLIGHT.set(self.in_flight)
            self._changed.notify_all()

    async def observe(self, latency_s: float, *, overloaded: bool) -> None:
        """Adapt to one finished Prefect call: 429, 5xx and timeouts count as overloaded."""
        if not self.settings.adaptive:
            return
        async with self._changed:
            before = self.slots
            self._adapt(latency_s, overloaded)
            self._pace(latency_s)
            LIMIT.set(self.limit)
            if self.on_change is not None and self.slots != before:
                self.on_change(self.slots)
            self._changed.notify_all()

    def _pace(self, latency_s: float) -> None:
        """Below a limit of 1, hold the next call back so that calls are in flight
        `limit` of the time."""
        if self.limit >= 1:
            self._paused_until = 0.0
            return
        pause_s = min(latency_s * (1 / self.limit - 1), self.settings.max_pause_s)
        self._paused_until = time.monotonic() + pause_s
        if self._unpause is not None:
            self._unpause.cancel()
        self._unpause = asyncio.get_running_loop().call_later(pause_s, self._pause_over)

    def _pause_over(self) -> None:
        self._unpause = None
        # The loop runs a timer up to its clock's resolution early: the pause is over
        # now, not a few microseconds later (when nothing would wake the worker).
        self._paused_until = 0.0
        if self.on_change is not None:
            self.on_change(self.slots)
        # Waiters in `slot` are woken under the condition's lock, from a task.
        self._notifier = asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def _adapt(self, latency_s: float, overloaded: bool) -> None:
        s = self.settings
        now = time.monotonic()
        if overloaded:
            # One cut per round trip: calls that were in flight together saw the same queue.
            if now - self._last_cut > latency_s:
                self._cut(now)
            return
        self._round.append(latency_s)
        # The call being observed still holds its slot.
        self._busy = self._busy or self.in_flight >= self.slots
        # At least `round_calls`: of fewer, the 90th percentile is the slowest call.
        enough = max(self.slots, s.round_calls)
        if len(self._round) < enough or now - self._round_started < s.round_s:
            return
        judged = _quantile(self._round, s.quantile)
        drifted = judged if self.no_load_s is None else self.no_load_s * (1 + s.no_load_drift)
        self.no_load_s = min(judged, drifted)
        if judged > max(s.latency_floor_s, s.latency_tolerance * self.no_load_s):
            self._cut(now)
        elif self._busy and self._slow_start:
            self.limit = min(float(s.maximum), self.limit * 2)
            self._last_raise = now
        elif self._busy and now - self._last_raise >= s.increase_every_s:
            # Per interval, not per round: a fast server finishes many rounds a second.
            # A quarter below one: from a quarter, one whole slot would be 5x.
            self.limit = min(float(s.maximum), self.limit + (1.0 if self.limit >= 1 else 0.25))
            self._last_raise = now
        self._new_round(now)

    def _cut(self, now: float) -> None:
        self._slow_start = False
        self.limit = max(float(self.settings.minimum), self.limit * self.settings.decrease_ratio)
        self._last_cut = self._last_raise = now
        self._new_round(now)  # the round under way saw the old limit's queue

    def _new_round(self, now: float) -> None:
        self._round = []
        self._round_started = now
        self._busy = False


def _quantile(values: list[float], q: float) -> float:
    """The nearest-rank quantile: the smallest value with a share `q` of `values` at or
    below it (of 10 calls, the 9th fastest for 0.9)."""
    ranked = sorted(values)
    rank = math.ceil(round(q * len(ranked), 9))  # 0.9 * 10 is 9.000000000000002
    return ranked[max(rank, 1) - 1]
