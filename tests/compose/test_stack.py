"""compose.yaml in a real Docker engine, driven as an operator would.

One stack serves the module (conftest.py brings it up and takes it down). Each
test is one thing an operator does or checks, in file order; each first puts
the stack in the shape it needs (`up -d --scale worker=N`, all healthy), so a
failing step does not take the next ones with it.
"""

import asyncio
import ipaddress
import json
import socket
import subprocess
import time
from datetime import datetime
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.compose.ports import FRONTEND_URL, PUBLISHED
from tests.compose.stack import SERVICES, ComposeStack, Container, create_runs, poll
from tests.compose.steps import report, step
from tests.fleet import (
    assert_histories_match,
    plan_changes,
    statuses,
    submit_mixed,
    wait_all_terminal,
)
from tests.mcp_calls import ok, wait_terminal
from tests.prefect_runs import PrefectRuns
from tests.test_auth import INITIALIZE, as_client

MCP_URL = f"{FRONTEND_URL}/mcp"
WORKER_METRICS = "http://127.0.0.1:9100/metrics"  # inside each worker's container
HEARTBEAT_MAX_AGE_S = 15.0  # 3 x PMQ_HEARTBEAT_S (5 s): a heartbeat older than this is stale
READY_TIMEOUT_S = 30.0  # a few heartbeats
# Stale heartbeats (15 s), then a healthcheck interval (10 s), with room for a loaded machine.
RECOVERY_TIMEOUT_S = 120.0
DOCKER_STOP_DEFAULT_S = 10  # docker stop's grace for a container without stop_grace_period


def fleet(stack: ComposeStack, workers: int, timeout_s: float = 180.0) -> list[Container]:
    """`up -d --scale worker=N`, then every service healthy; the running workers."""
    with step(f"up -d --scale worker={workers}, every service healthy"):
        stack.up(workers=workers)
        stack.wait_healthy({**dict.fromkeys(SERVICES, 1), "worker": workers}, timeout_s)
    return stack.running("worker")


def applied_by(stack: ComposeStack, worker: Container) -> float:
    """Jobs this worker process brought to `applied`, from its own /metrics on port 9100."""
    fetch = f"import urllib.request as u; r = u.urlopen({WORKER_METRICS!r}, timeout=5)"
    text = stack.exec(worker, "python", "-c", f"{fetch}; print(r.read().decode())")
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "pmq_worker_jobs_finished_total" and sample.labels == {
                "status": "applied"
            }:
                return sample.value
    return 0.0


def _status(url: str) -> int:
    try:
        return httpx.get(url, timeout=5).status_code
    except httpx.HTTPError:
        return 0


def fleet_metrics() -> dict[str, float]:
    """The frontend's /metrics as {"pmq_jobs_total{event=applied}": value, ...}."""
    response = httpx.get(f"{FRONTEND_URL}/metrics", timeout=10)
    response.raise_for_status()
    figures = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            labels = "".join(f"{{{key}={value}}}" for key, value in sorted(sample.labels.items()))
            figures[sample.name + labels] = sample.value
    return figures


def applied_so_far() -> float:
    return fleet_metrics().get("pmq_jobs_total{event=applied}", 0.0)


def assert_all_applied(jobs: list[dict[str, Any]]) -> None:
    wrong = [j for j in jobs if j["status"] != "applied"]
    assert not wrong, f"{len(wrong)} of {len(jobs)} jobs not applied, e.g. {wrong[:3]}"


async def submit_plan(token: str, changes: list[dict[str, Any]], seed: int) -> list[str]:
    async with as_client(MCP_URL, token) as client:
        return await submit_mixed(client, changes, seed)


async def drain(token: str, job_ids: list[str], timeout_s: float) -> list[dict[str, Any]]:
    async with as_client(MCP_URL, token) as client:
        return await wait_all_terminal(client, job_ids, timeout_s)


def test_every_service_is_healthy_after_up(stack: ComposeStack) -> None:
    stack.wait_healthy(timeout_s=10)
    for service, argv in {
        "redis": ["redis-server", "--version"],
        "postgres": ["postgres", "--version"],
        "prefect-server": ["python", "-c", "import prefect; print('prefect', prefect.__version__)"],
        "worker": ["python", "--version"],
    }.items():
        report(f"{service}: {stack.exec(stack.running(service)[0], *argv).strip()}")


async def test_a_flow_run_change_is_applied_through_the_published_endpoint(
    stack: ComposeStack, prefect_api: PrefectRuns, token: str
) -> None:
    await asyncio.to_thread(fleet, stack, 1)
    with step(f"set_flow_run_state RUNNING over {MCP_URL}"):
        flow_run = await prefect_api.flow_run()
        async with as_client(MCP_URL, token) as client:
            ticket = await ok(client, "set_flow_run_state", flow_run_id=flow_run, state="RUNNING")
            job = await wait_terminal(client, ticket["job_id"], 60)
    assert job["status"] == "applied", job
    history = await prefect_api.history("flow", flow_run)
    assert [state["type"] for state in history] == ["PENDING", "RUNNING"]


def test_no_token_is_401_readyz_is_200_and_metrics_parse(stack: ComposeStack) -> None:
    fleet(stack, workers=1)
    headers = {"Accept": "application/json, text/event-stream"}
    missing = httpx.post(MCP_URL, json=INITIALIZE, headers=headers, timeout=10)
    assert missing.status_code == 401, missing.text
    assert "Bearer" in missing.headers["WWW-Authenticate"]
    # Ready follows the workers' heartbeats (every 5 s), so it may trail the
    # healthchecks by a beat or two; an operator's readiness probe polls too.
    with step("/readyz 200"):
        poll(lambda: _status(f"{FRONTEND_URL}/readyz") == 200, READY_TIMEOUT_S, "/readyz 200")
    ready = httpx.get(f"{FRONTEND_URL}/readyz", timeout=10).json()
    assert ready["prefect"] == "ok" and ready["workers"] >= 1, ready
    metrics = fleet_metrics()
    assert metrics["pmq_workers_alive"] >= 1
    assert "pmq_jobs_total{event=applied}" in metrics


async def test_three_workers_share_the_queue(
    stack: ComposeStack, prefect_api: PrefectRuns, token: str
) -> None:
    workers = await asyncio.to_thread(fleet, stack, 3)
    assert len(workers) == 3
    before = {w.name: applied_by(stack, w) for w in workers}
    with step("300 changes over 30 runs, drained by 3 workers"):
        changes = plan_changes(await create_runs(prefect_api, 30), 10, seed=4)
        job_ids = await submit_plan(token, changes, seed=4)
        assert_all_applied(await drain(token, job_ids, 180))
    took = {w.name: applied_by(stack, w) - before[w.name] for w in workers}
    report(f"applied per worker: {took}")
    assert all(count > 0 for count in took.values()), took
    assert sum(took.values()) == len(changes), took


async def test_jobs_queued_while_workers_are_stopped_survive_a_redis_restart(
    stack: ComposeStack, prefect_api: PrefectRuns, token: str
) -> None:
    await asyncio.to_thread(fleet, stack, 3)
    with step("stop worker"):
        stack.compose("stop", "worker")
    assert not stack.running("worker")
    changes = plan_changes(await create_runs(prefect_api, 20), 5, seed=5)
    job_ids = await submit_plan(token, changes, seed=5)
    with step("restart redis, healthy again"):
        stack.compose("restart", "redis")
        await asyncio.to_thread(stack.wait_healthy, {"redis": 1}, 60)
    async with as_client(MCP_URL, token) as client:
        kept = await statuses(client, job_ids)
    assert [job["job_id"] for job in kept] == job_ids
    assert {job["status"] for job in kept} == {"queued"}, "jobs changed with no worker running"
    with step("start worker, the 100 queued changes applied"):
        stack.compose("start", "worker")
        assert_all_applied(await drain(token, job_ids, 180))
    await assert_histories_match(prefect_api, changes)


async def test_workers_recover_when_redis_restarts_under_them(
    stack: ComposeStack, prefect_api: PrefectRuns, token: str
) -> None:
    await asyncio.to_thread(fleet, stack, 3)
    restarted_at = time.time()
    with step("restart redis under 3 running workers"):
        stack.compose("restart", "redis")
        await asyncio.to_thread(stack.wait_healthy, {"redis": 1}, 60)

    # Heartbeats from before the restart came back with the append-only file;
    # a check that passes once they are stale proves a heartbeat written after it.
    recovered_s: dict[str, float] = {}

    def recovered() -> bool:
        workers = stack.running("worker")
        for worker in workers:
            passed = first_pass_after(worker, restarted_at + HEARTBEAT_MAX_AGE_S)
            if passed is not None:
                recovered_s.setdefault(worker.name, round(passed - restarted_at, 1))
        return len(workers) == 3 and all(w.name in recovered_s for w in workers)

    with step("every worker healthy on a heartbeat written after the restart"):
        try:
            await asyncio.to_thread(poll, recovered, RECOVERY_TIMEOUT_S, "workers recovered", 1.0)
        except AssertionError as e:
            raise AssertionError(f"{e} (so far {recovered_s})\n{stack.describe()}") from None
    workers = stack.running("worker")
    report(f"first passing healthcheck, seconds after the restart: {recovered_s}")
    report(f"worker restarts by the engine: { {w.name: w.restarts for w in workers} }")
    before = {w.name: applied_by(stack, w) for w in workers}
    with step("150 new changes applied after the restart"):
        changes = plan_changes(await create_runs(prefect_api, 30), 5, seed=6)
        assert_all_applied(await drain(token, await submit_plan(token, changes, 6), 180))
    took = {w.name: applied_by(stack, w) - before[w.name] for w in workers}
    report(f"applied per worker after the restart: {took}")
    assert all(count > 0 for count in took.values()), took


def first_pass_after(worker: Container, since: float) -> float | None:
    """When the first healthcheck that started after `since` and passed started (epoch s)."""
    starts = [_docker_time(probe["Start"]) for probe in worker.health_log if probe["ExitCode"] == 0]
    return min((start for start in starts if start > since), default=None)


def _docker_time(text: str) -> float:
    """Docker's RFC 3339 time with nanoseconds, as epoch seconds."""
    whole, _, fraction = text.rstrip("Z").partition(".")
    zone = ""
    for sign in ("+", "-"):
        if sign in fraction:
            fraction, _, offset = fraction.partition(sign)
            zone = sign + offset
    stamp = datetime.fromisoformat(f"{whole}.{fraction[:6].ljust(6, '0')}{zone or '+00:00'}")
    return stamp.timestamp()


async def test_a_worker_killed_mid_drain_loses_and_repeats_no_change(
    stack: ComposeStack, prefect_api: PrefectRuns, token: str
) -> None:
    workers = await asyncio.to_thread(fleet, stack, 3)
    with step("200 runs"):
        changes = plan_changes(await create_runs(prefect_api, 200), 5, seed=7)
    with step("1,000 changes over them submitted"):
        start = applied_so_far()
        job_ids = await submit_plan(token, changes, seed=7)
    await asyncio.to_thread(
        poll, lambda: applied_so_far() >= start + 100, 120, "100 changes applied", 0.2
    )
    with step(f"docker kill -s KILL {workers[0].name} mid-drain"):
        stack.engine.docker("kill", "-s", "KILL", workers[0].id)
        at_kill = applied_so_far() - start
    report(f"applied when killed: {at_kill:.0f} of {len(changes)}")
    assert at_kill < len(changes), "the drain was over before the kill"
    with step("every change applied after the kill"):
        assert_all_applied(await drain(token, job_ids, 240))
    with step("each run's Prefect history is its changes, once each, in order"):
        await assert_histories_match(prefect_api, changes)


async def test_a_stopped_worker_exits_within_its_grace_period(
    stack: ComposeStack, prefect_api: PrefectRuns, token: str
) -> None:
    workers = await asyncio.to_thread(fleet, stack, 3)
    victim = workers[0]
    grace_s = stack.engine.inspect(victim.id)["Config"].get("StopTimeout") or DOCKER_STOP_DEFAULT_S
    changes = plan_changes(await create_runs(prefect_api, 60), 5, seed=8)
    start = applied_so_far()
    job_ids = await submit_plan(token, changes, seed=8)
    await asyncio.to_thread(
        poll, lambda: applied_so_far() >= start + 30, 120, "30 changes applied", 0.2
    )
    with step(f"docker stop {victim.name} mid-drain"):
        began = time.monotonic()
        stack.engine.docker("stop", victim.id, timeout_s=grace_s + 30)
        took_s = time.monotonic() - began
    stopped = stack.engine.inspect(victim.id)["State"]
    report(f"{victim.name} exited {stopped['ExitCode']} after {took_s:.1f} s (grace {grace_s} s)")
    assert stopped["ExitCode"] != 137, f"SIGKILLed at the end of its grace period: {stopped}"
    assert took_s < grace_s, f"took {took_s:.1f} s to stop"
    with step("no job left stuck"):
        assert_all_applied(await drain(token, job_ids, 180))
    await assert_histories_match(prefect_api, changes)
    live = fleet_metrics()
    assert [live[f"pmq_jobs_live{{status={s}}}"] for s in ("queued", "running", "waiting")] == [
        0,
        0,
        0,
    ]


def test_logs_are_json_lines_without_the_token(stack: ComposeStack, token: str) -> None:
    text = stack.logs("worker", "mcp-frontend")
    # Compose's own header names the containers it reads; every other line is theirs.
    lines = [line for line in text.splitlines() if line.strip()]
    if lines and lines[0].startswith("Attaching to "):
        lines.pop(0)
    assert lines, "no log lines at all"
    not_json = [line for line in lines if not _json_object(line)]
    assert not not_json, f"{len(not_json)} of {len(lines)} lines are not JSON: {not_json[:5]}"
    assert token not in text, "the bearer token is in the logs"
    report(f"{len(lines)} log lines, all JSON, no token")


def _json_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def test_the_frontend_is_published_on_loopback_only(stack: ComposeStack) -> None:
    fleet(stack, workers=1)
    with socket.create_connection(("127.0.0.1", PUBLISHED.frontend), timeout=5):
        pass
    others = sorted(set(_host_addresses()) | set(_gateways(stack)))
    assert others, "no address but loopback to try"
    reached = {}
    for address in others:
        try:
            with socket.create_connection((address, PUBLISHED.frontend), timeout=3):
                reached[address] = "connected"
        except ConnectionRefusedError:
            continue
        except OSError as e:
            reached[address] = f"not refused: {e!r}"
    report(f"port {PUBLISHED.frontend} refused on {others}")
    assert not reached, reached


def _host_addresses() -> list[str]:
    """This machine's IPv4 addresses but loopback: its own interfaces', so nothing leaves it."""
    shown = subprocess.run(
        ["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True, check=True, timeout=10
    ).stdout
    addresses = [line.split()[3].split("/")[0] for line in shown.splitlines()]
    return [a for a in addresses if not ipaddress.ip_address(a).is_loopback]


def _gateways(stack: ComposeStack) -> list[str]:
    return [
        config["Gateway"]
        for network in stack.engine.networks()
        for config in (network.get("IPAM") or {}).get("Config") or []
        if config.get("Gateway") and ipaddress.ip_address(config["Gateway"]).version == 4
    ]


async def test_down_and_up_keep_prefect_and_redis_data(
    stack: ComposeStack, prefect_api: PrefectRuns, token: str
) -> None:
    await asyncio.to_thread(fleet, stack, 1)
    flow_run = await prefect_api.flow_run()
    async with as_client(MCP_URL, token) as client:
        ticket = await ok(client, "set_flow_run_state", flow_run_id=flow_run, state="RUNNING")
        before = await wait_terminal(client, ticket["job_id"], 60)
    assert before["status"] == "applied", before
    with step("down (volumes kept)"):
        stack.down()
    assert not stack.containers()
    with step("up -d, every service healthy again"):
        await asyncio.to_thread(fleet, stack, 1, 240)
    assert (await prefect_api.state("flow", flow_run))["type"] == "RUNNING"
    async with as_client(MCP_URL, token) as client:
        after = await ok(client, "get_job", job_id=ticket["job_id"])
    assert after == before
