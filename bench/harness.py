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
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator, Sequence
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
PREFECT_SERVER_VENV = ROOT / ".venv-prefect-server"


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


# Where Prefect keeps its data: "sqlite" (one API process), or "pg<N>": a PostgreSQL
# of the benchmark's own and N API processes (`prefect server start --workers N`;
# more than one needs Redis for Prefect's messaging: a second Redis, so that the
# queue's Redis figures stay the queue's).
PREFECT_BACKENDS = ("sqlite", "pg1", "pg2")


class BenchStack:
    """Redis and a Prefect server for one benchmark, plus the pmq processes it starts."""

    def __init__(
        self,
        tmp: Path,
        *,
        redis_args: Sequence[str] = (),
        prefect: bool = True,
        backend: str = "sqlite",
    ) -> None:
        self.tmp = tmp
        self.with_prefect = prefect  # B6 drives a stand-in instead
        self.backend = backend
        self.redis = RedisServer(free_port(), tmp / "redis")
        self.redis.argv += list(redis_args)
        self.prefect = PrefectServer(free_port(), tmp / "prefect", ui=False)
        self.support: list[Service] = []  # what Prefect itself needs (PostgreSQL, Redis)
        if backend != "sqlite":
            self._on_postgres(int(backend.removeprefix("pg")))
        self.api_url = self.prefect.api_url  # what the pmq children call; B6 points it elsewhere
        self.children: list[Service] = []
        self.metrics_urls: dict[str, str] = {}  # worker name -> its Prometheus endpoint

    def _on_postgres(self, processes: int) -> None:
        from bench.postgres import PostgresServer

        postgres = PostgresServer(free_port(), self.tmp / "postgres")
        self.support.append(postgres)
        self.prefect.env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = postgres.url
        if processes > 1:
            messaging = RedisServer(free_port(), self.tmp / "prefect-redis")
            self.support.append(messaging)
            # From the venv `make bench-tools` makes: prefect-redis cannot live beside arq.
            self.prefect.argv[0] = str(PREFECT_SERVER_VENV / "bin" / "prefect")
            self.prefect.argv += ["--workers", str(processes)]
            self.prefect.env |= {
                "PREFECT_MESSAGING_BROKER": "prefect_redis.messaging",
                "PREFECT_MESSAGING_CACHE": "prefect_redis.messaging",
                "PREFECT_SERVER_EVENTS_CAUSAL_ORDERING": "prefect_redis.ordering",
                "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect_redis.lease_storage",
                "PREFECT_REDIS_MESSAGING_HOST": "127.0.0.1",
                "PREFECT_REDIS_MESSAGING_PORT": str(messaging.port),
                "PREFECT_REDIS_MESSAGING_DB": "0",
            }

    @property
    def prefect_pids(self) -> list[int]:
        """Prefect's API process (its children, the other API processes, count with it)
        and its database server, for CPU figures."""
        return [s.proc.pid for s in (self.prefect, *self.support[:1]) if s.proc is not None]

    def start(self) -> None:
        self.redis.start_and_wait()
        if self.with_prefect:
            for service in self.support:
                service.start_and_wait()  # type: ignore[attr-defined]
            if "--workers" in self.prefect.argv:
                self._migrate_once()
            self.prefect.start_and_wait()

    def _migrate_once(self) -> None:
        """Create Prefect's tables before its API processes start: each one migrates an
        empty database at startup, and two at once collide (duplicate `block_type`)."""
        subprocess.run(
            [self.prefect.argv[0], "server", "database", "upgrade", "-y"],
            env=self.prefect.env,
            check=True,
            capture_output=True,
            timeout=300,
        )
        self.prefect.env["PREFECT_SERVER_DATABASE_MIGRATE_ON_START"] = "false"

    def stop(self) -> None:
        for child in reversed(self.children):
            child.stop()
        self.prefect.stop()
        for service in reversed(self.support):
            service.stop()
        self.redis.stop()

    def env(self, prefect_api_url: str | None = None, **settings: Any) -> dict[str, str]:
        """Environment for a pmq child: PMQ_* settings, Prefect's URL and a private home."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PMQ_", "PREFECT_"))}
        env |= {
            "PMQ_REDIS_URL": self.redis.url(),
            "PREFECT_API_URL": prefect_api_url or self.api_url,
            "PREFECT_HOME": str(self.tmp / "client-home"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PMQ_LOG_LEVEL": "WARNING",
        }
        env |= {f"PMQ_{k.upper()}": str(v) for k, v in settings.items()}
        return env

    def worker(self, name: str, **settings: Any) -> Service:
        """Start `pmq worker`; returns once its first heartbeat is in Redis."""
        return self.workers([name], **settings)[0]

    def workers(self, names: Sequence[str], **settings: Any) -> list[Service]:
        """Start several `pmq worker`s at once; returns once each has a heartbeat in Redis."""
        import redis

        started: list[tuple[Service, str]] = []
        for name in names:
            own = dict(settings)
            metrics_port = own.setdefault("worker_metrics_port", free_port())
            child = pmq_service(
                name, ["worker"], env=self.env(**own), log_path=self.tmp / f"{name}.log"
            )
            child.start()
            self.children.append(child)
            started.append((child, f"http://127.0.0.1:{metrics_port}/metrics"))
        with redis.Redis.from_url(self.redis.url()) as client:
            for child, metrics_url in started:
                beat = f"pmq:worker:*-{child.proc.pid}"  # type: ignore[union-attr]
                child.wait_ready(
                    lambda beat=beat, url=metrics_url: any(client.scan_iter(beat)) and _up(url),
                    90,
                )
                self.metrics_urls[child.name] = metrics_url
        return [child for child, _ in started]

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
def bench_stack(
    redis_args: Sequence[str] = (), *, prefect: bool = True, backend: str = "sqlite"
) -> Iterator[BenchStack]:
    with tempfile.TemporaryDirectory(prefix="pmq-bench-") as tmp:
        stack = BenchStack(Path(tmp), redis_args=redis_args, prefect=prefect, backend=backend)
        try:
            stack.start()
            yield stack
        finally:
            stack.stop()


def _processes() -> tuple[dict[int, int], dict[int, int]]:
    """Every process's parent and CPU ticks (user + system), from /proc."""
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
    return parents, ticks


def process_tree(pids: Iterable[int], parents: dict[int, int] | None = None) -> set[int]:
    """These processes and all their descendants."""
    if parents is None:
        parents, _ = _processes()
    tree = set(pids)
    frontier = list(tree)
    while frontier:
        current = frontier.pop()
        kids = [c for c, p in parents.items() if p == current and c not in tree]
        tree.update(kids)
        frontier += kids
    return tree


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and all its descendants, from /proc."""
    parents, ticks = _processes()
    tree = process_tree([pid], parents)
    return sum(ticks.get(p, 0) for p in tree) / os.sysconf("SC_CLK_TCK")


__all__ = [
    "PREFECT_BACKENDS",
    "RESULTS",
    "ROOT",
    "BenchStack",
    "Report",
    "bench_stack",
    "cpu_seconds",
    "machine",
    "percentile",
    "process_tree",
    "table",
    "wait_until",
]
