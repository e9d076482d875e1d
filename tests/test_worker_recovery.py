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
from pathlib import Path

import httpx
from mcp import Client
from prometheus_client.parser import text_string_to_metric_families

from mcp_frontend.devstack import PrefectServer, RedisServer, free_port
from mcp_frontend.server import build_server
from tests.chaos_proxy import BlackHole
from tests.conftest import TEST_SETTINGS, Services, Stack, wait_for
from tests.mcp_calls import ok, wait_terminal
from tests.prefect_runs import PrefectRuns
from worker.contract import TERMINAL_STATUSES
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
                if job["status"] == "running":
                    assert stack.redis.zscore("arq:queue", ticket["job_id"]) is not None
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
                tickets = [
                    await ok(client, "set_task_run_state", task_run_id=run, state="RUNNING")
                    for run in task_runs
                ]
                job_ids = [t["job_id"] for t in tickets]
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
