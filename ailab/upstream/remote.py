"""A remote OpenAI-compatible upstream (another AI Lab, a llama-server, a vLLM box) as a
pool member: its state, health checks with backoff, its own client and key, and its limit
on concurrent requests.

``RemoteUpstream`` answers what the pool, the gateway and the routes ask of a
``LlamaServerManager`` (state, message, base_url, pid, start, stop...), but there is no
process: "start" is a first health check, "stop" ends the checks. A remote holds no local
memory, so the pool never counts it in the budget and never evicts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from urllib.parse import urlsplit

import httpx

from ailab.config import ModelSource
from ailab.errors import Unavailable
from ailab.upstream import proxy, relay
from ailab.upstream.supervisor import HEALTH_STATUS, LlamaStartError, ManagerState

log = logging.getLogger("ailab.remote")

HEALTH_INTERVAL_S = 5.0  # between checks while it answers
BACKOFF_START_S = 1.0  # between checks while it does not, doubling up to the max
BACKOFF_MAX_S = 30.0
HEALTH_TIMEOUT_S = 5.0
# /v1/models first: every OpenAI-compatible server has it, and it checks the key too
# (llama-server's /health answers without one). /health for servers without it.
HEALTH_PATHS = ("/v1/models", "/health")
NO_SUCH_ROUTE = {404, 405}


class RemoteBusy(Unavailable):
    """Every place a remote upstream allows (max_concurrency) stayed taken too long."""


class _Noticing(httpx.AsyncBaseTransport):
    """The pooled transport, telling its remote when a connection cannot be made."""

    def __init__(self, inner: httpx.AsyncBaseTransport, unreachable: asyncio.Event) -> None:
        self._inner = inner
        self._unreachable = unreachable

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            return await self._inner.handle_async_request(request)
        except httpx.ConnectError:
            self._unreachable.set()
            raise

    async def aclose(self) -> None:
        await self._inner.aclose()


class RemoteUpstream:
    """One remote server standing in for a model; not a process."""

    def __init__(self, source: ModelSource) -> None:
        assert source.url is not None
        self.model = source
        self.base_url = source.url
        parts = urlsplit(source.url)
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.device = f"remote ({parts.hostname})"
        key = source.api_key.get_secret_value() if source.api_key else None
        # A request that cannot connect has the remote checked at once, not at the next
        # interval, so the requests after it get the reason without trying.
        self._unreachable = asyncio.Event()
        self.http, _ = proxy.make_client(key, lambda inner: _Noticing(inner, self._unreachable))
        self.relay = relay.Upstream.for_url(source.url, key, self._unreachable.set)
        # Health checks get a client of their own, so they never queue behind generations.
        auth = {"Authorization": f"Bearer {key}"} if key else None
        self._checks = httpx.AsyncClient(timeout=HEALTH_TIMEOUT_S, headers=auth, trust_env=False)
        limit = source.max_concurrency
        self._slots = asyncio.Semaphore(limit) if limit else None
        self.state = ManagerState.STOPPED
        self.message: str | None = None
        self.on_state: Callable[[], None] | None = None  # told after every transition
        self.pid: int | None = None  # no local process
        self.restarts = 0
        self.download = None  # nothing to download
        self.n_gpu_layers = 0  # no local layers
        self._ready_since: float | None = None
        self._monitor: asyncio.Task[None] | None = None

    # --- what the routes report ------------------------------------------------------

    @property
    def model_key(self) -> str:
        return self.model.key

    @property
    def n_ctx(self) -> int:
        return self.model.context_length

    @property
    def health_status(self) -> str:
        return HEALTH_STATUS.get(self.state, "error")

    @property
    def uptime_s(self) -> float | None:
        if self.state != ManagerState.READY or self._ready_since is None:
            return None
        return round(time.monotonic() - self._ready_since, 1)

    def _set_state(self, new: ManagerState, message: str | None = None) -> None:
        if new == self.state and message == self.message:
            return
        note = f": {message}" if message else ""
        log.info("%s %s -> %s%s", self.model_key, self.state, new, note)
        self.state = new
        self.message = message
        self._ready_since = time.monotonic() if new == ManagerState.READY else None
        if self.on_state is not None:
            self.on_state()

    # --- lifecycle -------------------------------------------------------------------

    async def start(self, source: ModelSource) -> None:
        """Check the remote once; keep checking in the background either way. Raises
        LlamaStartError with the reason when it does not answer now."""
        self.model = source
        await self._end_checks()
        self._set_state(ManagerState.STARTING, f"connecting to {self.base_url}")
        problem = await self.check()
        self._set_state(*((ManagerState.READY, None) if problem is None else self._down(problem)))
        self._monitor = asyncio.create_task(self._watch())
        if problem is not None:
            raise LlamaStartError(self.message or problem, 503)

    async def stop(self) -> None:
        """Stop checking; requests in flight finish on their own connections."""
        await self._end_checks()
        self._set_state(ManagerState.STOPPED)

    async def _end_checks(self) -> None:
        monitor, self._monitor = self._monitor, None
        if monitor is not None:
            monitor.cancel()
            await asyncio.gather(monitor, return_exceptions=True)

    async def close(self) -> None:
        await self.stop()
        await self._checks.aclose()

    # --- health ----------------------------------------------------------------------

    async def check(self) -> str | None:
        """None when the remote answers; otherwise why it does not."""
        for path in HEALTH_PATHS:
            try:
                reply = await self._checks.get(f"{self.base_url}{path}")
            except httpx.HTTPError as exc:
                return f"{self.base_url} is not reachable: {exc or type(exc).__name__}"
            if reply.status_code == 200:
                return None
            if reply.status_code in (401, 403):
                return f"{self.base_url} refused the api_key (HTTP {reply.status_code})"
            if reply.status_code not in NO_SUCH_ROUTE:
                return f"{self.base_url}{path} answered HTTP {reply.status_code}: " + (
                    proxy.error_message(reply)
                )
        return f"{self.base_url} has neither {' nor '.join(HEALTH_PATHS)}"

    def _down(self, problem: str) -> tuple[ManagerState, str]:
        return ManagerState.FAILED, f"{problem}; checked again every {BACKOFF_MAX_S:.0f} s at most"

    async def _watch(self) -> None:
        """Check every HEALTH_INTERVAL_S while it answers (and at once when a request could
        not connect), with backoff while it does not."""
        delay = HEALTH_INTERVAL_S if self.state == ManagerState.READY else BACKOFF_START_S
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._unreachable.wait(), delay)
            self._unreachable.clear()
            problem = await self.check()
            if problem is None:
                self._set_state(ManagerState.READY)
                delay = HEALTH_INTERVAL_S
                continue
            if self.state == ManagerState.READY:
                self.restarts += 1  # counted as a restart: it went away while serving
                delay = BACKOFF_START_S
            else:
                delay = min(delay * 2, BACKOFF_MAX_S)
            self._set_state(*self._down(problem))

    # --- admission -------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def slot(self, timeout_s: float) -> AsyncIterator[None]:
        """One of the places max_concurrency allows, waited for at most timeout_s."""
        if self._slots is None:
            yield
            return
        try:
            await asyncio.wait_for(self._slots.acquire(), timeout_s)
        except TimeoutError:
            raise RemoteBusy(
                f"{self.model_key}: all {self.model.max_concurrency} of its places "
                f"(max_concurrency) stayed taken for {timeout_s:.0f} s; try again later"
            ) from None
        try:
            yield
        finally:
            self._slots.release()
