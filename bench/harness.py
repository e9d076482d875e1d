"""What every benchmark needs: its own services, goals with PASS/FAIL, results on disk.

A benchmark starts a fresh Redis and Prefect server (SQLite) in a temporary
directory, runs `pmq worker` and `pmq serve` as child processes like an
operator would, and writes `bench/results/<name>.json` with the machine, the
date and the command beside the figures, so a table in the README can say
where each number came from.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mcp_frontend.devstack import (  # noqa: E402
    PrefectServer,
    RedisServer,
    Service,
    free_port,
    pmq_service,
    wait_until,
)

RESULTS = ROOT / "bench" / "results"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass
class Report:
    """Rows, goals and metadata of one benchmark; `save()` prints and writes them."""

    name: str
    command: str
    started: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    sections: dict[str, Any] = field(default_factory=dict)
    goals: list[dict[str, Any]] = field(default_factory=list)

    def goal(self, text: str, passed: bool, measured: str) -> None:
        self.goals.append({"goal": text, "passed": passed, "measured": measured})
        print(f"{'PASS' if passed else 'FAIL'}  {text}  ({measured})", flush=True)

    def save(self) -> Path:
        RESULTS.mkdir(exist_ok=True)
        path = RESULTS / f"{self.name}.json"
        body = {
            "name": self.name,
            "date": self.started,
            "machine": machine(),
            "command": self.command,
            **self.sections,
            "goals": self.goals,
        }
        path.write_text(json.dumps(body, indent=2) + "\n")
        print(f"wrote {path.relative_to(ROOT)}", flush=True)
        return path


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    """Print rows as an aligned text table."""
    cells = [[_fmt(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True)))
    for row_cells in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row_cells, widths, strict=True)), flush=True)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.1f}" if abs(value) >= 100 else f"{value:.2f}"
    return "" if value is None else str(value)


class BenchStack:
    """Redis and a Prefect server for one benchmark, plus the pmq processes it starts."""

    def __init__(self, tmp: Path, *, redis_args: Sequence[str] = ()) -> None:
        self.tmp = tmp
        self.redis = RedisServer(free_port(), tmp / "redis")
        self.redis.argv += list(redis_args)
        self.prefect = PrefectServer(free_port(), tmp / "prefect", ui=False)
        self.children: list[Service] = []
        self.metrics_urls: dict[str, str] = {}  # worker name -> its Prometheus endpoint

    def start(self) -> None:
        self.redis.start_and_wait()
        self.prefect.start_and_wait()

    def stop(self) -> None:
        for child in reversed(self.children):
            child.stop()
        self.prefect.stop()
        self.redis.stop()

    def env(self, prefect_api_url: str | None = None, **settings: Any) -> dict[str, str]:
        """Environment for a pmq child: PMQ_* settings, Prefect's URL and a private home."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PMQ_", "PREFECT_"))}
        env |= {
            "PMQ_REDIS_URL": self.redis.url(),
            "PREFECT_API_URL": prefect_api_url or self.prefect.api_url,
            "PREFECT_HOME": str(self.tmp / "client-home"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PMQ_LOG_LEVEL": "WARNING",
        }
        env |= {f"PMQ_{k.upper()}": str(v) for k, v in settings.items()}
        return env

    def worker(self, name: str, **settings: Any) -> Service:
        """Start `pmq worker`; returns once its first heartbeat is in Redis."""
        import redis

        metrics_port = settings.setdefault("worker_metrics_port", free_port())
        child = pmq_service(
            name, ["worker"], env=self.env(**settings), log_path=self.tmp / f"{name}.log"
        )
        child.start()
        self.children.append(child)
        with redis.Redis.from_url(self.redis.url()) as client:
            child.wait_ready(
                lambda: (
                    any(client.scan_iter("pmq:worker:*"))
                    and _up(f"http://127.0.0.1:{metrics_port}/metrics")
                ),
                90,
            )
        self.metrics_urls[child.name] = f"http://127.0.0.1:{metrics_port}/metrics"
        return child

    def frontend(self, name: str, *, processes: int = 1, **settings: Any) -> tuple[Service, str]:
        """Start `pmq serve --transport http`; returns it and its MCP URL once it answers."""
        port = free_port()
        child = pmq_service(
            name,
            ["serve", "--transport", "http", "--port", str(port), "--processes", str(processes)],
            env=self.env(**settings),
            log_path=self.tmp / f"{name}.log",
        )
        child.start()
        self.children.append(child)
        child.wait_ready(lambda: _up(f"http://127.0.0.1:{port}/healthz"), 60)
        return child, f"http://127.0.0.1:{port}/mcp"

    def stop_child(self, child: Service) -> None:
        child.stop()
        self.children.remove(child)


def _up(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@contextmanager
def bench_stack(redis_args: Sequence[str] = ()) -> Iterator[BenchStack]:
    with tempfile.TemporaryDirectory(prefix="pmq-bench-") as tmp:
        stack = BenchStack(Path(tmp), redis_args=redis_args)
        try:
            stack.start()
            yield stack
        finally:
            stack.stop()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and all its descendants, from /proc."""
    parents: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the process ended meanwhile
        child = int(stat.parent.name)
        parents[child] = int(fields[1])
        ticks[child] = sum(int(v) for v in fields[11:13])  # utime, stime
    tree, frontier = {pid}, [pid]
    while frontier:
        current = frontier.pop()
        kids = [c for c, p in parents.items() if p == current and c not in tree]
        tree.update(kids)
        frontier += kids
    return sum(ticks.get(p, 0) for p in tree) / os.sysconf("SC_CLK_TCK")


__all__ = [
    "RESULTS",
    "ROOT",
    "BenchStack",
    "Report",
    "bench_stack",
    "cpu_seconds",
    "machine",
    "percentile",
    "table",
    "wait_until",
]
