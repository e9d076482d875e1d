"""Redis connections from settings: a URL (password and TLS included), or Sentinel.

`PMQ_REDIS_URL` carries the password (`redis://:secret@host:6379/0`) and TLS
(`rediss://...`). With `PMQ_REDIS_SENTINELS` set, the master named
`PMQ_REDIS_SENTINEL_MASTER` is found through those sentinels, and the URL
supplies only the database, password and TLS choice.
"""

from dataclasses import replace
from urllib.parse import urlsplit

from arq.connections import RedisSettings
from redis.asyncio import Redis
from redis.asyncio.sentinel import Sentinel

from worker.settings import Settings


def sentinel_addresses(settings: Settings) -> list[tuple[str, int]]:
    addresses = []
    for entry in settings.redis_sentinels.split(","):
        if entry.strip():
            host, _, port = entry.strip().rpartition(":")
            addresses.append((host, int(port)))
    return addresses


def redis_client(settings: Settings, *, read_timeout: bool = True) -> Redis:
    """A client for the job store. `read_timeout=False` for long-idle subscriptions."""
    timeout = settings.redis_timeout_s if read_timeout else None
    sentinels = sentinel_addresses(settings)
    if not sentinels:
        client: Redis = Redis.from_url(
            settings.redis_url,
            socket_timeout=timeout,
            socket_connect_timeout=settings.redis_timeout_s,
        )
        return client
    url = urlsplit(settings.redis_url)
    sentinel = Sentinel(sentinels, socket_timeout=settings.redis_timeout_s)  # type: ignore[no-untyped-call]
    master: Redis = sentinel.master_for(
        settings.redis_sentinel_master,
        db=int(url.path.lstrip("/") or 0),
        username=url.username,
        password=url.password,
        ssl=url.scheme == "rediss",
        socket_timeout=timeout,
        socket_connect_timeout=settings.redis_timeout_s,
    )
    return master


def arq_redis_settings(settings: Settings) -> RedisSettings:
    """The same target for arq's own pool."""
    from_url = RedisSettings.from_dsn(settings.redis_url)
    sentinels = sentinel_addresses(settings)
    if not sentinels:
        return from_url
    return replace(
        from_url, host=sentinels, sentinel=True, sentinel_master=settings.redis_sentinel_master
    )


async def close_redis(client: Redis) -> None:
    """Close a client from `redis_client`, and the sentinel connections behind it."""
    await client.aclose()
    manager = getattr(client.connection_pool, "sentinel_manager", None)
    for sentinel in getattr(manager, "sentinels", ()):
        await sentinel.aclose()
