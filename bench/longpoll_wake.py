"""How soon does `get_job(wait_s=...)` answer after a job turns terminal, and at what cost?

Starts its own Redis, Prefect server and one worker; then, one change at a
time, submits it and waits for it through the MCP client (in-process) in two
ways measured in the same run:

- long-poll: `get_job(job_id, wait_s=10)`, woken by the worker's notification;
- baseline: a client polling `get_job(job_id)` every 100 ms.

For each it records the lag from the job's `finished_at` to the answer, and
the Redis reads (HGETALL) the frontend made per wait.

    .venv/bin/python bench/longpoll_wake.py [--changes 50]
"""

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis as redis_sync
from mcp import Client

from mcp_frontend.devstack import PrefectServer, RedisServer, free_port, pmq_service
from mcp_frontend.server import build_server
from tests.prefect_runs import PrefectRuns
from worker.settings import Settings

RESULTS = Path(__file__).parent / "results"
POLL_INTERVAL_S = 0.1


def hgetall_calls(client: "redis_sync.Redis") -> int:
    stats: dict[str, Any] = client.info("commandstats")  # type: ignore[assignment]
    return int(stats.get("cmdstat_hgetall", {}).get("calls", 0))


async def measure(
    client: Client,
    counter: "redis_sync.Redis",
    runs: list[str],
    wait: Callable[[Client, str], Awaitable[dict[str, Any]]],
) -> dict[str, float]:
    lags_ms: list[float] = []
    reads: list[int] = []
    for run in runs:
        ticket = await client.call_tool(
            "set_task_run_state", {"task_run_id": run, "state": "RUNNING"}
        )
        assert ticket.structured_content is not None
        before = hgetall_calls(counter)
        job = await wait(client, ticket.structured_content["job_id"])
        answered = datetime.now(UTC)
        reads.append(hgetall_calls(counter) - before - 1)  # minus the worker's own read
        assert job["status"] == "applied", job
        lags_ms.append(
            (answered - datetime.fromisoformat(job["finished_at"])).total_seconds() * 1e3
        )
    lags_ms.sort()
    return {
        "lag_p50_ms": round(statistics.median(lags_ms), 1),
        "lag_p99_ms": round(lags_ms[min(len(lags_ms) - 1, int(len(lags_ms) * 0.99))], 1),
        "lag_max_ms": round(lags_ms[-1], 1),
        "redis_reads_per_wait": round(float(statistics.mean(reads)), 1),
    }


async def long_poll(client: Client, job_id: str) -> dict[str, Any]:
    result = await client.call_tool("get_job", {"job_id": job_id, "wait_s": 10})
    assert result.structured_content is not None
    return dict(result.structured_content)


async def polling(client: Client, job_id: str) -> dict[str, Any]:
    while True:
        result = await client.call_tool("get_job", {"job_id": job_id})
        assert result.structured_content is not None
        if result.structured_content["finished_at"]:
            return dict(result.structured_content)
        await asyncio.sleep(POLL_INTERVAL_S)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--changes", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        redis_server = RedisServer(free_port(), tmp / "redis")
        prefect_server = PrefectServer(free_port(), tmp / "prefect", ui=False)
        redis_server.start_and_wait()
        prefect_server.start_and_wait()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PMQ_", "PREFECT_"))}
        env |= {
            "PMQ_REDIS_URL": redis_server.url(),
            "PREFECT_API_URL": prefect_server.api_url,
            "PREFECT_HOME": str(tmp / "client"),
        }
        worker = pmq_service("worker", ["worker"], env=env, log_path=tmp / "worker.log")
        worker.start()
        try:
            worker.wait_ready(lambda: "Starting worker" in worker.log_path.read_text(), 60)
            prefect = PrefectRuns(prefect_server.api_url)
            runs = [await prefect.task_run() for _ in range(2 * args.changes)]
            counter = redis_sync.Redis.from_url(redis_server.url())
            async with Client(build_server(Settings(redis_url=redis_server.url()))) as client:
                rows = {
                    "long-poll (wait_s=10)": await measure(
                        client, counter, runs[: args.changes], long_poll
                    ),
                    f"baseline: poll every {POLL_INTERVAL_S * 1000:g} ms": await measure(
                        client, counter, runs[args.changes :], polling
                    ),
                }
            await prefect.aclose()
        finally:
            worker.stop()
            prefect_server.stop()
            redis_server.stop()
    print(f"{'waiting by':<28} {'lag p50 ms':>10} {'p99 ms':>8} {'max ms':>8} {'reads/wait':>10}")
    for name, row in rows.items():
        print(
            f"{name:<28} {row['lag_p50_ms']:>10} {row['lag_p99_ms']:>8} {row['lag_max_ms']:>8} "
            f"{row['redis_reads_per_wait']:>10}"
        )
    ours = rows["long-poll (wait_s=10)"]
    ok = ours["lag_p99_ms"] <= 100
    print("PASS" if ok else "FAIL", f"long-poll wakes within 100 ms (p99 {ours['lag_p99_ms']} ms)")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "longpoll_wake.json").write_text(
        json.dumps(
            {
                "date": datetime.now(UTC).isoformat(timespec="seconds"),
                "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                f"Python {platform.python_version()}",
                "command": "python bench/longpoll_wake.py " + " ".join(sys.argv[1:]),
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    asyncio.run(main())
