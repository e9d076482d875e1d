"""D1, D3, D4: a worker cut off from Redis, a frontend cut off, Prefect black-holed and flapping.

One fault topology (faults.yaml) serves the module; each scenario starts by
making it whole again (`up -d` at full scale, every service healthy, the proxy
passing everything) and ends with checks (a), (b) and (c) of scenario.py.
"""

import asyncio
from typing import Any

import pytest

from tests.compose.faults.scenario import (
    Scenario,
    check_all_applied,
    disconnected,
    hold_fault,
    mid_drain,
    prepare,
    until,
)
from tests.compose.faults.topology import CLIENT_NET, REDIS_NET, Topology, answers, firewall
from tests.compose.steps import step
from tests.prefect_runs import PrefectRuns

pytestmark = pytest.mark.timeout(600)

PARTITION_S = 30.0  # D1: longer than the lease (PMQ_WORKER_LEASE_S, 10 s)
PREFECT_LATENCY_S = (0.3, 0.5)  # D1: each call through prefect-proxy
FRONTEND_CUT_S = 15.0  # D3, each of the two cuts
HOLE_S, FLAP_S, FLAP_RATE = 15.0, 15.0, 0.5  # D4


async def test_d1_a_worker_cut_off_from_redis_mid_drain(
    topology: Topology, prefect_api: PrefectRuns, token: str, results: dict[str, Any]
) -> None:
    await asyncio.to_thread(topology.ensure)
    topology.proxy(mode="pass", latency_s=PREFECT_LATENCY_S)
    scenario = await prepare("D1 worker partitioned from Redis", topology, prefect_api, token, 11)
    with scenario.recorded_in(results):
        victim = topology.workers()[0]
        async with scenario.submitting():
            # Mid-drain, and while the victim has Prefect calls in flight (each takes 300-500 ms).
            await mid_drain(
                scenario, lambda: topology.worker_metric(victim, "pmq_prefect_in_flight") > 0
            )
            async with disconnected(topology, victim, REDIS_NET):
                cut_at = scenario.mark(f"{victim.name} cut off from Redis")
                await hold_fault(PARTITION_S)
            healed_at = scenario.mark(f"{victim.name} reconnected")
        jobs = await check_all_applied(scenario, healed_at)
        applied_by_victim = topology.worker_metric(
            victim, "pmq_worker_jobs_finished_total", status="applied"
        )
        scenario.figures |= {
            "partition_s": round(healed_at - cut_at, 1),
            "recovery_from_cut_s": round(scenario.figures["recovery_s"] + healed_at - cut_at, 1),
            "victim_reconnected_and_healthy_s": round(
                await until(lambda: _healthy(topology, victim.id), 120, "victim healthy")
                - healed_at,
                1,
            ),
            "victim_jobs_applied": applied_by_victim,
            "proxy": topology.proxy_stats(),
        }
        assert len(jobs) == len(scenario.changes)


async def test_d3_a_frontend_cut_off_from_redis_then_from_its_clients(
    topology: Topology, prefect_api: PrefectRuns, token: str, results: dict[str, Any]
) -> None:
    await asyncio.to_thread(topology.ensure)
    victim, _ = topology.frontends()
    scenario = await prepare("D3 frontend cut off", topology, prefect_api, token, 13)
    with scenario.recorded_in(results):

        def calling_victim() -> bool:
            return any(agent.in_flight == victim.mcp_url for agent in scenario.agents)

        async with scenario.submitting():
            await mid_drain(scenario, calling_victim)
            async with disconnected(topology, victim.container, REDIS_NET):
                redis_cut = scenario.mark(f"{victim.container.name} cut off from Redis")
                await hold_fault(FRONTEND_CUT_S)
            redis_back = scenario.mark(f"{victim.container.name} reconnected to Redis")
            # Its agents come back to it once it stores changes again; cut it off mid-call.
            await until(
                lambda: _ticketed_by(scenario, victim.mcp_url, redis_back), 60, "tickets again"
            )
            await until(calling_victim, 30, f"a call in flight to {victim.url}")
            # The host reaches a container's published port through docker-proxy; once the
            # frontend leaves `default`, the engine republishes the port on its Redis network,
            # which the host reaches too. The firewall rule closes that path first.
            redis_address = topology.address(victim.container, REDIS_NET)
            with firewall(redis_address, 8000):
                async with disconnected(topology, victim.container, CLIENT_NET):
                    clients_cut = scenario.mark(f"{victim.container.name} cut off from its clients")
                    await hold_fault(FRONTEND_CUT_S)
            clients_back = scenario.mark(f"{victim.container.name} reachable again")
        await check_all_applied(scenario, clients_back)
        during = {
            "redis_cut": _calls_within(scenario, victim.mcp_url, redis_cut, redis_back),
            "clients_cut": _calls_within(scenario, victim.mcp_url, clients_cut, clients_back),
        }
        # A frontend without Redis stores nothing, so it may give no ticket for a call made then.
        for phase, calls in during.items():
            ticketed = [call for call in calls if call.tickets]
            assert not ticketed, f"{phase}: {victim.url} gave tickets while cut off: {ticketed[:3]}"
        with step(f"{victim.url} answers its clients again"):
            await until(lambda: answers(victim.url), 60, f"{victim.url} answers")
        scenario.figures |= {
            "cut_s": FRONTEND_CUT_S,
            "calls_to_victim_during_redis_cut": len(during["redis_cut"]),
            "calls_to_victim_during_clients_cut": len(during["clients_cut"]),
            "victim_tickets_again_after_redis_back_s": round(
                min(
                    call.ended
                    for agent in scenario.agents
                    for call in agent.calls
                    if call.url == victim.mcp_url and call.tickets and call.started >= redis_back
                )
                - redis_back,
                1,
            ),
        }


async def test_d4_prefect_black_holed_then_flapping(
    topology: Topology, prefect_api: PrefectRuns, token: str, results: dict[str, Any]
) -> None:
    await asyncio.to_thread(topology.ensure)
    scenario = await prepare("D4 Prefect slow and flapping", topology, prefect_api, token, 17)
    with scenario.recorded_in(results):
        try:
            async with scenario.submitting():
                await mid_drain(scenario)
                topology.proxy(mode="hole")
                hole_at = scenario.mark("prefect-proxy: black hole")
                await hold_fault(HOLE_S)
                topology.proxy(mode="flap", fail_rate=FLAP_RATE)
                scenario.mark(f"prefect-proxy: HTTP 500 to {FLAP_RATE:.0%} of calls")
                await hold_fault(FLAP_S)
                passing_at = scenario.mark("prefect-proxy: passes everything")
                topology.proxy(mode="pass")
        finally:
            topology.proxy(mode="pass")
        await check_all_applied(scenario, passing_at)
        stats = topology.proxy_stats()
        assert stats["held"] > 0 and stats["failed_500"] > 0, (
            f"the faults never hit a call: {stats}"
        )
        scenario.figures |= {
            "fault_s": round(passing_at - hole_at, 1),
            "recovery_from_fault_start_s": round(
                scenario.figures["recovery_s"] + passing_at - hole_at, 1
            ),
            "proxy": stats,
        }


def _healthy(topology: Topology, container_id: str) -> bool:
    return bool(
        topology.stack.engine.inspect(container_id)["State"].get("Health", {}).get("Status")
        == "healthy"
    )


def _ticketed_by(scenario: Scenario, url: str, since: float) -> bool:
    return any(
        call.url == url and call.tickets and call.started >= since
        for agent in scenario.agents
        for call in agent.calls
    )


def _calls_within(scenario: Scenario, url: str, start: float, end: float) -> list[Any]:
    """Calls to `url` made after `start` and answered (or failed) before `end`."""
    return [
        call
        for agent in scenario.agents
        for call in agent.calls
        if call.url == url and call.started > start and call.ended < end
    ]
