"""The workers' transport to Prefect (worker/prefect_http.py), against a real Prefect server.

Reproduces a defect of its first version, found by the benchmark against a real
Prefect (the stand-in never compressed): aiohttp decompressed Prefect's gzipped
answers and handed them on under their `Content-Encoding: gzip` header; httpx
decoded them again and failed. Every call then looked unanswered, so each change
was applied only after its settle wait and a history read.
"""

from typing import Any

import httpx
import pytest
from mcp import Client
from prefect.client.orchestration import PrefectClient

from mcp_frontend.server import build_server
from tests.chaos_proxy import ChaosProxy
from tests.conftest import Stack
from tests.mcp_calls import ok, wait_terminal
from tests.prefect_runs import PrefectRuns
from worker.prefect_http import REQUESTS_PER_CONNECTION, PrefectHttp


async def test_a_gzipped_answer_reads_as_prefect_sent_it(stack: Stack) -> None:
    async with PrefectClient(stack.prefect_api_url) as client:
        http = PrefectHttp(client, max_connections=2)
        try:
            # Large enough for Prefect's GZipMiddleware; asked as httpx asks (gzip accepted).
            response = await http.send(http.build_request("GET", "/openapi.json"))
        finally:
            await http.aclose()
    assert response.status_code == 200
    assert response.headers["content-encoding"] == "gzip"
    assert response.json()["openapi"].startswith("3.")


async def test_a_change_is_applied_on_its_first_call(stack: Stack, prefect: PrefectRuns) -> None:
    run = await prefect.task_run()
    stack.start_worker()
    async with Client(build_server(stack.settings)) as client:
        ticket = await ok(client, "set_task_run_state", task_run_id=run, state="RUNNING")
        job: dict[str, Any] = await wait_terminal(client, ticket["job_id"], timeout_s=30)
    assert job["status"] == "applied", job
    # One call, answered: not found in the history after an unanswered one.
    assert job["attempts"] == 1, job
    assert job["orchestration"]["reason"] is None, job
    assert [s["type"] for s in await prefect.history("task", run)] == ["PENDING", "RUNNING"]


async def test_connections_are_renewed_so_that_a_multi_process_prefect_shares_them(
    proxy: ChaosProxy,
) -> None:
    """A connection stays with the API process that accepted it, and a worker's few
    connections were often all accepted by one of two (bench/b2_throughput.py, pg2):
    one in every `REQUESTS_PER_CONNECTION` requests asks for its connection to be
    closed, and the next is accepted by whichever process is free."""
    renewals = 3
    async with PrefectClient(proxy.url + "/api") as client:
        http = PrefectHttp(client, max_connections=1)
        try:
            for _ in range(renewals * REQUESTS_PER_CONNECTION + 1):
                answer = await http.send(http.build_request("GET", "/version"))
                assert answer.status_code == 200
        finally:
            await http.aclose()
    assert len(proxy.client_ports) == renewals + 1, proxy.client_ports


async def test_an_unreachable_prefect_is_a_connect_error_nothing_sent(stack: Stack) -> None:
    """`not sent` decides whether the next try must read the history first."""
    from mcp_frontend.devstack import free_port

    async with PrefectClient(f"http://127.0.0.1:{free_port()}/api") as client:
        http = PrefectHttp(client, max_connections=1)
        try:
            with pytest.raises(httpx.ConnectError):
                await http.send(http.build_request("GET", "/health"))
        finally:
            await http.aclose()


async def test_a_connect_timeout_fires_on_time_not_at_the_next_whole_second() -> None:
    """aiohttp rounds a timeout over 5 s up to its loop clock's next whole second. A 6 s
    connect timeout then fired after up to 7 s, where the applier's hard limit (the
    timeout plus 1 s) could win: a change never sent was taken as maybe sent (seen in
    CI: test_worker_recovery's unreachable Prefect). The timeout here is chosen to end
    just past a whole second, where the rounding would add almost a second."""
    import asyncio
    import time

    from tests.chaos_proxy import BlackHole

    with BlackHole() as hole:
        async with PrefectClient(hole.url + "/api") as client:
            http = PrefectHttp(client, max_connections=1)
            loop = asyncio.get_running_loop()
            timeout_s = 5.0 + (1.0 - loop.time() % 1.0) + 0.05
            request = http.build_request("GET", "/health")
            timeouts = {"connect": timeout_s, "read": timeout_s}
            request.extensions = {**request.extensions, "timeout": timeouts}
            started = time.monotonic()
            try:
                with pytest.raises(httpx.ConnectTimeout):
                    await http.send(request)
            finally:
                await http.aclose()
            assert time.monotonic() - started < timeout_s + 0.5, time.monotonic() - started
