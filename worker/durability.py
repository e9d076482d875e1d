"""Durability of acknowledged writes: when Redis has kept a change, a ticket is returned.

Redis answers a write once it is in its memory. `PMQ_DURABILITY` chooses what
"stored" means before a ticket goes back (and before a worker calls Prefect on
a claim):

- `memory`: Redis's answer is enough. A Redis crash loses what its
  append-only file has not yet synced (up to a second with `appendfsync
  everysec`), a failover what the replica had not received.
- `disk`: the write is in the master's append-only file, fsynced: `WAITAOF 1 0`
  on Redis >= 7.2; an older Redis must run `appendfsync always` (and not
  `no-appendfsync-on-rewrite yes`), which syncs before it answers. That is read
  from its configuration every 30 s, so a change to it shows within that.
- `replicas`: `WAIT n`: n replicas have the write, so a failover to one of
  them keeps it.

The wait runs on the connection that wrote, in the same round trip (a
pipeline): WAIT and WAITAOF cover the writes of their own connection. When the
level is not met in time, the write has happened on the master and may or may
not survive, so the caller is told exactly that (`NotDurable`), and that a
resend with the same idempotency key is safe.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, ResponseError

# How long a finding about the server's persistence holds: a restart or a failover
# may bring a Redis configured otherwise.
_PROBE_TTL_S = 30.0


class Durability(StrEnum):
    MEMORY = "memory"
    DISK = "disk"
    REPLICAS = "replicas"


class NotDurable(Exception):
    """Redis did not confirm a write at the chosen level in time.

    `written` False: the check failed before anything was written. `reply` is the
    write's own answer when it was made (what a take claimed, say), else None.
    """

    def __init__(self, reason: str, *, written: bool = True, reply: Any = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.written = written
        self.reply = reply


@dataclass
class DurableWrites:
    """Runs a write script, then waits until the write is stored at `level`."""

    level: Durability = Durability.MEMORY
    replicas: int = 1
    timeout_s: float = 2.0
    _waitaof_until: float = field(default=0.0, init=False)  # monotonic; 0 = probe again
    _has_waitaof: bool = field(default=False, init=False)

    async def run(self, redis: Redis, script: AsyncScript, keys: list[Any], args: list[Any]) -> Any:
        """The script's reply, once its writes are stored at this level."""
        if self.level is Durability.MEMORY:
            return await script(keys=keys, args=args)
        command = ("EVALSHA", script.sha, len(keys), *keys, *args)
        try:
            return await self.execute(redis, *command)
        except NoScriptError:  # a restarted or new master: load it, and write once more
            await redis.script_load(script.script)
            return await self.execute(redis, *command)

    async def run_all(
        self,
        redis: Redis,
        calls: list[tuple[AsyncScript, list[Any], list[Any]]],
        *,
        confirm: bool = True,
        _retry: bool = True,
    ) -> list[Any]:
        """Several scripts in one round trip, in order: each one's reply, or its error in
        place. With `confirm`, returns once all of them are stored at this level."""
        wait = await self._wait_command(redis) if confirm else None
        async with redis.pipeline(transaction=False) as pipe:
            for script, keys, args in calls:
                pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
            if wait is not None:
                pipe.execute_command(*wait)
            replies: list[Any] = await pipe.execute(raise_on_error=False)
        acks = replies.pop() if wait is not None else None
        # A new or restarted master has no scripts: what failed so wrote nothing. Load
        # them and send those again, in order (once per Redis start).
        missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if missing and _retry:
            for script in {calls[i][0].sha: calls[i][0] for i in missing}.values():
                await redis.script_load(script.script)
            again = [calls[i] for i in missing]
            try:
                redone = await self.run_all(redis, again, confirm=confirm, _retry=False)
            except NotDurable as exc:
                exc.reply = _merged(replies, missing, exc.reply)
                raise
            replies = _merged(replies, missing, redone)
        if wait is not None and len(missing) < len(calls):  # the first wait covered some
            self._confirmed(wait, acks, replies)
        return replies

    async def execute(self, redis: Redis, *command: Any) -> Any:
        """One write command's reply, once it is stored at this level."""
        if self.level is Durability.MEMORY:
            return await redis.execute_command(*command)  # type: ignore[no-untyped-call]
        wait = await self._wait_command(redis)
        if wait is None:  # `appendfsync always`: Redis syncs before it answers
            return await redis.execute_command(*command)  # type: ignore[no-untyped-call]
        # One round trip, one connection: WAIT and WAITAOF cover their own connection's
        # writes. Errors are told apart by position, not text (redis-py puts the whole
        # command, arguments and all, into an error's message).
        async with redis.pipeline(transaction=False) as pipe:
            pipe.execute_command(*command)
            pipe.execute_command(*wait)
            reply, acks = await pipe.execute(raise_on_error=False)
        if isinstance(reply, Exception):
            raise reply
        self._confirmed(wait, acks, reply)
        return reply

    def _confirmed(self, wait: tuple[Any, ...], acks: Any, reply: Any) -> None:
        """Raise NotDurable (carrying the write's `reply`) unless `acks` meet this level."""
        if isinstance(acks, Exception):
            # e.g. appendonly switched off since the probe; the write has happened.
            self._waitaof_until = 0.0
            reason = f"Redis refused {wait[0]}: {str(acks).splitlines()[0]}"
            raise NotDurable(reason, reply=reply)
        try:
            self._check(acks)
        except NotDurable as exc:
            exc.reply = reply
            raise

    async def _wait_command(self, redis: Redis) -> tuple[Any, ...] | None:
        """What follows a write to store it at this level; None: nothing needs to."""
        if self.level is Durability.MEMORY:
            return None
        timeout_ms = max(1, round(self.timeout_s * 1000))
        if self.level is Durability.REPLICAS:
            return ("WAIT", self.replicas, timeout_ms)
        if time.monotonic() >= self._waitaof_until:
            self._has_waitaof = await self._probe_disk(redis)
            self._waitaof_until = time.monotonic() + _PROBE_TTL_S
        return ("WAITAOF", 1, 0, timeout_ms) if self._has_waitaof else None

    async def _probe_disk(self, redis: Redis) -> bool:
        """True: WAITAOF works here. False: `appendfsync always` does the job.

        Raises NotDurable (nothing written) when this Redis cannot keep a write on disk.
        """
        info = await redis.info("persistence")
        if not int(info.get("aof_enabled", 0)):
            raise NotDurable(
                "PMQ_DURABILITY=disk, but Redis keeps no append-only file (appendonly no)",
                written=False,
            )
        server = await redis.info("server")
        version = tuple(int(part) for part in str(server["redis_version"]).split(".")[:2])
        if version >= (7, 2):
            return True
        try:
            fsync = (await redis.config_get("appendfsync")).get("appendfsync")
            # With it, Redis skips even `always`'s fsync while a rewrite or save runs.
            skips = (await redis.config_get("no-appendfsync-on-rewrite")).get(
                "no-appendfsync-on-rewrite"
            )
        except ResponseError as exc:
            raise NotDurable(
                f"PMQ_DURABILITY=disk needs WAITAOF (Redis >= 7.2) or appendfsync always; "
                f"Redis {server['redis_version']} has no WAITAOF and CONFIG GET failed: {exc}",
                written=False,
            ) from exc
        if fsync != "always":
            raise NotDurable(
                f"PMQ_DURABILITY=disk needs WAITAOF (Redis >= 7.2) or appendfsync always; "
                f"Redis {server['redis_version']} runs appendfsync {fsync}",
                written=False,
            )
        if skips == "yes":
            raise NotDurable(
                f"PMQ_DURABILITY=disk: Redis {server['redis_version']} runs "
                "no-appendfsync-on-rewrite yes, which skips fsyncs during rewrites",
                written=False,
            )
        return False

    def _check(self, acks: Any) -> None:
        if self.level is Durability.REPLICAS:
            if int(acks) < self.replicas:
                raise NotDurable(
                    f"{int(acks)} of {self.replicas} replicas confirmed it within "
                    f"{self.timeout_s:g} s (PMQ_DURABILITY_TIMEOUT_S)"
                )
            return
        if int(acks[0]) < 1:
            raise NotDurable(
                f"Redis did not confirm it on disk within {self.timeout_s:g} s "
                "(PMQ_DURABILITY_TIMEOUT_S)"
            )


def _merged(replies: list[Any], positions: list[int], redone: list[Any]) -> list[Any]:
    merged = list(replies)
    for position, reply in zip(positions, redone, strict=True):
        merged[position] = reply
    return merged
