"""The gateway's uvicorn server ticks once a second, yet an exit signal ends its main loop
at once, and the Date header is still refreshed."""

from __future__ import annotations

import asyncio
import signal

import pytest
import uvicorn
import uvicorn.server

from ailab.api import serve


async def _app(scope: object, receive: object, send: object) -> None:  # never called
    raise AssertionError("no request is made")


def _server() -> serve.Server:
    config = uvicorn.Config(_app, log_level="warning")
    config.load()
    return serve.Server(config)


def test_an_exit_signal_ends_the_main_loop_without_waiting_for_the_tick(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(serve, "TICK_S", 3600.0)  # only the wake-up can end the loop
    server = _server()

    async def scenario() -> None:
        asyncio.get_running_loop().call_later(0.05, server.handle_exit, signal.SIGTERM, None)
        await asyncio.wait_for(server.main_loop(), 60)

    asyncio.run(scenario())
    assert server.should_exit


def test_every_tick_refreshes_the_date_header(monkeypatch: pytest.MonkeyPatch) -> None:
    refreshes = []
    monkeypatch.setattr(serve, "TICK_S", 0.001)
    monkeypatch.setattr(uvicorn.server, "formatdate", lambda *a, **k: refreshes.append(a) or "x")
    server = _server()
    ticks = 0
    on_tick = server.on_tick

    async def counted_tick(counter: int) -> bool:
        nonlocal ticks
        ticks += 1
        if ticks == 5:
            server.handle_exit(signal.SIGTERM, None)
        return await on_tick(counter)

    monkeypatch.setattr(server, "on_tick", counted_tick)
    asyncio.run(server.main_loop())
    assert len(refreshes) == ticks == 5  # uvicorn's own loop refreshes every tenth tick
