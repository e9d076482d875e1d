"""Redis behind Sentinel, with a password: the frontend and the workers follow."""

from pathlib import Path

import redis
from mcp import Client

from mcp_frontend.devstack import RedisServer, Service, find_redis_server, free_port, pmq_service
from mcp_frontend.server import build_server
from tests.conftest import Services, Stack
from tests.mcp_calls import ok, wait_terminal
from tests.prefect_runs import PrefectRuns
from worker.settings import Settings

PASSWORD = "sentinel-guarded-pass-42"


async def test_a_job_runs_through_a_sentinel_managed_master(
    services: Services, prefect: PrefectRuns, tmp_path: Path
) -> None:
    master = RedisServer(free_port(), tmp_path / "master")
    master.argv += ["--requirepass", PASSWORD, "--masterauth", PASSWORD]
    sentinel_port = free_port()
    config = tmp_path / "sentinel.conf"
    config.write_text(
        f"port {sentinel_port}\nbind 127.0.0.1\n"
        f"sentinel monitor pmq-master 127.0.0.1 {master.port} 1\n"
        f"sentinel auth-pass pmq-master {PASSWORD}\n"
    )
    sentinel = Service(
        "sentinel",
        [find_redis_server(), str(config), "--sentinel"],
        env={},
        log_path=tmp_path / "sentinel.log",
    )
    master.start_and_wait()
    sentinel.start()
    # The URL's host leads nowhere: only the sentinel knows where the master is.
    settings = Settings(
        redis_url=f"redis://:{PASSWORD}@127.0.0.1:{free_port()}/2",
        redis_sentinels=f"127.0.0.1:{sentinel_port}",
        redis_sentinel_master="pmq-master",
        heartbeat_s=1.0,
    )
    stack = Stack(services, 2, settings, services.prefect.api_url)
    worker = pmq_service("worker", ["worker"], env=stack.env(), log_path=tmp_path / "worker.log")
    stack.workers.append(worker)
    direct = redis.Redis(port=master.port, password=PASSWORD, db=2)
    try:
        sentinel.wait_ready(lambda: "+monitor master" in sentinel.log_path.read_text(), 20)
        worker.start()
        worker.wait_ready(lambda: bool(direct.keys("pmq:worker:*")), 60)
        flow_run = await prefect.flow_run()
        async with Client(build_server(settings)) as client:
            ticket = await ok(client, "set_flow_run_state", flow_run_id=flow_run, state="RUNNING")
            assert (await wait_terminal(client, ticket["job_id"]))["status"] == "applied"
        assert direct.exists(f"pmq:job:{ticket['job_id']}")
    finally:
        direct.close()
        stack.stop()
        sentinel.stop()
        master.stop()
