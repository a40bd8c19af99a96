"""The pass-through's own HTTP/1.1 client to one upstream (a local llama-server, or a remote
upstream over http or https): kept-alive connections on asyncio with httptools' C parser,
bodies as bytes both ways, the one safe retry.

httpx parses every chunk of a stream in pure Python (h11) under anyio; for the /v1 relay
that was most of the gateway's CPU per streamed token. Here a chunk costs one parser
callback, and chunks that arrived together are handed on as one piece. The retry rule is
proxy.py's: a kept-alive connection that closes before any byte of a response is retried
once on a fresh connection, since nothing was answered; anything later is an error.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Callable
from typing import cast
from urllib.parse import urlsplit

import httptools

CONNECT_TIMEOUT_S = 5.0
PAUSE_AT_BYTES = 1 << 20  # stop reading from llama-server while this much waits unsent


class RelayError(ConnectionError):
    """llama-server could not be reached, or closed the connection before answering fully."""


class Unreachable(RelayError):
    """No connection could be made: nothing was sent."""


class _StaleConnection(RelayError):
    """A kept-alive connection closed before any byte of the response: safe to retry."""


class _Connection(asyncio.Protocol):
    """One TCP connection; parses one response at a time into status, headers and body."""

    def __init__(self, idle: list[_Connection]) -> None:
        self._idle = idle  # the pool's idle list, left when the connection is lost
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._waiter: asyncio.Future[None] | None = None
        self._expect_response()

    def _expect_response(self) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.content_type = b""
        self._header_name = b""
        self.head_done = False
        self.complete = False
        self.keep_alive = False
        self.answered = False  # any byte of this response arrived
        self._body: list[bytes] = []
        self._buffered = 0
        self._paused = False
        self.error: Exception | None = None

    # --- asyncio.Protocol ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.answered = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.error = RelayError(f"llama-server sent a malformed response: {exc}")
            self.close()
        if self._buffered > PAUSE_AT_BYTES and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self in self._idle:
            self._idle.remove(self)
        self._wake()

    # --- httptools callbacks -------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"content-type":
            self.content_type = value

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()
        self.head_done = True

    def on_body(self, body: bytes) -> None:
        self._body.append(body)
        self._buffered += len(body)

    def on_message_complete(self) -> None:
        self.complete = True
        self.keep_alive = self._parser.should_keep_alive()  # only valid in this callback

    # --- used by Upstream and Exchange ---------------------------------------------

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _wait(self) -> None:
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    async def read_head(self) -> None:
        while not self.head_done:
            if self.error is not None:
                raise self.error
            if self.closed:
                if not self.answered:
                    raise _StaleConnection("llama-server closed the connection without answering")
                raise RelayError("llama-server closed the connection midway through a response")
            await self._wait()

    async def read_body(self) -> bytes:
        """What arrived of the body since the last call, joined; b"" once it is complete."""
        while not self._body:
            if self.complete:
                return b""
            if self.error is not None:
                raise self.error
            if self.closed:
                raise RelayError("llama-server closed the connection midway through a response")
            await self._wait()
        chunks, self._body, self._buffered = self._body, [], 0
        if self._paused and self.transport is not None and not self.closed:
            self._paused = False
            self.transport.resume_reading()
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    @property
    def reusable(self) -> bool:
        return self.complete and self.keep_alive and not self.closed

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        self.closed = True


class Exchange:
    """One response being read; `release()` (always, also after a failure) hands the
    connection back when the response was read to its end, and closes it otherwise."""

    def __init__(self, upstream: Upstream, connection: _Connection) -> None:
        self._upstream = upstream
        self._connection: _Connection | None = connection
        self._aborted = False
        self.status = connection.status
        self.content_type = connection.content_type.decode("latin-1")

    async def read(self) -> bytes:
        """The whole body."""
        return b"".join([chunk async for chunk in self.chunks()])

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives; chunks that arrived together come as one. Ends early,
        without an error, after `abort()`."""
        assert self._connection is not None
        try:
            while chunk := await self._connection.read_body():
                yield chunk
        except RelayError:
            if not self._aborted:
                raise

    def abort(self) -> None:
        """Stop reading: the connection is closed (llama-server stops generating)."""
        if self._connection is not None:
            self._aborted = True
            self._connection.close()

    def release(self) -> None:
        if self._connection is not None:
            self._upstream._release(self._connection)
            self._connection = None


class Upstream:
    """Kept-alive connections to one server, each request carrying its API key. Idle
    connections close themselves from the pool when the server drops them."""

    def __init__(
        self,
        host: str,
        port: int,
        api_key: str | None = None,
        *,
        tls: bool = False,
        prefix: str = "",
        on_unreachable: Callable[[], None] | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self._tls = ssl.create_default_context() if tls else None
        self._prefix = prefix.rstrip("/").encode("ascii")  # a remote's root path, if any
        self._on_unreachable = on_unreachable  # told when a connection cannot be made
        auth = f"Authorization: Bearer {api_key}\r\n" if api_key else ""
        # The same for every request: only the path and the length vary.
        self._fixed_headers = (
            f"Host: {host}:{port}\r\n{auth}Content-Type: application/json\r\n"
        ).encode("latin-1")
        self._idle: list[_Connection] = []

    @classmethod
    def for_url(cls, url: str, api_key: str | None, on_unreachable: Callable[[], None]) -> Upstream:
        """The client of a remote upstream, from its root URL (http or https)."""
        parts = urlsplit(url)
        tls = parts.scheme == "https"
        port = parts.port or (443 if tls else 80)
        host = parts.hostname or ""
        return cls(host, port, api_key, tls=tls, prefix=parts.path, on_unreachable=on_unreachable)

    async def post(self, path: str, body: bytes) -> Exchange:
        """Send a POST and wait for the response's head; the body is read from the
        Exchange. A kept-alive connection found closed is retried once on a fresh one."""
        request = b"".join(
            (
                b"POST ",
                self._prefix,
                path.encode("ascii"),
                b" HTTP/1.1\r\n",
                self._fixed_headers,
                b"Content-Length: %d\r\n\r\n" % len(body),
                body,
            )
        )
        connection, reused = self._take()
        try:
            return await self._send(connection, request)
        except _StaleConnection:
            if not reused:
                raise
        return await self._send(await self._connect(), request)

    async def _send(self, connection: _Connection | None, request: bytes) -> Exchange:
        if connection is None:
            connection = await self._connect()
        assert connection.transport is not None
        connection.transport.write(request)
        try:
            await connection.read_head()
        except BaseException:
            connection.close()
            raise
        return Exchange(self, connection)

    def _take(self) -> tuple[_Connection | None, bool]:
        while self._idle:
            connection = self._idle.pop()
            if not connection.closed:
                connection._expect_response()
                return connection, True
        return None, False

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            _, connection = await asyncio.wait_for(
                loop.create_connection(
                    lambda: _Connection(self._idle), self.host, self.port, ssl=self._tls
                ),
                CONNECT_TIMEOUT_S,
            )
        except (OSError, TimeoutError) as exc:
            if self._on_unreachable is not None:
                self._on_unreachable()
            raise Unreachable(f"cannot connect to {self.host}:{self.port}: {exc}") from exc
        return connection

    def _release(self, connection: _Connection) -> None:
        if connection.reusable:
            self._idle.append(connection)
        else:
            connection.close()

    def close_idle(self) -> None:
        """Drop the idle connections (llama-server lingers on SIGTERM while one is open);
        responses being read keep theirs."""
        for connection in list(self._idle):
            connection.close()
        self._idle.clear()
