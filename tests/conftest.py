"""Real services for the tests: one Redis and one Prefect server per session,
a fresh Redis database and `pmq worker` processes per test or module."""

import itertools
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from mcp_frontend.devstack import (
    PrefectServer,
    RedisServer,
    Service,
    free_port,
    pmq_service,
    wait_until,
)
from tests.chaos_proxy import ChaosProxy
from tests.prefect_runs import PrefectRuns
from worker.contract import QUEUE_KEY, WORKER_POLLED_KEY
from worker.settings import Settings

REDIS_DATABASES = 512
_databases = itertools.count(1)
_worker_names = itertools.count()

# Fast retries so fault tests finish in seconds; every value is a real setting.
TEST_SETTINGS: dict[str, Any] = {
    "backoff_base_s": 0.2,
    "backoff_max_s": 1.0,
    "worker_lease_s": 3.0,
    "settle_s": 5.0,
}


@dataclass
class Services:
    redis: RedisServer
    prefect: PrefectServer
    tmp: Path


@pytest.fixture(scope="session")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    tmp = tmp_path_factory.mktemp("services")
    redis_server = RedisServer(free_port(), tmp / "redis")
    redis_server.argv += ["--databases", str(REDIS_DATABASES)]
    prefect = PrefectServer(free_port(), tmp / "prefect", ui=False)
    redis_server.start_and_wait()
    try:
        prefect.start_and_wait()
        yield Services(redis_server, prefect, tmp)
    finally:
        prefect.stop()
        redis_server.stop()


@dataclass
class Stack:
    """One test's slice of the services: its own Redis database and workers."""

    services: Services
    db: int
    settings: Settings
    prefect_api_url: str
    workers: list[Service] = field(default_factory=list)

    @cached_property
    def redis(self) -> redis.Redis:
        """The test's own client for assertions; closed by stop()."""
        return redis.Redis.from_url(self.settings.redis_url)

    def env(self, **overrides: Any) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PMQ_", "PREFECT_"))}
        values = {**self.settings.model_dump(exclude={"prefect_api_url"}), **overrides}
        env.update({f"PMQ_{k.upper()}": str(v) for k, v in values.items() if v is not None})
        env["PREFECT_API_URL"] = overrides.pop("prefect_api_url", self.prefect_api_url)
        env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
        env["PREFECT_HOME"] = str(self.services.tmp / "client-home")
        return env

    def start_worker(
        self,
        *,
        prefect_api_url: str | None = None,
        extra_env: dict[str, str] | None = None,
        **overrides: Any,
    ) -> Service:
        """A `pmq worker` subprocess; returns once it polls the queue."""
        env = {**self.env(**overrides), **(extra_env or {})}
        if prefect_api_url:
            env["PREFECT_API_URL"] = prefect_api_url
        # Unique per session: stacks on other Redis servers reuse database numbers.
        name = f"worker-{self.db}-{next(_worker_names)}"
        worker = pmq_service(
            name, ["worker"], env=env, log_path=self.services.tmp / "logs" / f"{name}.log"
        )
        self.redis.delete(WORKER_POLLED_KEY)
        worker.start()
        self.workers.append(worker)
        worker.wait_ready(lambda: bool(self.redis.exists(WORKER_POLLED_KEY)), 60)
        return worker

    def start_frontend(
        self, *args: str, timeout_s: float = 30.0, **overrides: Any
    ) -> tuple[Service, int]:
        """`pmq serve --transport http` on a free port (plus `args`); stopped with the stack."""
        port = free_port()
        frontend = pmq_service(
            f"http-{port}",
            ["serve", "--transport", "http", "--port", str(port), *args],
            env=self.env(**overrides),
            log_path=self.services.tmp / "logs" / f"http-{port}.log",
        )
        frontend.start()
        self.workers.append(frontend)
        frontend.wait_ready(lambda: http_healthy(port), timeout_s)
        return frontend, port

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()
        if "redis" in self.__dict__:
            self.__dict__.pop("redis").close()

    def flush(self) -> None:
        with redis.Redis.from_url(self.settings.redis_url) as client:
            client.flushdb()

    def keys_without_ttl(self) -> list[str]:
        client = redis.Redis.from_url(self.settings.redis_url)
        try:
            return [
                key.decode()
                for key in client.scan_iter()
                if client.ttl(key) == -1 and key != QUEUE_KEY.encode()
            ]
        finally:
            client.close()


def make_stack(services: Services, **overrides: Any) -> Stack:
    db = next(_databases)
    assert db < REDIS_DATABASES, "more stacks than Redis databases"
    settings = Settings(redis_url=services.redis.url(db), **{**TEST_SETTINGS, **overrides})
    stack = Stack(services, db, settings, services.prefect.api_url)
    stack.flush()
    return stack


@pytest.fixture
def stack(services: Services) -> Iterator[Stack]:
    """A fresh database; the test starts the workers it needs. Leaves no key without a TTL."""
    current = make_stack(services)
    try:
        yield current
    finally:
        current.stop()
    assert current.keys_without_ttl() == []


@pytest.fixture(scope="module")
def worked_stack(services: Services) -> Iterator[Stack]:
    """A fresh database with one worker shared by a whole module."""
    current = make_stack(services)
    current.start_worker()
    try:
        yield current
    finally:
        current.stop()
    assert current.keys_without_ttl() == []


@pytest.fixture
def own_prefect(tmp_path: Path) -> Iterator[PrefectServer]:
    """A Prefect server this test may stop and restart (same port, same database)."""
    server = PrefectServer(free_port(), tmp_path / "prefect", ui=False)
    server.start_and_wait()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis server (AOF) this test may stop and restart on the same port."""
    server = RedisServer(free_port(), tmp_path / "redis", appendonly=True)
    server.start_and_wait()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def proxy(services: Services) -> Iterator[ChaosProxy]:
    """A fault-injecting proxy in front of the session's Prefect server."""
    with ChaosProxy(services.prefect.api_url.removesuffix("/api")) as chaos:
        yield chaos


@pytest.fixture
async def prefect(services: Services) -> AsyncIterator[PrefectRuns]:
    runs = PrefectRuns(services.prefect.api_url)
    try:
        yield runs
    finally:
        await runs.aclose()


def http_healthy(port: int) -> bool:
    """Does a frontend answer /healthz on this port?"""
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def wait_for(predicate: Any, timeout_s: float = 30.0, what: str = "condition") -> None:
    wait_until(predicate, timeout_s, what)
