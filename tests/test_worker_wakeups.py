"""An idle worker does not poll for work: an enqueue wakes it, and a retry is taken when due.

Each worker here polls only every 30 s (PMQ_WORKER_POLL_DELAY_S), so a change
applied within seconds was woken by the enqueue, or taken at the due time TAKE
reported.
"""

import time
from typing import cast

from mcp import Client

from mcp_frontend.server import build_server
from tests.chaos_proxy import ChaosProxy, Fault
from tests.conftest import Stack
from tests.mcp_calls import ok, wait_terminal
from tests.prefect_runs import PrefectRuns
from worker.contract import ENQUEUED_CHANNEL

POLLS_APART_S = 30.0


def _subscribed(stack: Stack) -> bool:
    numsub = cast(list[tuple[bytes, int]], stack.redis.pubsub_numsub(ENQUEUED_CHANNEL))
    return numsub[0][1] >= 1


async def test_an_idle_worker_is_woken_by_each_enqueue(stack: Stack, prefect: PrefectRuns) -> None:
    worker = stack.start_worker(worker_poll_delay_s=POLLS_APART_S)
    worker.wait_ready(lambda: _subscribed(stack), 30)
    runs = [await prefect.flow_run() for _ in range(2)]
    async with Client(build_server(stack.settings)) as client:
        for run in runs:  # the second finds the worker idle after the first
            started = time.monotonic()
            ticket = await ok(client, "set_flow_run_state", flow_run_id=run, state="RUNNING")
            job = await wait_terminal(client, ticket["job_id"], timeout_s=POLLS_APART_S / 2)
            assert job["status"] == "applied", job
            assert time.monotonic() - started < POLLS_APART_S / 3


async def test_a_retry_is_taken_when_due_not_at_the_next_poll(
    stack: Stack, proxy: ChaosProxy, prefect: PrefectRuns
) -> None:
    proxy.script.append(Fault(429, retry_after_s=1))
    stack.start_worker(prefect_api_url=proxy.url + "/api", worker_poll_delay_s=POLLS_APART_S)
    run = await prefect.flow_run()
    async with Client(build_server(stack.settings)) as client:
        ticket = await ok(client, "set_flow_run_state", flow_run_id=run, state="RUNNING")
        job = await wait_terminal(client, ticket["job_id"], timeout_s=POLLS_APART_S / 2)
    assert job["status"] == "applied" and job["attempts"] == 2, job
    first, second = [t for t in proxy.request_times if t][:2]
    # Retry-After says 1 s; the worker slept until then, not until its next poll.
    assert 1.0 <= second - first < POLLS_APART_S / 3, second - first
