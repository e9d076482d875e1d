"""Adaptive Prefect concurrency: the AIMD rule itself, then a worker against a queueing server."""

import itertools
import statistics

import pytest
from mcp import Client

from mcp_frontend.server import build_server
from tests.chaos_proxy import ChaosProxy
from tests.conftest import Stack
from tests.fleet import make_runs, wait_all_terminal
from tests.mcp_calls import ok
from tests.prefect_runs import PrefectRuns
from tests.tcp_cut import TcpCut
from worker.concurrency import AdaptiveLimit, LimitSettings, SlotTimeout

FAST, SLOW = 0.01, 0.5


def limit(**overrides: float | bool) -> AdaptiveLimit:
    # Rounds of one slot's worth of calls: the rules, not the noise they are sized against.
    settings = {
        "maximum": 8,
        "initial": 2,
        "increase_every_s": 0.0,
        "round_s": 0.0,
        "round_calls": 1,
        **overrides,
    }
    return AdaptiveLimit(LimitSettings(**settings))  # type: ignore[arg-type]


async def rounds(aimd: AdaptiveLimit, *latencies: float) -> None:
    for latency in latencies:
        await aimd.observe(latency, overloaded=False)


async def test_slow_start_doubles_then_grows_one_slot_per_round_while_every_slot_is_busy() -> None:
    aimd = limit(initial=1, latency_floor_s=0.0)
    await rounds(aimd, FAST)  # a whole round, idle: nothing held back
    assert aimd.limit == 1
    async with aimd.slot(1):
        await rounds(aimd, FAST)
    assert aimd.limit == 2
    async with aimd.slot(1), aimd.slot(1):
        await rounds(aimd, FAST)
        assert aimd.limit == 2  # half a round
        await rounds(aimd, FAST)
    assert aimd.limit == 4
    await rounds(aimd, SLOW, SLOW, SLOW, SLOW)  # queueing: slow start is over
    assert aimd.limit == pytest.approx(4 * 0.7)
    async with aimd.slot(1), aimd.slot(1):
        await rounds(aimd, FAST, FAST)
    assert aimd.limit == pytest.approx(4 * 0.7 + 1)


async def test_after_slow_start_one_slot_per_interval() -> None:
    aimd = limit(initial=2, increase_every_s=3600.0)
    await aimd.observe(FAST, overloaded=True)  # ends slow start: 2 * 0.7
    async with aimd.slot(1):
        await rounds(aimd, FAST)
    assert aimd.limit == pytest.approx(1.4)  # not a whole interval since the cut


async def test_one_slow_call_is_noise_a_slow_round_cuts_once() -> None:
    aimd = limit(initial=10, maximum=16, latency_floor_s=0.0)
    await rounds(aimd, *[FAST] * 10)  # the no-load latency
    await rounds(aimd, *[FAST] * 4, SLOW, *[FAST] * 5)  # a pause, not a queue
    assert aimd.limit == 10
    # A tenth of a round slow is a queue (a SQLite Prefect's lock waits look so): its
    # 90th percentile is judged, not its median.
    await rounds(aimd, SLOW, *[FAST] * 4, SLOW, *[FAST] * 4)
    assert aimd.limit == pytest.approx(10 * 0.7)
    await rounds(aimd, SLOW)  # the cut started a new round of int(7.0) = 7 calls
    assert aimd.limit == pytest.approx(10 * 0.7)


async def test_slow_rounds_under_the_floor_never_cut() -> None:
    aimd = limit(initial=4, latency_floor_s=SLOW)
    await rounds(aimd, FAST, FAST, FAST, FAST)
    await rounds(aimd, SLOW, SLOW, SLOW, SLOW)
    assert aimd.limit == 4


async def test_overload_cuts_at_once_even_when_fast_once_per_round_trip() -> None:
    overloaded = limit(initial=8)
    await overloaded.observe(FAST, overloaded=True)
    assert overloaded.limit == pytest.approx(8 * 0.7)
    await overloaded.observe(SLOW, overloaded=True)  # in flight with the first
    assert overloaded.limit == pytest.approx(8 * 0.7)


async def test_bounds_fixed_mode_and_slot_timeout() -> None:
    aimd = limit(initial=1, minimum=1, maximum=2)
    await aimd.observe(SLOW, overloaded=True)
    assert aimd.limit == 1  # never below the minimum
    async with aimd.slot(1):
        await rounds(aimd, FAST)
    assert aimd.limit == 2
    async with aimd.slot(1), aimd.slot(1):
        await rounds(aimd, FAST, FAST)
    assert aimd.limit == 2  # never above the maximum
    fixed = limit(adaptive=False, maximum=3)
    await fixed.observe(SLOW, overloaded=True)
    assert fixed.limit == 3
    async with fixed.slot(1), fixed.slot(1), fixed.slot(1):
        with pytest.raises(SlotTimeout):
            async with fixed.slot(timeout_s=0.05):
                pass


async def test_below_one_call_the_limit_paces_a_single_call() -> None:
    woken: list[int] = []
    aimd = AdaptiveLimit(
        LimitSettings(maximum=8, initial=0.25, round_s=3600.0), on_change=woken.append
    )
    assert (aimd.limit, aimd.slots) == (0.25, 1)
    assert aimd.reserve(4) == 1  # one call in flight, never more
    assert aimd.reserve(1) == 0
    await aimd.observe(0.04, overloaded=False)
    await aimd.release()
    # In flight a quarter of the time: 3 x the call's latency before the next one.
    assert 0.1 < aimd.paused_for_s <= 0.12
    assert aimd.reserve(1) == 0
    async with aimd.slot(timeout_s=1):  # waits for the pause's end
        assert aimd.paused_for_s == 0
    assert woken == [1]  # the pause's end woke the dispatcher
    await aimd.observe(30.0, overloaded=True)  # a timeout: cut, but never idle long
    assert aimd.limit == 0.25  # the minimum
    assert aimd.paused_for_s <= aimd.settings.max_pause_s


async def test_slow_start_from_a_quarter_call_to_whole_slots() -> None:
    aimd = limit(initial=0.25, latency_floor_s=0.0)
    for expected in (0.5, 1, 2):
        async with aimd.slot(timeout_s=1):
            await rounds(aimd, FAST)
        assert aimd.limit == expected
    await aimd.observe(FAST, overloaded=True)  # slow start over: 2 * 0.7
    await aimd.observe(FAST, overloaded=True)  # within a round trip of that cut: no cut
    assert aimd.limit == pytest.approx(1.4)


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


async def test_the_next_call_goes_out_without_waiting_for_redis(
    stack: Stack, proxy: ChaosProxy, prefect: PrefectRuns
) -> None:
    """A worker keeps a claimed job ready for each slot: when a call comes back, the
    next one starts at once, and the take that refills the reserve (with the outcome)
    runs while Prefect works. Redis is 100 ms away here, and Prefect takes 200 ms: a
    worker that took the next job only once a call was back would start one call
    every 300 ms or more."""
    redis_rtt_s, prefect_s = 0.1, 0.2
    proxy.latency_s = prefect_s
    with TcpCut(stack.services.redis.port, delay_s=redis_rtt_s / 2) as far:
        stack.start_worker(
            prefect_api_url=proxy.url + "/api",
            redis_url=f"redis://127.0.0.1:{far.port}/{stack.db}",
            prefect_adaptive=False,
            worker_concurrency=1,
        )
        await _drain(stack, prefect, 12)
    starts = proxy.request_times[-12:]
    gaps = [later - earlier for earlier, later in itertools.pairwise(starts)]
    assert min(gaps) >= prefect_s, gaps  # one call at a time
    assert statistics.median(gaps) < prefect_s + redis_rtt_s / 2, gaps
