"""A frontend whose link to Redis is partitioned: sockets left open and silent."""

import asyncio
import time

from mcp import Client

from mcp_frontend.server import build_server
from tests.conftest import Stack
from tests.fleet import make_runs
from tests.mcp_calls import ok, wait_terminal
from tests.prefect_runs import PrefectRuns
from tests.tcp_cut import TcpCut

REDIS_TIMEOUT_S = 1.0
LONG_POLL_S = 25.0


async def test_a_long_poll_wakes_after_a_partition_froze_the_subscription(
    stack: Stack, prefect: PrefectRuns
) -> None:
    """A partition does not close the frontend's subscription: its socket stays open
    and hears nothing, ever. Pinged when quiet, it is found dead and replaced, so a
    long poll still wakes when its job finishes, not when its wait runs out."""
    [(_, run)] = await make_runs(prefect, 1, kinds=("task",))
    with TcpCut(stack.services.redis.port) as link:
        cut_off = stack.settings.model_copy(
            update={
                "redis_url": f"redis://127.0.0.1:{link.port}/{stack.db}",
                "redis_timeout_s": REDIS_TIMEOUT_S,
            }
        )
        async with (
            Client(build_server(cut_off)) as partitioned,
            Client(build_server(stack.settings)) as direct,
        ):
            ticket = await ok(direct, "set_task_run_state", task_run_id=run, state="RUNNING")
            job_id = ticket["job_id"]
            # Subscribes the partitioned frontend's listener.
            await ok(partitioned, "get_job", job_id=job_id, wait_s=0.1)
            assert link.cut() >= 2  # the subscription and a pooled connection
            for _ in range(5):  # the frozen pooled connection times out once
                result = await partitioned.call_tool("get_job", {"job_id": job_id})
                if not result.is_error:
                    break
            assert not result.is_error
            started = time.monotonic()
            poll = asyncio.create_task(
                ok(partitioned, "get_job", job_id=job_id, wait_s=LONG_POLL_S)
            )
            await asyncio.to_thread(stack.start_worker)
            job = await poll
            waited = time.monotonic() - started
    assert job["status"] == "applied"
    # Found silent within 2 x PMQ_REDIS_TIMEOUT_S of the cut, resubscribed, then woken.
    assert waited < LONG_POLL_S / 2, f"the long poll waited {waited:.1f} s"


async def test_a_worker_whose_redis_connections_froze_reconnects_and_goes_on(
    stack: Stack, prefect: PrefectRuns
) -> None:
    """Without a read timeout on arq's pool, the worker's poll loop would wait on its
    frozen socket forever; with one, the read fails and the worker starts over."""
    runs = await make_runs(prefect, 2, kinds=("task",))
    with TcpCut(stack.services.redis.port) as link:
        stack.start_worker(
            redis_url=f"redis://127.0.0.1:{link.port}/{stack.db}",
            redis_timeout_s=REDIS_TIMEOUT_S,
        )
        async with Client(build_server(stack.settings)) as client:
            before = await ok(client, "set_task_run_state", task_run_id=runs[0][1], state="RUNNING")
            assert (await wait_terminal(client, before["job_id"]))["status"] == "applied"
            assert link.cut() >= 1
            after = await ok(client, "set_task_run_state", task_run_id=runs[1][1], state="RUNNING")
            assert (await wait_terminal(client, after["job_id"], timeout_s=60))[
                "status"
            ] == "applied"
    assert [s["type"] for s in await prefect.history("task", runs[1][1])] == ["PENDING", "RUNNING"]
