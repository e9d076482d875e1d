"""The fault suite's stack: compose.yaml with the overlays, and the faults it injects.

Faults are what an operator or a bad network would do to the containers:
`docker network disconnect` (a partition), `docker kill -s KILL`, and the
prefect-proxy's modes (see prefect_proxy.py). Each fault has an undo, run
whatever the test found, so the next scenario starts from a whole stack.
"""

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.compose.dockerd import EngineError
from tests.compose.ports import PROXY_CONTROL
from tests.compose.stack import COMPOSE_FILES, ComposeStack, Container, poll
from tests.compose.steps import report

HERE = Path(__file__).resolve().parent
FAULTS_FILES = (*COMPOSE_FILES, HERE.parent / "faults.yaml")
SENTINEL_FILES = (*FAULTS_FILES, HERE.parent / "faults-sentinel.yaml")
WORKERS, FRONTENDS = 3, 2
SENTINELS = ("sentinel-1", "sentinel-2", "sentinel-3")
REDIS_NET, CLIENT_NET = "redis-net", "default"  # the overlay's network names
WORKER_METRICS = "http://127.0.0.1:9100/metrics"  # inside each worker's container


@dataclass(frozen=True)
class Frontend:
    container: Container
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def mcp_url(self) -> str:
        return f"{self.url}/mcp"


@dataclass
class Topology:
    """The running fault stack and the operations the scenarios need on it."""

    stack: ComposeStack
    sentinel: bool = False

    def counts(self) -> dict[str, int]:
        counts = {
            "redis": 1,
            "postgres": 1,
            "prefect-server": 1,
            "prefect-proxy": 1,
            "worker": WORKERS,
            "mcp-frontend": FRONTENDS,
        }
        if self.sentinel:
            counts |= {"redis-replica": 1, **dict.fromkeys(SENTINELS, 1)}
        return counts

    def ensure(self, timeout_s: float = 240.0) -> None:
        """`up -d` at full scale (a no-op on a whole stack), every service healthy."""
        self.stack.compose(
            "up", "-d", "--scale", f"worker={WORKERS}", "--scale", f"mcp-frontend={FRONTENDS}"
        )
        self.stack.wait_healthy(self.counts(), timeout_s)
        for frontend in self.frontends():
            poll(lambda f=frontend: answers(f.url), 30, f"{frontend.url} answers")  # type: ignore[misc]
        self.proxy(mode="pass")

    def frontends(self) -> list[Frontend]:
        """The running frontends, by published port."""
        found = []
        for container in self.stack.running("mcp-frontend"):
            bound = self.stack.engine.inspect(container.id)["NetworkSettings"]["Ports"]
            found.append(Frontend(container, int(bound["8000/tcp"][0]["HostPort"])))
        return sorted(found, key=lambda f: f.port)

    def workers(self) -> list[Container]:
        return self.stack.running("worker")

    def network(self, name: str) -> str:
        """The engine's name of one of the overlay's networks."""
        for network in self.stack.engine.networks():
            labels = network.get("Labels") or {}
            if (
                labels.get("com.docker.compose.project") == self.stack.project
                and labels.get("com.docker.compose.network") == name
            ):
                return str(network["Name"])
        raise AssertionError(f"no network {name} in project {self.stack.project}")

    def disconnect(self, container: Container, network: str) -> None:
        self.stack.engine.docker("network", "disconnect", self.network(network), container.id)
        report(f"{container.name} disconnected from {network}")

    def connect(self, container: Container, network: str) -> None:
        self.stack.engine.docker("network", "connect", self.network(network), container.id)
        report(f"{container.name} reconnected to {network}")

    def address(self, container: Container, network: str) -> str:
        """The container's IP address on one of the overlay's networks."""
        networks = self.stack.engine.inspect(container.id)["NetworkSettings"]["Networks"]
        return str(networks[self.network(network)]["IPAddress"])

    def proxy(self, **mode: Any) -> dict[str, Any]:
        """Set prefect-proxy's mode (see prefect_proxy.py); its stats."""
        response = httpx.post(f"{PROXY_CONTROL}/mode", json=mode, timeout=10)
        response.raise_for_status()
        stats: dict[str, Any] = response.json()
        return stats

    def proxy_stats(self) -> dict[str, Any]:
        response = httpx.get(f"{PROXY_CONTROL}/stats", timeout=10)
        response.raise_for_status()
        stats: dict[str, Any] = response.json()
        return stats

    def worker_metric(self, worker: Container, name: str, **labels: str) -> float:
        """One sample of a worker's own /metrics (port 9100, in its container)."""
        fetch = f"import urllib.request as u; r = u.urlopen({WORKER_METRICS!r}, timeout=5)"
        text = self.stack.exec(worker, "python", "-c", f"{fetch}; print(r.read().decode())")
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and sample.labels == labels:
                    return float(sample.value)
        return 0.0

    def applied_so_far(self, frontend: Frontend) -> float:
        """The fleet's applied jobs, as a frontend's /metrics counts them (from Redis)."""
        response = httpx.get(f"{frontend.url}/metrics", timeout=10)
        response.raise_for_status()
        for family in text_string_to_metric_families(response.text):
            for sample in family.samples:
                if sample.name == "pmq_jobs_total" and sample.labels == {"event": "applied"}:
                    return float(sample.value)
        return 0.0

    def redis_cli(self, service: str, *args: str) -> str:
        """redis-cli in a running container of `service` (a sentinel: add -p 26379)."""
        container = self.stack.running(service)[0]
        return self.stack.exec(container, "redis-cli", *args).strip()

    def master_address(self) -> str | None:
        """`SENTINEL get-master-addr-by-name` from the first sentinel that answers."""
        for sentinel in SENTINELS:
            try:
                reply = self.redis_cli(
                    sentinel, "-p", "26379", "SENTINEL", "get-master-addr-by-name", "mymaster"
                )
            except EngineError:  # that sentinel is down or cut off: ask the next one
                continue
            if reply:
                return reply.splitlines()[0]
        return None

    def container_at(self, address: str) -> Container:
        """The container holding this IP address on the Redis network."""
        for container in self.stack.containers():
            networks = self.stack.engine.inspect(container.id)["NetworkSettings"]["Networks"]
            if any(net.get("IPAddress") == address for net in networks.values()):
                return container
        raise AssertionError(f"no container has address {address}")


@contextmanager
def firewall(address: str, port: int) -> Iterator[None]:
    """Drop the host's packets to address:port for the block (a host firewall rule).

    The published ports are served by docker-proxy, a process on the host, so its
    connections leave through the OUTPUT chain.
    """
    rule = ["OUTPUT", "-p", "tcp", "-d", address, "--dport", str(port), "-j", "DROP"]
    subprocess.run(["iptables", "-I", *rule], check=True, capture_output=True, timeout=30)
    report(f"host drops packets to {address}:{port}")
    try:
        yield
    finally:
        subprocess.run(["iptables", "-D", *rule], check=True, capture_output=True, timeout=30)
        report(f"host passes packets to {address}:{port} again")


def answers(url: str) -> bool:
    try:
        httpx.get(f"{url}/healthz", timeout=3)
    except httpx.HTTPError:
        return False
    return True
