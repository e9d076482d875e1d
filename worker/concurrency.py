"""How many Prefect calls one worker keeps in flight: AIMD, as TCP does.

More calls in flight than Prefect can serve only queue inside Prefect: the
throughput stays flat and every call waits longer (a 2-core SQLite server
applies ~110 set_state/s whether 1 or 16 calls are in flight, but at 16 its
p99 is 2 s; see bench/b2_throughput.py). So the limit grows by one slot a
second while calls come back fast, and is cut by `decrease_ratio` when one
comes back slow (more than `latency_tolerance` times the fastest recent call,
and above `latency_floor_s`), overloaded (429, 5xx) or not at all (timeout).
Cuts are at most one per round trip, so one slow burst counts once.

Each worker process adapts on its own. They see the same signal (Prefect's
latency) and, like TCP flows sharing a link, converge to a fair share of
what Prefect can take without talking to each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
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
    initial: int = 4
    minimum: int = 1
    latency_tolerance: float = 2.0
    latency_floor_s: float = 0.05
    decrease_ratio: float = 0.7
    increase_every_s: float = 1.0
    window: int = 200  # recent calls over which the fastest one is the baseline


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
        self._recent: deque[float] = deque(maxlen=settings.window)
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
        if not overloaded:
            self._recent.append(latency_s)
        baseline = min(self._recent, default=latency_s)
        slow = latency_s > max(s.latency_floor_s, s.latency_tolerance * baseline)
        now = time.monotonic()
        if overloaded or slow:
            # One cut per round trip: calls that were in flight together saw the same queue.
            if now - self._last_cut > latency_s:
                self.limit = max(float(s.minimum), self.limit * s.decrease_ratio)
                self._last_cut = self._last_raise = now
        elif self.in_flight >= int(self.limit) and now - self._last_raise >= s.increase_every_s:
            # One more slot per interval, and only while the limit is what holds calls
            # back. Per interval, not per call: a fast server answers hundreds of calls
            # between two slow ones, and growing per call would outrun every cut.
            self.limit = min(float(s.maximum), self.limit + 1.0)
            self._last_raise = now
