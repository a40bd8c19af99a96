"""The web page: files shipped inside this package, served at `/` and `/web/...` with a strict CSP.

The page is static (no build step, no template); everything it shows comes from the JSON API.
"""

from __future__ import annotations

import asyncio
from importlib import resources
from pathlib import PurePosixPath

from fastapi import APIRouter, HTTPException
from fastapi.responses import Response

router = APIRouter()

# No inline script or style anywhere, nothing from another origin, and every HTML string the
# page puts into the DOM must come out of DOMPurify (Trusted Types, where the browser has them).
CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "font-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
        "require-trusted-types-for 'script'",
        "trusted-types dompurify",
    )
)
# X-Content-Type-Options comes from the security boundary, on every response.
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}


def _read(relative: PurePosixPath) -> bytes | None:
    node = resources.files(__name__)
    for part in relative.parts:
        node = node.joinpath(part)
    return node.read_bytes() if node.is_file() else None


async def _serve(path: str) -> Response:
    relative = PurePosixPath(path)
    media_type = MEDIA_TYPES.get(relative.suffix)
    hidden = any(part.startswith(".") or part == "__pycache__" for part in relative.parts)
    if media_type is None or hidden or relative.is_absolute():
        raise HTTPException(404, f"no page file {path!r}")
    body = await asyncio.to_thread(_read, relative)
    if body is None:
        raise HTTPException(404, f"no page file {path!r}")
    return Response(body, media_type=media_type, headers=SECURITY_HEADERS)


@router.get("/", include_in_schema=False)
async def index() -> Response:
    return await _serve("index.html")


@router.get("/web/{path:path}", include_in_schema=False)
async def page_file(path: str) -> Response:
    return await _serve(path)
