"""uvicorn's server, waking once a second instead of ten times when there is nothing to do,
and handing each request its client's transport, so a stream can bypass the event loop.

uvicorn's main loop wakes every 0.1 s to refresh the Date header (once a second) and to
notice a request to exit. On a 2-core virtual machine each wake costs about 0.15 ms of CPU
(a timer and a context switch), taken from llama-server's cores while it generates: 1.5 ms
a second, about a tenth of what the gateway spends relaying a stream. Here the loop waits
for the loop clock's next whole second between refreshes (the pool's housekeeping keeps
the same beat, so both share the wake), and a signal to exit wakes it at once, so
shutdown is as prompt as before.
"""

from __future__ import annotations

import asyncio
import contextlib
from types import FrameType

import uvicorn
from starlette.types import Scope
from uvicorn.config import STARTUP_FAILURE
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

TICK_S = 1.0
TICKS_PER_DATE = 10  # uvicorn's on_tick refreshes the Date header when counter % 10 == 0
CLIENT_TRANSPORT = "ailab.client_transport"  # the scope extension HttpProtocol adds


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's own HTTP/1.1 protocol; each request's scope also carries the connection's
    transport, for a /v1 stream to be written to its socket by a thread (see
    relay.Exchange.pipe_to): about a quarter less CPU per token than a relay through the
    event loop, side by side."""

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.scope["extensions"] = {CLIENT_TRANSPORT: {"transport": self.transport}}


def client_transport(scope: Scope) -> asyncio.Transport | None:
    """The client's transport, where the server is this module's (not a test client)."""
    extension = scope.get("extensions", {}).get(CLIENT_TRANSPORT)
    return extension["transport"] if extension else None


class Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Future[None] | None = None

    async def main_loop(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        counter = 0
        while not await self.on_tick(counter):
            counter = (counter + TICKS_PER_DATE) % 864000
            self._wake = loop.create_future()
            if self.should_exit:  # a signal that came while the last wake was spent
                break
            # On the loop clock's whole seconds, as the pool's housekeeping: one wake for both.
            timer = loop.call_at((loop.time() // TICK_S + 1) * TICK_S, _settle, self._wake)
            await self._wake
            timer.cancel()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        if self._loop is not None and self._wake is not None:
            # A signal handler may interrupt the loop's own code: wake it the safe way.
            self._loop.call_soon_threadsafe(_settle, self._wake)


def _settle(wake: asyncio.Future[None]) -> None:
    if not wake.done():
        wake.set_result(None)


def run(config: uvicorn.Config) -> None:
    """What uvicorn.run does for one process: serve until told to stop."""
    server = Server(config)
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    if not server.started:
        raise SystemExit(STARTUP_FAILURE)
