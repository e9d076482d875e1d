"""The workers' HTTP transport to Prefect: aiohttp under the requests Prefect's client builds.

Prefect's httpx client (URL, auth headers, TLS settings) builds every request;
this sends it. httpx's own transport (httpcore on anyio) cost a worker more CPU
per change than everything else it does together: every request walked the
connection pool with a poll and a getpeername per idle connection, and anyio's
checkpoints ran on each read and write (py-spy, bench/b6_queue_ceiling.py).
aiohttp's connection pool and C parser cost a fraction of that.

The httpx-aiohttp package does the same, but it maps a server disconnect (the
request sent, the answer lost) to httpx.ConnectTimeout, which says "never
sent": the worker would resend a change Prefect may have written without reading
the run's history first. Here a failure is "not sent" only when aiohttp failed
to connect.
"""

from __future__ import annotations

import contextlib
import math
import ssl
from typing import Any

import aiohttp
import httpx
import yarl
from prefect.client.orchestration import PrefectClient

# aiohttp's errors in httpx's terms, most specific first: the classification in
# worker.applier reads "not sent" from ConnectError, ConnectTimeout and PoolTimeout.
_NOT_SENT: tuple[tuple[type[BaseException], type[httpx.TransportError]], ...] = (
    (aiohttp.ConnectionTimeoutError, httpx.ConnectTimeout),
    (aiohttp.ClientConnectorError, httpx.ConnectError),
)
_SENT: tuple[tuple[type[BaseException], type[httpx.TransportError]], ...] = (
    (aiohttp.SocketTimeoutError, httpx.ReadTimeout),
    (aiohttp.ServerTimeoutError, httpx.ReadTimeout),
    (aiohttp.ClientPayloadError, httpx.ReadError),
    (aiohttp.ServerDisconnectedError, httpx.RemoteProtocolError),
    (aiohttp.ClientError, httpx.ReadError),
    (TimeoutError, httpx.ReadTimeout),
)
_MAPPED = tuple(cause for cause, _ in (*_NOT_SENT, *_SENT))
# aiohttp rounds a timeout over 5 s up to the loop clock's next whole second, so a
# 6 s connect timeout fired after 6-7 s and sometimes lost to the applier's hard limit
# (the timeout plus 1 s): a change never sent was then taken as maybe sent, and
# waited for Prefect to answer before it could be tried again (seen in CI).
_EXACT = math.inf
# Every this many requests, one asks the server to close its connection after
# answering. A Prefect of several API processes (or replicas behind a TCP load
# balancer) keeps a connection where it was accepted, and the processes accept
# in bursts: a worker's few connections often all landed on one process, which
# then served them all while the other idled (a 2-process Prefect applied 170
# changes/s one time and 267 the next, with 4 calls in flight). A connection made
# later is accepted by whichever process is idle, so the load spreads within a
# second or two. Reconnecting costs each side a fraction of a millisecond.
REQUESTS_PER_CONNECTION = 50


class AiohttpTransport(httpx.AsyncBaseTransport):
    """Sends httpx requests with one aiohttp session; the whole body is read at once
    (Prefect's answers are small)."""

    def __init__(
        self, *, ssl_context: ssl.SSLContext | None, max_connections: int, base_url: str
    ) -> None:
        self._ssl = ssl_context
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None
        self._requests = 0
        # HTTP(S)_PROXY and NO_PROXY, as Prefect's httpx client honours them, read once
        # for Prefect's URL: aiohttp's trust_env reads them, and ~/.netrc in a thread,
        # on every request.
        self._proxy: yarl.URL | None = None
        self._proxy_auth: aiohttp.BasicAuth | None = None
        with contextlib.suppress(LookupError):  # no proxy for it
            self._proxy, self._proxy_auth = aiohttp.helpers.get_env_proxy_for_url(
                yarl.URL(base_url)
            )

    def _client(self) -> aiohttp.ClientSession:
        # Made on first use: a session belongs to the event loop that runs it.
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                limit=self._max_connections,
                ssl=self._ssl if self._ssl is not None else True,
                timeout_ceil_threshold=_EXACT,
            )
            # The body goes to httpx as it came (gzip and all, with its Content-Encoding):
            # httpx decodes it once, as it would have done itself.
            self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False)
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeout = request.extensions.get("timeout", {})
        sent_headers = request.headers.multi_items()
        self._requests += 1
        if self._requests % REQUESTS_PER_CONNECTION == 0:
            sent_headers.append(("Connection", "close"))
        try:
            async with self._client().request(
                request.method,
                str(request.url),
                headers=sent_headers,
                data=request.content or None,
                allow_redirects=False,
                proxy=self._proxy,
                proxy_auth=self._proxy_auth,
                timeout=aiohttp.ClientTimeout(
                    sock_connect=timeout.get("connect"),
                    sock_read=timeout.get("read"),
                    ceil_threshold=_EXACT,
                ),
            ) as answer:
                body = await answer.read()
                headers = [(k.encode(), v.encode()) for k, v in answer.headers.items()]
                return httpx.Response(answer.status, headers=headers, content=body, request=request)
        except _MAPPED as exc:
            raise _as_httpx(exc, request) from exc

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


class PrefectHttp:
    """Prefect's own client builds each request (its URL, auth headers and TLS
    settings); aiohttp sends it."""

    def __init__(self, client: PrefectClient, *, max_connections: int) -> None:
        http = client._client
        # The TLS context Prefect made from PREFECT_API_TLS_INSECURE_SKIP_VERIFY and
        # PREFECT_API_SSL_CERT_FILE; httpcore keeps it on the pool (a private attribute,
        # so a change there fails loudly here rather than dropping the settings).
        pool = getattr(http._transport_for_url(http.base_url), "_pool", None)
        context = getattr(pool, "_ssl_context", None)
        if pool is None or not hasattr(pool, "_ssl_context"):
            raise RuntimeError("Prefect's client has no connection pool with a TLS context")
        self.transport = AiohttpTransport(
            ssl_context=context, max_connections=max_connections, base_url=str(http.base_url)
        )

        # What httpx's build_request would merge into every request, merged once: its
        # URL merging cost more CPU than aiohttp's send.
        self._base = str(http.base_url).rstrip("/")
        self._headers = httpx.Headers(http.headers)
        self._extensions = {"timeout": http.timeout.as_dict()}

    def build_request(self, method: str, path: str, **kwargs: Any) -> httpx.Request:
        """A request as Prefect's client builds it: `path` below its API URL, its headers
        (auth included) and timeouts; `params` and `json` as httpx takes them."""
        return httpx.Request(
            method,
            self._base + path,
            headers=self._headers,
            extensions=self._extensions,
            **kwargs,
        )

    async def send(self, request: httpx.Request) -> httpx.Response:
        return await self.transport.handle_async_request(request)

    async def aclose(self) -> None:
        await self.transport.aclose()


def _as_httpx(exc: BaseException, request: httpx.Request) -> httpx.TransportError:
    for cause, mapped in (*_NOT_SENT, *_SENT):
        if isinstance(exc, cause):
            return mapped(f"{type(exc).__name__}: {exc}", request=request)
    return httpx.ReadError(repr(exc), request=request)
