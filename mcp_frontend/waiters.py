"""Wake long-polling callers when their job turns terminal (or, on request, changes).

One Redis subscription per frontend process carries the id of every job that
changed status; callers wait on in-process events. A subscription per caller
would cost a Redis connection per waiting agent. A caller that follows many
jobs at once (a task listen) gets a `JobChanges` instead: one event, and the
ids that changed since it last looked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import AsyncIterator, Iterable
from typing import TypeVar

from prometheus_client import Gauge
from redis.asyncio import Redis

from worker.contract import STATUS_CHANNEL, TERMINAL_CHANNEL
from worker.subscription import receive

log = logging.getLogger(__name__)

T = TypeVar("T")

WAITING_ON = Gauge(
    "pmq_frontend_job_waits",
    "Job ids callers of this frontend process wait on (long-polls and task listens).",
)


class JobChanges:
    """The ids among `job_ids` seen changing status since the last `take()`."""

    def __init__(self, job_ids: Iterable[str]) -> None:
        self.job_ids = frozenset(job_ids)
        self.arrived = asyncio.Event()
        self._changed: set[str] = set()

    def note(self, job_id: str) -> None:
        self._changed.add(job_id)
        self.arrived.set()

    def note_all(self) -> None:
        """Notifications may have been lost: every id counts as changed."""
        self._changed |= self.job_ids
        self.arrived.set()

    def take(self) -> frozenset[str]:
        changed = frozenset(self._changed)
        self._changed.clear()
        self.arrived.clear()
        return changed


class TerminalWaiters:
    """Routes job-status notifications to the callers waiting on those ids."""

    def __init__(self, redis: Redis, *, silence_s: float = 5.0) -> None:
        self._redis = redis
        # A quiet subscription is pinged after this long, and given up this long after
        # the ping: a partition leaves its socket open and silent, never closed.
        self._silence_s = silence_s
        self._events: dict[str, set[asyncio.Event]] = defaultdict(set)
        # The subset of `_events` that also wants non-terminal status changes.
        self._change_events: set[asyncio.Event] = set()
        self._changes: dict[str, set[JobChanges]] = defaultdict(set)
        self._listener: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()

    async def aclose(self) -> None:
        """Stop listening; the subscription's connection is closed with it."""
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener

    @contextlib.asynccontextmanager
    async def watch(self, *job_ids: str, changes: bool = False) -> AsyncIterator[asyncio.Event]:
        """One event, set when any of `job_ids` is published as terminal (with
        `changes`: as changed at all).

        Subscribed before it is yielded, so a caller that checks the records
        after entering cannot miss a notification sent in between.
        """
        await self._ensure_listening()
        event = asyncio.Event()
        for job_id in job_ids:
            self._events[job_id].add(event)
        if changes:
            self._change_events.add(event)
        WAITING_ON.inc(len(job_ids))
        try:
            yield event
        finally:
            WAITING_ON.dec(len(job_ids))
            self._change_events.discard(event)
            for job_id in job_ids:
                _forget(self._events, job_id, event)

    @contextlib.asynccontextmanager
    async def changes(self, job_ids: Iterable[str]) -> AsyncIterator[JobChanges]:
        """Every status change, terminal or not, of any of `job_ids`, collected by id.

        Subscribed before it is yielded, like `watch`; released on exit however
        the caller leaves (a cancelled request included).
        """
        await self._ensure_listening()
        changes = JobChanges(job_ids)
        for job_id in changes.job_ids:
            self._changes[job_id].add(changes)
        WAITING_ON.inc(len(changes.job_ids))
        try:
            yield changes
        finally:
            WAITING_ON.dec(len(changes.job_ids))
            for job_id in changes.job_ids:
                _forget(self._changes, job_id, changes)

    async def _ensure_listening(self) -> None:
        if self._listener is None or self._listener.done():
            self._subscribed.clear()
            self._listener = asyncio.create_task(self._listen())
        await self._subscribed.wait()

    async def _listen(self) -> None:
        lost = False
        while True:
            try:
                async with self._redis.pubsub() as pubsub:
                    await pubsub.subscribe(TERMINAL_CHANNEL, STATUS_CHANNEL)
                    self._subscribed.set()
                    if lost:  # what was published while unsubscribed is gone: re-read
                        self._wake_all()
                        lost = False
                    await receive(pubsub, self._silence_s, self._route)
            except asyncio.CancelledError:
                raise
            except Exception:
                # Redis went away: wake everyone so they re-read (and see the error),
                # then resubscribe once it is back.
                log.warning("terminal-event subscription lost; resubscribing", exc_info=True)
                self._wake_all()
                lost = True
                self._subscribed.set()
                await asyncio.sleep(0.5)

    def _wake_all(self) -> None:
        for events in self._events.values():
            for event in events:
                event.set()
        for followers in self._changes.values():
            for changes in followers:
                changes.note_all()

    def _route(self, channel: bytes | str, data: bytes | str) -> None:
        job_id = data.decode() if isinstance(data, bytes) else data
        for changes in self._changes.get(job_id, ()):
            changes.note(job_id)
        waiting = self._events.get(job_id)
        if not waiting:
            return
        terminal = (channel.decode() if isinstance(channel, bytes) else channel) == (
            TERMINAL_CHANNEL
        )
        for event in waiting:
            if terminal or event in self._change_events:
                event.set()


def _forget(registry: dict[str, set[T]], job_id: str, waiter: T) -> None:
    waiting = registry.get(job_id)
    if waiting is not None:
        waiting.discard(waiter)
        if not waiting:
            del registry[job_id]
