"""AI Lab's HTTP API: FastAPI in front of a supervised llama-server.

Run: ``python ai_server.py`` (or ``make run``). Endpoints are documented in README.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from sse_starlette import EventSourceResponse

from ailab import exports
from ailab.agent.engine import ApprovalGone, Event, TurnStats
from ailab.agent.token_budget import ContextOverflow
from ailab.api import llama_routes
from ailab.api.schemas import (
    ApprovalRequest,
    AuditResponse,
    ChatRequest,
    ChatResponse,
    CommandRequest,
    CommandResponse,
    ConversationResponse,
    ConversationsResponse,
    ConversationSummaryOut,
    DownloadInfo,
    HealthResponse,
    LoadResponse,
    ModelRequest,
    ModelsResponse,
    StatusResponse,
    SwitchRequest,
    SwitchResponse,
    UnloadResponse,
)
from ailab.bench.model_speed import ModelBenchError
from ailab.commands import COMMANDS, CommandError
from ailab.config import GENERATION_DEFAULTS, ConfigError, ModelSource, Settings, load_settings
from ailab.gateway import Gateway, ModelFileMissing, ModelNotFound, SwitchFailed
from ailab.upstream import proxy
from ailab.upstream.admission import Overloaded, SwitchTimeout
from ailab.upstream.pool import Instance, PoolRefused
from ailab.upstream.supervisor import LlamaStartError, LlamaUnavailable, ManagerState

log = logging.getLogger("ailab.server")


def find_llama_server(settings: Settings) -> Path:
    if settings.llama_server_path:
        return settings.llama_server_path
    on_path = shutil.which("llama-server")
    if on_path:
        return Path(on_path)
    cached = sorted(Path.home().glob(".cache/ailab/llama-server/*/llama-server"))
    if cached:
        return cached[-1]
    raise ConfigError(
        "no llama-server found: run `make setup`, set LLAMA_SERVER_PATH, "
        "or put llama-server on PATH"
    )


def create_app(settings: Settings, binary: Path) -> FastAPI:
    gateway = Gateway(settings, binary)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await gateway.start()
        try:
            yield
        finally:
            await gateway.close()

    app = FastAPI(title="AI Lab", version="0.1.0", lifespan=lifespan)
    app.state.gateway = gateway
    _install_error_handlers(app)
    _add_status_routes(app, gateway)
    _add_chat_routes(app, gateway)
    _add_conversation_routes(app, gateway)
    llama_routes.add_routes(app, gateway)
    return app


def _install_error_handlers(app: FastAPI) -> None:
    """Known failures become 4xx/5xx with a message that says what to do."""
    statuses: dict[type[Exception], int] = {
        ModelNotFound: 404,
        ApprovalGone: 404,
        ModelFileMissing: 400,
        ContextOverflow: 400,
        CommandError: 400,
        ValueError: 400,
        SwitchTimeout: 503,
        LlamaUnavailable: 503,
        SwitchFailed: 500,
        LlamaStartError: 500,
        ModelBenchError: 502,
    }
    for exc_type, status in statuses.items():

        async def handler(_: Request, exc: Exception, status: int = status) -> JSONResponse:
            return JSONResponse({"detail": str(exc)}, status_code=status)

        app.add_exception_handler(exc_type, handler)

    async def overloaded(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(
            {"detail": f"server busy: {exc}; retry shortly"},
            status_code=429,
            headers={"Retry-After": "1"},
        )

    async def with_status(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, proxy.UpstreamError | PoolRefused)
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    app.add_exception_handler(Overloaded, overloaded)
    app.add_exception_handler(proxy.UpstreamError, with_status)
    app.add_exception_handler(PoolRefused, with_status)


# --- status and models -------------------------------------------------------------------


def _add_status_routes(app: FastAPI, gw: Gateway) -> None:
    @app.get("/health", response_model=HealthResponse)
    async def health() -> JSONResponse:
        manager = gw.manager
        download = manager.download.model_dump() if manager.download else None
        residents = await asyncio.to_thread(gw.resident_status)
        # The default model unloaded for idling or for room is not a fault: the next
        # request loads it again.
        unloaded = manager.state == ManagerState.STOPPED
        body = HealthResponse(
            status="ok" if unloaded else manager.health_status,  # type: ignore[arg-type]
            model_key=manager.model.key if manager.model else None,
            model_name=manager.model.name if manager.model else None,
            device=manager.device,
            pid=manager.pid,
            restarts=manager.restarts,
            uptime_s=manager.uptime_s,
            message=manager.message,
            download=DownloadInfo(**download) if download else None,
            n_ctx=gw.pool.n_ctx_for(gw.default_instance.source),
            parallel=gw.settings.parallel,
            memory_budget_mb=gw.pool.budget_mb,
            memory_used_mb=round(sum(i.cost_mb for i in gw.pool.resident()), 1),
            max_loaded_models=gw.pool.max_models,
            models=residents,
        )
        status = 200 if body.status == "ok" else 503
        return JSONResponse(body.model_dump(), status_code=status)

    @app.get("/models", response_model=ModelsResponse)
    async def models() -> ModelsResponse:
        infos = await asyncio.to_thread(gw.list_models)
        return ModelsResponse(
            current=gw.default_model,
            memory_budget_mb=gw.pool.budget_mb,
            max_loaded_models=gw.pool.max_models,
            models=infos,
        )

    @app.post("/models/load", response_model=LoadResponse)
    async def load_model(request: ModelRequest) -> LoadResponse:
        instance = await gw.load_model(request.model)
        status = await asyncio.to_thread(gw.instance_status, instance.source, instance.purpose)
        return LoadResponse(status="ok", model=status)

    @app.post("/models/unload", response_model=UnloadResponse)
    async def unload_model(request: ModelRequest) -> UnloadResponse:
        return UnloadResponse(status="ok", unloaded=await gw.unload_model(request.model))

    @app.post("/model/switch", response_model=SwitchResponse)
    async def switch(request: SwitchRequest) -> SwitchResponse:
        previous, seconds = await gw.switch_model(request.model_key)
        return SwitchResponse(
            status="ok",
            model_key=request.model_key,
            previous_model_key=previous,
            load_time_s=round(seconds, 3),
            message=f"{request.model_key} is loaded on {gw.manager.device}",
        )

    @app.post("/command", response_model=CommandResponse)
    async def command(request: CommandRequest) -> CommandResponse:
        handler = COMMANDS.get(request.command.strip().lower())
        if handler is None:
            raise HTTPException(
                400,
                f"unknown command {request.command!r}; commands: {', '.join(sorted(COMMANDS))}",
            )
        message, value = await handler(gw, request.value, request.conversation_id)
        return CommandResponse(status="ok", command=request.command, message=message, value=value)

    @app.get("/tools/audit", response_model=AuditResponse)
    async def tool_audit(
        limit: int = Query(100, ge=1, le=1000), conversation_id: str | None = None
    ) -> AuditResponse:
        records = await gw.store.list_tool_audit(limit, conversation_id)
        return AuditResponse(records=[r.model_dump(mode="json") for r in records])

    @app.post("/shutdown", response_model=StatusResponse)
    async def shutdown() -> StatusResponse:
        # SIGTERM runs uvicorn's graceful exit, which runs the lifespan's clean-up.
        asyncio.get_running_loop().call_later(0.1, os.kill, os.getpid(), signal.SIGTERM)
        return StatusResponse(status="ok")


# --- chat --------------------------------------------------------------------------------


def _add_chat_routes(app: FastAPI, gw: Gateway) -> None:
    @app.post("/chat", response_model=ChatResponse)
    async def chat(request: ChatRequest) -> Response:
        max_tokens = request.max_tokens or GENERATION_DEFAULTS["max_tokens"]
        source = await gw.chat_source(request.conversation_id, request.model)
        budget = gw.token_budget(source, max_tokens)

        async def events(instance: Instance) -> AsyncIterator[Event]:
            async with gw.conversation_locks.hold(request.conversation_id):
                opts = await gw.prepare_turn(request, source.key)
                if opts is None:
                    yield "done", {**TurnStats().summary(), "response": ""}
                    return
                async for event in gw.engine_for(instance).run(opts, TurnStats(), budget):
                    yield event

        return await _respond(gw, source, events, request.conversation_id, request.stream)

    @app.post("/chat/approve", response_model=ChatResponse)
    async def approve(request: ApprovalRequest) -> Response:
        pending = await gw.store.get_pending_approval(request.conversation_id, request.approval_id)
        if pending is None:
            raise HTTPException(
                404,
                f"no pending approval {request.approval_id!r} in conversation "
                f"{request.conversation_id!r} (already decided, or never asked)",
            )
        max_tokens = int(pending.state["options"]["sampling"]["max_tokens"])
        source = await gw.chat_source(request.conversation_id, None)
        budget = gw.token_budget(source, max_tokens)

        async def events(instance: Instance) -> AsyncIterator[Event]:
            async with gw.conversation_locks.hold(request.conversation_id):
                async for event in gw.engine_for(instance).resume(
                    pending, request.approve, request.stream, budget
                ):
                    yield event

        return await _respond(gw, source, events, request.conversation_id, request.stream)


Turn = Callable[[Instance], AsyncIterator[Event]]


async def _respond(
    gw: Gateway, source: ModelSource, turn: Turn, conversation_id: str, stream: bool
) -> Response:
    """Run a turn on the model's instance, held for as long as the turn runs."""
    if stream:
        return EventSourceResponse(_sse(gw, source, turn, conversation_id), ping=15)
    final: dict[str, Any] = {}
    async with gw.generation(source) as instance:
        async for name, data in turn(instance):
            if name == "done":
                final = data
    return JSONResponse(
        ChatResponse(**final, **gw.chat_extras(instance, conversation_id)).model_dump()
    )


async def _sse(
    gw: Gateway, source: ModelSource, turn: Turn, conversation_id: str
) -> AsyncIterator[dict]:
    """Events as SSE; a failure mid-stream becomes an `error` event and a clean close.
    A client that disconnects cancels this generator, which closes the upstream stream."""
    try:
        async with gw.generation(source) as instance:
            extras = gw.chat_extras(instance, conversation_id)
            async for name, data in turn(instance):
                if name == "done":
                    data = ChatResponse(**data, **extras).model_dump()
                yield {"event": name, "data": json.dumps(data)}
    except (
        ApprovalGone,
        proxy.UpstreamError,
        ContextOverflow,
        ValueError,
        Overloaded,
        SwitchTimeout,
        LlamaUnavailable,
        LlamaStartError,
        PoolRefused,
    ) as exc:
        yield {"event": "error", "data": json.dumps({"error": str(exc)})}
    except httpx.HTTPError as exc:
        yield {"event": "error", "data": json.dumps({"error": f"llama-server: {exc}"})}


# --- conversations -----------------------------------------------------------------------


def _add_conversation_routes(app: FastAPI, gw: Gateway) -> None:
    @app.get("/conversations", response_model=ConversationsResponse)
    async def list_conversations() -> ConversationsResponse:
        summaries = await gw.store.list_conversations()
        return ConversationsResponse(
            conversations=[ConversationSummaryOut(**s.model_dump(mode="json")) for s in summaries]
        )

    @app.get("/conversations/export")
    async def export_all(
        format: str = Query("jsonl", pattern="^(jsonl|json|text)$"), tools: bool = True
    ) -> Response:
        ids = [s.id for s in await gw.store.list_conversations()]
        conversations = {cid: await gw.store.get_messages(cid) for cid in ids}
        return _export_response(conversations, format, tools, gw.system_prompt)

    @app.get("/conversations/{conversation_id}", response_model=ConversationResponse)
    async def get_conversation(conversation_id: str) -> ConversationResponse:
        if not await gw.store.conversation_exists(conversation_id):
            raise HTTPException(404, f"no conversation {conversation_id!r}")
        messages = await gw.store.get_messages(conversation_id)
        return ConversationResponse(id=conversation_id, messages=messages)

    @app.delete("/conversations/{conversation_id}", response_model=StatusResponse)
    async def delete_conversation(conversation_id: str) -> StatusResponse:
        if not await gw.store.delete_conversation(conversation_id):
            raise HTTPException(404, f"no conversation {conversation_id!r}")
        return StatusResponse(status="ok")

    @app.get("/conversations/{conversation_id}/export")
    async def export_one(
        conversation_id: str,
        format: str = Query("jsonl", pattern="^(jsonl|json|text)$"),
        tools: bool = True,
    ) -> Response:
        if not await gw.store.conversation_exists(conversation_id):
            raise HTTPException(404, f"no conversation {conversation_id!r}")
        messages = await gw.store.get_messages(conversation_id)
        return _export_response({conversation_id: messages}, format, tools, gw.system_prompt)


def _export_response(
    conversations: dict[str, list[dict[str, Any]]], fmt: str, tools: bool, system_prompt: str
) -> Response:
    body = exports.export_conversations(fmt, conversations, system_prompt, tools)
    media = "application/json" if fmt == "json" else "text/plain"
    return PlainTextResponse(body, media_type=media)


# --- entry point -------------------------------------------------------------------------


def main() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per proxied request is noise
    try:
        settings = load_settings()
        binary = find_llama_server(settings)
    except ConfigError as exc:
        print(f"ai_server: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    app = create_app(settings, binary)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning")


if __name__ == "__main__":
    main()
