"""Adaptive Prefect concurrency: the AIMD rule itself, then a worker against a queueing server."""

import contextlib
import statistics

import pytest
from mcp import Client

from mcp_frontend.server import build_server
from tests.chaos_proxy import ChaosProxy
from tests.conftest import Stack
from tests.fleet import make_runs, wait_all_terminal
from tests.mcp_calls import ok
from tests.prefect_runs import PrefectRuns
from worker.concurrency import AdaptiveLimit, LimitSettings, SlotTimeout

FAST, SLOW = 0.01, 0.5


def limit(**overrides: float | bool) -> AdaptiveLimit:
    settings = {"maximum": 8, "initial": 2, "increase_every_s": 0.0, **overrides}
    return AdaptiveLimit(LimitSettings(**settings))  # type: ignore[arg-type]


async def test_grows_one_slot_per_interval_only_while_every_slot_is_busy() -> None:
    aimd = limit()
    await aimd.observe(FAST, overloaded=False)  # idle: nothing held back
    assert aimd.limit == 2
    async with contextlib.AsyncExitStack() as held:
        for _ in range(2):
            await held.enter_async_context(aimd.slot(timeout_s=1))
        await aimd.observe(FAST, overloaded=False)
        assert aimd.limit == 3
    slow_growth = limit(increase_every_s=3600.0)
    async with slow_growth.slot(1), slow_growth.slot(1):
        await slow_growth.observe(FAST, overloaded=False)
    assert slow_growth.limit == 2  # not a whole interval since the start


async def test_a_slow_burst_cuts_once_and_overload_cuts_even_when_fast() -> None:
    aimd = limit(initial=8)
    await aimd.observe(FAST, overloaded=False)
    await aimd.observe(SLOW, overloaded=False)
    await aimd.observe(SLOW, overloaded=False)  # same round trip: counted once
    assert aimd.limit == pytest.approx(8 * 0.7)
    overloaded = limit(initial=8)
    await overloaded.observe(FAST, overloaded=True)
    assert overloaded.limit == pytest.approx(8 * 0.7)


async def test_bounds_fixed_mode_and_slot_timeout() -> None:
    aimd = limit(initial=1, maximum=2)
    await aimd.observe(SLOW, overloaded=True)
    assert aimd.limit == 1  # never below the minimum
    async with aimd.slot(1):
        await aimd.observe(FAST, overloaded=False)
    assert aimd.limit == 2
    async with aimd.slot(1), aimd.slot(1):
        await aimd.observe(FAST, overloaded=False)
    assert aimd.limit == 2  # never above the maximum
    fixed = limit(adaptive=False, maximum=3)
    await fixed.observe(SLOW, overloaded=True)
    assert fixed.limit == 3
    async with fixed.slot(1), fixed.slot(1), fixed.slot(1):
        with pytest.raises(SlotTimeout):
            async with fixed.slot(timeout_s=0.05):
                pass


async def _drain(stack: Stack, prefect: PrefectRuns, runs: int) -> None:
    task_runs = await make_runs(prefect, runs, kinds=("task",))
    changes = [{"run_type": "task", "run_id": run, "state": "RUNNING"} for _, run in task_runs]
    async with Client(build_server(stack.settings)) as client:
        tickets = (await ok(client, "submit_state_changes", changes=changes))["jobs"]
        jobs = await wait_all_terminal(client, [t["job_id"] for t in tickets], timeout_s=120)
    assert {j["status"] for j in jobs} == {"applied"}


async def test_worker_keeps_few_calls_in_flight_on_a_queueing_server(
    stack: Stack, proxy: ChaosProxy, prefect: PrefectRuns
) -> None:
    # Each call takes 30 ms per call in flight: more concurrency buys only latency.
    proxy.latency_per_in_flight_s = 0.03
    worker = stack.start_worker(prefect_api_url=proxy.url + "/api", worker_concurrency=16)
    await _drain(stack, prefect, 200)
    adaptive = proxy.in_flight_seen[50:]  # past the first adjustments
    worker.stop()
    stack.workers.remove(worker)
    proxy.in_flight_seen.clear()
    stack.start_worker(
        prefect_api_url=proxy.url + "/api", worker_concurrency=16, prefect_adaptive=False
    )
    await _drain(stack, prefect, 200)
    fixed = proxy.in_flight_seen[50:]
    # Where AIMD settles depends on this machine's own latency; the margins are wide.
    assert statistics.median(fixed) >= 12, statistics.median(fixed)
    assert statistics.median(adaptive) <= min(6, statistics.median(fixed) / 2), adaptive
