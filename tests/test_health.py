"""/readyz follows Redis and the workers; /metrics counts what the fleet did."""

from pathlib import Path

import httpx
from mcp import Client

from mcp_frontend.devstack import RedisServer, Service, free_port, pmq_service
from mcp_frontend.server import build_server
from tests.conftest import Services, Stack, wait_for
from tests.mcp_calls import ok, wait_terminal
from tests.prefect_runs import PrefectRuns
from worker.settings import Settings


def _get(url: str) -> httpx.Response | None:
    try:
        return httpx.get(url, timeout=3)
    except httpx.HTTPError:
        return None


def _ready(base: str) -> bool | None:
    response = _get(base + "/readyz")
    return None if response is None else response.status_code == 200


def test_readyz_follows_redis_and_workers(
    services: Services, own_redis: RedisServer, tmp_path: Path
) -> None:
    stack = Stack(
        services,
        0,
        Settings(redis_url=own_redis.url(), heartbeat_s=1.0, worker_lease_s=3.0),
        services.prefect.api_url,
    )
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    frontend = pmq_service(
        "frontend",
        ["serve", "--transport", "http", "--port", str(port)],
        env=stack.env(),
        log_path=tmp_path / "frontend.log",
    )
    frontend.start()
    stack.workers.append(frontend)
    try:
        frontend.wait_ready(lambda: _ready(base) is not None, 30)
        body = httpx.get(base + "/readyz").json()
        assert body == {"ready": False, "redis": "ok", "workers": 0, "prefect": "unknown"}
        worker = stack.start_worker()
        wait_for(lambda: _ready(base) is True, 15, "ready with a worker")
        assert httpx.get(base + "/readyz").json()["prefect"] == "ok"
        worker.kill()  # no goodbye: its heartbeat has to go stale
        wait_for(lambda: _ready(base) is False, 15, "not ready without a worker")
        stack.start_worker()
        wait_for(lambda: _ready(base) is True, 15, "ready again")
        own_redis.stop()
        wait_for(lambda: _ready(base) is False, 15, "not ready without Redis")
        assert httpx.get(base + "/readyz").json()["redis"] == "unreachable"
        own_redis.start_and_wait()
        wait_for(lambda: _ready(base) is True, 30, "ready once Redis is back")
    finally:
        stack.stop()


async def test_metrics_count_the_fleet_and_the_worker_times_its_calls(
    stack: Stack, prefect: PrefectRuns, tmp_path: Path
) -> None:
    metrics_port = free_port()
    stack.start_worker(worker_metrics_port=metrics_port)
    port = free_port()
    frontend: Service = pmq_service(
        "frontend",
        ["serve", "--transport", "http", "--port", str(port)],
        env=stack.env(),
        log_path=tmp_path / "frontend.log",
    )
    frontend.start()
    stack.workers.append(frontend)
    frontend.wait_ready(lambda: _get(f"http://127.0.0.1:{port}/healthz") is not None, 30)
    runs = [await prefect.flow_run() for _ in range(3)]
    async with Client(build_server(stack.settings)) as client:
        tickets = [
            await ok(client, "set_flow_run_state", flow_run_id=run, state="RUNNING") for run in runs
        ] + [await ok(client, "set_flow_run_state", flow_run_id=runs[0], state="PENDING")]
        for ticket in tickets:
            await wait_terminal(client, ticket["job_id"])
    fleet = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    assert 'pmq_jobs_total{event="enqueued"} 4.0' in fleet
    assert 'pmq_jobs_total{event="applied"} 3.0' in fleet
    assert 'pmq_jobs_total{event="rejected"} 1.0' in fleet
    assert 'pmq_jobs_live{status="queued"} 0.0' in fleet
    assert "pmq_workers_alive 1.0" in fleet
    assert "pmq_queue_depth 0.0" in fleet
    own = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
    assert 'pmq_prefect_call_seconds_count{call="set_state",outcome="201"} 3.0' in own
    assert 'pmq_job_enqueue_to_terminal_seconds_count{status="applied"} 3.0' in own
