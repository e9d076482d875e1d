"""Is the configured Redis usable? One PING at start-up that fails fast, in plain words.

Without it, a worker given the wrong CA retried forever on CERTIFICATE_VERIFY_FAILED,
and a plaintext port behind a `rediss://` URL cost every call the whole
PMQ_REDIS_TIMEOUT_S, then said only "Timeout connecting to server": a plaintext
Redis holds a TLS ClientHello, waiting for the newline that ends a command.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.connection import parse_url
from redis.exceptions import AuthenticationError, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from worker.redis_conn import close_redis, redis_client, sentinel_addresses, sentinel_kwargs
from worker.redis_tls import ssl_context, tls_options
from worker.settings import Settings

Address = tuple[str, int]

# A TLS handshake on a working link takes a few round trips; one still going
# after this long is asked whether its port speaks plaintext Redis.
HANDSHAKE_STALL_S = 0.5
# How long to wait for a TLS server to say why it drops a client it has shaken hands with.
ALERT_WAIT_S = 1.0
_NAME_MISMATCH = {62, 64}  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH

PLAINTEXT = (
    "no TLS handshake: the port seems to speak plaintext Redis; use redis:// or the TLS port"
)
SPEAKS_TLS = "the port speaks TLS, not plaintext Redis: use rediss:// (with ssl_ca_certs=...)"
CERT_NOT_TRUSTED = "TLS certificate verification failed (check ssl_ca_certs)"
CERT_WRONG_NAME = (
    "the server's TLS certificate is not valid for this host name or address: connect by "
    "one the certificate lists, or leave out ssl_check_hostname"
)
CLIENT_CERT_REQUIRED = (
    "the server requires a client certificate (mutual TLS): add ssl_certfile and ssl_keyfile"
)
CLIENT_CERT_REJECTED = (
    "the server rejected the client certificate (ssl_certfile): not signed by a CA it trusts"
)
AUTH_FAILED = "authentication failed: check the user name and password in PMQ_REDIS_URL"
_REJECTED_ALERTS = {
    "TLSV1_ALERT_UNKNOWN_CA",
    "SSLV3_ALERT_BAD_CERTIFICATE",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED",
    "SSLV3_ALERT_CERTIFICATE_REVOKED",
}


class RedisUnusable(ValueError):
    """Redis as configured can never work (a CA, a client certificate, a TLS file, the
    scheme, the password): retrying will not help. The message names the address and
    the cause, never the password."""


class RedisUnreachable(RedisConnectionError):
    """Redis did not answer now (refused, timed out, no master known): it may later."""


async def check_redis(settings: Settings) -> None:
    """Connect and PING as the frontends and workers will (sentinels first, if any).

    Raises RedisUnusable when this configuration can never work, RedisUnreachable
    when Redis did not answer.
    """
    tls = _tls_or_unusable(settings.redis_url)
    timeout_s = settings.redis_timeout_s
    sentinels = sentinel_addresses(settings)
    if not sentinels:
        url: dict[str, Any] = dict(parse_url(settings.redis_url))
        address = None if "path" in url else (url.get("host", "localhost"), url.get("port", 6379))
        name = f"Redis at {url['path']}" if "path" in url else "Redis"
        client = redis_client(settings)
        try:
            await _ping(client, lambda: address, name, tls, timeout_s)
        finally:
            await close_redis(client)
        return
    # Each sentinel on its own: redis-py's discovery turns their errors into "No master found".
    verdicts = await asyncio.gather(
        *(_check_sentinel(settings, address, tls) for address in sentinels),
        return_exceptions=True,
    )
    for verdict in verdicts:
        # One sentinel down is what Sentinel is for; one that can never be used is not.
        if isinstance(verdict, BaseException) and not isinstance(verdict, RedisUnreachable):
            raise verdict
    master = redis_client(settings)
    pool: Any = master.connection_pool  # a SentinelConnectionPool: knows the master once found
    try:
        name = f"Redis master {settings.redis_sentinel_master!r}"
        await _ping(master, lambda: pool.master_address, name, tls, timeout_s)
    finally:
        await close_redis(master)


def _tls_or_unusable(url: str) -> dict[str, Any]:
    """The URL's TLS options, with its files read now so that a bad one is named."""
    try:
        tls = tls_options(url)
    except ValueError as exc:
        raise RedisUnusable(f"PMQ_REDIS_URL: {exc}") from None
    for option in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
        if path := tls.get(option):
            try:
                Path(path).read_bytes()
            except OSError as exc:
                raise RedisUnusable(
                    f"PMQ_REDIS_URL: cannot read {option} {path}: {exc.strerror}"
                ) from None
    if tls:
        try:
            ssl_context(tls)
        except ssl.SSLError as exc:
            raise RedisUnusable(
                f"PMQ_REDIS_URL: the TLS files do not load ({exc.reason}): ssl_ca_certs, "
                "ssl_certfile and ssl_keyfile must be PEM, the key that of the certificate"
            ) from None
    return tls


async def _check_sentinel(settings: Settings, address: Address, tls: dict[str, Any]) -> None:
    client = Redis(host=address[0], port=address[1], **sentinel_kwargs(settings))
    try:
        await _ping(client, lambda: address, "Redis sentinel", tls, settings.redis_timeout_s)
    finally:
        await client.aclose()


async def _ping(
    client: Redis,
    where: Callable[[], Address | None],
    name: str,
    tls: dict[str, Any],
    timeout_s: float,
) -> None:
    """PING through `client`; a failure is told as RedisUnusable or RedisUnreachable."""
    ping = asyncio.ensure_future(client.ping())
    # Retrieved here, so that one cancelled just as it failed is not reported at exit.
    ping.add_done_callback(lambda task: task.cancelled() or task.exception())
    try:
        await asyncio.wait({ping}, timeout=HANDSHAKE_STALL_S)
        stalled, address = not ping.done(), where()
        if stalled and tls and address and await _speaks_plaintext_redis(address, timeout_s):
            raise RedisUnusable(f"{_named(name, address)}: {PLAINTEXT}")
        await ping
    except RedisError as exc:
        address = where()
        cause, permanent = await _cause(exc, address, tls, timeout_s)
        error = RedisUnusable if permanent else RedisUnreachable
        raise error(f"{_named(name, address)}: {cause}") from exc
    finally:
        ping.cancel()


async def _cause(
    exc: RedisError, address: Address | None, tls: dict[str, Any], timeout_s: float
) -> tuple[str, bool]:
    """The failure in plain words, and whether it is for good."""
    if isinstance(exc, AuthenticationError):
        return AUTH_FAILED, True
    chain = list(_chain(exc))
    for error in chain:
        if isinstance(error, ssl.SSLCertVerificationError):
            if error.verify_code in _NAME_MISMATCH:
                return CERT_WRONG_NAME, True
            return f"{CERT_NOT_TRUSTED}: {error.verify_message}", True
    tls_error = next((e for e in chain if isinstance(e, ssl.SSLError)), None)
    timed_out = any(isinstance(e, RedisTimeoutError | TimeoutError) for e in chain)
    dropped = "closed by server" in str(exc) or any(
        isinstance(e, ConnectionResetError | BrokenPipeError | asyncio.IncompleteReadError)
        for e in chain
    )
    if tls and address is not None:
        reason = tls_error.reason if tls_error else None
        if reason is None and dropped:  # TLS 1.3 refuses a client certificate after the handshake
            reason = await _tls_refusal(address, tls, timeout_s)
        if reason == "TLSV13_ALERT_CERTIFICATE_REQUIRED":
            return CLIENT_CERT_REQUIRED, True
        if reason in _REJECTED_ALERTS:
            return CLIENT_CERT_REJECTED, True
        no_tls_session = tls_error is not None or timed_out or dropped
        if no_tls_session and await _speaks_plaintext_redis(address, timeout_s):
            return PLAINTEXT, True
        if tls_error:
            return f"TLS handshake failed: {tls_error.reason or tls_error}", True
    elif dropped and address is not None and await _speaks_tls(address, timeout_s):
        return SPEAKS_TLS, True
    if timed_out:
        return f"no answer in {timeout_s:g} s (PMQ_REDIS_TIMEOUT_S)", False
    if any(isinstance(e, ConnectionRefusedError) for e in chain):
        return "connection refused: nothing listens on that port", False
    if any(isinstance(e, socket.gaierror) for e in chain):
        return "the host name does not resolve", False
    return str(exc), False


def failure_kind(exc: RedisError) -> str:
    """What went wrong in a few fixed words, with no address or detail: for /readyz,
    which anyone may read, and which answers at once rather than probing."""
    chain = list(_chain(exc))
    if isinstance(exc, AuthenticationError):
        return "authentication failed"
    if any(isinstance(e, ssl.SSLCertVerificationError) for e in chain):
        return "TLS certificate verification failed"
    if any(isinstance(e, ssl.SSLError) for e in chain):
        return "TLS handshake failed"
    if any(isinstance(e, RedisTimeoutError | TimeoutError) for e in chain):
        return "timed out"
    if any(isinstance(e, ConnectionRefusedError) for e in chain):
        return "connection refused"
    return "connection failed"


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: BaseException | None = exc
    while seen is not None:
        yield seen
        seen = seen.__cause__ or seen.__context__


def _named(name: str, address: Address | None) -> str:
    if address is None:
        return name
    host, port = address
    return f"{name} at {f'[{host}]' if ':' in host else host}:{port}"


async def _speaks_plaintext_redis(address: Address, timeout_s: float) -> bool:
    """Does the port answer a plaintext PING as Redis does (+PONG, or -NOAUTH, -DENIED...)?"""
    try:
        async with asyncio.timeout(timeout_s), _opened(address) as (reader, writer):
            writer.write(b"PING\r\n")
            await writer.drain()
            reply = await reader.readline()
    except (OSError, TimeoutError):
        return False
    return reply[:1] in (b"+", b"-") and reply.endswith(b"\r\n")


async def _speaks_tls(address: Address, timeout_s: float) -> bool:
    """Does the port complete a TLS handshake (whoever signed its certificate)?"""
    anyone = ssl.create_default_context()
    anyone.check_hostname = False
    anyone.verify_mode = ssl.CERT_NONE
    try:
        async with asyncio.timeout(timeout_s), _opened(address, anyone):
            return True
    except (OSError, TimeoutError):
        return False


async def _tls_refusal(address: Address, tls: dict[str, Any], timeout_s: float) -> str | None:
    """The alert a TLS server sends when it drops us after the handshake, if any.

    Read before writing anything: a write to a socket the server has closed
    brings a reset, which throws the alert away unread.
    """
    try:
        async with asyncio.timeout(timeout_s), _opened(address, ssl_context(tls)) as (reader, _):
            async with asyncio.timeout(ALERT_WAIT_S):
                await reader.read(1)
    except ssl.SSLError as exc:
        return str(exc.reason)
    except (OSError, TimeoutError):
        pass
    return None


@contextlib.asynccontextmanager
async def _opened(
    address: Address, tls: ssl.SSLContext | None = None
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection(*address, ssl=tls)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
