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

from ailab import exports
from ailab.agent.engine import ApprovalGone, TurnStats
from ailab.agent.token_budget import ContextOverflow
from ailab.agent.turn import Event, RunningTurn, TurnStopped
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
    ModelsResponse,
    StatusResponse,
    SwitchRequest,
    SwitchResponse,
)
from ailab.bench.model_speed import ModelBenchError
from ailab.commands import COMMANDS, CommandError
from ailab.config import ConfigError, Settings, load_settings
from ailab.gateway import (
    ConversationNotFound,
    Gateway,
    ModelFileMissing,
    ModelNotFound,
    SwitchFailed,
)
from ailab.storage import ConversationChanged, StorageError
from ailab.upstream import proxy
from ailab.upstream.admission import Overloaded, SwitchTimeout
from ailab.upstream.supervisor import DownloadFailed, LlamaStartError, LlamaUnavailable

log = logging.getLogger("ailab.server")

# On SIGTERM (or /shutdown) running requests get this long to finish; then they are
# cancelled, and a turn cut short is stored as interrupted, so a long generation cannot
# hold the shutdown up.
SHUTDOWN_GRACE_S = 5


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
    _add_openai_routes(app, gateway)
    return app


def _install_error_handlers(app: FastAPI) -> None:
    """Known failures become 4xx/5xx with a message that says what to do."""
    statuses: dict[type[Exception], int] = {
        ModelNotFound: 404,
        ApprovalGone: 404,
        ConversationNotFound: 404,
        TurnStopped: 409,
        ConversationChanged: 409,
        StorageError: 503,
        ModelFileMissing: 400,
        ContextOverflow: 400,
        CommandError: 400,
        ValueError: 400,
        SwitchTimeout: 503,
        LlamaUnavailable: 503,
        SwitchFailed: 500,
        LlamaStartError: 500,
        DownloadFailed: 502,
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
        if not request.messages:
            await gw.reset_conversation(request.conversation_id)
            return _reset_response(gw, request.conversation_id, request.stream)
        turn = await gw.start_chat(request)
        return await _respond(gw, turn, request.conversation_id, request.stream)

    @app.post("/chat/approve", response_model=ChatResponse)
    async def approve(request: ApprovalRequest) -> Response:
        turn = await gw.start_approval(request)
        return await _respond(gw, turn, request.conversation_id, request.stream)

    @app.post("/conversations/{conversation_id}/regenerate", response_model=ChatResponse)
    async def regenerate(conversation_id: str, request: GenerationOptions) -> Response:
        turn = await gw.start_regeneration(conversation_id, request)
        return await _respond(gw, turn, conversation_id, request.stream)


def _reset_response(gw: Gateway, conversation_id: str, stream: bool) -> Response:
    body = ChatResponse(
        **{**TurnStats().summary(), "response": ""}, **gw.chat_extras(conversation_id)
    ).model_dump()
    if stream:
        return EventSourceResponse(iter([{"event": "done", "data": json.dumps(body)}]))
    return JSONResponse(body)


async def _respond(gw: Gateway, turn: RunningTurn, conversation_id: str, stream: bool) -> Response:
    """The turn was admitted: stream its events, or collect them into one response."""
    extras = gw.chat_extras(conversation_id)
    if stream:
        return EventSourceResponse(_sse(turn.events(), extras), ping=15)
    final: dict[str, Any] = {}
    async for name, data in turn.events():
        if name == "done":
            final = data
    return JSONResponse(ChatResponse(**final, **extras).model_dump())


async def _sse(events: AsyncIterator[Event], extras: dict[str, Any]) -> AsyncIterator[dict]:
    """Events as SSE; a failure mid-stream becomes an `error` event and a clean close.
    A client that disconnects cancels this generator, which stops the turn."""
    try:
        async for name, data in events:
            if name == "done":
                data = ChatResponse(**data, **extras).model_dump()
            yield {"event": name, "data": json.dumps(data)}
    except Exception as exc:  # the 200 is sent; the reason must still reach the client
        if not isinstance(exc, _EXPECTED_TURN_ERRORS):
            log.exception("turn failed")
        yield {"event": "error", "data": json.dumps({"error": str(exc)})}


_EXPECTED_TURN_ERRORS = (
    ApprovalGone,
    proxy.UpstreamError,
    ContextOverflow,
    ValueError,
    Overloaded,
    SwitchTimeout,
    LlamaUnavailable,
    TurnStopped,
    StorageError,
    ConversationChanged,
)


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


# --- OpenAI-compatible pass-through ------------------------------------------------------


def _add_openai_routes(app: FastAPI, gw: Gateway) -> None:
    async def forward(request: Request, path: str) -> Response:
        body = await request.body()
        wants_stream = False
        if request.method == "POST":
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
    try:
        app = create_app(settings, binary)
    except StorageError as exc:
        print(f"ai_server: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level="warning",
        timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
    )


if __name__ == "__main__":
    main()
