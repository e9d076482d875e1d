"""Redis over TLS, for real: a private CA made with `openssl`, redis-server on a TLS port.

The frontend, the workers, `pmq jobs` and /readyz work over rediss:// with the CA
(and a client certificate) given as the URL's ssl_* options; the mistakes that used
to retry forever or wait out PMQ_REDIS_TIMEOUT_S stop at once and say why.
"""

import itertools
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from mcp import Client

from mcp_frontend.devstack import BIN_DIR, Service, free_port, pmq_service
from mcp_frontend.server import build_server
from tests.conftest import TEST_SETTINGS, Services, Stack, wait_for
from tests.mcp_calls import ok, wait_terminal
from tests.prefect_runs import PrefectRuns
from tests.tls_redis import Certificates, TlsRedisServer, make_certificates, tls_redis_binary
from worker.contract import WORKER_POLLED_KEY
from worker.redis_check import (
    CERT_NOT_TRUSTED,
    CLIENT_CERT_REJECTED,
    CLIENT_CERT_REQUIRED,
    PLAINTEXT,
    SPEAKS_TLS,
    RedisUnusable,
    check_redis,
)
from worker.settings import Settings

PASSWORD = "tls-guarded-pass-42"
# A PMQ_REDIS_TIMEOUT_S that no fail-fast answer may wait out.
LONG_TIMEOUT_S = 30.0
_servers = itertools.count()


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("certs"))


@contextmanager
def tls_redis(
    tmp_path: Path, certs: Certificates, port: int | None = None, **options: Any
) -> Iterator[TlsRedisServer]:
    data_dir = tmp_path / f"redis-{next(_servers)}"
    server = TlsRedisServer(port or free_port(), data_dir, certs, password=PASSWORD, **options)
    server.start_and_wait()
    try:
        yield server
    finally:
        server.stop()


def tls_stack(services: Services, redis_url: str, **overrides: Any) -> Stack:
    settings = Settings(redis_url=redis_url, **{**TEST_SETTINGS, "heartbeat_s": 1.0, **overrides})
    return Stack(services, 0, settings, services.prefect.api_url)


def pmq_jobs(stack: Stack, *args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    """`pmq jobs ...` as a process; also how long it took."""
    started = time.monotonic()
    result = subprocess.run(
        [str(BIN_DIR / "pmq"), "jobs", *args],
        env=stack.env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return result, time.monotonic() - started


def start_doomed_worker(stack: Stack, name: str) -> Service:
    """A `pmq worker` expected to stop by itself; the stack stops it if it does not."""
    worker = pmq_service(
        name, ["worker"], env=stack.env(), log_path=stack.services.tmp / "logs" / f"{name}.log"
    )
    worker.start()
    stack.workers.append(worker)
    return worker


def exit_code(worker: Service, timeout_s: float = 60.0) -> int:
    assert worker.proc is not None
    try:
        return worker.proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        log = worker.log_path.read_text()
        raise AssertionError(f"{worker.name} still running after {timeout_s:g} s:\n{log}") from None


def readyz(port: int) -> dict[str, Any] | None:
    try:
        body: dict[str, Any] = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=10).json()
        return body
    except httpx.HTTPError:
        return None


async def unusable(settings: Settings) -> tuple[str, float]:
    """The RedisUnusable message check_redis gives, and how long it took."""
    started = time.monotonic()
    with pytest.raises(RedisUnusable) as raised:
        await check_redis(settings)
    return str(raised.value), time.monotonic() - started


async def test_frontend_workers_pmq_jobs_and_readyz_over_tls(
    services: Services, prefect: PrefectRuns, certs: Certificates, tmp_path: Path
) -> None:
    """A change goes HTTP frontend -> Redis -> worker -> Prefect, all of it over TLS.
    Then Redis comes back with a certificate from a CA nobody here trusts: /readyz
    says so without naming the address, and the worker stops instead of retrying."""
    with tls_redis(tmp_path, certs) as server:
        stack = tls_stack(services, server.url())
        try:
            worker = stack.start_worker()
            _, port = stack.start_frontend()
            flow_run = await prefect.flow_run()
            async with Client(f"http://127.0.0.1:{port}/mcp") as client:
                ticket = await ok(
                    client, "set_flow_run_state", flow_run_id=flow_run, state="RUNNING"
                )
                job = await wait_terminal(client, ticket["job_id"])
            assert job["status"] == "applied", job
            assert (await prefect.state("flow", flow_run))["type"] == "RUNNING"
            wait_for(lambda: (readyz(port) or {}).get("ready") is True, 15, "/readyz ready")
            assert readyz(port) == {"ready": True, "redis": "ok", "workers": 1, "prefect": "ok"}
            status, _ = pmq_jobs(stack, "status", ticket["job_id"])
            assert status.returncode == 0, status
            assert status.stdout.split()[:2] == [ticket["job_id"], "applied"]
            assert stack.keys_without_ttl() == []

            server.stop()
            with tls_redis(tmp_path, certs, server.port, identity=certs.other_server):
                wait_for(
                    lambda: (
                        (readyz(port) or {}).get("redis_error")
                        == "TLS certificate verification failed"
                    ),
                    30,
                    "/readyz saying why",
                )
                body = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=10)
                assert body.status_code == 503
                assert body.json()["redis"] == "unreachable"
                assert str(server.port) not in body.text and PASSWORD not in body.text
                assert exit_code(worker) == 2
                log = worker.log_path.read_text()
                assert f"Redis at 127.0.0.1:{server.port}: {CERT_NOT_TRUSTED}" in log, log
                assert PASSWORD not in log
        finally:
            stack.stop()


async def test_mutual_tls_with_and_without_a_client_certificate(
    services: Services, certs: Certificates, tmp_path: Path
) -> None:
    with tls_redis(tmp_path, certs, client_certificates=True) as server:
        mutual = tls_stack(services, server.url(client=certs.client))
        try:
            mutual.start_worker()  # it polls: its certificate was accepted
            listed, _ = pmq_jobs(mutual, "list")
            assert listed.returncode == 0, listed
            anonymous = tls_stack(services, server.url())
            refused, _ = pmq_jobs(anonymous, "list")
            assert refused.returncode == 2, refused
            assert f"Redis at 127.0.0.1:{server.port}: {CLIENT_CERT_REQUIRED}" in refused.stderr
            stranger = tls_stack(services, server.url(client=certs.other_client))
            message, _ = await unusable(stranger.settings)
            assert message == f"Redis at 127.0.0.1:{server.port}: {CLIENT_CERT_REJECTED}"
        finally:
            mutual.stop()


async def test_a_wrong_ca_stops_the_worker_and_pmq_jobs_at_once(
    services: Services, certs: Certificates, tmp_path: Path
) -> None:
    """It used to retry forever on CERTIFICATE_VERIFY_FAILED, while /readyz (on a
    frontend with the right CA) said Redis ok and zero workers."""
    with tls_redis(tmp_path, certs) as server:
        stack = tls_stack(services, server.url(ca=certs.other_ca))
        expected = f"Redis at 127.0.0.1:{server.port}: {CERT_NOT_TRUSTED}"
        try:
            worker = start_doomed_worker(stack, "worker-wrong-ca")
            assert exit_code(worker) == 2
            log = worker.log_path.read_text()
            assert expected in log and "lost Redis" not in log, log
            listed, _ = pmq_jobs(stack, "list")
            assert listed.returncode == 2, listed
            assert f"error: {expected}: " in listed.stderr
            assert PASSWORD not in log + listed.stderr
        finally:
            stack.stop()


async def test_a_plaintext_port_behind_rediss_is_named_well_within_the_timeout(
    services: Services, certs: Certificates
) -> None:
    """A plaintext Redis holds the TLS ClientHello, waiting for a newline: every call
    used to wait out PMQ_REDIS_TIMEOUT_S, then say only "Timeout connecting to server"."""
    plain_port = services.redis.port
    url = f"rediss://:{PASSWORD}@127.0.0.1:{plain_port}/0?ssl_ca_certs={certs.ca}"
    stack = tls_stack(services, url, redis_timeout_s=LONG_TIMEOUT_S)
    # Several times: a ClientHello that happens to hold a newline gets an answer at
    # once, one that does not gets none; both must be told apart from a slow server.
    for _ in range(3):
        message, elapsed_s = await unusable(stack.settings)
        assert message == f"Redis at 127.0.0.1:{plain_port}: {PLAINTEXT}"
        assert elapsed_s < 2.0, f"{elapsed_s:.1f} s"
    listed, elapsed_s = pmq_jobs(stack, "list")
    assert listed.returncode == 2, listed
    assert PLAINTEXT in listed.stderr and PASSWORD not in listed.stderr
    assert elapsed_s < LONG_TIMEOUT_S / 3, f"{elapsed_s:.1f} s"


async def test_url_mistakes_are_named(
    services: Services, certs: Certificates, tmp_path: Path
) -> None:
    """The other way round (redis:// at a TLS port), and options redis-py would
    take in silence or fail on with a TypeError at the first command."""
    with tls_redis(tmp_path, certs) as server:
        base = f"127.0.0.1:{server.port}/0"
        cases = {
            f"redis://:{PASSWORD}@{base}": f"Redis at 127.0.0.1:{server.port}: {SPEAKS_TLS}",
            f"rediss://{base}?ssl_ca_cert={certs.ca}": "unknown option ssl_ca_cert",
            f"redis://{base}?ssl_ca_certs={certs.ca}": "ssl_ca_certs needs a rediss:// URL",
            f"rediss://{base}?ssl_ca_certs={tmp_path}/none.crt": f"cannot read ssl_ca_certs "
            f"{tmp_path}/none.crt: No such file or directory",
            f"rediss://{base}?ssl_certfile={certs.client.cert}": "ssl_certfile and ssl_keyfile go",
            f"rediss://{base}?ssl_cert_reqs=always": "ssl_cert_reqs must be one of",
        }
        for url, expected in cases.items():
            message, _ = await unusable(Settings(redis_url=url))
            assert expected in message, (url, message)
            assert PASSWORD not in message
        # The URL's host name checked too, when asked: the certificate names 127.0.0.1.
        checked = f"rediss://:{PASSWORD}@{base}?ssl_ca_certs={certs.ca}&ssl_check_hostname=true"
        await check_redis(Settings(redis_url=checked))


async def test_a_worker_finds_its_master_through_tls_sentinels(
    services: Services, prefect: PrefectRuns, certs: Certificates, tmp_path: Path
) -> None:
    """Sentinels on TLS ports (`tls-replication yes`: TLS to the master too); the URL's
    ssl_* options reach both the sentinels and the master they name."""
    with tls_redis(tmp_path, certs) as master:
        sentinel_port = free_port()
        config = tmp_path / "sentinel.conf"
        config.write_text(
            f"port 0\ntls-port {sentinel_port}\nbind 127.0.0.1\n"
            f"tls-cert-file {certs.server.cert}\ntls-key-file {certs.server.key}\n"
            f"tls-ca-cert-file {certs.ca}\ntls-replication yes\ntls-auth-clients no\n"
            f"sentinel monitor pmq-master 127.0.0.1 {master.port} 1\n"
            f"sentinel auth-pass pmq-master {PASSWORD}\n"
        )
        sentinel = Service(
            "sentinel",
            [tls_redis_binary(), str(config), "--sentinel"],
            env={},
            log_path=tmp_path / "sentinel.log",
        )
        ca_only = master.url(2).split("?", 1)[1]
        # The URL's host leads nowhere: only the sentinel knows where the master is.
        settings = Settings(
            redis_url=f"rediss://:{PASSWORD}@127.0.0.1:{free_port()}/2?{ca_only}",
            redis_sentinels=f"127.0.0.1:{sentinel_port}",
            redis_sentinel_master="pmq-master",
            heartbeat_s=1.0,
        )
        stack = Stack(services, 2, settings, services.prefect.api_url)
        direct = redis.Redis.from_url(master.url(2))
        asked = redis.Redis(
            host="127.0.0.1", port=sentinel_port, ssl=True, ssl_ca_certs=str(certs.ca)
        )
        sentinel.start()
        try:
            # A run id is what the sentinel learns from the master's INFO, over TLS.
            sentinel.wait_ready(lambda: bool(_master_seen_by(asked).get("runid")), 20)
            await check_redis(settings)
            worker = start_doomed_worker(stack, "worker-sentinel-tls")
            worker.wait_ready(lambda: bool(direct.exists(WORKER_POLLED_KEY)), 60)
            flow_run = await prefect.flow_run()
            async with Client(build_server(settings)) as client:
                ticket = await ok(
                    client, "set_flow_run_state", flow_run_id=flow_run, state="RUNNING"
                )
                assert (await wait_terminal(client, ticket["job_id"]))["status"] == "applied"
            assert direct.exists(f"pmq:job:{ticket['job_id']}")
            wrong_ca = settings.model_copy(
                update={"redis_url": settings.redis_url.replace(str(certs.ca), str(certs.other_ca))}
            )
            message, _ = await unusable(wrong_ca)
            assert message.startswith(
                f"Redis sentinel at 127.0.0.1:{sentinel_port}: {CERT_NOT_TRUSTED}"
            )
        finally:
            stack.stop()
            direct.close()
            asked.close()
            sentinel.stop()


def _master_seen_by(sentinel: redis.Redis) -> dict[str, Any]:
    """What the sentinel knows of the master; {} while it does not answer yet."""
    try:
        seen: dict[str, Any] = sentinel.sentinel_master("pmq-master")  # type: ignore[no-untyped-call]
    except redis.RedisError:
        return {}
    return seen
