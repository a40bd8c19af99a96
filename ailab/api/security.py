"""The security boundary: one ASGI middleware decides whether a request reaches any route.

It wraps the whole application, so every route is covered, including routes added later,
streamed responses and static files. In order, a request is refused when:

1. its Host header is not allowed (a DNS-rebinding page names its own domain): 403;
2. it is a CORS preflight from an origin not in AILAB_CORS_ORIGINS: 403 (allowed
   origins get their preflight answered here);
3. it changes state (POST, PUT, PATCH, DELETE) and comes from another site: an Origin
   that is neither the gateway's own nor allowed, or Sec-Fetch-Site: cross-site without
   an allowed Origin: 403;
4. API keys are configured and it carries none that matches (GET /health excepted): 401;
5. it has a body that is not declared as JSON: 415.

Every response carries ``X-Content-Type-Options: nosniff``. Routes learn who called
through ``current_caller()``. Keys are held as SHA-256 digests, compared in constant
time, and never logged or echoed.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import json
import logging
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ailab.config import Settings, host_form, is_loopback

log = logging.getLogger("ailab.security")

DEFAULT_HOSTS = ("localhost", "127.0.0.1", "[::1]")
WILDCARD_BINDS = {"0.0.0.0", "::", ""}
STATE_CHANGING = {"POST", "PUT", "PATCH", "DELETE"}
OPEN_ROUTES = {("GET", "/health"), ("HEAD", "/health")}
# The web page's own files hold no data: a browser must load them to ask for the key.
OPEN_PAGE = ("/", "/web/")
# What the API uses: the preflight answer lists no more than that.
CORS_METHODS = b"GET, POST, PATCH, DELETE"
CORS_HEADERS = b"Authorization, Content-Type, X-API-Key"
CORS_MAX_AGE = b"600"
NOSNIFF = (b"x-content-type-options", b"nosniff")
KEY_HINT = (
    "send it as `Authorization: Bearer <key>` or `x-api-key: <key>` "
    "(terminal client: --api-key or AILAB_API_KEY)"
)
Headers = list[tuple[bytes, bytes]]


@dataclass(frozen=True)
class Caller:
    """Who sent the request being handled, as far as the boundary can tell."""

    client: str  # address:port of the connection
    origin: str | None  # the Origin header; None for curl, SDKs and the terminal client
    authorized: bool  # a valid key was sent, or no key is configured


_CALLER: contextvars.ContextVar[Caller] = contextvars.ContextVar("ailab_caller")


def current_caller() -> Caller:
    """The caller of the current request; set by the boundary before any route runs."""
    return _CALLER.get()


@dataclass(frozen=True)
class Reply:
    """What the boundary answers itself instead of a route: a refusal or a preflight."""

    status: int
    detail: str
    headers: tuple[tuple[bytes, bytes], ...] = ()


@dataclass(frozen=True)
class Policy:
    """The boundary's rules, derived once from the settings."""

    hosts: frozenset[str] | None  # None: any Host (AILAB_ALLOWED_HOSTS=*)
    cors_origins: frozenset[str]
    key_digests: tuple[bytes, ...]

    @classmethod
    def from_settings(cls, settings: Settings) -> Policy:
        hosts: frozenset[str] | None
        if settings.allowed_hosts == ("*",):
            hosts = None
        elif settings.allowed_hosts:
            hosts = frozenset(settings.allowed_hosts)
        else:
            bound = () if settings.host in WILDCARD_BINDS else (host_form(settings.host).lower(),)
            hosts = frozenset((*DEFAULT_HOSTS, *bound))
        return cls(
            hosts=hosts,
            cors_origins=frozenset(settings.cors_origins),
            key_digests=tuple(bytes.fromhex(d) for d in settings.api_key_sha256),
        )

    def host_allowed(self, host: str) -> bool:
        """An entry with a port matches that port only; one without matches any port."""
        if self.hosts is None:
            return True
        name = host[: host.find("]") + 1] if host.startswith("[") else host.rsplit(":", 1)[0]
        return host in self.hosts or name in self.hosts

    def key_valid(self, presented: list[str]) -> bool:
        """Constant time in the keys: every digest is compared, matching or not."""
        valid = False
        for candidate in presented:
            digest = hashlib.sha256(candidate.encode()).digest()
            for known in self.key_digests:
                valid |= hmac.compare_digest(digest, known)
        return valid


def install(app: Starlette, settings: Settings) -> None:
    """Put the boundary in front of the whole application, and say when it is weakened."""
    policy = Policy.from_settings(settings)
    if policy.hosts is None:
        log.warning(
            "AILAB_ALLOWED_HOSTS=*: the Host check is off, so a web page can reach the "
            "gateway through DNS rebinding"
        )
    if not policy.key_digests and not is_loopback(settings.host):
        log.warning(
            "AILAB_ALLOW_NO_AUTH=1: listening on %s without an API key; anyone who can "
            "reach this address can use the gateway, its tools and stored conversations",
            settings.host,
        )
    app.add_middleware(SecurityBoundary, policy=policy)


class SecurityBoundary:
    """Pure ASGI middleware: no buffering, so streams pass through untouched."""

    def __init__(self, app: ASGIApp, policy: Policy) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = _first_values(scope["headers"])
        origin = headers.get("origin")
        allowed_origin = origin is not None and origin.lower() in self.policy.cors_origins
        extra: Headers = [NOSNIFF]
        if allowed_origin:
            assert origin is not None
            extra += [(b"access-control-allow-origin", origin.encode()), (b"vary", b"Origin")]

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        reply, authorized = self._check(scope, headers, allowed_origin)
        if reply is not None:
            if reply.status >= 400:
                log.warning(
                    "refused %s %s from %s: %s",
                    _method(scope),
                    scope["path"],
                    _client(scope),
                    reply.detail,
                )
            await _reply(scope, send_with_headers, reply)
            return
        token = _CALLER.set(Caller(_client(scope), origin, authorized))
        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            _CALLER.reset(token)

    def _check(
        self, scope: Scope, headers: dict[str, str], allowed_origin: bool
    ) -> tuple[Reply | None, bool]:
        """The boundary's own reply (None lets the request through), and whether the
        caller may use every route."""
        method = _method(scope)
        host = headers.get("host", "").lower()
        if not self.policy.host_allowed(host):
            return Reply(403, _host_detail(host)), False
        if method == "OPTIONS" and "access-control-request-method" in headers:
            return _preflight(headers.get("origin"), allowed_origin), False
        if method in STATE_CHANGING or scope["type"] == "websocket":
            problem = _cross_site_problem(scope, headers, allowed_origin)
            if problem:
                return Reply(403, problem), False
        authorized = self._authorized(headers)
        if not authorized and not _open(method, scope["path"]):
            missing = "authorization" not in headers and "x-api-key" not in headers
            detail = "this gateway needs an API key; " if missing else "the API key is not valid; "
            return Reply(401, detail + KEY_HINT, ((b"www-authenticate", b"Bearer"),)), False
        problem = _body_problem(method, headers)
        return (Reply(415, problem) if problem else None), authorized

    def _authorized(self, headers: dict[str, str]) -> bool:
        if not self.policy.key_digests:
            return True
        presented = []
        scheme, _, value = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            presented.append(value.strip())
        if "x-api-key" in headers:
            presented.append(headers["x-api-key"].strip())
        return self.policy.key_valid(presented)


def _first_values(raw: list[tuple[bytes, bytes]]) -> dict[str, str]:
    """Header names to their first value, as Starlette's own Request would read them."""
    headers: dict[str, str] = {}
    for name, value in raw:
        headers.setdefault(name.decode("latin-1"), value.decode("latin-1"))
    return headers


def _method(scope: Scope) -> str:
    return str(scope.get("method", "GET"))


def _client(scope: Scope) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "unknown"


def _host_detail(host: str) -> str:
    shown = host or "(none)"
    return (
        f"Host {shown!r} is not allowed; use the address the gateway listens on "
        "(localhost), or add this name to AILAB_ALLOWED_HOSTS"
    )


def _preflight(origin: str | None, allowed_origin: bool) -> Reply:
    if not allowed_origin:
        return Reply(
            403,
            f"cross-origin requests from {origin!r} are not allowed; "
            "list the origin in AILAB_CORS_ORIGINS to allow them",
        )
    return Reply(
        204,
        "",
        (
            (b"access-control-allow-methods", CORS_METHODS),
            (b"access-control-allow-headers", CORS_HEADERS),
            (b"access-control-max-age", CORS_MAX_AGE),
        ),
    )


def _normal_origin(origin: str) -> str:
    origin = origin.lower().rstrip("/")
    for scheme, port in (("http://", ":80"), ("https://", ":443")):
        if origin.startswith(scheme) and origin.endswith(port):
            return origin[: -len(port)]
    return origin


def _cross_site_problem(scope: Scope, headers: dict[str, str], allowed_origin: bool) -> str | None:
    """Browsers always send Origin on cross-origin writes; curl and SDKs send none."""
    origin = headers.get("origin")
    if origin is not None and not allowed_origin:
        scheme = "https" if scope["scheme"] in ("https", "wss") else "http"
        own = _normal_origin(f"{scheme}://{headers.get('host', '')}")
        if _normal_origin(origin) != own:
            return (
                f"requests from origin {origin!r} may not change anything here; "
                "list it in AILAB_CORS_ORIGINS if that page should use the gateway"
            )
        return None
    if headers.get("sec-fetch-site") == "cross-site" and not allowed_origin:
        return (
            "a cross-site request without an allowed Origin may not change anything here; "
            "list the page's origin in AILAB_CORS_ORIGINS"
        )
    return None


def _body_problem(method: str, headers: dict[str, str]) -> str | None:
    """A body must be JSON. Form and text/plain bodies are what a web page can send
    across sites without a preflight, so refusing them closes that door everywhere."""
    content_type = headers.get("content-type")
    has_body = headers.get("content-length", "0").strip() not in ("0", "") or (
        "transfer-encoding" in headers
    )
    if content_type is None:
        return (
            "a request body must be JSON; send Content-Type: application/json" if has_body else None
        )
    if method not in STATE_CHANGING and not has_body:
        return None
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type == "application/json":
        return None
    return f"Content-Type {media_type!r} is not accepted; send the body as application/json"


async def _reply(scope: Scope, send: Send, reply: Reply) -> None:
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008, "reason": reply.detail[:120]})
        return
    body = json.dumps({"detail": reply.detail}).encode() if reply.status != 204 else b""
    headers: Headers = [*reply.headers]
    if body:
        headers += [(b"content-type", b"application/json")]
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": reply.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _open(method: str, path: str) -> bool:
    """Answered without a key: health (the status only) and the web page's files."""
    if (method, path) in OPEN_ROUTES:
        return True
    page = path == OPEN_PAGE[0] or path.startswith(OPEN_PAGE[1])
    return page and method in ("GET", "HEAD")
