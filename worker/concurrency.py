"""How many Prefect calls one worker keeps in flight: AIMD, as TCP does.

More calls in flight than Prefect can serve only queue inside Prefect: the
throughput stays flat and every call waits longer (a 2-core SQLite server
applies ~110 set_state/s whether 1 or 16 calls are in flight, but at 16 its
p99 is 2 s; see bench/b2_throughput.py). A Prefect of several API processes,
on PostgreSQL, serves more calls at once, and applies more of them per second
with 4 to 8 in flight than with 1 or 2.

So the limit is judged per round (at least `limit` calls and `round_s`). It
starts at one call, so that the first rounds measure Prefect's no-load latency,
and doubles per round (slow start) until the first slow round; then it grows
by one slot per `increase_every_s` while the rounds come back fast and every
slot is busy. It is cut by `decrease_ratio` when a round is slow: its median
latency is more than `latency_tolerance` times the no-load latency and above
`latency_floor_s`. The no-load latency is the fastest round median seen, let
rise by `no_load_drift` per round: a Prefect that became slower for good (a
bigger database) is followed, and the limit's own sawtooth never is (judged
against its own lowest point, the limit would creep up a third per cut).
A median, not single calls: one slow call (a pause for garbage collection, a
checkpoint) says nothing about queueing, and cutting on it kept the limit at
1-3 where Prefect served 4 at once. A call overloaded (429, 5xx) or unanswered
(timeout) cuts at once, at most once per round trip.

Each worker process adapts on its own. They see the same signal (Prefect's
latency) and, like TCP flows sharing a link, converge to a fair share of
what Prefect can take without talking to each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
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
    initial: int = 1
    minimum: int = 1
    latency_tolerance: float = 2.0
    latency_floor_s: float = 0.025
    decrease_ratio: float = 0.7
    increase_every_s: float = 0.5
    round_s: float = 0.2
    no_load_drift: float = 0.002  # per round: doubles in ~350 rounds (a minute or more)


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
        self.on_change = on_change  # told the new whole number of slots
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
        LIMIT.set(self.limit)

    @contextlib.asynccontextmanager
    async def slot(self, timeout_s: float) -> AsyncIterator[None]:
        """Hold one slot; raise SlotTimeout if none comes free within `timeout_s`."""
        async with self._changed:
            try:
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: self.in_flight < int(self.limit)), timeout_s
                )
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
        granted = max(0, min(wanted, int(self.limit) - self.in_flight))
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
            before = int(self.limit)
            self._adapt(latency_s, overloaded)
            LIMIT.set(self.limit)
            if self.on_change is not None and int(self.limit) != before:
                self.on_change(int(self.limit))
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
        self._busy = self._busy or self.in_flight >= int(self.limit)
        if len(self._round) < int(self.limit) or now - self._round_started < s.round_s:
            return
        median = statistics.median(self._round)
        drifted = median if self.no_load_s is None else self.no_load_s * (1 + s.no_load_drift)
        self.no_load_s = min(median, drifted)
        if median > max(s.latency_floor_s, s.latency_tolerance * self.no_load_s):
            self._cut(now)
        elif self._busy and self._slow_start:
            self.limit = min(float(s.maximum), self.limit * 2)
            self._last_raise = now
        elif self._busy and now - self._last_raise >= s.increase_every_s:
            # Per interval, not per round: a fast server finishes many rounds a second.
            self.limit = min(float(s.maximum), self.limit + 1.0)
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
