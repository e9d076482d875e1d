"""Redis connections from settings: a URL (password and TLS included), or Sentinel.

`PMQ_REDIS_URL` carries the password (`redis://:secret@host:6379/0`) and TLS
(`rediss://...?ssl_ca_certs=/ca.crt`, with redis-py's ssl_* query options).
With `PMQ_REDIS_SENTINELS` set, the master named `PMQ_REDIS_SENTINEL_MASTER`
is found through those sentinels, and the URL supplies only the database,
password and TLS options; with `rediss://` the sentinels are spoken to over
TLS too, with the same options.
"""

from typing import Any, TypeVar

from arq.connections import ArqRedis
from arq.constants import default_queue_name
from redis.asyncio import Redis
from redis.asyncio.connection import parse_url
from redis.asyncio.sentinel import Sentinel

from worker.contract import json_deserializer, json_serializer
from worker.redis_tls import tls_options
from worker.settings import Settings

R = TypeVar("R", bound=Redis)


def sentinel_addresses(settings: Settings) -> list[tuple[str, int]]:
    addresses = []
    for entry in settings.redis_sentinels.split(","):
        if entry.strip():
            host, _, port = entry.strip().rpartition(":")
            addresses.append((host, int(port)))
    return addresses


def sentinel_kwargs(settings: Settings) -> dict[str, Any]:
    """How to connect to each sentinel: the master's TLS options, timeouts."""
    return {
        "socket_timeout": settings.redis_timeout_s,
        "socket_connect_timeout": settings.redis_timeout_s,
        **tls_options(settings.redis_url),
    }


def redis_client(settings: Settings, *, read_timeout: bool = True) -> Redis:
    """A client for the job store. `read_timeout=False` for long-idle subscriptions.

    Every other client gets a read timeout: a partition leaves a socket open and
    silent, and a read on it without one would wait forever.
    """
    return _connect(settings, read_timeout=read_timeout, redis_class=Redis)


def _connect(settings: Settings, *, read_timeout: bool, redis_class: type[R]) -> R:
    timeout = settings.redis_timeout_s if read_timeout else None
    # Read on both paths: a misspelt ssl_* option is a ValueError here, not a
    # TypeError from inside redis-py at the first command.
    tls = tls_options(settings.redis_url)
    sentinels = sentinel_addresses(settings)
    if not sentinels:
        client: R = redis_class.from_url(
            settings.redis_url,
            socket_timeout=timeout,
            socket_connect_timeout=settings.redis_timeout_s,
        )
        return client
    url: dict[str, Any] = dict(parse_url(settings.redis_url))
    sentinel = Sentinel(sentinels, sentinel_kwargs=sentinel_kwargs(settings))  # type: ignore[no-untyped-call]
    master: R = sentinel.master_for(
        settings.redis_sentinel_master,
        redis_class=redis_class,
        db=url.get("db", 0),
        username=url.get("username"),
        password=url.get("password"),
        socket_timeout=timeout,
        socket_connect_timeout=settings.redis_timeout_s,
        **tls,
    )
    return master


def arq_pool(settings: Settings) -> ArqRedis:
    """arq's pool for a worker, on the same target as `redis_client`.

    Built here, not by arq from a RedisSettings: arq's own pool has no read
    timeout, so after a partition its poll loop and every job would hang on a
    dead socket instead of failing and reconnecting.
    """
    pool = _connect(settings, read_timeout=True, redis_class=ArqRedis)
    pool.job_serializer = json_serializer
    pool.job_deserializer = json_deserializer
    pool.default_queue_name = default_queue_name
    return pool


async def close_redis(client: Redis) -> None:
    """Close a client from `redis_client`, and the sentinel connections behind it."""
    await client.aclose()
    manager = getattr(client.connection_pool, "sentinel_manager", None)
    for sentinel in getattr(manager, "sentinels", ()):
        await sentinel.aclose()
