"""The fault suite: 1,000 changes per scenario while a real process dies or fails.

Every scenario ends with the same three checks: every accepted job is
terminal (`applied`), every change appears exactly once in its run's Prefect
history, and each run's changes appear in the order they were submitted.
"""

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client

from mcp_frontend.devstack import PrefectServer, RedisServer, free_port
from mcp_frontend.server import build_server
from tests.chaos_proxy import ChaosProxy, Fault
from tests.conftest import TEST_SETTINGS, Services, Stack, http_healthy
from tests.fleet import (
    assert_histories_match,
    make_runs,
    plan_changes,
    statuses,
    wait_all_terminal,
)
from tests.mcp_calls import ok
from tests.prefect_runs import PrefectRuns
from worker.settings import Settings

RUNS, STEPS = 200, 5  # 1,000 changes
pytestmark = pytest.mark.timeout(420)


def keyed(changes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Give each change an idempotency key, so a client may resend it safely."""
    return [
        {**c, "idempotency_key": f"{c['run_id']}:{c['message'].split(':')[1]}"} for c in changes
    ]


async def submit(client: Client, changes: list[dict[str, Any]], batch: int = 100) -> list[str]:
    job_ids: list[str] = []
    for start in range(0, len(changes), batch):
        tickets = await ok(client, "submit_state_changes", changes=changes[start : start + batch])
        job_ids += [t["job_id"] for t in tickets["jobs"]]
    return job_ids


async def until_applied(client: Client, job_ids: list[str], count: int) -> None:
    """Wait (long-polling) until at least `count` of the jobs are applied: mid-drain."""
    deadline = time.monotonic() + 120
    while sum(j["status"] == "applied" for j in await statuses(client, job_ids)) < count:
        assert time.monotonic() < deadline, f"fewer than {count} applied in 120 s"
        await ok(client, "get_job", job_id=job_ids[-1], wait_s=0.2)


async def assert_exactly_once_in_order(
    client: Client, prefect: PrefectRuns, job_ids: list[str], changes: list[dict[str, Any]]
) -> None:
    jobs = await wait_all_terminal(client, job_ids, timeout_s=300)
    assert Counter(j["status"] for j in jobs) == {"applied": len(changes)}
    # A ticket names a stored change: the job ran the change the caller sent.
    assert [(j["run_id"], j["state"]) for j in jobs] == [(c["run_id"], c["state"]) for c in changes]
    await assert_histories_match(prefect, changes)


async def test_f1_sigkill_one_of_three_workers_then_start_a_new_one(
    stack: Stack, prefect: PrefectRuns
) -> None:
    changes = plan_changes(await make_runs(prefect, RUNS), steps=STEPS, seed=1)
    workers = [stack.start_worker() for _ in range(3)]
    async with Client(build_server(stack.settings)) as client:
        job_ids = await submit(client, changes)
        await until_applied(client, job_ids, 200)
        workers[0].kill()
        stack.start_worker()
        await assert_exactly_once_in_order(client, prefect, job_ids, changes)


async def test_f2_prefect_stopped_for_20_s_mid_drain(
    stack: Stack, own_prefect: PrefectServer
) -> None:
    prefect = PrefectRuns(own_prefect.api_url)
    changes = plan_changes(await make_runs(prefect, RUNS), steps=STEPS, seed=2)
    for _ in range(2):
        stack.start_worker(prefect_api_url=own_prefect.api_url, max_attempts=200)
    async with Client(build_server(stack.settings)) as client:
        job_ids = await submit(client, changes)
        await until_applied(client, job_ids, 200)
        own_prefect.stop()
        outage_ends = time.monotonic() + 20
        while time.monotonic() < outage_ends:  # the fault lasts 20 s; nothing may fail in it
            jobs = await statuses(client, job_ids)
            assert not [
                j for j in jobs if j["status"] not in ("applied", "queued", "running", "waiting")
            ]
            await ok(client, "get_job", job_id=job_ids[-1], wait_s=1.0)
        assert any(j["status"] == "waiting" for j in jobs), "no job noticed the outage"
        own_prefect.start_and_wait()
        await assert_exactly_once_in_order(client, prefect, job_ids, changes)
    await prefect.aclose()


@pytest.fixture
def durable_stack(services: Services, tmp_path: Path) -> Iterator[tuple[Stack, RedisServer]]:
    """A stack on its own Redis with AOF and `appendfsync always`, which the test may kill."""
    redis_server = RedisServer(
        free_port(), tmp_path / "redis", appendonly=True, appendfsync="always"
    )
    redis_server.start_and_wait()
    settings = Settings(redis_url=redis_server.url(), **TEST_SETTINGS)
    stack = Stack(services, 0, settings, services.prefect.api_url)
    try:
        yield stack, redis_server
    finally:
        stack.stop()
        left = stack.keys_without_ttl()
        redis_server.stop()
        assert left == []


async def test_f3_redis_killed_and_restarted_mid_drain_keeps_every_acknowledged_job(
    durable_stack: tuple[Stack, RedisServer], prefect: PrefectRuns
) -> None:
    stack, redis_server = durable_stack
    changes = keyed(plan_changes(await make_runs(prefect, RUNS), steps=STEPS, seed=3))
    for _ in range(2):
        stack.start_worker()
    first, rest = changes[:500], changes[500:]
    acknowledged: list[str] = []
    errors = 0

    def restart_redis() -> None:
        redis_server.start_and_wait()

    async with Client(build_server(stack.settings)) as client:
        acknowledged += await submit(client, first)
        await until_applied(client, acknowledged, 150)
        restarted = None
        # A careful client submits the rest in batches, resending a refused batch with
        # the same keys until accepted; Redis dies under it after the fifth batch.
        for index, start in enumerate(range(0, len(rest), 10)):
            if index == 5:
                redis_server.kill()  # SIGKILL: only what was fsynced survives
                restarted = asyncio.create_task(anyio.to_thread.run_sync(restart_redis))
            batch = rest[start : start + 10]
            while True:
                result = await client.call_tool("submit_state_changes", {"changes": batch})
                if not result.is_error:
                    assert result.structured_content is not None
                    acknowledged.extend(t["job_id"] for t in result.structured_content["jobs"])
                    break
                errors += 1
                await asyncio.sleep(0.05)  # back off before resending, as a client would
        assert restarted is not None
        await restarted
    assert errors > 0, "the submitter never saw Redis down"
    assert len(acknowledged) == len(changes) == len(set(acknowledged))
    async with Client(build_server(stack.settings)) as client:  # a fresh frontend connection
        await assert_exactly_once_in_order(client, prefect, acknowledged, changes)


async def test_f4_proxy_answers_429_and_503_to_30_percent_of_calls(
    stack: Stack, proxy: ChaosProxy, prefect: PrefectRuns
) -> None:
    changes = plan_changes(await make_runs(prefect, RUNS), steps=STEPS, seed=4)
    proxy.fault_rate = 0.3
    proxy.random_faults = [Fault(429, retry_after_s=1), Fault(503)]
    # 30 tries: a job failing 8 times in a row at 30% would happen about once in 15 runs.
    for _ in range(2):
        stack.start_worker(prefect_api_url=proxy.url + "/api", max_attempts=30)
    async with Client(build_server(stack.settings)) as client:
        job_ids = await submit(client, changes)
        await assert_exactly_once_in_order(client, prefect, job_ids, changes)
    assert proxy.faults_sent >= 250, proxy.faults_sent
    assert 0.2 < proxy.faults_sent / (proxy.faults_sent + proxy.forwarded) < 0.4


async def resend_until_ticketed(
    url: str, changes: list[dict[str, Any]], job_ids: list[str]
) -> tuple[list[str], int]:
    """An MCP client over HTTP sending changes in order; after an error it reconnects and
    resends the same change (same idempotency key) until it gets a ticket."""
    errors = 0
    while len(job_ids) < len(changes):
        try:
            async with Client(url) as client:
                for change in changes[len(job_ids) :]:
                    tool = f"set_{change['run_type']}_run_state"
                    args = {k: v for k, v in change.items() if k not in ("run_type", "run_id")}
                    args[f"{change['run_type']}_run_id"] = change["run_id"]
                    with anyio.fail_after(10):
                        result = await client.call_tool(tool, args)
                    assert not result.is_error and result.structured_content, result.content
                    job_ids.append(result.structured_content["job_id"])
        except Exception:  # the frontend died under us: any transport error
            errors += 1
            await asyncio.sleep(0.05)  # back off before reconnecting, as a client would
    return job_ids, errors


async def test_f5_frontend_killed_and_restarted_while_clients_submit(
    stack: Stack, prefect: PrefectRuns
) -> None:
    runs = await make_runs(prefect, RUNS)
    owners = [runs[i::5] for i in range(5)]  # five agents, each owning 40 runs
    plans = [keyed(plan_changes(owned, steps=STEPS, seed=50 + i)) for i, owned in enumerate(owners)]
    for _ in range(2):
        stack.start_worker()
    frontend, port = stack.start_frontend()
    url = f"http://127.0.0.1:{port}/mcp"

    progress: list[list[str]] = [[] for _ in plans]
    sending = [
        asyncio.create_task(resend_until_ticketed(url, plan, progress[i]))
        for i, plan in enumerate(plans)
    ]
    deadline = time.monotonic() + 120
    while sum(map(len, progress)) < 300:
        done = [t.exception() or "finished" for t in sending if t.done()]
        assert not done, f"an agent ended before the kill: {done}"
        assert time.monotonic() < deadline, f"{sum(map(len, progress))} of 300 tickets in 120 s"
        await asyncio.sleep(0.05)
    frontend.kill()

    def restart_frontend() -> None:
        frontend.start()
        frontend.wait_ready(lambda: http_healthy(port), 30)

    await anyio.to_thread.run_sync(restart_frontend)
    results = await asyncio.gather(*sending)
    assert sum(errors for _, errors in results) > 0, "no client saw the frontend die"
    changes = [c for plan in plans for c in plan]
    job_ids = [job_id for ids, _ in results for job_id in ids]
    assert len(set(job_ids)) == len(changes)
    async with Client(build_server(stack.settings)) as client:
        await assert_exactly_once_in_order(client, prefect, job_ids, changes)
