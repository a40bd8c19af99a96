"""The pass-through's own client: one retry for a kept-alive connection the server closed
while idle and nothing else, bodies byte for byte, chunks that arrived together as one."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from ailab.upstream import relay

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"
SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length")
    )
    return head + await reader.readexactly(length)


async def serve(behaviours: list[str]) -> tuple[asyncio.Server, list[bytes]]:
    """A raw HTTP server; each accepted connection answers per the next behaviour:
    'keepalive' answers one request then closes without answering the next,
    'partial' sends half a response then closes, 'silent' closes without answering,
    'ok' answers every request on the connection. `seen` holds each connection's first
    request."""
    seen: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        behaviour = behaviours[min(len(seen), len(behaviours) - 1)]
        seen.append(await read_request(reader))
        if behaviour == "partial":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nhalf")
        elif behaviour != "silent":
            writer.write(OK)
        await writer.drain()
        if behaviour == "keepalive":
            await reader.readuntil(b"\r\n\r\n")  # the next request on this connection...
        while behaviour == "ok" and not reader.at_eof():
            with contextlib.suppress(asyncio.IncompleteReadError):
                await read_request(reader)
                writer.write(OK)
                await writer.drain()
        writer.close()  # ...is met with a close and no response

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, seen


def upstream_of(server: asyncio.Server, api_key: str | None = None) -> relay.Upstream:
    return relay.Upstream("127.0.0.1", server.sockets[0].getsockname()[1], api_key)


async def post(upstream: relay.Upstream, body: bytes = b"{}") -> bytes:
    exchange = await upstream.post("/v1/chat/completions", body)
    try:
        return await exchange.read()
    finally:
        exchange.release()


def test_a_request_on_a_connection_the_server_closed_is_retried_once() -> None:
    async def scenario() -> None:
        server, seen = await serve(["keepalive", "ok"])
        async with server:
            upstream = upstream_of(server)
            assert (await post(upstream), await post(upstream)) == (b"ok", b"ok")
        assert len(seen) == 2  # the retry went out once more, on a fresh connection

    asyncio.run(scenario())


def test_a_fresh_connection_closed_without_an_answer_is_not_retried() -> None:
    async def scenario() -> None:
        server, seen = await serve(["silent", "ok"])
        async with server:
            with pytest.raises(relay.RelayError, match="without answering"):
                await post(upstream_of(server))
        assert len(seen) == 1

    asyncio.run(scenario())


def test_a_response_cut_off_midway_is_not_retried() -> None:
    async def scenario() -> None:
        server, seen = await serve(["partial", "ok"])
        async with server:
            with pytest.raises(relay.RelayError, match="midway"):
                await post(upstream_of(server))
        assert len(seen) == 1

    asyncio.run(scenario())


def test_the_request_carries_the_body_the_key_and_json_content_type() -> None:
    async def scenario() -> None:
        server, seen = await serve(["ok"])
        body = '{"model": "m", "text": "héllo"}'.encode()
        async with server:
            await post(upstream_of(server, api_key="k3y"), body)
        head, _, sent = seen[0].partition(b"\r\n\r\n")
        assert head.startswith(b"POST /v1/chat/completions HTTP/1.1")
        assert b"Authorization: Bearer k3y" in head and b"Content-Type: application/json" in head
        assert sent == body

    asyncio.run(scenario())


def test_connections_are_kept_alive_and_dropping_idle_ones_keeps_the_client_usable() -> None:
    async def scenario() -> None:
        server, seen = await serve(["ok"])
        connections: list[int] = []
        async with server:
            upstream = upstream_of(server)
            await post(upstream)
            await post(upstream)
            connections.append(len(seen))
            upstream.close_idle()
            assert await post(upstream) == b"ok"
        assert connections == [1] and len(seen) == 2

    asyncio.run(scenario())


def test_a_stream_comes_byte_for_byte_with_chunks_that_arrived_together_as_one() -> None:
    events = [b'data: {"n": %d}\n\n' % i for i in range(3)]
    go_on = asyncio.Event

    async def scenario() -> None:
        release = go_on()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader)
            chunked = [b"%x\r\n%s\r\n" % (len(e), e) for e in events]
            writer.write(SSE_HEAD + chunked[0])
            await release.wait()
            writer.write(chunked[1] + chunked[2] + b"0\r\n\r\n")  # two at once, then the end
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        async with server:
            exchange = await upstream_of(server).post("/v1/chat/completions", b"{}")
            assert exchange.content_type == "text/event-stream"
            chunks = exchange.chunks()
            received = [await anext(chunks)]
            release.set()
            received += [chunk async for chunk in chunks]
            exchange.release()
        assert received == [events[0], events[1] + events[2]]

    asyncio.run(scenario())


def test_an_aborted_stream_ends_quietly_and_closes_its_connection() -> None:
    async def scenario() -> None:
        closed = asyncio.Event()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader)
            writer.write(SSE_HEAD + b"5\r\nfirst\r\n")
            await reader.read()  # the gateway hanging up is what stops the generation
            closed.set()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        async with server:
            exchange = await upstream_of(server).post("/v1/chat/completions", b"{}")
            chunks = exchange.chunks()
            assert await anext(chunks) == b"first"
            exchange.abort()
            assert [chunk async for chunk in chunks] == []
            await asyncio.wait_for(closed.wait(), 5)
            exchange.release()

    asyncio.run(scenario())


def test_a_server_that_is_not_there_is_a_relay_error() -> None:
    async def scenario() -> None:
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()
        with pytest.raises(relay.RelayError, match="cannot connect"):
            await relay.Upstream("127.0.0.1", port).post("/x", b"{}")

    asyncio.run(scenario())


def test_a_remote_url_gives_its_path_prefix_and_key_and_an_unreachable_one_is_reported() -> None:
    told: list[str] = []

    async def scenario() -> None:
        server, seen = await serve(["ok"])
        async with server:
            port = server.sockets[0].getsockname()[1]
            url = f"http://127.0.0.1:{port}/llama/"
            upstream = relay.Upstream.for_url(url, "remote-key", lambda: told.append("down"))
            assert await post(upstream) == b"ok"
        assert seen[0].startswith(b"POST /llama/v1/chat/completions HTTP/1.1\r\n")
        assert b"Authorization: Bearer remote-key\r\n" in seen[0]
        assert told == []
        upstream.close_idle()  # so the next request must connect
        with pytest.raises(relay.RelayError, match="cannot connect"):
            await post(upstream)  # the server is gone
        assert told == ["down"]

    asyncio.run(scenario())


def test_an_https_remote_is_reached_over_tls_and_its_certificate_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost"],
        check=True, capture_output=True,
    )  # fmt: skip
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)

    async def answer_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(OK)
        await writer.drain()
        writer.close()

    async def scenario(trusted: bool) -> bytes:
        server = await asyncio.start_server(answer_once, "127.0.0.1", 0, ssl=tls)
        async with server:
            port = server.sockets[0].getsockname()[1]
            if trusted:
                monkeypatch.setenv("SSL_CERT_FILE", str(cert))
            upstream = relay.Upstream.for_url(f"https://localhost:{port}", None, lambda: None)
            return await post(upstream)

    with pytest.raises(relay.RelayError):
        asyncio.run(scenario(trusted=False))  # a certificate nobody vouches for
    assert asyncio.run(scenario(trusted=True)) == b"ok"


# --- a stream's body piped by a thread straight to the client's socket -------------------

EVENTS = [b'data: {"n": %d}\n\n' % i for i in range(5)]


def chunked(events: list[bytes]) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(event), event) for event in events)


def unchunked(framed: bytes) -> bytes:
    """The body carried by HTTP/1.1 chunks (the terminal chunk is the server's to send)."""
    body = b""
    while framed:
        size, _, framed = framed.partition(b"\r\n")
        length = int(size, 16)
        body, framed = body + framed[:length], framed[length + 2 :]
    return body


def client_pair() -> tuple[socket.socket, socket.socket]:
    """The gateway's end (non-blocking, as the server's transport leaves it) and the client's."""
    gateway_end, client_end = socket.socketpair()
    gateway_end.setblocking(False)
    return gateway_end, client_end


async def stream_then_ok(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, events: list[bytes], pace: float
) -> None:
    """Answer a stream chunk by chunk, then a plain request on the same connection."""
    await read_request(reader)
    writer.write(SSE_HEAD + chunked(events[:1]))
    for event in events[1:]:
        await asyncio.sleep(pace)
        writer.write(chunked([event]))
        await writer.drain()
    writer.write(b"0\r\n\r\n")
    await read_request(reader)
    writer.write(OK)
    await writer.drain()


def test_a_piped_stream_reaches_the_client_socket_as_chunks_and_keeps_its_connection() -> None:
    gateway_end, client_end = client_pair()

    async def scenario() -> None:
        connections: list[int] = []

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            connections.append(1)
            await stream_then_ok(reader, writer, EVENTS, pace=0.02)

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        async with server:
            upstream = upstream_of(server)
            exchange = await upstream.post("/v1/chat/completions", b"{}")
            before = time.perf_counter()
            first_piped_at = await exchange.pipe_to(gateway_end)  # the head came with EVENTS[0]
            assert first_piped_at is not None and before < first_piped_at < time.perf_counter()
            exchange.release()
            assert await post(upstream) == b"ok"  # on the same connection, read to its end
        assert len(connections) == 1

    asyncio.run(scenario())
    client_end.setblocking(False)
    assert unchunked(client_end.recv(1 << 16)) == b"".join(EVENTS)


def test_a_slow_client_gets_every_byte_of_a_piped_stream() -> None:
    gateway_end, client_end = client_pair()
    events = [b"data: %s\n\n" % (b"%05d" % i * 2000) for i in range(400)]  # 4 MB
    received = bytearray()

    def read_slowly() -> None:
        while data := client_end.recv(1 << 14):
            received.extend(data)
            time.sleep(0.001)

    async def scenario() -> None:
        server = await asyncio.start_server(
            lambda r, w: stream_then_ok(r, w, events, pace=0), "127.0.0.1", 0
        )
        async with server:
            exchange = await upstream_of(server).post("/v1/chat/completions", b"{}")
            assert await exchange.pipe_to(gateway_end)
            exchange.release()
        gateway_end.close()

    reader = threading.Thread(target=read_slowly)
    reader.start()
    asyncio.run(scenario())
    reader.join(30)
    assert unchunked(bytes(received)) == b"".join(events)


def test_an_aborted_pipe_ends_quietly_and_closes_the_upstream_connection() -> None:
    gateway_end, _client_end = client_pair()

    async def scenario() -> None:
        closed = asyncio.Event()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader)
            writer.write(SSE_HEAD)  # and no token yet: a long prompt is being read
            await reader.read()  # the gateway hanging up is what stops the generation
            closed.set()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        async with server:
            exchange = await upstream_of(server).post("/v1/chat/completions", b"{}")
            piping = asyncio.create_task(exchange.pipe_to(gateway_end))
            await asyncio.sleep(0.1)
            assert not piping.done()  # waiting on llama-server in its thread
            exchange.abort()
            assert await asyncio.wait_for(piping, 5) == 0.0  # nothing was piped
            await asyncio.wait_for(closed.wait(), 5)
            exchange.release()

    asyncio.run(scenario())


def test_a_client_gone_mid_pipe_is_client_gone_and_the_upstream_connection_closes() -> None:
    gateway_end, client_end = client_pair()
    client_end.close()

    async def scenario() -> None:
        closed = asyncio.Event()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader)
            writer.write(SSE_HEAD + chunked(EVENTS[:1]))
            await asyncio.sleep(0.05)
            writer.write(chunked(EVENTS[1:2]))
            await reader.read()
            closed.set()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        async with server:
            exchange = await upstream_of(server).post("/v1/chat/completions", b"{}")
            with pytest.raises(relay.ClientGone):
                await exchange.pipe_to(gateway_end)
            exchange.release()  # not read to its end: closed, not kept
            await asyncio.wait_for(closed.wait(), 5)

    asyncio.run(scenario())
