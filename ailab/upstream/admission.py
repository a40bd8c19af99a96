"""Who may generate when: a bounded queue, model switches, one request per conversation.

There is no global generation lock. Requests run concurrently (llama-server has its own
slots); a model switch waits for running generations to finish and makes new ones wait
for it; past the queue limit a request is turned away with 429 at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from ailab.errors import AilabError, Unavailable


class Overloaded(AilabError):
    """More requests are waiting than the queue allows."""

    status = 429
    headers = {"Retry-After": "1"}  # noqa: RUF012  # read-only class constant

    def __init__(self, message: str) -> None:
        super().__init__(f"server busy: {message}; retry shortly")


class SwitchTimeout(Unavailable):
    """A model switch took longer than a waiting request was willing to wait."""


class GenerationGate:
    def __init__(self, capacity: int, switch_wait_s: float) -> None:
        self.capacity = capacity
        self.switch_wait_s = switch_wait_s
        self.active = 0
        self._switching = False
        self._admitted = 0  # active plus those waiting for a switch to finish
        self._condition = asyncio.Condition()

    @property
    def switching(self) -> bool:
        return self._switching

    @property
    def admitted(self) -> int:
        """Requests running or waiting for their turn."""
        return self._admitted

    @asynccontextmanager
    async def generation(self) -> AsyncIterator[None]:
        if self._admitted >= self.capacity:
            raise Overloaded(f"{self._admitted} requests are already running or queued")
        self._admitted += 1
        try:
            async with self._condition:
                if self._switching:  # the usual case skips the timer task wait_for makes
                    await self._wait_for_switch()
                self.active += 1
            try:
                yield
            finally:
                async with self._condition:
                    self.active -= 1
                    self._condition.notify_all()
        finally:
            self._admitted -= 1

    async def _wait_for_switch(self) -> None:
        try:
            await asyncio.wait_for(
                self._condition.wait_for(lambda: not self._switching), self.switch_wait_s
            )
        except TimeoutError:
            raise SwitchTimeout(
                f"a model switch is still running after {self.switch_wait_s:.0f} s"
            ) from None

    @asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        """Hold off new generations and wait for running ones (used by model switches)."""
        async with self._condition:
            await self._condition.wait_for(lambda: not self._switching)
            self._switching = True
            await self._condition.wait_for(lambda: self.active == 0)
        try:
            yield
        finally:
            async with self._condition:
                self._switching = False
                self._condition.notify_all()


class KeyedLocks:
    """One asyncio.Lock per key, dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)
