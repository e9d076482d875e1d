"""A TCP forwarder that can cut its connections the way a partition does, or
delay them as a link to a distant host does.

`cut()` freezes every connection open now: nothing more is forwarded either
way and nothing is closed, so neither end hears of it (as when a container is
disconnected from its network and comes back with another address). New
connections made after it are forwarded as usual.
"""

import asyncio
import threading

from mcp_frontend.devstack import free_port


class TcpCut:
    def __init__(self, upstream_port: int, *, delay_s: float = 0.0) -> None:
        self.upstream_port = upstream_port
        self.delay_s = delay_s  # before each read is passed on, either way
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._frozen: set[asyncio.Event] = set()  # one per live connection: set = cut
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None

    def __enter__(self) -> "TcpCut":
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._accept, "127.0.0.1", self.port), self._loop
        ).result(5)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in asyncio.all_tasks() - {asyncio.current_task()}:
            task.cancel()
        for writer in self._writers:
            writer.close()

    def cut(self) -> int:
        """Freeze the connections open now; returns how many there were."""
        return asyncio.run_coroutine_threadsafe(self._freeze(), self._loop).result(5)

    async def _freeze(self) -> int:
        for cut in self._frozen:
            cut.set()
        count = len(self._frozen)
        self._frozen = set()
        return count

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self._writers += [writer, up_writer]
        cut = asyncio.Event()
        self._frozen.add(cut)
        await asyncio.gather(
            self._pipe(reader, up_writer, cut, self.delay_s),
            self._pipe(up_reader, writer, cut, self.delay_s),
            return_exceptions=True,
        )

    @staticmethod
    async def _pipe(
        source: asyncio.StreamReader,
        sink: asyncio.StreamWriter,
        cut: asyncio.Event,
        delay_s: float,
    ) -> None:
        while not cut.is_set():
            data = await source.read(65_536)
            if not data:
                break
            if delay_s:
                await asyncio.sleep(delay_s)  # the link's latency, not a wait for a condition
            if cut.is_set():
                break  # a partition drops what is in flight
            sink.write(data)
            await sink.drain()
        if cut.is_set():
            await asyncio.Event().wait()  # frozen: keep both sockets open, forever
        sink.close()
