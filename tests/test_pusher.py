"""A relayed stream reaches ASGI send from the upstream's read callback: in order, also when
the client is slow and a send has to wait, and a send that fails stops the upstream."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from test_relay import SSE_HEAD, read_request, upstream_of

from ailab.api.pusher import Pusher

EVENTS = [b'data: {"n": %d}\n\n' % i for i in range(40)]


def chunked(events: list[bytes]) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events)


async def stream_server(closed: asyncio.Event) -> asyncio.Server:
    """Streams EVENTS in four writes, a little apart, then notes when the gateway hangs up."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(SSE_HEAD)
        try:
            for start in range(0, len(EVENTS), 10):
                writer.write(chunked(EVENTS[start : start + 10]))
                await writer.drain()
                await asyncio.sleep(0.02)
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            await reader.read()
        except ConnectionError:
            pass  # the gateway hung up while this was still writing
        closed.set()
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


def test_every_chunk_arrives_in_order_when_a_slow_client_makes_a_send_wait() -> None:
    async def scenario() -> tuple[bytes, int]:
        received: list[bytes] = []
        slow_client = asyncio.get_running_loop().create_future()
        waited = 0

        async def send(message: dict[str, Any]) -> None:
            nonlocal waited
            if len(received) == 1 and not slow_client.done():
                waited += 1
                asyncio.get_running_loop().call_later(0.1, slow_client.set_result, None)
                await slow_client  # as uvicorn's send waits for a full socket buffer to drain
            received.append(message["body"])

        firsts: list[int] = []
        server = await stream_server(asyncio.Event())
        async with server:
            exchange = await upstream_of(server).post("/v1/chat/completions", b"{}")
            push = Pusher(send, exchange, lambda: firsts.append(len(received)))
            await exchange.pipe(push)
            await push.drain()
            exchange.release()
        assert firsts == [0], "the first-token mark comes once, before the first chunk"
        return b"".join(received), waited

    body, waited = asyncio.run(scenario())
    assert waited == 1
    assert body == b"".join(EVENTS)


def test_a_send_that_fails_stops_the_upstream_and_drain_raises_it() -> None:
    class ClientGone(Exception):
        pass

    async def scenario() -> None:
        closed = asyncio.Event()
        sent: list[bytes] = []

        async def send(message: dict[str, Any]) -> None:
            if sent:
                raise ClientGone("the client's connection broke")
            sent.append(message["body"])

        server = await stream_server(closed)
        async with server:
            exchange = await upstream_of(server).post("/v1/chat/completions", b"{}")
            push = Pusher(send, exchange, lambda: None)
            await exchange.pipe(push)  # ends quietly: the pusher aborted the exchange
            with pytest.raises(ClientGone):
                await push.drain()
            await asyncio.wait_for(closed.wait(), 5)
            exchange.release()
        assert len(sent) == 1

    asyncio.run(scenario())
