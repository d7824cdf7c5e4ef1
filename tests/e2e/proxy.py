"""A TCP proxy that a test can cut: the outage of one stack's database or broker, made without
stopping or reconfiguring the server that other stacks and test sessions share.

The stack's processes connect to the proxy's port instead of the server's. :meth:`Proxy.cut`
resets every connection through it and refuses new ones (each is accepted and reset at once,
so the port stays the proxy's); :meth:`Proxy.restore` lets connections through again.

    proxy = Proxy("127.0.0.1", 5432).start()
    url = proxy.url("postgres://postgres@127.0.0.1:5432/db")   # ...@127.0.0.1:<proxy port>/db
    with proxy.outage():
        ...  # the server is unreachable for whoever uses the proxy
    proxy.stop()
"""
from __future__ import annotations

import asyncio
import logging
import socket
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit, urlunsplit

logger = logging.getLogger(__name__)

CHUNK = 65536


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close a connection with a TCP reset (SO_LINGER 0), as a server that went away does."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:  # already closed
            pass
    writer.transport.abort()


class Proxy:
    """Forward 127.0.0.1:<port> to ``host:port`` in a thread of its own, until cut."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"proxy-{port}", daemon=True)
        self._server: asyncio.AbstractServer | None = None
        self._open: set[asyncio.StreamWriter] = set()
        self._cut = False
        #: connections accepted (forwarded or refused), for tests that check the proxy was in the path
        self.accepted = 0

    def start(self) -> "Proxy":
        self._thread.start()
        self._server = self._call(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._call(self._shutdown())
            self._server = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()

    def url(self, url: str) -> str:
        """``url`` with its host and port replaced by the proxy's (user and password kept)."""
        parts = urlsplit(url)
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = f"{userinfo}@127.0.0.1:{self.port}" if userinfo else f"127.0.0.1:{self.port}"
        return urlunsplit(parts._replace(netloc=netloc))

    def cut(self) -> None:
        """Reset every open connection and refuse new ones until :meth:`restore`."""
        self._call(self._cut_all())

    def restore(self) -> None:
        self._cut = False
        logger.info("proxy to %s:%s restored", *self.target)

    @contextmanager
    def outage(self) -> Iterator[None]:
        self.cut()
        try:
            yield
        finally:
            self.restore()

    # -- inside the proxy's thread

    def _call(self, coroutine):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=30)

    async def _cut_all(self) -> None:
        self._cut = True
        for writer in list(self._open):
            _reset(writer)
        self._open.clear()
        logger.info("proxy to %s:%s cut", *self.target)

    async def _shutdown(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._cut_all()
        await self._server.wait_closed()

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self._cut:
            _reset(client_writer)
            return
        try:
            server_reader, server_writer = await asyncio.open_connection(*self.target)
        except OSError:
            _reset(client_writer)
            return
        if self._cut:  # cut while connecting
            _reset(server_writer)
            _reset(client_writer)
            return
        pair = {client_writer, server_writer}
        self._open |= pair
        try:
            await asyncio.gather(self._pump(client_reader, server_writer), self._pump(server_reader, client_writer))
        finally:
            for writer in pair:
                if writer in self._open:
                    self._open.discard(writer)
                    writer.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Copy one direction until EOF, then pass the EOF on (the other direction may go on)."""
        try:
            while data := await reader.read(CHUNK):
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except (ConnectionError, OSError):
            _reset(writer)
