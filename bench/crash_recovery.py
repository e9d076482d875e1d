"""How long after a worker is SIGKILLed do the changes it held reach a terminal status?

Starts its own Redis, Prefect server and a latency-adding proxy in front of
Prefect (so the victim is mid-call when killed), then for each lease setting:
worker A takes N jobs, worker B stands by, A is killed, and the time until all
N jobs are terminal is measured. The baseline is arq's own recovery: the
in-progress key of the longest job timeout plus 10 s. Also checks that no
change was written twice.

    .venv/bin/python bench/crash_recovery.py [--jobs 20]
"""

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from redis.asyncio import Redis

from mcp_frontend.devstack import PrefectServer, RedisServer, free_port, pmq_service, wait_until
from mcp_frontend.jobs import JobService
from mcp_frontend.waiters import TerminalWaiters
from tests.chaos_proxy import ChaosProxy
from tests.prefect_runs import PrefectRuns
from worker.contract import RunType, StateChange, StateType, Status
from worker.settings import Settings
from worker.store import JobStore

RESULTS = Path(__file__).parent / "results"


async def one_round(
    tmp: Path, redis_url: str, proxy: ChaosProxy, prefect: PrefectRuns, jobs: int, lease_s: float
) -> dict[str, float | int | str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMQ_", "PREFECT_"))}
    env |= {
        "PMQ_REDIS_URL": redis_url,
        "PMQ_WORKER_CONCURRENCY": str(jobs),
        "PMQ_WORKER_LEASE_S": str(lease_s),
        "PREFECT_API_URL": proxy.url + "/api",
        "PREFECT_HOME": str(tmp / "client"),
    }
    redis = Redis.from_url(redis_url)
    await redis.flushdb()
    store = JobStore(redis, result_ttl_s=3600, job_deadline_s=3600, max_queue_depth=10_000)
    service = JobService(store, TerminalWaiters(redis), max_wait_s=30)
    runs = [await prefect.task_run() for _ in range(jobs)]
    victim = pmq_service("victim", ["worker"], env=env, log_path=tmp / f"victim-{lease_s}.log")
    victim.start()
    tickets = await service.submit(
        [
            StateChange(run_type=RunType.TASK, run_id=run, state=StateType.RUNNING, message=run)
            for run in runs
        ],
        "bench",
    )
    ids = [t.job_id for t in tickets]

    async def count(status: Status) -> int:
        return sum(1 for j in await service.get_many(ids, "bench") if j.status is status)

    while await count(Status.RUNNING) < jobs:  # the victim holds every job, mid-call
        await asyncio.sleep(0.05)
    standby = pmq_service("standby", ["worker"], env=env, log_path=tmp / f"standby-{lease_s}.log")
    standby.start()
    # A standby is already running in production: start the clock once it polls.
    wait_until(lambda: "Starting worker" in standby.log_path.read_text(), 60, "standby")
    victim.kill()
    killed = time.monotonic()
    while sum(1 for j in await service.get_many(ids, "bench") if j.status.is_terminal) < jobs:
        await asyncio.sleep(0.1)
    recovered_s = time.monotonic() - killed
    standby.stop()
    applied = await count(Status.APPLIED)
    duplicates = 0
    for run in runs:
        messages = [s["message"] for s in await prefect.history("task", run)]
        duplicates += messages.count(run) - 1
    await redis.aclose()
    return {
        "lease_s": lease_s,
        "recovered_s": round(recovered_s, 2),
        "jobs": jobs,
        "applied": applied,
        "duplicates": duplicates,
    }


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--latency-s", type=float, default=2.0)
    args = parser.parse_args()
    settings = Settings()
    arq_default_s = settings.job_timeout_s + 10
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        redis_server = RedisServer(free_port(), tmp / "redis")
        prefect_server = PrefectServer(free_port(), tmp / "prefect", ui=False)
        redis_server.start_and_wait()
        prefect_server.start_and_wait()
        try:
            with ChaosProxy(prefect_server.api_url.removesuffix("/api")) as proxy:
                proxy.latency_s = args.latency_s
                prefect = PrefectRuns(prefect_server.api_url)
                rows = [
                    await one_round(tmp, redis_server.url(), proxy, prefect, args.jobs, lease)
                    for lease in (settings.worker_lease_s, arq_default_s)
                ]
                await prefect.aclose()
        finally:
            prefect_server.stop()
            redis_server.stop()
    ours, baseline = rows
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}",
        "command": "python bench/crash_recovery.py " + " ".join(sys.argv[1:]),
        "prefect_latency_s": args.latency_s,
        "rows": rows,
        "speedup": round(float(baseline["recovered_s"]) / float(ours["recovered_s"]), 2),
    }
    print(f"{'lease (s)':>10} {'recovered (s)':>14} {'applied':>8} {'duplicates':>10}")
    for row in rows:
        print(
            f"{row['lease_s']:>10} {row['recovered_s']:>14} {row['applied']:>8} "
            f"{row['duplicates']:>10}"
        )
    print(
        f"lease {ours['lease_s']} s recovers {result['speedup']}x faster than arq's default "
        f"({arq_default_s:g} s in-progress key)"
    )
    ok = all(r["applied"] == r["jobs"] and r["duplicates"] == 0 for r in rows)
    print("PASS" if ok else "FAIL", "every job applied exactly once")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "crash_recovery.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    asyncio.run(main())
