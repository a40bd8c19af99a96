"""The gateway's runtime: the model pool, the store, the engines and the rules about who
may generate when. The HTTP layer (ailab/api) only translates to and from it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from ailab import config
from ailab import tools_all as tools
from ailab.agent.engine import ChatEngine, TurnOptions
from ailab.api.schemas import ChatRequest, DownloadInfo, InstanceStatus, ModelInfo
from ailab.config import GENERATION_DEFAULTS, ModelSource, Settings
from ailab.storage import AsyncStore, merge_messages
from ailab.upstream.admission import GenerationGate, KeyedLocks
from ailab.upstream.pool import Instance, ModelPool, PoolRefused, Purpose, instance_id
from ailab.upstream.supervisor import LlamaServerManager, LlamaStartError, LlamaUnavailable

log = logging.getLogger("ailab.gateway")


class ModelNotFound(LookupError):
    """No model is registered or discovered under this key."""


class ModelFileMissing(FileNotFoundError):
    """The model is registered but its file is not on disk."""


class SwitchFailed(RuntimeError):
    """The new model failed to load; the message says whether the old one came back."""


class Gateway:
    def __init__(self, settings: Settings, binary: Path) -> None:
        self.settings = settings
        self.store = AsyncStore(settings.database_path)
        self.pool = ModelPool(settings, binary)
        self.default_model = settings.default_model
        self.gate = GenerationGate(settings.parallel + settings.queue_limit, settings.switch_wait_s)
        self.conversation_locks = KeyedLocks()
        self.system_prompt = config.DEFAULT_SYSTEM_PROMPT
        self.tools_enabled = True
        self._engines: dict[str, ChatEngine] = {}
        self._switch_lock = asyncio.Lock()

    # --- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        await asyncio.to_thread(tools.configure, self.settings)
        self.system_prompt = await self.store.get_setting("system_prompt", self.system_prompt)
        self.tools_enabled = bool(await self.store.get_setting("tools_enabled", True))
        saved_roots = await self.store.get_setting("tool_roots")
        if saved_roots and not self.settings.tool_roots:
            try:
                await asyncio.to_thread(tools.set_allowed_roots, saved_roots)
            except ValueError as exc:
                log.warning("ignoring saved tool roots: %s", exc)
        await self.pool.start()
        keys = dict.fromkeys([self.default_model, *self.settings.preload])
        for key in keys:
            try:
                await self.pool.load(await asyncio.to_thread(self.model_source, key))
            except (LlamaStartError, LlamaUnavailable, PoolRefused) as exc:
                # Stay up: /health shows the reason and a switch to another model can fix it.
                log.error("could not load %s: %s", key, exc)

    async def close(self) -> None:
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
        """The named model's source (the default for None); ModelNotFound lists the keys."""
        return await asyncio.to_thread(self.model_source, key or self.default_model)

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

    def engine_for(self, instance: Instance) -> ChatEngine:
        """The agent loop bound to one instance (its client, its port, its token counts)."""
        engine = self._engines.get(instance.id)
        if engine is None:
            engine = ChatEngine(
                instance.http,
                self.store,
                instance.manager.base_url,
                self.settings.max_tool_iterations,
                self.settings.tool_approval,
            )
            self._engines[instance.id] = engine
        return engine

    def list_models(self) -> list[ModelInfo]:
        """Every model with its file and pool state; called in a worker thread (it stats
        files and reads GGUF headers)."""
        infos = []
        for key, entry in config.get_all_models(self.settings).items():
            path = config.model_path(self.settings, entry)
            exists = bool(path and path.is_file())
            source = self.model_source(key)
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
                    **main.model_dump(exclude={"id", "purpose"}),
                    embeddings=self.instance_status(source, "embed") if embeddings else None,
                )
            )
        return infos

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
        )

    def resident_status(self) -> list[InstanceStatus]:
        return [self.instance_status(i.source, i.purpose) for i in self.pool.resident()]

    async def switch_model(self, key: str) -> tuple[str | None, float]:
        """Make another model the default and load it (making room as any load does).

        Fails fast for an unknown key or a missing file; if the new model does not load,
        the previous default stays (and is loaded again if it was unloaded for room)."""
        source = await asyncio.to_thread(self._loadable_source, key)
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
        if source.kind != "huggingface" and not (source.path and source.path.is_file()):
            raise ModelFileMissing(
                f"model {key!r} has no file at {source.path}; put the GGUF there "
                "(make models fetches the bundled ones)"
            )
        return source

    async def load_model(self, key: str) -> Instance:
        source = await asyncio.to_thread(self._loadable_source, key)
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
        async with self.gate.generation(), self.pool.use(source, purpose) as instance:
            yield instance

    async def chat_source(self, conversation_id: str, requested: str | None) -> ModelSource:
        """/chat's model: the one named, else the conversation's, else the default."""
        key = requested or await self.store.get_conversation_model(conversation_id)
        return await self.source_for(key)

    def token_budget(self, source: ModelSource, max_tokens: int) -> int:
        n_ctx = self.pool.n_ctx_for(source)
        if max_tokens >= n_ctx:
            raise ValueError(
                f"max_tokens={max_tokens} leaves no room for the conversation in a "
                f"{n_ctx}-token context; use a smaller max_tokens"
            )
        budget = n_ctx - max_tokens
        if self.settings.max_conversation_tokens:
            budget = min(budget, self.settings.max_conversation_tokens)
        return budget

    async def prepare_turn(self, request: ChatRequest, model_key: str) -> TurnOptions | None:
        """Store the request's new messages and the conversation's model; None when it was
        a reset (empty messages)."""
        conversation_id = request.conversation_id
        if not request.messages:
            await self.store.reset_conversation(conversation_id)
            return None
        await self.store.set_conversation_model(conversation_id, model_key)
        stored = await self.store.get_messages(conversation_id)
        incoming = [m.model_dump(exclude_none=True) for m in request.messages]
        merged = merge_messages(stored, incoming)
        if not merged.new_messages:
            raise ValueError("the request holds no new message after the stored history")
        await self.store.append_messages(conversation_id, merged.new_messages)
        sampling = {
            name: getattr(request, name) if getattr(request, name) is not None else default
            for name, default in GENERATION_DEFAULTS.items()
        }
        choice = request.tool_choice
        return TurnOptions(
            conversation_id=conversation_id,
            system_prompt=request.system_prompt or merged.system_prompt or self.system_prompt,
            sampling=sampling,
            tools_enabled=request.enable_tools and self.tools_enabled,
            tool_choice=choice if isinstance(choice, str) else choice.model_dump(),
            stream=request.stream,
        )

    @staticmethod
    def chat_extras(instance: Instance, conversation_id: str) -> dict[str, Any]:
        return {
            "conversation_id": conversation_id,
            "model_key": instance.key,
            "device": instance.manager.device,
        }
