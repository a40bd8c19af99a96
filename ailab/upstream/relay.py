"""The pass-through's own HTTP/1.1 client to one upstream (a local llama-server, or a remote
upstream over http or https): kept-alive connections on asyncio with httptools' C parser,
bodies as bytes both ways, the one safe retry.

httpx parses every chunk of a stream in pure Python (h11) under anyio; for the /v1 relay
that was most of the gateway's CPU per streamed token. Here a chunk costs one parser
callback, and chunks that arrived together are handed on as one piece. The retry rule is
proxy.py's: a kept-alive connection that closes before any byte of a response is retried
once on a fresh connection, since nothing was answered; anything later is an error.

`Exchange.pipe_to` goes one step further for a /v1 stream: a thread reads the rest of the
body and writes it straight to the client's socket, so a token wakes no event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import select
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import cast
from urllib.parse import urlsplit

import httptools

CONNECT_TIMEOUT_S = 5.0
PAUSE_AT_BYTES = 1 << 20  # stop reading from llama-server while this much waits unsent
READ_BYTES = 1 << 16
CLIENT_WAIT_S = 1.0  # a piping thread blocked on a slow client checks this often for an abort


class ClientGone(ConnectionError):
    """The client closed its connection while a body was piped to it."""


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
        self.first_piped_at: float | None = None  # when pipe_body wrote its first piece

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

    def pipe_body(
        self, upstream: socket.socket, client: socket.socket, stop: threading.Event
    ) -> None:
        """In a piping thread: write what the body has left to `client` as HTTP/1.1
        chunks, reading from `upstream` (a blocking duplicate of this connection's socket,
        whose transport is paused), until the response is complete or `stop` is set. The parser
        is this connection's, so the body is framed and ended exactly as on the event loop."""
        while not stop.is_set():
            if self._body:  # chunks that arrived together go as one
                body, self._body, self._buffered = b"".join(self._body), [], 0
                _send_all(client, b"%x\r\n%b\r\n" % (len(body), body), stop)
                self.first_piped_at = self.first_piped_at or time.perf_counter()
            if self.complete:
                return
            data = upstream.recv(READ_BYTES)
            if not data:
                raise RelayError("llama-server closed the connection midway through a response")
            try:
                self._parser.feed_data(data)
            except httptools.HttpParserError as exc:
                raise RelayError(f"llama-server sent a malformed response: {exc}") from exc

    @property
    def reusable(self) -> bool:
        return self.complete and self.keep_alive and not self.closed

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        self.closed = True


def _send_all(client: socket.socket, data: bytes, stop: threading.Event) -> None:
    """Write all of `data` to a non-blocking socket, waiting while the client is slow."""
    view = memoryview(data)
    writable: select.poll | None = None  # only for a client that falls behind
    while view:
        try:
            view = view[client.send(view) :]
        except BlockingIOError:
            if writable is None:
                writable = select.poll()
                writable.register(client, select.POLLOUT)
            while not writable.poll(CLIENT_WAIT_S * 1000):
                if stop.is_set():
                    return
        except OSError as exc:  # EPIPE, ECONNRESET: the client hung up
            raise ClientGone(str(exc)) from exc


class Exchange:
    """One response being read; `release()` (always, also after a failure) hands the
    connection back when the response was read to its end, and closes it otherwise."""

    def __init__(self, upstream: Upstream, connection: _Connection) -> None:
        self._upstream = upstream
        self._connection: _Connection | None = connection
        self._aborted = False
        self._stop_piping = threading.Event()
        self._piped_from: socket.socket | None = None  # while a thread pipes the body
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

    async def pipe_to(self, client: socket.socket) -> float | None:
        """The rest of the body written straight to the client's socket as HTTP/1.1 chunks
        by a thread, with no event-loop wake per chunk; the time (`time.perf_counter`) its
        first piece was written, 0.0 if there was none. None, with nothing read, where
        `chunks()` should hand on the body instead: a TLS upstream, or a body already
        complete. Raises ClientGone if the client hangs up; ends early, without an error,
        after `abort()`."""
        connection = self._connection
        assert connection is not None and connection.transport is not None
        if self._upstream.tls or connection.closed or connection.complete or self._aborted:
            return None
        transport = connection.transport
        transport.pause_reading()
        upstream_fd = transport.get_extra_info("socket").fileno()
        self._piped_from = socket.socket(fileno=os.dup(upstream_fd))
        # One syscall per chunk instead of poll and read. The flag is the socket's, shared
        # with the paused transport, and restored before it reads again.
        self._piped_from.setblocking(True)
        loop = asyncio.get_running_loop()
        finished: asyncio.Future[BaseException | None] = loop.create_future()

        def pipe() -> None:
            assert self._piped_from is not None
            outcome: BaseException | None = None
            try:
                connection.pipe_body(self._piped_from, client, self._stop_piping)
            except BaseException as exc:  # handed to the event loop, raised there
                outcome = exc
            loop.call_soon_threadsafe(_settle, finished, outcome)

        _PIPERS.run(pipe)
        try:
            outcome = await asyncio.shield(finished)
        except asyncio.CancelledError:
            self.abort()
            await finished
            raise
        finally:
            with contextlib.suppress(OSError):
                self._piped_from.setblocking(False)
            self._piped_from.close()
            self._piped_from = None
        if outcome is not None and not (self._aborted and isinstance(outcome, RelayError)):
            connection.close()
            raise outcome
        if connection.complete and not connection.closed:
            transport.resume_reading()
        return connection.first_piped_at or 0.0

    def abort(self) -> None:
        """Stop reading: the connection is closed (llama-server stops generating)."""
        if self._connection is not None:
            self._aborted = True
            self._stop_piping.set()
            if self._piped_from is not None:  # wakes the piping thread at once
                with contextlib.suppress(OSError):
                    self._piped_from.shutdown(socket.SHUT_RDWR)
            self._connection.close()

    def release(self) -> None:
        if self._connection is not None:
            self._upstream._release(self._connection)
            self._connection = None


class _Pipers:
    """The threads that pipe stream bodies, each kept for the next stream when its own
    ends: a thread started per stream cost a clone and a handshake with the event loop,
    two more context switches while llama-server reads the prompt. There are as many as
    streams were ever piped at once; they are daemons, and idle ones wait on a queue."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._idle = 0
        self._lock = threading.Lock()

    def run(self, job: Callable[[], None]) -> None:
        with self._lock:
            start = self._idle == 0
            if not start:
                self._idle -= 1  # an idle thread will take this job
        if start:
            threading.Thread(target=self._serve, name="ailab-pipe", daemon=True).start()
        self._jobs.put(job)

    def _serve(self) -> None:
        while True:
            self._jobs.get()()  # a job hands its own outcome over; it never raises
            with self._lock:
                self._idle += 1


_PIPERS = _Pipers()


def _settle(future: asyncio.Future[BaseException | None], outcome: BaseException | None) -> None:
    if not future.done():
        future.set_result(outcome)


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

    @property
    def tls(self) -> bool:
        return self._tls is not None

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
