"""Fleet guarantees with real worker processes: ordering, idempotency, crashes, batches."""

import asyncio
import random
import time
from collections import Counter
from datetime import UTC, datetime
from typing import Any, cast

from mcp import Client
from redis.asyncio import Redis

from mcp_frontend.server import build_server
from tests.chaos_proxy import ChaosProxy, Fault
from tests.conftest import Stack, wait_for
from tests.fleet import (
    STATES,
    assert_histories_match,
    make_runs,
    plan_changes,
    submit_mixed,
    wait_all_terminal,
)
from tests.mcp_calls import error, ok
from tests.prefect_runs import PrefectRuns
from worker.contract import QUEUE_KEY
from worker.store import RateLimiter


async def test_per_run_order_holds_across_4_workers_and_20_clients(
    stack: Stack, prefect: PrefectRuns
) -> None:
    # 400 changes: the fault suite drives 1,000 per scenario through fewer clients;
    # here the point is 20 clients racing on shared runs across 4 workers.
    runs = await make_runs(prefect, 100)
    for _ in range(4):
        # 8 calls in flight are as many as a 2-core SQLite Prefect can take (see issue #5).
        stack.start_worker(worker_concurrency=2)
    owners = [runs[i::20] for i in range(20)]  # each client owns 5 runs
    plans = [plan_changes(owned, steps=4, seed=i) for i, owned in enumerate(owners)]

    async def client_session(index: int) -> list[str]:
        async with Client(build_server(stack.settings)) as client:
            return await submit_mixed(client, plans[index], seed=100 + index)

    job_ids = [j for ids in await asyncio.gather(*map(client_session, range(20))) for j in ids]
    assert len(job_ids) == 400 == len(set(job_ids))
    async with Client(build_server(stack.settings)) as client:
        jobs = await wait_all_terminal(client, job_ids, timeout_s=240)
    assert Counter(j["status"] for j in jobs) == {"applied": 400}
    await assert_histories_match(prefect, [c for plan in plans for c in plan])


async def test_one_key_submitted_50_times_at_once_is_one_job_and_one_transition(
    stack: Stack, prefect: PrefectRuns
) -> None:
    stack.start_worker()
    task_run = await prefect.task_run()
    args = {"task_run_id": task_run, "state": "RUNNING", "idempotency_key": "fleet:once"}

    async def five_calls() -> list[dict[str, Any]]:
        async with Client(build_server(stack.settings)) as client:
            return list(
                await asyncio.gather(*(ok(client, "set_task_run_state", **args) for _ in range(10)))
            )

    tickets = [
        t for group in await asyncio.gather(*(five_calls() for _ in range(5))) for t in group
    ]
    assert len({t["job_id"] for t in tickets}) == 1
    assert Counter(t["deduplicated"] for t in tickets) == {True: 49, False: 1}
    async with Client(build_server(stack.settings)) as client:
        await wait_all_terminal(client, [tickets[0]["job_id"]], timeout_s=60)
    assert [s["type"] for s in await prefect.history("task", task_run)] == ["PENDING", "RUNNING"]


async def test_batch_with_one_bad_item_writes_nothing_and_a_good_one_keeps_order(
    stack: Stack,
) -> None:
    rng = random.Random(3)
    changes = [
        {
            "run_type": rng.choice(["task", "flow"]),
            "run_id": f"{i:08x}-0000-4000-8000-{i:012x}",
            "state": rng.choice(STATES),
        }
        for i in range(1000)
    ]
    bad = [*changes[:637], {**changes[637], "state": "DONE"}, *changes[638:]]
    async with Client(build_server(stack.settings)) as client:
        message = await error(client, "submit_state_changes", changes=bad)
        assert "changes[637].state" in message and "nothing was queued" in message
        assert stack.redis.dbsize() == 0
        bad_id = [*changes[:12], {**changes[12], "run_id": "nope"}]
        assert "changes[12].run_id" in await error(client, "submit_state_changes", changes=bad_id)
        too_many = await error(client, "submit_state_changes", changes=changes + changes[:1])
        assert "changes" in too_many
        assert stack.redis.dbsize() == 0
        tickets = (await ok(client, "submit_state_changes", changes=changes))["jobs"]
    assert [(t["run_type"], t["run_id"], t["state"]) for t in tickets] == [
        (c["run_type"], c["run_id"], c["state"]) for c in changes
    ]
    assert len({t["job_id"] for t in tickets}) == 1000


async def test_idempotency_keys_inside_a_batch(stack: Stack) -> None:
    run = "5b0f2f3e-8a1d-4c1e-9a51-0d4b3e1c2f70"
    same = {"run_type": "task", "run_id": run, "state": "RUNNING", "idempotency_key": "k1"}
    async with Client(build_server(stack.settings)) as client:
        first = (await ok(client, "submit_state_changes", changes=[same, same]))["jobs"]
        assert first[0]["job_id"] == first[1]["job_id"]
        assert [t["deduplicated"] for t in first] == [False, True]
        clash = {**same, "state": "FAILED"}
        message = await error(client, "submit_state_changes", changes=[clash])
        assert "changes[0].idempotency_key" in message and first[0]["job_id"] in message
        inside = await error(
            client,
            "submit_state_changes",
            changes=[{**same, "idempotency_key": "k2"}, {**clash, "idempotency_key": "k2"}],
        )
        assert "changes[1].idempotency_key" in inside
    assert stack.redis.zcard(QUEUE_KEY) == 1


async def test_full_queue_recovers_by_itself_as_it_drains(
    services: Any, prefect: PrefectRuns
) -> None:
    from tests.conftest import make_stack

    small = make_stack(services, max_queue_depth=5)
    runs = await make_runs(prefect, 6, kinds=("flow",))
    try:
        async with Client(build_server(small.settings)) as client:
            tickets = [
                await ok(client, "set_flow_run_state", flow_run_id=run, state="RUNNING")
                for _, run in runs[:5]
            ]
            assert "queue full" in await error(
                client, "set_flow_run_state", flow_run_id=runs[5][1], state="RUNNING"
            )
            small.start_worker()
            await wait_all_terminal(client, [t["job_id"] for t in tickets], timeout_s=60)
            wait_for(lambda: small.redis.zcard(QUEUE_KEY) == 0, 30, "queue drained")
            late = await ok(client, "set_flow_run_state", flow_run_id=runs[5][1], state="RUNNING")
            assert late["status"] == "queued"
            await wait_all_terminal(client, [late["job_id"]], timeout_s=60)
    finally:
        small.stop()
    assert small.keys_without_ttl() == []


async def test_cancelling_a_waiting_change_lets_the_run_go_on(
    stack: Stack, proxy: ChaosProxy, prefect: PrefectRuns
) -> None:
    flow_run = await prefect.flow_run("PENDING")
    # The first change gets a 503 asking for 60 s: `waiting`, with the next queued behind it.
    proxy.script.append(Fault(503, retry_after_s=60))
    stack.start_worker(prefect_api_url=proxy.url + "/api")
    async with Client(build_server(stack.settings)) as client:
        first = await ok(
            client, "set_flow_run_state", flow_run_id=flow_run, state="RUNNING", message="first"
        )
        second = await ok(
            client,
            "set_flow_run_state",
            flow_run_id=flow_run,
            state="COMPLETED",
            message="second",
        )
        waiting = await ok(client, "get_job", job_id=first["job_id"])
        while waiting["status"] != "waiting":
            waiting = await ok(client, "get_job", job_id=first["job_id"], wait_s=0.1)
        assert waiting["error"]["code"] == "transient_error"
        parked = await ok(client, "get_job", job_id=second["job_id"])
        while parked["status"] == "queued":  # until a worker has looked at it
            parked = await ok(client, "get_job", job_id=second["job_id"], wait_s=0.1)
        assert parked["status"] == "waiting" and parked["attempts"] == 0
        cancelled = await ok(client, "cancel_job", job_id=first["job_id"])
        assert cancelled["status"] == "cancelled"
        done = await wait_all_terminal(client, [second["job_id"]], timeout_s=30)
        assert done[0]["status"] == "applied"
        assert (await ok(client, "get_job", job_id=first["job_id"]))["status"] == "cancelled"
    history = await prefect.history("flow", flow_run)
    assert [(s["type"], s["message"]) for s in history[1:]] == [("COMPLETED", "second")]


async def test_long_poll_is_woken_by_the_job_finishing_not_by_polling(
    stack: Stack, prefect: PrefectRuns
) -> None:
    task_run = await prefect.task_run()
    async with Client(build_server(stack.settings)) as client:
        ticket = await ok(client, "set_task_run_state", task_run_id=task_run, state="RUNNING")
        before = _calls(stack, "hgetall")
        poll = asyncio.create_task(ok(client, "get_job", job_id=ticket["job_id"], wait_s=25))
        stack.start_worker()  # takes a few seconds: a polling loop would read many times
        job = await asyncio.wait_for(poll, 30)
        returned = datetime.now(UTC)
    assert job["status"] == "applied"
    # One read before waiting, one after the wake-up, plus the worker's own reads.
    assert _calls(stack, "hgetall") - before <= 5
    assert (returned - datetime.fromisoformat(job["finished_at"])).total_seconds() < 2


async def test_shared_rate_limit_holds_across_workers_and_fails_nothing(
    stack: Stack, proxy: ChaosProxy, prefect: PrefectRuns
) -> None:
    runs = await make_runs(prefect, 30, kinds=("flow",))
    for _ in range(2):
        stack.start_worker(prefect_api_url=proxy.url + "/api", prefect_max_rps=5)
    start = len(proxy.request_times)
    changes = [{"run_type": "flow", "run_id": run, "state": "RUNNING"} for _, run in runs]
    async with Client(build_server(stack.settings)) as client:
        tickets = (await ok(client, "submit_state_changes", changes=changes))["jobs"]
        jobs = await wait_all_terminal(client, [t["job_id"] for t in tickets], timeout_s=60)
    assert Counter(j["status"] for j in jobs) == {"applied": 30}
    times = proxy.request_times[start:]
    assert len(times) == 30
    busiest = max(sum(1 for t in times if t0 <= t < t0 + 1.0) for t0 in times)
    assert busiest <= 6, f"{busiest} Prefect calls within one second"  # 5/s, edge-inclusive
    assert times[-1] - times[0] >= 29 / 5 - 0.5


async def test_calls_waiting_on_the_rate_limit_ask_redis_once_each(stack: Stack) -> None:
    """Each call books its turn of the shared budget and waits for it: 16 calls waiting
    on 20/s used to wake together, and all but one asked again (67 Redis commands per
    call in bench/b6_queue_ceiling.py with PMQ_PREFECT_MAX_RPS)."""
    calls, rate = 32, 20.0
    client = Redis.from_url(stack.settings.redis_url)
    limiter = RateLimiter(client, rate)
    turns: list[float] = []

    async def call(n: int) -> None:
        for _ in range(n):
            booked, wait_s = await limiter.book(longest_wait_s=10)
            assert booked
            await asyncio.sleep(wait_s)  # the booked turn
            turns.append(time.monotonic())

    try:
        before = _calls(stack, "evalsha")
        await asyncio.gather(*(call(calls // 16) for _ in range(16)))
        assert _calls(stack, "evalsha") - before == calls
        turns.sort()
        assert turns[-1] - turns[0] >= (calls - 1) / rate - 0.05, turns  # the rate held
        # A turn too far off is not booked: the job goes back to the queue instead.
        one_a_second = RateLimiter(client, 1.0)
        assert (await one_a_second.book(longest_wait_s=10))[0]
        booked, wait_s = await one_a_second.book(longest_wait_s=0.5)
        assert not booked and wait_s > 0.5
    finally:
        await client.aclose()


def _calls(stack: Stack, command: str) -> int:
    stats = cast(dict[str, Any], stack.redis.info("commandstats"))
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))
