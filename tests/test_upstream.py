"""The pooled client retries a connection the server closed while idle, and nothing else."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from ailab.upstream import proxy

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"


async def serve(behaviours: list[str]) -> tuple[asyncio.Server, list[int]]:
    """A raw HTTP server; each accepted connection answers per the next behaviour:
    'keepalive' answers one request then closes without answering the next,
    'partial' sends half a response then closes, 'ok' answers normally."""
    seen: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        behaviour = behaviours[min(len(seen), len(behaviours) - 1)]
        seen.append(1)
        await reader.readuntil(b"\r\n\r\n")
        if behaviour == "partial":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nhalf")
        else:
            writer.write(OK)
        await writer.drain()
        if behaviour == "keepalive":
            await reader.readuntil(b"\r\n\r\n")  # the next request on this connection...
        writer.close()  # ...is met with a close and no response

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, seen


def url_of(server: asyncio.Server) -> str:
    return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/"


def test_a_request_on_a_connection_the_server_closed_is_retried_once() -> None:
    async def scenario() -> None:
        server, seen = await serve(["keepalive", "ok"])
        client, _ = proxy.make_client()
        async with server, client:
            first = await proxy.send(client, client.build_request("GET", url_of(server)))
            second = await proxy.send(client, client.build_request("GET", url_of(server)))
        assert (first.text, second.text) == ("ok", "ok")
        assert len(seen) == 2  # the retry opened a fresh connection

    asyncio.run(scenario())


def test_a_response_cut_off_midway_is_not_retried() -> None:
    async def scenario() -> None:
        server, seen = await serve(["partial", "ok"])
        client, _ = proxy.make_client()
        async with server, client:
            with pytest.raises(httpx.RemoteProtocolError):
                await proxy.send(client, client.build_request("GET", url_of(server)))
        assert len(seen) == 1

    asyncio.run(scenario())


def test_dropping_idle_connections_keeps_the_client_usable() -> None:
    async def scenario() -> None:
        server, seen = await serve(["ok"])
        client, transport = proxy.make_client()
        async with server, client:
            await proxy.send(client, client.build_request("GET", url_of(server)))
            await transport.aclose()
            reply = await proxy.send(client, client.build_request("GET", url_of(server)))
        assert reply.text == "ok" and len(seen) == 2

    asyncio.run(scenario())
