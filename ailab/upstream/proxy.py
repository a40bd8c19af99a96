"""The pooled async HTTP client to llama-server, with the one retry that is always safe.

llama-server closes kept-alive connections now and then; the pooled client only learns
this when its next request on that connection gets no response at all. Exactly that
case is retried: nothing was answered, so nothing can be duplicated.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx

from ailab.errors import AilabError

DISCONNECTED_BEFORE_RESPONSE = "Server disconnected without sending a response"


class UpstreamError(AilabError):
    """llama-server failed or answered with an error; status is what to pass on."""

    status = 502


def _is_stale_connection(exc: httpx.HTTPError) -> bool:
    return isinstance(exc, httpx.RemoteProtocolError) and DISCONNECTED_BEFORE_RESPONSE in str(exc)


Wrap = Callable[[httpx.AsyncHTTPTransport], httpx.AsyncBaseTransport]


def make_client(
    api_key: str | None = None, wrap: Wrap | None = None
) -> tuple[httpx.AsyncClient, httpx.AsyncHTTPTransport]:
    """The pooled client, and its transport so idle connections can be dropped. With
    `api_key`, every request carries that key; `wrap` puts a layer around the transport."""
    # Generation can take minutes; only connecting is bounded tightly.
    timeout = httpx.Timeout(connect=5.0, read=None, write=30.0, pool=30.0)
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=64)
    transport = httpx.AsyncHTTPTransport(limits=limits)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    client = httpx.AsyncClient(
        transport=wrap(transport) if wrap else transport,
        timeout=timeout,
        trust_env=False,
        headers=headers,
    )
    return client, transport


async def send(client: httpx.AsyncClient, request: httpx.Request) -> httpx.Response:
    """Send a request and read the whole body, retrying a stale pooled connection once."""
    try:
        return await client.send(request)
    except httpx.HTTPError as exc:
        if not _is_stale_connection(exc):
            raise
    return await client.send(request)


def error_message(response: httpx.Response) -> str:
    """llama-server's own error text, which usually says what was wrong."""
    return error_text(response.status_code, response.content)


def error_text(status: int, content: bytes) -> str:
    """The message in an error body (OpenAI's shape, or a plain string), else its text."""
    try:
        body: Any = json.loads(content)
    except ValueError:
        return content.decode(errors="replace")[:500] or f"HTTP {status}"
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if isinstance(error, str):
            return error
    return str(body)[:500]


async def post_json(
    client: httpx.AsyncClient, url: str, payload: dict[str, Any], upstream: str = "llama-server"
) -> dict[str, Any]:
    """POST JSON to llama-server (or the remote upstream named `upstream`); raise
    UpstreamError with its message on failure."""
    try:
        response = await send(client, client.build_request("POST", url, json=payload))
    except httpx.HTTPError as exc:
        raise UpstreamError(f"{upstream} is not reachable: {exc}", 503) from exc
    if response.status_code >= 400:
        status = response.status_code if response.status_code < 500 else 502
        raise UpstreamError(f"{upstream}: {error_message(response)}", status)
    return response.json()
