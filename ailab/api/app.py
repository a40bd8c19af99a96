"""AI Lab's HTTP API: FastAPI in front of a supervised llama-server.

Run: ``python ai_server.py`` (or ``make run``). Endpoints are documented in README.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.telemetry import TelemetryConfig
from prometheus_client import CONTENT_TYPE_LATEST
from sse_starlette import EventSourceResponse
from starlette.types import Scope

from ailab import exports, metrics, web
from ailab.agent.engine import TurnStats
from ailab.agent.turn import RunningTurn
from ailab.api import conversation_meta, llama_routes, security, serve
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
    GenerationOptions,
    HealthResponse,
    KvCacheStatus,
    LoadResponse,
    ModelRequest,
    ModelsResponse,
    PublicHealthResponse,
    StatusResponse,
    SwitchRequest,
    SwitchResponse,
    UnloadResponse,
)
from ailab.commands import COMMANDS
from ailab.config import ConfigError, Settings, load_settings
from ailab.errors import AilabError, NotFound, described, json_body, sse_event
from ailab.gateway import Gateway
from ailab.mcp import server as mcp_server
from ailab.storage import StorageError
from ailab.upstream import binaries
from ailab.upstream.supervisor import ManagerState

log = logging.getLogger("ailab.server")

# On SIGTERM (or /shutdown) running requests get this long to finish; then they are
# cancelled, and a turn cut short is stored as interrupted, so a long generation cannot
# hold the shutdown up.
SHUTDOWN_GRACE_S = 5


def create_app(settings: Settings, binary: Path) -> FastAPI:
    gateway = Gateway(settings, binary)

    access_log = None
    if settings.metrics:
        access_log = metrics.AccessLog(settings.log_dir, settings.access_log_console)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await gateway.start()
        # What exists now (modules, routes, schemas) lives as long as the process: out of
        # the collector's sight, a full collection stops walking it. About 0.1 ms of CPU
        # less per request (scripts/compare_gateways.py).
        gc.freeze()
        try:
            yield
        finally:
            await gateway.close()
            if access_log is not None:
                access_log.stop()

    # FastAPI's OpenTelemetry is off: the gateway has its own metrics (/metrics), and
    # left on it looks up the global providers on every request.
    telemetry: TelemetryConfig = {"tracing": False, "metrics": False, "logs": False}
    app = FastAPI(title="AI Lab", version="0.1.0", lifespan=lifespan, telemetry=telemetry)
    app.state.gateway = gateway
    security.install(app, settings)
    if access_log is not None:
        # Outermost, so that requests the boundary refuses are counted and logged too.
        app.add_middleware(
            metrics.MetricsMiddleware, metrics=gateway.metrics, access_log=access_log
        )
    _install_error_handlers(app)
    # First: routes are matched in order, and these carry the most requests.
    llama_routes.add_routes(app, gateway)
    _add_status_routes(app, gateway)
    _add_chat_routes(app, gateway)
    app.include_router(conversation_meta.router)  # before /conversations/{id}
    _add_conversation_routes(app, gateway)
    app.include_router(web.router)
    mcp_server.mount(app, gateway)
    return app


def _install_error_handlers(app: FastAPI) -> None:
    """Known failures become 4xx/5xx with a message that says what to do."""

    async def known_failure(_: Request, exc: Exception) -> JSONResponse:
        error = described(exc)
        return JSONResponse(json_body(error), status_code=error.status, headers=error.headers)

    app.add_exception_handler(AilabError, known_failure)
    app.add_exception_handler(httpx.HTTPError, known_failure)


# --- status and models -------------------------------------------------------------------


def _add_status_routes(app: FastAPI, gw: Gateway) -> None:
    @app.get("/health", response_model=HealthResponse | PublicHealthResponse)
    async def health() -> JSONResponse:
        manager = gw.manager
        health_status = manager.health_status
        if manager.state == ManagerState.STOPPED:
            # The default model unloaded for idling or for room is not a fault (the next
            # request loads it again); before its first load has begun, it is loading.
            health_status = "loading" if gw.starting else "ok"
        status = 200 if health_status == "ok" else 503
        if not security.current_caller().authorized:
            # Open without a key so monitors work; the details are for key holders.
            public = PublicHealthResponse(status=health_status)  # type: ignore[arg-type]
            return JSONResponse(public.model_dump(), status_code=status)
        # A switch downloads into the new model's instance while the default serves.
        downloading = [i.manager.download for i in gw.pool.instances.values()]
        progress = manager.download or next((d for d in downloading if d), None)
        download = progress.model_dump() if progress else None
        residents = await asyncio.to_thread(gw.resident_status)
        body = HealthResponse(
            status=health_status,  # type: ignore[arg-type]
            model_key=manager.model_key,
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
            kv_cache=KvCacheStatus(**gw.kv.status()),
        )
        return JSONResponse(body.model_dump(), status_code=status)

    @app.get("/models", response_model=ModelsResponse)
    async def models() -> ModelsResponse:
        infos = await asyncio.to_thread(gw.list_models)
        return ModelsResponse(
            current=gw.default_model,
            memory_budget_mb=gw.pool.budget_mb,
            max_loaded_models=gw.pool.max_models,
            models=infos,
            refused_adapters=await asyncio.to_thread(gw.refused_adapters),
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

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus_metrics() -> PlainTextResponse:
        if not gw.settings.metrics:
            raise NotFound("metrics are off (AILAB_METRICS=0)")
        return PlainTextResponse(await gw.metrics_text(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/shutdown", response_model=StatusResponse)
    async def shutdown() -> StatusResponse:
        # SIGTERM runs uvicorn's graceful exit, which runs the lifespan's clean-up.
        asyncio.get_running_loop().call_later(0.1, os.kill, os.getpid(), signal.SIGTERM)
        return StatusResponse(status="ok")


# --- chat --------------------------------------------------------------------------------


def _add_chat_routes(app: FastAPI, gw: Gateway) -> None:
    @app.post("/chat", response_model=ChatResponse)
    async def chat(request: ChatRequest, http: Request) -> Response:
        if not request.messages:
            await gw.reset_conversation(request.conversation_id)
            return _reset_response(gw, request.conversation_id, request.stream)
        turn = await gw.start_chat(request)
        return await _respond(gw, http.scope, turn, request.conversation_id, request.stream)

    @app.post("/chat/approve", response_model=ChatResponse)
    async def approve(request: ApprovalRequest, http: Request) -> Response:
        turn = await gw.start_approval(request)
        return await _respond(gw, http.scope, turn, request.conversation_id, request.stream)

    @app.post("/conversations/{conversation_id}/regenerate", response_model=ChatResponse)
    async def regenerate(
        conversation_id: str, request: GenerationOptions, http: Request
    ) -> Response:
        turn = await gw.start_regeneration(conversation_id, request)
        return await _respond(gw, http.scope, turn, conversation_id, request.stream)


def _reset_response(gw: Gateway, conversation_id: str, stream: bool) -> Response:
    body = ChatResponse(
        **{**TurnStats().summary(), "response": ""}, **gw.chat_extras(None, conversation_id)
    ).model_dump()
    if stream:
        return EventSourceResponse(iter([{"event": "done", "data": json.dumps(body)}]))
    return JSONResponse(body)


async def _respond(
    gw: Gateway, scope: Scope, turn: RunningTurn, conversation_id: str, stream: bool
) -> Response:
    """The turn was admitted: stream its events, or collect them into one response."""
    if stream:
        return EventSourceResponse(_sse(gw, scope, turn, conversation_id), ping=15)
    final: dict[str, Any] = {}
    async for name, data in turn.events():
        if name == "done":
            final = data
    return JSONResponse(_finished(gw, scope, turn, conversation_id, final))


def _finished(
    gw: Gateway, scope: Scope, turn: RunningTurn, conversation_id: str, stats: dict[str, Any]
) -> dict[str, Any]:
    """The turn's response body, named after the model that served it (known only at
    the end: a switch may run meanwhile); its figures go to the metrics."""
    model = turn.record.model_key
    gw.metrics.record_chat_usage(model or "", stats)
    metrics.note(
        scope,
        model=model,
        conversation_id=conversation_id,
        tokens_input=stats.get("tokens_input"),
        tokens_output=stats.get("tokens_generated"),
    )
    return ChatResponse(**stats, **gw.chat_extras(model, conversation_id)).model_dump()


async def _sse(
    gw: Gateway, scope: Scope, turn: RunningTurn, conversation_id: str
) -> AsyncIterator[dict]:
    """Events as SSE; a failure mid-stream becomes an `error` event and a clean close.
    A client that disconnects cancels this generator, which stops the turn."""
    try:
        async for name, data in turn.events():
            if name == "done":
                data = _finished(gw, scope, turn, conversation_id, data)
            elif name == "delta":
                metrics.first_token(scope)
            yield {"event": name, "data": json.dumps(data)}
    except Exception as exc:  # the 200 is sent; the reason must still reach the client
        if not isinstance(exc, AilabError | httpx.HTTPError):
            log.exception("turn failed")
        yield sse_event(described(exc))


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
        format: str = Query("jsonl", pattern="^(jsonl|json|text)$"),
        tools: bool = True,
        interrupted: bool = False,
    ) -> Response:
        ids = [s.id for s in await gw.store.list_conversations()]
        return await _export_response(gw, ids, format, tools, interrupted)

    @app.get("/conversations/{conversation_id}", response_model=ConversationResponse)
    async def get_conversation(conversation_id: str) -> ConversationResponse:
        stored = await gw.store.load_conversation(conversation_id)
        if not stored.exists:
            raise HTTPException(404, f"no conversation {conversation_id!r}")
        return ConversationResponse(
            id=conversation_id,
            messages=stored.messages,
            system_prompt=stored.used_system_prompt,
        )

    @app.delete("/conversations/{conversation_id}", response_model=StatusResponse)
    async def delete_conversation(conversation_id: str) -> StatusResponse:
        if not await gw.delete_conversation(conversation_id):
            raise HTTPException(404, f"no conversation {conversation_id!r}")
        return StatusResponse(status="ok")

    @app.get("/conversations/{conversation_id}/export")
    async def export_one(
        conversation_id: str,
        format: str = Query("jsonl", pattern="^(jsonl|json|text)$"),
        tools: bool = True,
        interrupted: bool = False,
    ) -> Response:
        if not gw.store.conversation_exists(conversation_id):
            raise HTTPException(404, f"no conversation {conversation_id!r}")
        return await _export_response(gw, [conversation_id], format, tools, interrupted)


async def _export_response(
    gw: Gateway, ids: list[str], fmt: str, tools: bool, interrupted: bool
) -> Response:
    """Each conversation with the system prompt it was generated with (the default for
    conversations stored before prompts were kept)."""
    conversations, prompts = {}, {}
    for cid in ids:
        stored = await gw.store.load_conversation(cid)
        conversations[cid] = stored.messages
        prompts[cid] = stored.used_system_prompt or gw.system_prompt
    body = exports.export_conversations(
        fmt, conversations, prompts, tools, include_interrupted=interrupted
    )
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
        binary = binaries.find_llama_server(settings)
    except ConfigError as exc:
        print(f"ai_server: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        app = create_app(settings, binary)
    except StorageError as exc:
        print(f"ai_server: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    serve.run(
        uvicorn.Config(
            app,
            host=settings.host,
            port=settings.port,
            log_level="warning",
            # Ours is metrics.AccessLog. uvicorn's, though silent at "warning", still
            # formats its arguments (client address, quoted path) for every response.
            access_log=False,
            # uvicorn trusts X-Forwarded-For from 127.0.0.1 by default: any local program
            # could then name another client in the audit of who changed the tool roots.
            proxy_headers=False,
            http=serve.HttpProtocol,
            timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
        )
    )


if __name__ == "__main__":
    main()
