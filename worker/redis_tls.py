"""TLS options of a `rediss://` URL, in redis-py's own names.

`Redis.from_url` applies a URL's query options itself; these are for the
connections it does not build from the URL (Sentinel's), and for the start-up
check, which needs the same SSL context as the clients.
"""

from __future__ import annotations

import ssl
from typing import Any

from redis.asyncio.connection import RedisSSLContext, SSLConnection, parse_url

# SSLConnection's options that a URL can carry as text; ssl_min_version cannot
# (redis-py would hand the string to OpenSSL as it is).
URL_TLS_OPTIONS = (
    "ssl_ca_certs",
    "ssl_certfile",
    "ssl_keyfile",
    "ssl_cert_reqs",
    "ssl_check_hostname",
    "ssl_ciphers",
)
CERT_REQS = ("none", "optional", "required")


def tls_options(url: str) -> dict[str, Any]:
    """`ssl=True` plus the URL's ssl_* query options for `rediss://`; {} for `redis://`.

    Raises ValueError for an ssl_* option redis-py does not know (a typo would
    otherwise fail as a TypeError at the first command), one on a `redis://`
    URL, a client certificate without its key (or the reverse), or a
    `ssl_cert_reqs` that is not none, optional or required.
    """
    parsed: dict[str, Any] = dict(parse_url(url))
    given = {name: value for name, value in parsed.items() if name.startswith("ssl")}
    unknown = sorted(set(given) - set(URL_TLS_OPTIONS))
    if unknown:
        raise ValueError(f"unknown option {unknown[0]}; TLS options: {', '.join(URL_TLS_OPTIONS)}")
    if parsed.get("connection_class") is not SSLConnection:
        if given:
            raise ValueError(f"{sorted(given)[0]} needs a rediss:// URL")
        return {}
    if ("ssl_certfile" in given) != ("ssl_keyfile" in given):
        # redis-py would quietly send no certificate at all.
        raise ValueError("ssl_certfile and ssl_keyfile go together (mutual TLS)")
    if given.get("ssl_cert_reqs", "required") not in CERT_REQS:
        raise ValueError(f"ssl_cert_reqs must be one of {', '.join(CERT_REQS)}")
    return {"ssl": True, **given}


def ssl_context(options: dict[str, Any]) -> ssl.SSLContext:
    """The SSL context redis-py builds from these options (files are read here)."""
    kwargs = {name.removeprefix("ssl_"): value for name, value in options.items() if name != "ssl"}
    kwargs.setdefault("cert_reqs", "required")  # SSLConnection's default
    return RedisSSLContext(**kwargs).get()
