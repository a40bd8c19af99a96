"""The gateway's runtime: the supervised llama-server, the store, the engine and the rules
about who may generate when. The HTTP layer (ailab/api/app.py) only translates to and
from it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx

from ailab import config, tools
from ailab.agent.engine import ApprovalGone, ChatEngine, TurnOptions, TurnStats
from ailab.agent.turn import (
    SUPERSEDED_BY_MESSAGE,
    SUPERSEDED_BY_REGENERATION,
    Event,
    RunningTurn,
    TurnRecord,
)
from ailab.api.schemas import ApprovalRequest, ChatRequest, GenerationOptions, ModelInfo
from ailab.config import GENERATION_DEFAULTS, ModelSource, Settings
from ailab.errors import AilabError, BadRequest, NotFound
from ailab.mcp.client import McpHub
from ailab.storage import AsyncStore, StoredConversation, merge_messages
from ailab.upstream import proxy
from ailab.upstream.admission import GenerationGate, KeyedLocks
from ailab.upstream.supervisor import DownloadFailed, LlamaServerManager, LlamaStartError

log = logging.getLogger("ailab.gateway")


class ModelNotFound(NotFound):
    """No model is registered or discovered under this key."""


class ModelFileMissing(BadRequest):
    """The model is registered but its file is not on disk."""


class SwitchFailed(AilabError):
    """The new model failed to load; the message says whether the old one came back."""


class ConversationNotFound(NotFound):
    """No conversation is stored under this id."""


TurnBuilder = Callable[[StoredConversation], Awaitable[tuple[TurnRecord, AsyncIterator[Event]]]]


class Gateway:
    def __init__(self, settings: Settings, binary: Path) -> None:
        self.settings = settings
        # llama-server's key: new at each start, in memory only (see LlamaServerManager).
        llama_key = secrets.token_urlsafe(32)
        self.http, transport = proxy.make_client(llama_key)
        self.store = AsyncStore(settings.database_path)
        self.manager = LlamaServerManager(settings, binary, self.http, transport, llama_key)
        self.gate = GenerationGate(settings.parallel + settings.queue_limit, settings.switch_wait_s)
        self.conversation_locks = KeyedLocks()
        self.turns: dict[str, RunningTurn] = {}  # the running turn of each conversation
        # Shares nothing until start() applies the settings; /roots replaces it.
        self.tool_policy = tools.ToolPolicy()
        self.mcp = McpHub(settings.mcp_config_file, settings.log_dir, settings.mcp_call_timeout_s)
        self.engine = ChatEngine(
            self.http,
            self.store,
            settings.llama_base_url,
            settings.max_tool_iterations,
            lambda: self.tool_policy,
            self.mcp,
        )
        self.system_prompt = config.DEFAULT_SYSTEM_PROMPT
        self.tools_enabled = True
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
                self.tool_policy = await asyncio.to_thread(self.tool_policy.with_roots, saved_roots)
            except ValueError as exc:
                log.warning("ignoring saved tool roots: %s", exc)
        await self.manager.detect_devices()
        source = self.model_source(self.settings.default_model)
        # The port opens while the first model loads (or downloads): /health says
        # "loading" and requests wait for it. The task enters that state before its first
        # pause, so before the server can take a request.
        self._first_load = asyncio.create_task(self._load_first_model(source))

    async def _load_first_model(self, source: ModelSource) -> None:
        try:
            await self.manager.start(source)
        except LlamaStartError as exc:
            # Stay up: /health shows the reason and a switch to another model can fix it.
            log.error("could not start llama-server: %s", exc)
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
        await self.manager.close()
        await self.http.aclose()
        await self.store.close()

    # --- models ----------------------------------------------------------------------

    def model_source(self, key: str) -> ModelSource:
        try:
            return config.get_model_source(self.settings, key)
        except KeyError:
            known = ", ".join(sorted(config.get_all_models(self.settings)))
            raise ModelNotFound(f"unknown model {key!r}; known models: {known}") from None

    def list_models(self) -> list[ModelInfo]:
        """Every model with its file state; called in a worker thread (it stats files)."""
        current = self.manager.model_key
        infos = []
        for key, entry in config.get_all_models(self.settings).items():
            path = config.model_path(self.settings, entry)
            exists = bool(path and path.is_file())
            infos.append(
                ModelInfo(
                    key=key,
                    name=entry.get("name", key),
                    description=entry.get("description"),
                    exists=exists,
                    size_bytes=path.stat().st_size if exists and path else None,
                    is_finetuned=bool(entry.get("is_finetuned")),
                    recommended=bool(entry.get("recommended")),
                    current=key == current,
                    context_length=entry.get("context_length"),
                    hf_repo=entry.get("hf_repo"),
                    usage=entry.get("usage"),
                    base_model=entry.get("base_model"),
                )
            )
        return infos

    async def switch_model(self, key: str) -> tuple[str | None, float]:
        """Swap llama-server to another model once running generations are done.

        Fails fast (before stopping anything) for an unknown key, a missing file or a
        failed download; if the new model does not load, the previous one is brought
        back."""
        source = await asyncio.to_thread(self._loadable_source, key)
        if source.kind == "huggingface":
            # Downloading first keeps the current model serving meanwhile; only a
            # complete download stops it, and a failed one leaves it running.
            try:
                source = await self.manager.download_ahead(source)
            except DownloadFailed as exc:
                current = self.manager.model
                still = f"; {current.key} is still serving" if current else ""
                raise DownloadFailed(f"{exc}{still}") from exc
        return await self.restart_llama(source)

    def _loadable_source(self, key: str) -> ModelSource:
        """The model's source, or why it cannot load (runs in a thread: it stats files)."""
        source = self.model_source(key)
        if source.kind != "huggingface" and not (source.path and source.path.is_file()):
            raise ModelFileMissing(
                f"model {key!r} has no file at {source.path}; put the GGUF there "
                "(make models fetches the bundled ones)"
            )
        return source

    async def restart_llama(
        self, source: ModelSource | None = None, **manager_settings: int
    ) -> tuple[str | None, float]:
        """Restart llama-server under the exclusive gate, with a new model and/or new
        manager settings (n_gpu_layers, n_ctx_limit); on failure everything is put back."""
        async with self._switch_lock, self.gate.exclusive():
            previous = self.manager.model
            old_settings = {name: getattr(self.manager, name) for name in manager_settings}
            for name, value in manager_settings.items():
                setattr(self.manager, name, value)
            started = time.perf_counter()
            try:
                await self.manager.restart(source)
            except LlamaStartError as exc:
                for name, value in old_settings.items():
                    setattr(self.manager, name, value)
                if previous is None:
                    raise SwitchFailed(str(exc)) from exc
                try:
                    await self.manager.restart(previous)
                except LlamaStartError as again:
                    raise SwitchFailed(
                        f"{exc}; restoring {previous.key} also failed: {again}"
                    ) from again
                raise SwitchFailed(f"{exc}; {previous.key} was restored") from exc
            if source is not None and (previous is None or source.key != previous.key):
                self.engine.counter.clear()
            return (previous.key if previous else None), time.perf_counter() - started

    # --- chat ------------------------------------------------------------------------

    @asynccontextmanager
    async def generation(self) -> AsyncIterator[None]:
        """Admission for anything that generates: a queue place, no switch running, and
        llama-server serving (waiting, bounded, while it loads or restarts)."""
        async with self.gate.generation():
            await self.manager.wait_until_serving(self.settings.switch_wait_s)
            yield

    def token_budget(self, max_tokens: int) -> int:
        n_ctx = self.manager.n_ctx
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
        budget = self.token_budget(request.max_tokens or GENERATION_DEFAULTS["max_tokens"])

        async def build(stored: StoredConversation) -> tuple[TurnRecord, AsyncIterator[Event]]:
            incoming = [m.model_dump(exclude_none=True) for m in request.messages]
            merged = merge_messages(stored.messages, incoming)
            if not merged.new_messages:
                raise BadRequest("the request holds no new message after the stored history")
            own = request.system_prompt or merged.system_prompt or stored.system_prompt
            record = self._record(request.conversation_id, stored, len(stored.messages), own)
            record.retire(stored.pending, SUPERSEDED_BY_MESSAGE, answer=True)
            record.add_input(merged.new_messages)
            return record, await self._generate(record, request, budget)

        return await self._begin(request.conversation_id, build)

    async def start_regeneration(
        self, conversation_id: str, request: GenerationOptions
    ) -> RunningTurn:
        """Answer the last user message again, replacing the answer (and its tool calls)
        that followed it; the old answer stays if the new one fails before any output."""
        budget = self.token_budget(request.max_tokens or GENERATION_DEFAULTS["max_tokens"])

        async def build(stored: StoredConversation) -> tuple[TurnRecord, AsyncIterator[Event]]:
            if not stored.exists:
                raise ConversationNotFound(f"no conversation {conversation_id!r}")
            users = [i for i, m in enumerate(stored.messages) if m.get("role") == "user"]
            if not users:
                raise BadRequest(f"conversation {conversation_id!r} has no message to answer")
            own = request.system_prompt or stored.system_prompt
            record = self._record(conversation_id, stored, users[-1] + 1, own)
            record.retire(stored.pending, SUPERSEDED_BY_REGENERATION, answer=False)
            return record, await self._generate(record, request, budget)

        return await self._begin(conversation_id, build)

    async def start_approval(self, request: ApprovalRequest) -> RunningTurn:
        """Resume a turn paused for approval, with the person's decision."""
        conversation_id = request.conversation_id

        async def build(stored: StoredConversation) -> tuple[TurnRecord, AsyncIterator[Event]]:
            wanted = request.approval_id
            pending = next((p for p in stored.pending if p.approval_id == wanted), None)
            if pending is None:
                raise ApprovalGone(
                    f"no pending approval {request.approval_id!r} in conversation "
                    f"{conversation_id!r} (already decided, superseded by a new message, "
                    "or never asked)"
                )
            options = pending.state["options"]
            budget = self.token_budget(int(options["sampling"]["max_tokens"]))
            record = TurnRecord(
                conversation_id=conversation_id,
                stored=stored.messages,
                keep=len(stored.messages),
                system_prompt=options["system_prompt"],
                own_prompt=stored.system_prompt,
            )
            events = self.engine.resume(record, pending, request.approve, request.stream, budget)
            return record, events

        return await self._begin(conversation_id, build)

    async def _begin(self, conversation_id: str, build: TurnBuilder) -> RunningTurn:
        """Wait for the conversation, take an admission place, read the conversation and
        build the turn; the turn then owns the lock and the place until it is stored."""
        resources = contextlib.AsyncExitStack()
        try:
            await resources.enter_async_context(self.conversation_locks.hold(conversation_id))
            await resources.enter_async_context(self.generation())
            stored = await self.store.load_conversation(conversation_id)
            record, events = await build(stored)
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
        self, record: TurnRecord, request: GenerationOptions, budget: int
    ) -> AsyncIterator[Event]:
        """The agent loop for a new answer, after checking what would only fail later: a
        conversation that cannot fit, a forced tool that does not exist."""
        opts = self._options(record, request)
        await self.engine.prompt(record, opts, budget)
        return self.engine.run(record, opts, TurnStats(), budget)

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

    async def delete_conversation(self, conversation_id: str) -> bool:
        """Delete a conversation; a turn running on it is stopped and nothing of it is
        stored, so the conversation stays deleted. False when there was nothing."""
        running = self.turns.get(conversation_id)
        if running is not None:
            running.stop("the conversation was deleted", keep=False)
        async with self.conversation_locks.hold(conversation_id):
            deleted = await self.store.delete_conversation(conversation_id)
        return deleted or running is not None

    def chat_extras(self, conversation_id: str) -> dict[str, Any]:
        return {
            "conversation_id": conversation_id,
            "model_key": self.manager.model_key,
            "device": self.manager.device,
        }

    # --- pass-through ----------------------------------------------------------------

    def upstream_request(self, method: str, path: str, body: bytes) -> httpx.Request:
        return self.http.build_request(
            method,
            f"{self.settings.llama_base_url}{path}",
            content=body,
            headers={"content-type": "application/json"},
        )
