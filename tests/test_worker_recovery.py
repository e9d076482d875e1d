"""A worker outlives a lost Redis, an unreachable Prefect and a frozen one, for real.

Each test reproduces a defect found by running compose.yaml in Docker:
- with `PMQ_WORKER_METRICS_PORT` set, the worker's restart loop bound the metrics
  port again, took `Address already in use` for "lost Redis" and looped forever;
- a Prefect that accepts no connection made one call take four connect timeouts,
  longer than arq's job timeout: arq dropped the job, which stayed `running`;
- a Prefect frozen mid-call later processed both the first request and the retry.
"""

import os
import signal
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import anyio
import httpx
from mcp import Client
from prometheus_client.parser import text_string_to_metric_families

from mcp_frontend.devstack import PrefectServer, RedisServer, free_port
from mcp_frontend.jobs import job_store
from mcp_frontend.server import build_server
from tests.chaos_proxy import BlackHole, ChaosProxy
from tests.conftest import TEST_SETTINGS, Services, Stack, wait_for
from tests.mcp_calls import ok, wait_terminal
from tests.prefect_runs import PrefectRuns
from worker.contract import (
    INFLIGHT_KEY,
    PENDING_STATUSES,
    QUEUE_KEY,
    TERMINAL_STATUSES,
    job_key,
    utcnow,
)
from worker.fleet_stats import STATS_KEY
from worker.redis_conn import close_redis, redis_client
from worker.settings import Settings


def _applied_by_worker(metrics_port: int) -> float:
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=3).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "pmq_worker_jobs_finished"
        for sample in family.samples
        if sample.name.endswith("_total") and sample.labels.get("status") == "applied"
    )


async def test_a_worker_with_a_metrics_port_applies_changes_after_redis_comes_back(
    services: Services, own_redis: RedisServer, prefect: PrefectRuns, tmp_path: Path
) -> None:
    settings = Settings(redis_url=own_redis.url(), heartbeat_s=1.0, **TEST_SETTINGS)
    stack = Stack(services, 0, settings, services.prefect.api_url)
    metrics_port = free_port()
    try:
        worker = stack.start_worker(worker_metrics_port=metrics_port)
        own_redis.stop()
        # Redis stays away until the worker has given up on it and begun to start over.
        wait_for(lambda: "lost Redis" in worker.log_path.read_text(), 30, "worker restart loop")
        own_redis.start_and_wait()
        flow_run = await prefect.flow_run()
        async with Client(build_server(settings)) as client:
            ticket = await ok(client, "set_flow_run_state", flow_run_id=flow_run, state="RUNNING")
            job = await wait_terminal(client, ticket["job_id"], timeout_s=60)
        assert job["status"] == "applied"
        assert worker.running
        # The listener of the first run still serves, and counts the new run's jobs.
        assert _applied_by_worker(metrics_port) == 1
        assert "Address already in use" not in worker.log_path.read_text()
    finally:
        stack.stop()


async def test_an_unreachable_prefect_never_leaves_a_job_running_without_a_queue_entry(
    stack: Stack,
) -> None:
    # Four connect timeouts of 6 s (Prefect's pool retries) outlived the old 22 s job limit.
    with BlackHole() as hole:
        stack.start_worker(
            prefect_api_url=hole.url + "/api", prefect_timeout_s=6, max_attempts=2, heartbeat_s=1
        )
        async with Client(build_server(stack.settings)) as client:
            ticket = await ok(
                client, "set_flow_run_state", flow_run_id=str(uuid.uuid4()), state="RUNNING"
            )
            started = time.monotonic()
            while (job := await ok(client, "get_job", job_id=ticket["job_id"], wait_s=0.5))[
                "status"
            ] not in TERMINAL_STATUSES:
                assert time.monotonic() - started < 60, f"job not terminal: {job}"
                # The heartbeat never waits on the unreachable Prefect.
                assert stack.redis.keys("pmq:worker:*"), "the worker looks dead"
                # The record and its queue entry in one read: read one after the other,
                # the job could finish in between and leave the queue rightly.
                with stack.redis.pipeline(transaction=True) as pipe:
                    pipe.hget(job_key(ticket["job_id"]), "status")
                    pipe.zscore(QUEUE_KEY, ticket["job_id"])
                    status, score = pipe.execute()
                if status == b"running":
                    assert score is not None
    assert job["status"] == "failed"
    assert job["error"]["code"] == "retries_exhausted"
    assert "ConnectTimeout" in job["error"]["message"]
    assert job["attempts"] == 2
    assert time.monotonic() - started < 2 * 6 + 10  # two attempts, one connect timeout each


async def test_a_frozen_prefect_gets_each_change_once(
    stack: Stack, own_prefect: PrefectServer
) -> None:
    """SIGSTOP holds the requests Prefect has read; after SIGCONT it processes them in
    any order with the worker's history reads. Task runs have no transition guard."""
    runs = PrefectRuns(own_prefect.api_url)
    try:
        flow_run = await runs.flow_run("RUNNING")
        task_runs = [await runs.task_run(flow_run) for _ in range(20)]
        stack.start_worker(
            prefect_api_url=own_prefect.api_url,
            prefect_timeout_s=2,
            settle_s=2,
            max_attempts=100,
            heartbeat_s=1,
        )
        assert own_prefect.proc is not None
        async with Client(build_server(stack.settings)) as client:
            os.killpg(own_prefect.proc.pid, signal.SIGSTOP)
            try:
                job_ids = await _set_running(client, task_runs)
                # Frozen for three of the worker's timeout-plus-settle periods, during
                # which the old rule read the history and sent the change again.
                frozen_until = time.monotonic() + 3 * (2 + 2)
                while time.monotonic() < frozen_until:
                    jobs = (await ok(client, "get_jobs", job_ids=job_ids))["jobs"]
                    assert not [j for j in jobs if j["status"] in TERMINAL_STATUSES]
                    await ok(client, "get_job", job_id=job_ids[0], wait_s=0.5)
            finally:
                os.killpg(own_prefect.proc.pid, signal.SIGCONT)
            done = [await wait_terminal(client, job_id, timeout_s=90) for job_id in job_ids]
        assert [j["status"] for j in done] == ["applied"] * len(done)
        for run in task_runs:
            assert [s["type"] for s in await runs.history("task", run)] == ["PENDING", "RUNNING"]
        # A change sent twice would say so on its job.
        assert all(j["duplicate_transitions"] in (None, 0) for j in done)
    finally:
        await runs.aclose()


async def test_a_stalled_prefect_that_wakes_in_the_worst_order_gets_each_change_once(
    stack: Stack, proxy: ChaosProxy, prefect: PrefectRuns
) -> None:
    """The frozen server of the test above, made deterministic: the proxy reads every
    request and answers none, then processes them newest first, so a history read
    sent last is answered before the first set_state, which lands after it."""
    task_runs = await _worker_behind(stack, proxy, prefect, runs=10, settle_s=2)
    async with Client(build_server(stack.settings)) as client:
        proxy.hold()
        job_ids = await _set_running(client, task_runs)
        stalled_until = time.monotonic() + 3 * (2 + 2)
        # Wake while some request is fresh, so its caller still waits for the answer.
        while time.monotonic() < stalled_until or not (
            proxy.held and time.monotonic() - proxy.held[-1].arrived < 0.5
        ):
            jobs = (await ok(client, "get_jobs", job_ids=job_ids))["jobs"]
            assert not [j for j in jobs if j["status"] in TERMINAL_STATUSES]
            await ok(client, "get_job", job_id=job_ids[0], wait_s=0.1)
        await anyio.to_thread.run_sync(proxy.release_newest_first)
        done = [await wait_terminal(client, job_id, timeout_s=90) for job_id in job_ids]
    assert [j["status"] for j in done] == ["applied"] * len(done)
    histories = [[s["type"] for s in await prefect.history("task", run)] for run in task_runs]
    assert histories == [["PENDING", "RUNNING"]] * len(task_runs)
    assert all(j["duplicate_transitions"] in (None, 0) for j in done)


async def test_a_change_written_twice_anyway_is_reported_on_its_job(
    stack: Stack, proxy: ChaosProxy, prefect: PrefectRuns
) -> None:
    """No client rule can see a request stuck in one of several Prefect API processes
    while the others answer: the worker sends the change again, and the late copy
    lands after. The duplicate check must then find it and say so."""
    task_runs = await _worker_behind(
        stack, proxy, prefect, runs=3, settle_s=3, sweep_interval_s=0.5
    )
    async with Client(build_server(stack.settings)) as client:
        proxy.hold()
        job_ids = await _set_running(client, task_runs)
        # Until every first try has timed out: nothing can be known before that.
        await _until_all(client, job_ids, lambda j: j["status"] == "waiting" and j["attempts"])
        # Served again at once; the stuck first tries land 7 s later: after the worker's
        # history read (3 to 6 s from now: 3 s of answers), before its duplicate check
        # (2 + 2 x 3 s after it sent the change again).
        await anyio.to_thread.run_sync(lambda: proxy.release_newest_first(overtaken_for_s=7))
        done = [await wait_terminal(client, job_id, timeout_s=60) for job_id in job_ids]
        assert [j["status"] for j in done] == ["applied"] * len(done)
        reported = await _until_all(
            client, job_ids, lambda j: j["duplicate_transitions"] is not None
        )
    copies = [
        [s["type"] for s in await prefect.history("task", run)].count("RUNNING")
        for run in task_runs
    ]
    assert copies == [2] * len(task_runs)  # the fault did what it should
    assert [j["duplicate_transitions"] for j in reported] == [1] * len(task_runs)
    duplicated = cast(bytes, stack.redis.hget(STATS_KEY, "duplicated"))
    assert int(duplicated) == len(task_runs)


async def _worker_behind(
    stack: Stack, proxy: ChaosProxy, prefect: PrefectRuns, *, runs: int, **settings: Any
) -> list[str]:
    """`runs` task runs, and a worker reaching Prefect through `proxy` with 2 s calls."""
    flow_run = await prefect.flow_run("RUNNING")
    task_runs = [await prefect.task_run(flow_run) for _ in range(runs)]
    stack.start_worker(
        prefect_api_url=proxy.url + "/api",
        prefect_timeout_s=2,
        max_attempts=100,
        heartbeat_s=1,
        **settings,
    )
    return task_runs


async def _set_running(client: Client, task_runs: list[str]) -> list[str]:
    """One RUNNING change per task run; their job ids."""
    tickets = [
        await ok(client, "set_task_run_state", task_run_id=run, state="RUNNING")
        for run in task_runs
    ]
    return [t["job_id"] for t in tickets]


async def _until_all(
    client: Client, job_ids: list[str], done: Callable[[dict[str, Any]], bool]
) -> list[dict[str, Any]]:
    """Poll until `done` holds for every job; return them."""
    deadline = time.monotonic() + 60
    while True:
        jobs: list[dict[str, Any]] = (await ok(client, "get_jobs", job_ids=job_ids))["jobs"]
        if all(done(job) for job in jobs):
            return jobs
        assert time.monotonic() < deadline, jobs
        await ok(client, "get_job", job_id=job_ids[0], wait_s=0.2)


async def test_the_sweeper_requeues_a_running_job_whose_queue_entry_was_lost(
    stack: Stack, prefect: PrefectRuns
) -> None:
    """A job claimed long ago, its record `running` and its queue entry gone (a
    failover that kept the claim and lost the lease). Nothing else would run it again."""
    flow_run = await prefect.flow_run()
    async with Client(build_server(stack.settings)) as client:
        ticket = await ok(client, "set_flow_run_state", flow_run_id=flow_run, state="RUNNING")
    job_id = ticket["job_id"]
    redis = redis_client(stack.settings)
    try:
        store = job_store(redis, stack.settings)
        long_ago = utcnow() - timedelta(hours=1)
        claim = await store.claim(
            job_id,
            allowed=PENDING_STATUSES,
            set_fields={"started_at": long_ago, "attempt_started_at": long_ago},
            recheck_at=utcnow(),
        )
        assert claim.outcome == "claimed"
        await redis.zadd(INFLIGHT_KEY, {job_id: 0})  # claimed long ago
        await redis.zrem(QUEUE_KEY, job_id)
    finally:
        await close_redis(redis)
    stack.start_worker(sweep_interval_s=0.5)
    async with Client(build_server(stack.settings)) as client:
        job = await wait_terminal(client, job_id, timeout_s=60)
    assert job["status"] == "applied"
    assert [s["type"] for s in await prefect.history("flow", flow_run)] == ["PENDING", "RUNNING"]
    assert cast(bytes, stack.redis.hget(STATS_KEY, "swept")) == b"1"


async def test_the_sweeper_requeues_a_queued_job_whose_queue_entry_a_failover_lost(
    stack: Stack, prefect: PrefectRuns
) -> None:
    """Seen in the Sentinel failover test: a job never claimed, its record `queued`
    on the new master, and its queue entry gone. It is in the pending index from its
    enqueue on."""
    task_run = await prefect.task_run()
    async with Client(build_server(stack.settings)) as client:
        ticket = await ok(client, "set_task_run_state", task_run_id=task_run, state="RUNNING")
    job_id = ticket["job_id"]
    assert stack.redis.zscore(INFLIGHT_KEY, job_id) is not None
    stack.redis.zadd(INFLIGHT_KEY, {job_id: 0})  # last seen long ago
    stack.redis.zrem(QUEUE_KEY, job_id)
    stack.start_worker(sweep_interval_s=0.5)
    async with Client(build_server(stack.settings)) as client:
        job = await wait_terminal(client, job_id, timeout_s=60)
    assert job["status"] == "applied" and job["attempts"] == 1
    assert [s["type"] for s in await prefect.history("task", task_run)] == ["PENDING", "RUNNING"]
    assert cast(bytes, stack.redis.hget(STATS_KEY, "swept")) == b"1"
