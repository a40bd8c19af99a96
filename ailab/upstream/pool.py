"""The model pool: one supervised llama-server per resident model instance, each on its own
loopback port with its own log, loaded on demand and unloaded to make room or when idle.

What fits and what to evict is decided by the pure functions in ``budget.py``; this module
does the waiting, the loading and the unloading. A request holds its instance with
``use()``: while it is in flight the instance is never unloaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import httpx
import psutil

from ailab.config import ModelSource, Settings
from ailab.errors import AilabError
from ailab.gguf_meta import GgufError
from ailab.upstream import binaries, budget, proxy, relay, rpc
from ailab.upstream.gguf_header import read_shape
from ailab.upstream.remote import RemoteUpstream
from ailab.upstream.supervisor import (
    LlamaServerManager,
    LlamaStartError,
    LlamaUnavailable,
    ManagerState,
    cleanup_stale_processes,
)

log = logging.getLogger("ailab.pool")

Purpose = Literal["generate", "embed", "rerank"]
HOUSEKEEPING_INTERVAL_S = 1.0
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
FREE_VRAM = re.compile(r"\((\d+) MiB, (\d+) MiB free\)")
# One slot: with several, llama-server decodes a batch's inputs together and their vectors
# differ from the same inputs embedded alone (measured with SmolLM2: up to 0.47 apart with
# --parallel 2, 0.006 with --parallel 2 --kv-unified, identical with --parallel 1). Placed
# after the supervisor's own flags, so this --parallel is the one that counts.
EMBEDDING_ARGS = ["--embeddings", "--pooling", "mean", "--parallel", "1"]
# In embedding mode every token of a micro-batch (llama-server's default: 512) is an output.
EMBEDDING_OUTPUTS = 512
RERANK_ARGS = ["--reranking"]
HOLDS_NO_MEMORY = {ManagerState.STOPPED, ManagerState.FAILED}
LOADING_STATES = {ManagerState.DOWNLOADING, ManagerState.STARTING, ManagerState.RESTARTING}


class PoolRefused(AilabError):
    """The model cannot be loaded now (503) or ever under this budget (400)."""

    status = 503


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def instance_id(source: ModelSource, purpose: Purpose) -> str:
    """A model's main instance is named by its key; its embedding instance gets a suffix."""
    return f"{source.key}#embeddings" if purpose == "embed" and not source.reranker else source.key


def _rss_mb(pid: int | None) -> float | None:
    """A process's resident memory from one read of /proc/<pid>/statm: psutil.Process reads
    three files to be created, about 1 ms of an idle gateway's CPU a second on a 2-core VM."""
    if pid is None:
        return None
    try:
        statm = os.open(f"/proc/{pid}/statm", os.O_RDONLY)
        try:
            resident_pages = int(os.read(statm, 256).split()[1])
        finally:
            os.close(statm)
    except (OSError, ValueError, IndexError):
        return None
    return round(resident_pages * PAGE_BYTES / budget.MB, 1)


@dataclass
class Instance:
    """One model started for one purpose, and what the pool knows about it."""

    key: str
    purpose: Purpose
    source: ModelSource
    manager: LlamaServerManager | RemoteUpstream
    http: httpx.AsyncClient
    relay: relay.Upstream  # the /v1 pass-through's connections (the gateway's own calls use http)
    pinned: bool
    ttl_s: float
    estimate_mb: float | None = None
    measured_mb: float | None = None
    peak_mb: float | None = None
    in_flight: int = 0
    last_used: float = field(default_factory=time.monotonic)
    last_used_wall: float | None = None
    reserved: bool = False  # room is taken, the process is not up yet
    unloading: bool = False  # chosen to unload: admits nobody new
    # Counted for /metrics: loads, the last load's seconds, and unloads by reason.
    loads: int = 0
    last_load_s: float | None = None
    unloads: dict[str, int] = field(default_factory=dict)
    # A model on RPC workers: its connections to them, and where its weights went.
    rpc_watch: rpc.WorkerWatch | None = None
    placement: rpc.Placement | None = None

    @property
    def id(self) -> str:
        return instance_id(self.source, self.purpose)

    @property
    def remote(self) -> bool:
        return isinstance(self.manager, RemoteUpstream)

    @property
    def upstream_name(self) -> str:
        """How messages name the server behind this instance."""
        return f"remote upstream {self.key} ({self.source.url})" if self.remote else "llama-server"

    @property
    def holds_memory(self) -> bool:
        if self.remote:
            return False  # on another machine: never in the budget, never evicted
        return self.reserved or self.manager.state not in HOLDS_NO_MEMORY

    @property
    def serving(self) -> bool:
        return self.manager.state == ManagerState.READY and not self.unloading

    @property
    def state(self) -> str:
        """The state users see: unloaded, downloading, loading, ready, unloading, failed."""
        if self.unloading or self.manager.state == ManagerState.STOPPING:
            return "unloading"
        if self.manager.state == ManagerState.DOWNLOADING:
            return "downloading"  # checked before `reserved`, which lasts the whole load
        if self.reserved or self.manager.state in (
            ManagerState.STARTING,
            ManagerState.RESTARTING,
        ):
            return "loading"
        return {
            ManagerState.STOPPED: "unloaded",
            ManagerState.READY: "ready",
            ManagerState.FAILED: "failed",
        }[self.manager.state]

    @property
    def cost_mb(self) -> float:
        return budget.effective_cost_mb(self.estimate_mb or 0.0, self.peak_mb)

    def as_resident(self) -> budget.Resident:
        return budget.Resident(
            key=self.id,
            cost_mb=self.cost_mb,
            in_flight=self.in_flight,
            pinned=self.pinned,
            last_used=self.last_used,
            ttl_s=self.ttl_s,
            settled=self.manager.state == ManagerState.READY
            and not self.reserved
            and not self.unloading,
        )


class ModelPool:
    """All model instances of one gateway, keyed by instance id."""

    def __init__(self, settings: Settings, binary: Path, api_key: str) -> None:
        self.settings = settings
        self.binary = binary
        self._api_key = api_key  # every instance's llama-server requires it (see supervisor)
        self.instances: dict[str, Instance] = {}
        self.n_gpu_layers = settings.n_gpu_layers
        self.n_ctx_limit = settings.n_ctx
        self.gpu_devices: list[str] = []
        self.budget_mb = settings.memory_budget_mb or 0.0
        self._placing = asyncio.Lock()
        self._changed = asyncio.Event()
        self._housekeeper: asyncio.Task[None] | None = None
        self._fixed_port_taken = False
        self._estimates: dict[tuple[str, int, int, int, int], float] = {}
        self._rpc_prober = rpc.Prober()
        # Called with a serving instance about to stop (evicted, idle, unloaded, shut down,
        # restarted): the gateway saves its KV caches (kv_cache.py). Bounds its own time.
        self.before_stop: Callable[[Instance], Awaitable[None]] | None = None

    # --- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Find the devices and the budget, clear stale processes, start housekeeping."""
        self.gpu_devices = await binaries.list_devices(self.binary)
        if self.settings.memory_budget_mb is None:
            available = (await asyncio.to_thread(psutil.virtual_memory)).available / budget.MB
            free_vram = [float(m.group(2)) for d in self.gpu_devices if (m := FREE_VRAM.search(d))]
            self.budget_mb = budget.default_budget_mb(
                available, free_vram, offloaded=self.n_gpu_layers != 0
            )
        log.info("memory budget %.0f MB, at most %d models", self.budget_mb, self.max_models)
        await asyncio.to_thread(cleanup_stale_processes, self.settings.data_dir, set())
        self._housekeeper = asyncio.create_task(self._housekeeping())

    async def close(self) -> None:
        if self._housekeeper:
            self._housekeeper.cancel()
        for instance in list(self.instances.values()):
            await self._before_stop(instance)
            await instance.manager.close()
            await instance.http.aclose()
            instance.relay.close_idle()
        await self._rpc_prober.close()

    @property
    def max_models(self) -> int:
        return self.settings.max_loaded_models

    # --- instances -------------------------------------------------------------------

    def instance(self, source: ModelSource, purpose: Purpose = "generate") -> Instance:
        """The instance of a model for a purpose, created (unloaded) on first use."""
        if source.reranker:
            purpose = "rerank"
        elif source.url is not None:
            purpose = "generate"  # one instance for every purpose: the remote has its own
        key = instance_id(source, purpose)
        existing = self.instances.get(key)
        if existing is not None:
            return existing
        if source.url is not None:
            return self._remote_instance(source, purpose)
        extra = {"embed": EMBEDDING_ARGS, "rerank": RERANK_ARGS}.get(purpose, [])
        started_source = source.model_copy(
            update={
                "extra_args": [*source.extra_args, *extra],
                # Only generation applies adapters; the instance serves the base itself.
                "adapters": source.adapters if purpose == "generate" else (),
                "adapter": None,
            }
        )
        http, transport = proxy.make_client(self._api_key)
        # The first instance takes AILAB_LLAMA_PORT; the others take ports the OS hands out.
        port = None if not self._fixed_port_taken else _free_port()
        self._fixed_port_taken = True
        manager = LlamaServerManager(
            self.settings,
            self.binary,
            http,
            transport,
            self._api_key,
            port=port,
            log_name=f"llama-server-{key.replace('#', '-')}.log",
            clean_stale=False,
        )
        manager.gpu_devices = self.gpu_devices
        manager.on_state = self._notify
        upstream = relay.Upstream(self.settings.llama_host, manager.port, self._api_key)
        manager.drop_idle.append(upstream.close_idle)
        instance = Instance(
            key=source.key,
            purpose=purpose,
            source=started_source,
            manager=manager,
            http=http,
            relay=upstream,
            pinned=source.pinned,
            ttl_s=source.ttl_s if source.ttl_s is not None else self.settings.model_ttl_s,
        )
        self.instances[instance.id] = instance
        return instance

    def _remote_instance(self, source: ModelSource, purpose: Purpose) -> Instance:
        manager = RemoteUpstream(source)
        manager.on_state = self._notify
        instance = Instance(
            key=source.key,
            purpose=purpose,
            source=source,
            manager=manager,
            http=manager.http,
            relay=manager.relay,
            pinned=source.pinned,
            ttl_s=0.0,
        )
        self.instances[instance.id] = instance
        return instance

    def resident(self) -> list[Instance]:
        return [i for i in self.instances.values() if i.holds_memory]

    def n_ctx_for(self, source: ModelSource) -> int:
        return min(self.n_ctx_limit, source.context_length)

    # --- admission -------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def use(
        self, source: ModelSource, purpose: Purpose = "generate"
    ) -> AsyncIterator[Instance]:
        """Hold a serving instance for one request, loading it (and making room) first;
        waits at most the switch wait, then raises PoolRefused or LlamaUnavailable."""
        instance = self.instance(source, purpose)
        await self._until_serving(instance, time.monotonic() + self.settings.switch_wait_s)
        if isinstance(instance.manager, RemoteUpstream):
            limit = instance.manager.slot(self.settings.switch_wait_s)
        else:
            limit = contextlib.nullcontext()
        instance.in_flight += 1  # no await since the check: nobody can unload it between
        try:
            async with limit:
                yield instance
        finally:
            instance.in_flight -= 1
            instance.last_used = time.monotonic()
            instance.last_used_wall = time.time()
            self._notify()

    async def load(self, source: ModelSource, purpose: Purpose = "generate") -> Instance:
        """Make an instance serve (POST /models/load, /model/switch, AILAB_PRELOAD)."""
        instance = self.instance(source, purpose)
        if instance.manager.state == ManagerState.FAILED:
            await instance.manager.stop()  # an explicit load tries a failed model again
        await self._until_serving(instance, time.monotonic() + self.settings.switch_wait_s)
        return instance

    async def _until_serving(self, instance: Instance, deadline: float) -> None:
        while not instance.serving:
            state = instance.manager.state
            if state == ManagerState.FAILED and not instance.reserved:
                raise LlamaUnavailable(
                    f"{instance.id} failed: {instance.manager.message}; "
                    "POST /models/load tries it again"
                )
            if state == ManagerState.STOPPED and not instance.reserved and not instance.unloading:
                await self._place_and_start(instance, deadline)
                continue
            await self._wait_for_change(deadline, f"{instance.id} is still {instance.state}")

    async def _wait_for_change(self, deadline: float, what: str) -> None:
        changed = self._changed
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise PoolRefused(f"{what} after {self.settings.switch_wait_s:.0f} s")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(changed.wait(), remaining)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    # --- loading and unloading -------------------------------------------------------

    async def _place_and_start(self, instance: Instance, deadline: float) -> None:
        """Reserve room (evicting idle models, or waiting for busy ones), then start."""
        if instance.remote:
            await instance.manager.start(instance.source)  # takes no room here
            return
        if instance.estimate_mb is None:
            instance.estimate_mb = await asyncio.to_thread(
                self.estimate, instance.source, instance.purpose
            )
        async with self._placing:
            if instance.holds_memory or instance.serving:
                return  # another request placed it meanwhile
            if instance.source.rpc and not await self._workers_ready(instance):
                return  # failed with the reason
            # A model still to be downloaded counts the baseline until it is measured.
            need = instance.estimate_mb or budget.PROCESS_OVERHEAD_MB
            while True:
                plan = budget.plan_room(
                    instance.id,
                    need,
                    self.budget_mb,
                    self.max_models,
                    [i.as_resident() for i in self.resident()],
                )
                if plan.action == "load":
                    break
                if plan.action == "refuse":
                    raise PoolRefused(plan.reason, plan.status)
                await self._wait_for_change(deadline, f"no room: {plan.reason}")
            victims = [self.instances[key] for key in plan.evict]
            for victim in victims:
                victim.unloading = True
            instance.reserved = True
        try:
            for victim in victims:
                log.info("unloading %s to make room for %s", victim.id, instance.id)
                victim.unloads["room"] = victim.unloads.get("room", 0) + 1
                await self._stop(victim)
            instance.manager.n_gpu_layers = self.n_gpu_layers
            instance.manager.n_ctx_limit = self.n_ctx_limit
            started = time.monotonic()
            await instance.manager.start(instance.source)
            instance.last_used = time.monotonic()  # idle time counts from being ready
            instance.loads += 1
            instance.last_load_s = instance.last_used - started
        finally:
            instance.reserved = False
            self._notify()
        await self._measure(instance)
        await self._watch_workers(instance)

    async def _workers_ready(self, instance: Instance) -> bool:
        """Before a load on RPC workers (under `_placing`): none of them serving another of
        our models, each answering; a worker that does not fails the instance."""
        for other in self.resident():
            shared = sorted(set(other.source.rpc) & set(instance.source.rpc))
            if shared and other is not instance:
                raise PoolRefused(
                    f"RPC worker {shared[0]} is serving {other.id}, and a ggml-rpc-server "
                    f"serves one llama-server at a time: unload {other.key} first (POST "
                    "/models/unload) or give this model workers of its own"
                )
        problem = await self._rpc_prober.check(instance.source.rpc)
        if problem:
            log.warning("%s not loaded: %s", instance.id, problem)
            await instance.manager.fail(problem)
        return problem is None

    def estimate(self, source: ModelSource, purpose: Purpose) -> float | None:
        """The memory estimate from the file and its header (blocking: run it in a thread);
        None for a model still to be downloaded."""
        path = source.path
        if path is None or not path.is_file():
            return None
        if source.rpc:
            # Its weights and KV cache go to the workers; measured RSS takes over once it runs.
            return budget.PROCESS_OVERHEAD_MB
        stat = path.stat()
        outputs = EMBEDDING_OUTPUTS if purpose == "embed" else self.settings.parallel
        n_ctx = self.n_ctx_for(source)
        cache_key = (str(path), stat.st_size, stat.st_mtime_ns, n_ctx, outputs)
        if cache_key not in self._estimates:
            try:
                shape: budget.ModelShape | None = read_shape(path)
            except (GgufError, OSError) as exc:
                log.warning("%s: no shape in the GGUF header (%s); counting the file", path, exc)
                shape = None
            self._estimates[cache_key] = budget.estimate_mb(stat.st_size, shape, n_ctx, outputs)
        return self._estimates[cache_key]

    async def unload(self, instance: Instance) -> None:
        """Unload once its requests are done; no new ones are admitted meanwhile."""
        if not instance.holds_memory:
            return
        instance.unloading = True
        try:
            deadline = time.monotonic() + self.settings.switch_wait_s
            while instance.in_flight:
                await self._wait_for_change(
                    deadline, f"{instance.id} still has {instance.in_flight} requests in flight"
                )
            await self._stop(instance)
        finally:
            instance.unloading = False
            self._notify()

    async def _before_stop(self, instance: Instance) -> None:
        if self.before_stop is not None and instance.manager.state == ManagerState.READY:
            await self.before_stop(instance)  # a failed or crashed process has nothing to save

    async def _stop(self, instance: Instance) -> None:
        try:
            await self._before_stop(instance)
            await instance.manager.stop()
        finally:
            instance.unloading = False
            instance.measured_mb = instance.peak_mb = None
            self._notify()

    async def restart_all(self, **values: int) -> None:
        """Apply n_gpu_layers / n_ctx_limit to every loaded instance by restarting it
        (the caller holds the generation gate exclusively)."""
        for name, value in values.items():
            setattr(self, name, value)
        for instance in self.resident():
            for name, value in values.items():
                setattr(instance.manager, name, value)
            instance.estimate_mb = await asyncio.to_thread(
                self.estimate, instance.source, instance.purpose
            )
            await self._before_stop(instance)
            await instance.manager.restart(instance.source)
            await self._measure(instance)

    # --- housekeeping ----------------------------------------------------------------

    async def _housekeeping(self) -> None:
        """Measure resident processes and unload the ones idle past their TTL."""
        loop = asyncio.get_running_loop()
        while True:
            # On the loop clock's whole seconds, as uvicorn's tick (api/serve.py): an idle
            # gateway then wakes once a second, not twice.
            await asyncio.sleep(HOUSEKEEPING_INTERVAL_S - loop.time() % HOUSEKEEPING_INTERVAL_S)
            for instance in self.resident():
                await self._measure(instance)
                await self._watch_workers(instance)
            residents = [i.as_resident() for i in self.resident()]
            for key in budget.idle_expired(residents, time.monotonic()):
                instance = self.instances[key]
                log.info("unloading %s: idle for %.0f s", key, instance.ttl_s)
                instance.unloads["ttl"] = instance.unloads.get("ttl", 0) + 1
                with contextlib.suppress(PoolRefused, LlamaStartError):
                    await self.unload(instance)

    async def _watch_workers(self, instance: Instance) -> None:
        """A model whose RPC worker went away fails with that reason (rpc.WorkerWatch): a
        ready one when its connection to the worker closed, a crashed one (llama-server
        aborts on a lost worker) when the worker refuses connections."""
        manager, workers = instance.manager, instance.source.rpc
        lost = None
        if workers and manager.state == ManagerState.READY and manager.pid is not None:
            if instance.rpc_watch is None or instance.rpc_watch.pid != manager.pid:
                instance.rpc_watch = await asyncio.to_thread(
                    rpc.WorkerWatch.take, manager.pid, workers
                )
                instance.placement = await asyncio.to_thread(rpc.read_placement, manager.log_path)
            worker = await asyncio.to_thread(instance.rpc_watch.lost)
            if worker:
                lost = f"RPC worker {worker} closed its connection: the layers it held are gone"
        elif workers and manager.state == ManagerState.RESTARTING:
            for worker in workers:
                lost = lost or await rpc.refused(worker)
        if lost:
            log.warning("%s failed: %s", instance.id, lost)
            await manager.fail(f"{lost}; start the worker again")

    async def _measure(self, instance: Instance) -> None:
        # On the loop: /proc is memory the kernel fills in, never a wait for a disk, and a
        # thread hop each second cost more CPU (taken from llama-server) than the read.
        rss = _rss_mb(instance.manager.pid)
        instance.measured_mb = rss
        if rss is not None:
            instance.peak_mb = max(rss, instance.peak_mb or 0.0)
