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
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from sse_starlette import EventSourceResponse
from starlette.types import Receive, Scope, Send

from ailab import exports, web
from ailab.agent.engine import ApprovalGone, Event, TurnStats
from ailab.agent.token_budget import ContextOverflow
from ailab.api import conversation_meta
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
    ModelsResponse,
    StatusResponse,
    SwitchRequest,
    SwitchResponse,
)
from ailab.bench.model_speed import ModelBenchError
from ailab.commands import COMMANDS, CommandError
from ailab.config import GENERATION_DEFAULTS, ConfigError, Settings, load_settings
from ailab.gateway import Gateway, ModelFileMissing, ModelNotFound, SwitchFailed
from ailab.upstream import proxy
from ailab.upstream.admission import Overloaded, SwitchTimeout
from ailab.upstream.supervisor import LlamaStartError, LlamaUnavailable

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
    app.include_router(conversation_meta.router)  # before /conversations/{id}
    _add_conversation_routes(app, gateway)
    app.include_router(web.router)
    _add_openai_routes(app, gateway)
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

    async def upstream_failed(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, proxy.UpstreamError)
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    app.add_exception_handler(Overloaded, overloaded)
    app.add_exception_handler(proxy.UpstreamError, upstream_failed)


# --- status and models -------------------------------------------------------------------


def _add_status_routes(app: FastAPI, gw: Gateway) -> None:
    @app.get("/health", response_model=HealthResponse)
    async def health() -> JSONResponse:
        manager = gw.manager
        download = manager.download.model_dump() if manager.download else None
        body = HealthResponse(
            status=manager.health_status,  # type: ignore[arg-type]
            model_key=manager.model.key if manager.model else None,
            model_name=manager.model.name if manager.model else None,
            device=manager.device,
            pid=manager.pid,
            restarts=manager.restarts,
            uptime_s=manager.uptime_s,
            message=manager.message,
            download=DownloadInfo(**download) if download else None,
            n_ctx=manager.n_ctx,
            parallel=gw.settings.parallel,
        )
        status = 200 if body.status == "ok" else 503
        return JSONResponse(body.model_dump(), status_code=status)

    @app.get("/models", response_model=ModelsResponse)
    async def models() -> ModelsResponse:
        infos = await asyncio.to_thread(gw.list_models)
        current = gw.manager.model.key if gw.manager.model else None
        return ModelsResponse(current=current, models=infos)

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
        budget = gw.token_budget(max_tokens)

        async def events() -> AsyncIterator[Event]:
            async with gw.generation(), gw.conversation_locks.hold(request.conversation_id):
                opts = await gw.prepare_turn(request)
                if opts is None:
                    yield "done", {**TurnStats().summary(), "response": ""}
                    return
                async for event in gw.engine.run(opts, TurnStats(), budget):
                    yield event

        return await _respond(gw, events(), request.conversation_id, request.stream)

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
        budget = gw.token_budget(max_tokens)

        async def events() -> AsyncIterator[Event]:
            async with gw.generation(), gw.conversation_locks.hold(request.conversation_id):
                async for event in gw.engine.resume(
                    pending, request.approve, request.stream, budget
                ):
                    yield event

        return await _respond(gw, events(), request.conversation_id, request.stream)


async def _respond(
    gw: Gateway, events: AsyncIterator[Event], conversation_id: str, stream: bool
) -> Response:
    extras = gw.chat_extras(conversation_id)
    if stream:
        return EventSourceResponse(_sse(events, extras), ping=15)
    final: dict[str, Any] = {}
    async for name, data in events:
        if name == "done":
            final = data
    return JSONResponse(ChatResponse(**final, **extras).model_dump())


async def _sse(events: AsyncIterator[Event], extras: dict[str, Any]) -> AsyncIterator[dict]:
    """Events as SSE; a failure mid-stream becomes an `error` event and a clean close.
    A client that disconnects cancels this generator, which closes the upstream stream."""
    try:
        async for name, data in events:
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


# --- OpenAI-compatible pass-through ------------------------------------------------------


def _add_openai_routes(app: FastAPI, gw: Gateway) -> None:
    async def forward(request: Request, path: str) -> Response:
        body = await request.body()
        wants_stream = False
        if body:
            try:
                wants_stream = bool(json.loads(body).get("stream"))
            except (ValueError, AttributeError):
                raise HTTPException(400, "the request body must be a JSON object") from None
        upstream_request = gw.upstream_request(request.method, path, body)
        if wants_stream:
            return await _forward_stream(gw, upstream_request)
        async with gw.generation():
            try:
                response = await proxy.send(gw.http, upstream_request)
            except httpx.HTTPError as exc:
                raise proxy.UpstreamError(f"llama-server is not reachable: {exc}", 503) from exc
        return Response(
            response.content,
            status_code=response.status_code,
            media_type=response.headers.get("content-type", "application/json"),
        )

    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
        app.add_api_route(path, _bind(forward, path), methods=["POST"])
    app.add_api_route("/v1/models", _bind(forward, "/v1/models"), methods=["GET"])


def _bind(forward: Any, path: str) -> Any:
    async def endpoint(request: Request) -> Response:
        return await forward(request, path)

    endpoint.__name__ = "proxy_" + path.strip("/").replace("/", "_")
    return endpoint


class _ProxiedStream(StreamingResponse):
    """llama-server's SSE bytes, passed through as they arrive. The admission slot and the
    upstream stream are released when the response ends, however it ends."""

    def __init__(self, upstream_response: httpx.Response, resources: contextlib.AsyncExitStack):
        super().__init__(
            upstream_response.aiter_raw(),
            status_code=upstream_response.status_code,
            media_type=upstream_response.headers.get("content-type", "text/event-stream"),
        )
        self._resources = resources

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with self._resources:
            await super().__call__(scope, receive, send)


async def _forward_stream(gw: Gateway, request: httpx.Request) -> Response:
    resources = contextlib.AsyncExitStack()
    try:
        await resources.enter_async_context(gw.generation())
        response = await resources.enter_async_context(proxy.stream(gw.http, request))
    except httpx.HTTPError as exc:
        await resources.aclose()
        raise proxy.UpstreamError(f"llama-server is not reachable: {exc}", 503) from exc
    except BaseException:
        await resources.aclose()
        raise
    return _ProxiedStream(response, resources)


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
