"""The gateway's runtime: the model pool, the store, the engines, the MCP hub and the rules
about who may generate when. The HTTP layer (ailab/api) only translates to and from it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx
from prometheus_client import generate_latest

from ailab import config, tools
from ailab.agent.engine import ApprovalGone, ChatEngine, TurnOptions, TurnStats
from ailab.agent.turn import (
    SUPERSEDED_BY_MESSAGE,
    SUPERSEDED_BY_REGENERATION,
    Event,
    RunningTurn,
    TurnRecord,
)
from ailab.api.schemas import (
    AdapterInfo,
    ApprovalRequest,
    ChatRequest,
    DownloadInfo,
    GenerationOptions,
    InstanceStatus,
    ModelInfo,
)
from ailab.config import GENERATION_DEFAULTS, ModelSource, Settings
from ailab.errors import AilabError, BadRequest, NotFound
from ailab.finetune.service import FinetuneService
from ailab.mcp.client import McpHub
from ailab.metrics import GatewayState, Metrics, ModelFacts, StateCollector, llama_metrics_text
from ailab.storage import AsyncStore, PendingApproval, StoredConversation, merge_messages
from ailab.upstream import lora
from ailab.upstream.admission import GenerationGate, KeyedLocks
from ailab.upstream.kv_cache import KvCache
from ailab.upstream.pool import Instance, ModelPool, PoolRefused, Purpose, instance_id
from ailab.upstream.supervisor import (
    DownloadFailed,
    LlamaServerManager,
    LlamaStartError,
    LlamaUnavailable,
)

log = logging.getLogger("ailab.gateway")

SOURCE_FRESH_S = 1.0  # how long a model's resolved source is reused (see source_for)


class ModelNotFound(NotFound):
    """No model is registered or discovered under this key."""


class ModelFileMissing(BadRequest):
    """The model is registered but its file is not on disk."""


class SwitchFailed(AilabError):
    """The new model failed to load; the message says whether the old one came back."""


class ConversationNotFound(NotFound):
    """No conversation is stored under this id."""


Built = tuple[TurnRecord, AsyncIterator[Event]]
TurnBuilder = Callable[[StoredConversation, "ChatEngine", int], Awaitable[Built]]


class Gateway:
    def __init__(self, settings: Settings, binary: Path) -> None:
        self.settings = settings
        # llama-server's key: new at each start, in memory only (see LlamaServerManager).
        self.store = AsyncStore(settings.database_path)
        self.pool = ModelPool(settings, binary, secrets.token_urlsafe(32))
        self.kv = KvCache(settings)
        self.pool.before_stop = self.kv.save_instance
        self.default_model = settings.default_model
        self.gate = GenerationGate(settings.parallel + settings.queue_limit, settings.switch_wait_s)
        self.conversation_locks = KeyedLocks()
        self.turns: dict[str, RunningTurn] = {}  # the running turn of each conversation
        # Shares nothing until start() applies the settings; /roots replaces it.
        self.tool_policy = tools.ToolPolicy()
        self.mcp = McpHub(settings.mcp_config_file, settings.log_dir, settings.mcp_call_timeout_s)
        self.metrics = Metrics()
        self.metrics.add_collector(StateCollector(self._metrics_state))
        self.system_prompt = config.DEFAULT_SYSTEM_PROMPT
        self.tools_enabled = True
        self._engines: dict[tuple[str, str | None], ChatEngine] = {}
        self._adapter_bases: dict[str, str] = {}  # LoRA adapter key -> the base serving it
        self._sources: dict[str, tuple[float, ModelSource]] = {}  # key -> (found at, source)
        self.finetune = FinetuneService(settings)
        self._switch_lock = asyncio.Lock()
        self._first_load: asyncio.Task[None] | None = None

    # --- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        await self.mcp.start()  # the servers connect while llama-server loads
        self.tool_policy = await asyncio.to_thread(tools.ToolPolicy.from_settings, self.settings)
        self.system_prompt = await self.store.get_setting("system_prompt", self.system_prompt)
        self.tools_enabled = bool(await self.store.get_setting("tools_enabled", True))
        saved_roots = await self.store.get_setting("tool_roots")
        if saved_roots and not self.settings.tool_roots:
            try:
                self.tool_policy = await asyncio.to_thread(
                    self.tool_policy.with_runtime_roots, saved_roots, self.settings.tool_roots
                )
            except ValueError as exc:
                log.warning("ignoring saved tool roots: %s", exc)
        await self.kv.start()  # its directory must exist before any llama-server starts
        await self.pool.start()
        registry = await asyncio.to_thread(config.get_all_models, self.settings)
        for key, entry in registry.items():
            if entry.get("lora_refused"):
                log.error("LoRA adapter %s refused: %s", key, entry["lora_error"])
        # Remote upstreams are checked from the start, so /models shows whether they answer.
        remotes = [key for key, entry in registry.items() if entry.get("url")]
        keys = list(dict.fromkeys([self.default_model, *self.settings.preload, *remotes]))
        for key in keys:  # unknown keys fail here, before the port opens
            self.pool.instance(await asyncio.to_thread(self.model_source, key))
        # The port opens while the models load (or download): /health says "loading" and
        # requests wait for them.
        self._first_load = asyncio.create_task(self._load_first_models(keys))

    async def _load_first_models(self, keys: list[str]) -> None:
        for key in keys:
            try:
                await self.pool.load(await asyncio.to_thread(self.model_source, key))
            except (LlamaStartError, LlamaUnavailable, PoolRefused) as exc:
                # Stay up: /health shows the reason and a switch to another model can fix it.
                log.error("could not load %s: %s", key, exc)
        await self.mcp.wait_started()

    async def close(self) -> None:
        if self._first_load is not None:
            self._first_load.cancel()
            await asyncio.gather(self._first_load, return_exceptions=True)
        running = list(self.turns.values())
        for turn in running:
            turn.stop("the gateway is shutting down")
        await asyncio.gather(*(turn.task for turn in running), return_exceptions=True)
        await self.mcp.close()
        await self.finetune.close()
        await self.pool.close()
        await self.store.close()

    # --- models ----------------------------------------------------------------------

    def model_source(self, key: str) -> ModelSource:
        try:
            return config.get_model_source(self.settings, key)
        except KeyError:
            known = ", ".join(sorted(config.get_all_models(self.settings)))
            raise ModelNotFound(f"unknown model {key!r}; known models: {known}") from None

    async def source_for(self, key: str | None) -> ModelSource:
        """The named model's source (the default for None); ModelNotFound lists the keys.
        Reading the registry (models/custom/, AILAB_EXTRA_MODELS) costs a thread hop and
        disk reads, too much for every request: a source found is reused for
        SOURCE_FRESH_S, so a change on disk shows within that; an unknown key is always
        looked up again."""
        key = key or self.default_model
        now = time.monotonic()
        found = self._sources.get(key)
        if found is not None and now - found[0] < SOURCE_FRESH_S:
            return found[1]
        source = await asyncio.to_thread(self.model_source, key)
        self._sources[key] = (now, source)
        return source

    @property
    def starting(self) -> bool:
        """The models named at start are still being loaded."""
        return self._first_load is not None and not self._first_load.done()

    @property
    def default_instance(self) -> Instance:
        """The default model's instance (created unloaded at start, or by a switch)."""
        return self.pool.instances[self.default_model]

    @property
    def manager(self) -> LlamaServerManager:
        """The default model's supervisor: what /health, /command and the bench report."""
        return self.default_instance.manager

    @property
    def engine(self) -> ChatEngine:
        return self.engine_for(self.default_instance)

    def engine_for(self, instance: Instance, adapter: str | None = None) -> ChatEngine:
        """The agent loop bound to one instance (its client, its port, its token counts)
        and, for a LoRA base, to one of its adapters (None: the base itself)."""
        engine = self._engines.get((instance.id, adapter))
        if engine is None:
            engine = ChatEngine(
                self.store,
                instance.manager.base_url,
                self.settings.max_tool_iterations,
                lambda: self.tool_policy,
                self.mcp,
                self.metrics,
                lambda: request_fields(instance, adapter),
                self.kv.for_instance(instance),
                streams=instance.relay,
                upstream=instance.upstream_name,
            )
            self._engines[(instance.id, adapter)] = engine
        return engine

    def list_models(self) -> list[ModelInfo]:
        """Every model with its file and pool state; called in a worker thread (it stats
        files and reads GGUF headers)."""
        infos = []
        models = config.get_all_models(self.settings)
        for key, entry in models.items():
            if entry.get("kind") == "lora":
                continue  # listed under its base
            path = config.model_path(self.settings, entry)
            source = self.model_source(key)
            # A remote model has nothing to download: it is there as soon as registered.
            exists = bool(path and path.is_file()) or source.url is not None
            main = self.instance_status(source)
            embeddings = self.pool.instances.get(instance_id(source, "embed"))
            infos.append(
                ModelInfo(
                    key=key,
                    name=entry.get("name", key),
                    description=entry.get("description"),
                    exists=exists,
                    size_bytes=path.stat().st_size if exists and path else None,
                    is_finetuned=bool(entry.get("is_finetuned")),
                    recommended=bool(entry.get("recommended")),
                    current=key == self.default_model,
                    context_length=entry.get("context_length"),
                    hf_repo=entry.get("hf_repo"),
                    usage=entry.get("usage"),
                    base_model=entry.get("base_model"),
                    pinned=source.pinned,
                    reranker=source.reranker,
                    url=source.url,
                    rpc_workers=list(source.rpc),
                    **main.model_dump(exclude={"id", "purpose"}),
                    embeddings=self.instance_status(source, "embed") if embeddings else None,
                    adapters=self._adapters_of(source, models),
                )
            )
        return infos

    def _adapters_of(
        self, source: ModelSource, models: dict[str, dict[str, Any]]
    ) -> list[AdapterInfo]:
        """A base's LoRA adapters with their state, the refused ones with the reason."""
        instance = self.pool.instances.get(source.key)
        servable = {file.key: file for file in source.adapters}
        adapters = []
        for key, entry in models.items():
            if entry.get("kind") != "lora" or entry.get("base") != source.key:
                continue
            state, message = (
                lora.adapter_state(instance, servable[key])
                if key in servable
                else ("refused", entry["lora_error"])
            )
            adapters.append(
                AdapterInfo(
                    key=key,
                    name=entry.get("name", key),
                    description=entry.get("description"),
                    base=source.key,
                    state=state,
                    message=message,
                )
            )
        return adapters

    def refused_adapters(self) -> list[AdapterInfo]:
        """Adapters whose base is not a model: nothing to list them under."""
        models = config.get_all_models(self.settings)
        return [
            AdapterInfo(
                key=key,
                name=entry.get("name", key),
                description=entry.get("description"),
                base=entry.get("base") if isinstance(entry.get("base"), str) else None,
                state="refused",
                message=entry["lora_error"],
            )
            for key, entry in models.items()
            if entry.get("kind") == "lora" and entry.get("base") not in models
        ]

    def instance_status(self, source: ModelSource, purpose: Purpose = "generate") -> InstanceStatus:
        """What the pool knows about one instance of a model, loaded or not (may read the
        GGUF header for the estimate: call it in a thread)."""
        instance = self.pool.instances.get(instance_id(source, purpose))
        if instance is None:
            return InstanceStatus(
                id=instance_id(source, purpose),
                purpose=purpose,
                state="unloaded",
                memory_estimate_mb=self.pool.estimate(source, purpose),
            )
        manager = instance.manager
        download = manager.download.model_dump() if manager.download else None
        return InstanceStatus(
            id=instance.id,
            purpose=instance.purpose,
            state=instance.state,  # type: ignore[arg-type]
            message=manager.message,
            download=DownloadInfo(**download) if download else None,
            pid=manager.pid,
            port=manager.port,
            memory_estimate_mb=instance.estimate_mb or self.pool.estimate(source, purpose),
            memory_measured_mb=instance.measured_mb,
            in_flight=instance.in_flight,
            last_used=instance.last_used_wall,
            restarts=manager.restarts,
            placement=asdict(instance.placement)
            if instance.placement and instance.state == "ready"
            else None,
        )

    def resident_status(self) -> list[InstanceStatus]:
        return [self.instance_status(i.source, i.purpose) for i in self.pool.resident()]

    async def switch_model(self, key: str) -> tuple[str | None, float]:
        """Make another model the default and load it (making room as any load does).

        Fails fast for an unknown key or a missing file; if the new model does not load,
        the previous default stays (and is loaded again if it was unloaded for room)."""
        source = await asyncio.to_thread(self._loadable_source, key)
        if source.adapter is not None:
            raise BadRequest(
                f"{key!r} is a LoRA adapter of {source.key!r}: switch to {source.key!r} and "
                f'name {key!r} in a request\'s "model" to use it'
            )
        if source.kind == "huggingface":
            # Downloading first keeps the current model serving meanwhile; only a
            # complete download can make it give way, and a failed one leaves it running.
            try:
                source = await self.pool.instance(source).manager.download_ahead(source)
            except DownloadFailed as exc:
                raise DownloadFailed(f"{exc}; {self.default_model} is still serving") from exc
        async with self._switch_lock:
            previous = self.default_model
            previous_source = self.default_instance.source
            started = time.perf_counter()
            self.pool.instance(source)
            self.default_model = key  # requests without a model now wait for this one
            try:
                await self.pool.load(source)
            except (LlamaStartError, LlamaUnavailable, PoolRefused) as exc:
                self.default_model = previous
                raise SwitchFailed(f"{exc}; {await self._restore(previous_source)}") from exc
            return previous, time.perf_counter() - started

    async def _restore(self, source: ModelSource) -> str:
        if self.pool.instance(source).serving:
            return f"{source.key} stays the default"
        try:
            await self.pool.load(source)
        except (LlamaStartError, LlamaUnavailable, PoolRefused) as again:
            return f"restoring {source.key} also failed: {again}"
        return f"{source.key} was restored"

    def _loadable_source(self, key: str) -> ModelSource:
        """The model's source, or why it cannot load (runs in a thread: it stats files)."""
        source = self.model_source(key)
        if source.kind in ("local", "local_finetuned") and not (
            source.path and source.path.is_file()
        ):
            raise ModelFileMissing(
                f"model {key!r} has no file at {source.path}; put the GGUF there "
                "(make models fetches the bundled ones)"
            )
        return source

    async def load_model(self, key: str) -> Instance:
        source = await asyncio.to_thread(self._loadable_source, key)
        await lora.prepare(self.pool, source)  # started with the adapters there now
        return await self.pool.load(source)

    async def unload_model(self, key: str) -> list[str]:
        """Unload every instance of a model (once its requests are done)."""
        await self.source_for(key)
        unloaded = []
        for instance in list(self.pool.instances.values()):
            if instance.key == key and instance.holds_memory:
                await self.pool.unload(instance)
                unloaded.append(instance.id)
        return unloaded

    async def restart_llama(self, **manager_settings: int) -> None:
        """Restart every loaded model under the exclusive gate with new manager settings
        (n_gpu_layers, n_ctx_limit); on failure the old settings are put back."""
        async with self._switch_lock, self.gate.exclusive():
            old = {name: getattr(self.pool, name) for name in manager_settings}
            try:
                await self.pool.restart_all(**manager_settings)
            except LlamaStartError as exc:
                try:
                    await self.pool.restart_all(**old)
                except LlamaStartError as again:
                    raise SwitchFailed(
                        f"{exc}; restoring the settings also failed: {again}"
                    ) from again
                raise SwitchFailed(f"{exc}; the previous settings were restored") from exc

    # --- chat ------------------------------------------------------------------------

    @asynccontextmanager
    async def generation(
        self, source: ModelSource, purpose: Purpose = "generate"
    ) -> AsyncIterator[Instance]:
        """Admission for anything that generates: a queue place, no switch running, and
        the model's instance serving (loaded first, and waited for, bounded)."""
        waiting_since = time.perf_counter()
        if source.adapter is not None and purpose != "generate":
            raise BadRequest(
                f"{source.adapter!r} is a LoRA adapter: it serves generation only; "
                f"name its base {source.key!r} for {purpose} requests"
            )
        if purpose == "generate":
            await lora.prepare(self.pool, source)
        if source.adapter is not None:
            self._adapter_bases[source.adapter] = source.key
        async with self.gate.generation(), self.pool.use(source, purpose) as instance:
            self.metrics.queue_wait_seconds.observe(time.perf_counter() - waiting_since)
            yield instance

    def token_budget(self, source: ModelSource, max_tokens: int) -> int:
        n_ctx = self.pool.n_ctx_for(source)
        if max_tokens >= n_ctx:
            raise BadRequest(
                f"max_tokens={max_tokens} leaves no room for the conversation in a "
                f"{n_ctx}-token context; use a smaller max_tokens"
            )
        budget = n_ctx - max_tokens
        if self.settings.max_conversation_tokens:
            budget = min(budget, self.settings.max_conversation_tokens)
        return budget

    # --- turns: one at a time per conversation, each ended by the turn rule -----------

    async def start_chat(self, request: ChatRequest) -> RunningTurn:
        """Admit and start a /chat turn; rejections (4xx, 429, 503) raise before it runs."""
        max_tokens = request.max_tokens or GENERATION_DEFAULTS["max_tokens"]

        async def build(stored: StoredConversation, engine: ChatEngine, n_budget: int) -> Built:
            incoming = [m.model_dump(exclude_none=True) for m in request.messages]
            merged = merge_messages(stored.messages, incoming)
            if not merged.new_messages:
                raise BadRequest("the request holds no new message after the stored history")
            own = request.system_prompt or merged.system_prompt or stored.system_prompt
            record = self._record(request.conversation_id, stored, len(stored.messages), own)
            record.retire(stored.pending, SUPERSEDED_BY_MESSAGE, answer=True)
            record.add_input(merged.new_messages)
            return record, await self._generate(engine, record, request, n_budget)

        return await self._begin(request.conversation_id, request.model, max_tokens, build)

    async def start_regeneration(
        self, conversation_id: str, request: GenerationOptions
    ) -> RunningTurn:
        """Answer the last user message again, replacing the answer (and its tool calls)
        that followed it; the old answer stays if the new one fails before any output."""
        max_tokens = request.max_tokens or GENERATION_DEFAULTS["max_tokens"]

        async def build(stored: StoredConversation, engine: ChatEngine, n_budget: int) -> Built:
            if not stored.exists:
                raise ConversationNotFound(f"no conversation {conversation_id!r}")
            users = [i for i, m in enumerate(stored.messages) if m.get("role") == "user"]
            if not users:
                raise BadRequest(f"conversation {conversation_id!r} has no message to answer")
            own = request.system_prompt or stored.system_prompt
            record = self._record(conversation_id, stored, users[-1] + 1, own)
            record.retire(stored.pending, SUPERSEDED_BY_REGENERATION, answer=False)
            return record, await self._generate(engine, record, request, n_budget)

        return await self._begin(conversation_id, request.model, max_tokens, build)

    async def start_approval(self, request: ApprovalRequest) -> RunningTurn:
        """Resume a turn paused for approval, with the person's decision."""
        conversation_id = request.conversation_id
        # The paused turn's own max_tokens applies; it is read with the approval.
        pending = await self._pending(conversation_id, request.approval_id)
        max_tokens = int(pending.state["options"]["sampling"]["max_tokens"])

        async def build(stored: StoredConversation, engine: ChatEngine, n_budget: int) -> Built:
            current = await self._pending(conversation_id, request.approval_id, stored)
            record = TurnRecord(
                conversation_id=conversation_id,
                stored=stored.messages,
                keep=len(stored.messages),
                system_prompt=current.state["options"]["system_prompt"],
                own_prompt=stored.system_prompt,
            )
            events = engine.resume(record, current, request.approve, request.stream, n_budget)
            return record, events

        return await self._begin(conversation_id, None, max_tokens, build)

    async def _pending(
        self, conversation_id: str, approval_id: str, stored: StoredConversation | None = None
    ) -> PendingApproval:
        stored = stored or await self.store.load_conversation(conversation_id)
        pending = next((p for p in stored.pending if p.approval_id == approval_id), None)
        if pending is None:
            raise ApprovalGone(
                f"no pending approval {approval_id!r} in conversation {conversation_id!r} "
                "(already decided, superseded by a new message, or never asked)"
            )
        return pending

    async def _begin(
        self, conversation_id: str, requested_model: str | None, max_tokens: int, build: TurnBuilder
    ) -> RunningTurn:
        """Wait for the conversation, read it, choose its model (the one the request names,
        else the conversation's, else the default), take an admission place with that model
        serving, and build the turn; the turn then owns the lock and the place until it is
        stored."""
        resources = contextlib.AsyncExitStack()
        try:
            await resources.enter_async_context(self.conversation_locks.hold(conversation_id))
            stored = await self.store.load_conversation(conversation_id)
            source = await self.source_for(requested_model or stored.model_key)
            n_budget = self.token_budget(source, max_tokens)
            instance = await resources.enter_async_context(self.generation(source))
            engine = self.engine_for(instance, source.adapter)
            record, events = await build(stored, engine, n_budget)
            record.model_key = source.adapter or instance.key
        except BaseException:
            await resources.aclose()
            raise

        def forget() -> None:
            if self.turns.get(conversation_id) is turn:
                del self.turns[conversation_id]

        turn = RunningTurn(record, events, self.store, resources, forget)
        self.turns[conversation_id] = turn
        return turn

    def _record(
        self, conversation_id: str, stored: StoredConversation, keep: int, own: str | None
    ) -> TurnRecord:
        return TurnRecord(
            conversation_id=conversation_id,
            stored=stored.messages,
            keep=keep,
            system_prompt=own or self.system_prompt,
            own_prompt=own,
        )

    async def _generate(
        self, engine: ChatEngine, record: TurnRecord, request: GenerationOptions, n_budget: int
    ) -> AsyncIterator[Event]:
        """The agent loop for a new answer, after checking what would only fail later: a
        conversation that cannot fit, a forced tool that does not exist."""
        opts = self._options(record, request)
        await engine.prompt(record, opts, n_budget)
        return engine.run(record, opts, TurnStats(), n_budget)

    def _options(self, record: TurnRecord, request: GenerationOptions) -> TurnOptions:
        sampling = {
            name: getattr(request, name) if getattr(request, name) is not None else default
            for name, default in GENERATION_DEFAULTS.items()
        }
        choice = request.tool_choice
        opts = TurnOptions(
            conversation_id=record.conversation_id,
            system_prompt=record.system_prompt,
            sampling=sampling,
            tools_enabled=request.enable_tools and self.tools_enabled,
            tool_choice=choice if isinstance(choice, str) else choice.model_dump(),
            stream=request.stream,
        )
        named = opts.named_tool
        known = [*tools.tool_names(), *(s["function"]["name"] for s in self.mcp.schemas())]
        if opts.tools_enabled and named is not None and named not in known:
            raise BadRequest(
                f"tool_choice names an unknown tool {named!r}; tools: {', '.join(known)}"
            )
        return opts

    async def reset_conversation(self, conversation_id: str) -> None:
        """Empty a conversation, after the turn running on it (if any) is stored."""
        async with self.conversation_locks.hold(conversation_id):
            await self.store.reset_conversation(conversation_id)
            await self.kv.forget(conversation_id)

    async def delete_conversation(self, conversation_id: str) -> bool:
        """Delete a conversation; a turn running on it is stopped and nothing of it is
        stored, so the conversation stays deleted. False when there was nothing."""
        running = self.turns.get(conversation_id)
        if running is not None:
            running.stop("the conversation was deleted", keep=False)
        async with self.conversation_locks.hold(conversation_id):
            deleted = await self.store.delete_conversation(conversation_id)
            await self.kv.forget(conversation_id)
        return deleted or running is not None

    # --- metrics ---------------------------------------------------------------------

    def _metrics_state(self) -> GatewayState:
        models = [
            ModelFacts(
                id=i.id,
                state=i.state,
                estimate_mb=i.estimate_mb,
                measured_mb=i.measured_mb,
                in_flight=i.in_flight,
                loads=i.loads,
                last_load_s=i.last_load_s,
                unloads=dict(i.unloads),
                restarts=i.manager.restarts,
            )
            for i in self.pool.instances.values()
        ]
        return GatewayState(models=models, admitted=self.gate.admitted)

    async def metrics_text(self) -> str:
        """The gateway's metrics, then llama-server's own from each model that is running:
        a scrape never loads a model and never counts as its use (no idle timer reset)."""
        conversations = await self.store.list_conversations()
        self.metrics.conversations.set(len(conversations))
        size = await asyncio.to_thread(_file_size, self.settings.database_path)
        self.metrics.database_bytes.set(size)
        # A remote upstream's metrics are its own server's to publish.
        running = [i for i in self.pool.instances.values() if i.serving and not i.remote]
        texts = await asyncio.gather(*(self._llama_metrics(i) for i in running))
        own = generate_latest(self.metrics.registry).decode()
        return own + llama_metrics_text(
            {i.id: text for i, text in zip(running, texts, strict=True) if text}
        )

    @staticmethod
    async def _llama_metrics(instance: Instance) -> str | None:
        try:
            reply = await instance.http.get(f"{instance.manager.base_url}/metrics", timeout=5)
        except httpx.HTTPError:
            return None  # it stopped meanwhile: its metrics are gone with it
        return reply.text if reply.status_code == 200 else None

    def chat_extras(self, model_key: str | None, conversation_id: str) -> dict[str, Any]:
        """What a chat response says about where it ran."""
        key = model_key or self.default_model
        instance = self.pool.instances.get(self._adapter_bases.get(key, key))
        return {
            "conversation_id": conversation_id,
            "model_key": model_key or self.default_model,
            "device": instance.manager.device if instance else "CPU",
        }


def request_fields(instance: Instance, adapter: str | None) -> dict[str, Any]:
    """What every request to an instance adds (a conversation's engine, the /v1 routes): a
    remote upstream's name for the model, or a LoRA base's adapter scales."""
    if instance.remote:
        return {"model": instance.source.remote_name}
    return lora.request_fields(instance, adapter)


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0
