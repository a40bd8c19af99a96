"""llama-server's own API, each request routed to the model its body names: the OpenAI and
Anthropic compatible routes, token counting, templates, embeddings and reranking.

Bodies and answers pass through as bytes (streams chunk by chunk, as they arrive); only the
``model`` field is read, to pick the instance. Errors the gateway raises itself come back
in the error shape of the API the request came in on, so SDKs show their message.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.types import Receive, Scope, Send

from ailab import metrics
from ailab.api import serve
from ailab.errors import AilabError, BadRequest, described
from ailab.gateway import Gateway, request_fields
from ailab.upstream import proxy, relay
from ailab.upstream.pool import Purpose
from ailab.upstream.supervisor import LlamaStartError

ApiStyle = Literal["openai", "anthropic"]


@dataclass(frozen=True)
class Route:
    path: str
    style: ApiStyle = "openai"  # llama-server's own routes answer errors as OpenAI does
    purpose: Purpose = "generate"


ROUTES: tuple[Route, ...] = (
    Route("/v1/chat/completions"),
    Route("/v1/chat/completions/input_tokens"),
    Route("/v1/completions"),
    Route("/v1/responses"),
    Route("/v1/responses/input_tokens"),
    Route("/v1/messages", "anthropic"),
    Route("/v1/messages/count_tokens", "anthropic"),
    Route("/tokenize"),
    Route("/detokenize"),
    Route("/apply-template"),
    Route("/v1/embeddings", purpose="embed"),
    Route("/v1/rerank", purpose="rerank"),
)

ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    404: "not_found_error",
    429: "rate_limit_error",
    503: "overloaded_error",
}


class OpenAIModel(BaseModel):
    """One entry of /v1/models: OpenAI's fields, then the pool's."""

    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "ailab"
    state: str
    current: bool
    memory_estimate_mb: float | None
    memory_measured_mb: float | None
    in_flight: int
    last_used: float | None
    message: str | None
    parent: str | None = None  # a LoRA adapter's base model


class OpenAIModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[OpenAIModel]


def error_response(style: ApiStyle, status: int, message: str) -> JSONResponse:
    """An error as the API's own clients expect it."""
    headers = {"Retry-After": "1"} if status == 429 else None
    if style == "anthropic":
        kind = ANTHROPIC_ERROR_TYPES.get(status, "api_error")
        body: dict[str, Any] = {"type": "error", "error": {"type": kind, "message": message}}
    else:
        kind = "invalid_request_error" if status < 500 else "server_error"
        code = "model_not_found" if status == 404 else status
        body = {"error": {"message": message, "type": kind, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _status_for(exc: Exception) -> int | None:
    """The HTTP status of a failure the gateway knows; None for anything else. A model
    that cannot start is "unavailable" here, whatever its supervisor calls it."""
    if isinstance(exc, LlamaStartError):
        return 503
    if isinstance(exc, AilabError | httpx.HTTPError):
        return described(exc).status
    return None


class _PassThroughRoute(APIRoute):
    """A route that OpenAPI documents as any other, whose requests skip FastAPI's request
    handling (dependency solving, two exit stacks, exception wrapping): about a tenth of
    the gateway's CPU per request. Its endpoint takes the Request, returns a Response and
    answers known failures itself; anything else still meets the app's handlers."""

    def __init__(
        self, path: str, endpoint: Callable[[Request], Awaitable[Response]], **kwargs: Any
    ) -> None:
        super().__init__(path, endpoint, **kwargs)

        async def handle(scope: Scope, receive: Receive, send: Send) -> None:
            response = await endpoint(Request(scope, receive))
            await response(scope, receive, send)

        self.app = handle


def add_routes(app: FastAPI, gw: Gateway) -> None:
    for route in ROUTES:
        app.router.add_api_route(
            route.path,
            _endpoint(gw, route),
            methods=["POST"],
            route_class_override=_PassThroughRoute,
        )

    @app.get("/v1/models", response_model=OpenAIModelList)
    async def openai_models() -> OpenAIModelList:
        infos = await asyncio.to_thread(gw.list_models)
        return OpenAIModelList(
            data=[
                OpenAIModel(
                    id=info.key,
                    state=info.state,
                    current=info.current,
                    memory_estimate_mb=info.memory_estimate_mb,
                    memory_measured_mb=info.memory_measured_mb,
                    in_flight=info.in_flight,
                    last_used=info.last_used,
                    message=info.message,
                )
                for info in infos
            ]
            + [
                OpenAIModel(
                    id=adapter.key,
                    state=adapter.state,
                    current=False,
                    memory_estimate_mb=None,
                    memory_measured_mb=None,
                    in_flight=0,
                    last_used=None,
                    message=adapter.message,
                    parent=info.key,
                )
                for info in infos
                for adapter in info.adapters
            ]
        )


def _endpoint(gw: Gateway, route: Route) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        body = await request.body()
        try:
            payload = json.loads(body)
        except ValueError:  # an empty body too: llama-server would answer it with a 500
            payload = None
        if not isinstance(payload, dict):
            return error_response(route.style, 400, "the request body must be a JSON object")
        try:
            return await _forward(gw, route, payload, body, request.scope)
        except Exception as exc:
            status = _status_for(exc)
            if status is None:
                raise
            return error_response(route.style, status, str(exc))

    endpoint.__name__ = "llama_" + route.path.strip("/").replace("/", "_").replace("-", "_")
    return endpoint


async def _forward(
    gw: Gateway, route: Route, payload: dict[str, Any], body: bytes, scope: Scope
) -> Response:
    model = payload.get("model")
    if model is not None and not isinstance(model, str):
        raise BadRequest("model must be a string (a key from /v1/models)")
    source = await gw.source_for(model)
    metrics.note(scope, model=source.adapter or source.key)
    if route.purpose == "rerank" and not source.reranker:
        raise BadRequest(
            f"{source.key} is not registered as a reranker, so it is not started with "
            "--reranking and cannot rank documents; use a reranker model (an entry with "
            '"reranker": true in AILAB_EXTRA_MODELS)'
        )
    resources = contextlib.AsyncExitStack()
    try:
        instance = await resources.enter_async_context(gw.generation(source, route.purpose))
        body = _with_fields(payload, body, request_fields(instance, source.adapter))
        if gw.kv.waiting(instance, route.path):  # a saved KV cache to restore first
            body = await gw.kv.restore_for_client(instance, payload, body)
        exchange = await instance.relay.post(route.path, body)
        resources.callback(exchange.release)
        if payload.get("stream"):
            return _ProxiedStream(exchange, resources)
        content = await exchange.read()
    except relay.RelayError as exc:
        await resources.aclose()
        message = f"{source.key}: {source.url or 'llama-server'} is not reachable: {exc}"
        raise proxy.UpstreamError(message, 503) from exc
    except BaseException:
        await resources.aclose()
        raise
    await resources.aclose()
    media_type = exchange.content_type or "application/json"
    return Response(content, status_code=exchange.status, media_type=media_type)


def _with_fields(payload: dict[str, Any], body: bytes, fields: dict[str, Any]) -> bytes:
    """The body as it came, unless the fields its instance needs change it (a client's own
    values of them are replaced)."""
    if all(payload.get(name) == value for name, value in fields.items()):
        return body
    return json.dumps({**payload, **fields}).encode()


class _ProxiedStream(Response):
    """llama-server's SSE bytes handed on as they arrive (chunks that arrived together go as
    one): piped by a thread straight to the client's socket where it can be, else through
    ASGI `send`. The instance and the upstream connection are released when the response
    ends, however it ends; a client that hangs up closes the upstream connection, which
    stops the generation."""

    def __init__(self, exchange: relay.Exchange, resources: contextlib.AsyncExitStack) -> None:
        self._exchange = exchange
        self._resources = resources
        self.background = None  # FastAPI looks for it
        self.status_code = exchange.status
        media_type = exchange.content_type or "text/event-stream"
        self.raw_headers = [(b"content-type", media_type.encode("latin-1"))]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with self._resources:
            watcher = asyncio.create_task(self._close_on_disconnect(receive))
            try:
                start = {"status": self.status_code, "headers": self.raw_headers}
                await send({"type": "http.response.start", **start})
                first_piped_at = await self._piped(scope)
                if first_piped_at is None:
                    await self._relayed(scope, send)
                elif first_piped_at:
                    metrics.first_token(scope, first_piped_at)
                await send({"type": "http.response.body", "body": b""})
            finally:
                watcher.cancel()

    async def _piped(self, scope: Scope) -> float | None:
        """The body written straight to the client's socket by a thread (see
        `relay.Exchange.pipe_to`), where the server is ours, the connection is HTTP/1.1
        (chunked) and the head has left; None to relay it through the event loop instead."""
        transport = serve.client_transport(scope)
        if (
            transport is None
            or transport.is_closing()
            or transport.get_write_buffer_size()
            or scope["http_version"] != "1.1"
        ):
            return None
        client = socket.socket(fileno=os.dup(transport.get_extra_info("socket").fileno()))
        try:
            return await self._exchange.pipe_to(client)
        except relay.ClientGone:
            self._exchange.abort()  # llama-server stops generating
            return 0.0
        finally:
            client.close()

    async def _relayed(self, scope: Scope, send: Send) -> None:
        async with contextlib.aclosing(self._exchange.chunks()) as chunks:
            if not (first := await anext(chunks, b"")):
                return
            metrics.first_token(scope)
            await send({"type": "http.response.body", "body": first, "more_body": True})
            async for chunk in chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})

    async def _close_on_disconnect(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self._exchange.abort()
