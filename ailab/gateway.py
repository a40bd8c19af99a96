"""The gateway's runtime: the supervised llama-server, the store, the engine and the rules
about who may generate when. The HTTP layer (ai_server.py) only translates to and from it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx

from ailab import config, tools
from ailab.agent.engine import ChatEngine, TurnOptions
from ailab.api.schemas import ChatRequest, ModelInfo
from ailab.config import GENERATION_DEFAULTS, ModelSource, Settings
from ailab.errors import AilabError, BadRequest, NotFound
from ailab.finetune.service import FinetuneService
from ailab.storage import AsyncStore, merge_messages
from ailab.upstream import proxy
from ailab.upstream.admission import GenerationGate, KeyedLocks
from ailab.upstream.supervisor import LlamaServerManager, LlamaStartError

log = logging.getLogger("ailab.gateway")


class ModelNotFound(NotFound):
    """No model is registered or discovered under this key."""


class ModelFileMissing(BadRequest):
    """The model is registered but its file is not on disk."""


class SwitchFailed(AilabError):
    """The new model failed to load; the message says whether the old one came back."""


class Gateway:
    def __init__(self, settings: Settings, binary: Path) -> None:
        self.settings = settings
        self.http, transport = proxy.make_client()
        self.store = AsyncStore(settings.database_path)
        self.manager = LlamaServerManager(settings, binary, self.http, transport)
        self.gate = GenerationGate(settings.parallel + settings.queue_limit, settings.switch_wait_s)
        self.conversation_locks = KeyedLocks()
        # Shares nothing until start() applies the settings; /roots replaces it.
        self.tool_policy = tools.ToolPolicy()
        self.engine = ChatEngine(
            self.http,
            self.store,
            settings.llama_base_url,
            settings.max_tool_iterations,
            lambda: self.tool_policy,
        )
        self.system_prompt = config.DEFAULT_SYSTEM_PROMPT
        self.tools_enabled = True
        self.finetune = FinetuneService(settings)
        self._switch_lock = asyncio.Lock()

    # --- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
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
        try:
            await self.manager.start(self.model_source(self.settings.default_model))
        except LlamaStartError as exc:
            # Stay up: /health shows the reason and a switch to another model can fix it.
            log.error("could not start llama-server: %s", exc)

    async def close(self) -> None:
        await self.finetune.close()
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

        Fails fast (before stopping anything) for an unknown key or a missing file; if
        the new model does not load, the previous one is brought back."""
        source = await asyncio.to_thread(self._loadable_source, key)
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

    async def prepare_turn(self, request: ChatRequest) -> TurnOptions | None:
        """Store the request's new messages; None when it was a reset (empty messages)."""
        conversation_id = request.conversation_id
        if not request.messages:
            await self.store.reset_conversation(conversation_id)
            return None
        stored = await self.store.get_messages(conversation_id)
        incoming = [m.model_dump(exclude_none=True) for m in request.messages]
        merged = merge_messages(stored, incoming)
        if not merged.new_messages:
            raise BadRequest("the request holds no new message after the stored history")
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
