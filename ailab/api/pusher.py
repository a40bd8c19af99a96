"""Hands a relayed stream's chunks to ASGI `send` from the upstream's read callback.

A streamed token used to cost a task wake-up in the gateway: the read callback woke the
response's task, which then called `send`. `send` (uvicorn's, through the middleware)
finishes at once unless the client reads slower than llama-server writes, so it is run
here, in the read callback, up to its first wait. Only a send that must wait gets a task;
upstream reading pauses meanwhile, and the chunks already read wait, in order, behind it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

from starlette.types import Send

from ailab.upstream import relay


class Pusher:
    """The sink for `relay.Exchange.pipe`: never raises; `drain()` reports a failure."""

    def __init__(self, send: Send, exchange: relay.Exchange, on_first: Callable[[], None]) -> None:
        self._send = send
        self._exchange = exchange
        self._on_first: Callable[[], None] | None = on_first
        self._waiting: asyncio.Task[None] | None = None  # a send that could not finish at once
        self._backlog: list[bytes] = []  # chunks read while it waits
        self._failure: BaseException | None = None

    def __call__(self, chunk: bytes) -> None:
        if self._on_first is not None:
            self._on_first()
            self._on_first = None
        if self._waiting is not None or self._failure is not None:
            self._backlog.append(chunk)
            return
        sending = self._send({"type": "http.response.body", "body": chunk, "more_body": True})
        try:
            waits_on = sending.send(None)
        except StopIteration:
            return  # sent
        except BaseException as exc:  # drain() raises it
            self._fail(exc)
            return
        self._exchange.pause_reading()
        self._waiting = asyncio.ensure_future(self._finish(sending, waits_on))

    async def drain(self) -> None:
        """Wait until every chunk handed over has been sent; raise what stopped a send."""
        if self._waiting is not None:
            await asyncio.shield(self._waiting)
        if self._failure is not None:
            raise self._failure

    def cancel(self) -> None:
        if self._waiting is not None:
            self._waiting.cancel()

    async def _finish(self, sending: Coroutine[Any, Any, None], waits_on: Any) -> None:
        """Step the waiting send on as a task would, then send the backlog."""
        try:
            try:
                while True:
                    if waits_on is None:  # a bare yield: let the loop run once
                        await asyncio.sleep(0)
                    else:
                        await asyncio.wait([waits_on])
                    waits_on = sending.send(None)
            except StopIteration:
                pass
            finally:
                sending.close()  # a no-op once it returned; closes it when cancelled
            while self._backlog:
                body, self._backlog = b"".join(self._backlog), []
                await self._send({"type": "http.response.body", "body": body, "more_body": True})
        except Exception as exc:  # drain() raises it
            self._fail(exc)
        finally:
            self._waiting = None
        self._exchange.resume_reading()

    def _fail(self, exc: BaseException) -> None:
        self._failure = self._failure or exc
        self._backlog.clear()
        self._exchange.abort()  # stop llama-server generating for a client we cannot reach
