"""Errors that become HTTP responses: one base class that carries its status, and the one
mapping of any of them to a JSON response body and to an SSE `error` event."""

from __future__ import annotations

import json
from typing import Any, ClassVar

import httpx


class AilabError(Exception):
    """A failure the client should hear about; the message says what to do instead."""

    status: ClassVar[int] = 500
    headers: ClassVar[dict[str, str]] = {}

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status  # type: ignore[misc]  # per-instance override


class BadRequest(AilabError):
    """The request cannot be served as sent."""

    status = 400


class NotFound(AilabError):
    """The request names something that does not exist (any more)."""

    status = 404


class Unavailable(AilabError):
    """Nothing can serve the request right now; the message says why."""

    status = 503


def described(exc: BaseException) -> AilabError:
    """The error as the client should see it: a known failure as it is, a lost
    connection to llama-server as 503, anything else (a bug) as a bare 500."""
    if isinstance(exc, AilabError):
        return exc
    if isinstance(exc, httpx.HTTPError):
        return Unavailable(f"llama-server is not reachable: {exc}")
    return AilabError(f"internal error ({type(exc).__name__}); see the gateway's log")


def json_body(exc: AilabError) -> dict[str, Any]:
    return {"detail": str(exc)}


def sse_event(exc: AilabError) -> dict[str, str]:
    """The `error` event that ends a stream whose 200 was already sent."""
    return {"event": "error", "data": json.dumps({"error": str(exc), "status": exc.status})}
