"""AI Lab as an MCP server: its fifteen tools and a ``chat`` tool, over stdio or at /mcp.

The tools run exactly as the agent loop runs them (``tools.execute_tool`` under a
``ToolPolicy``: the same sandbox roots, protected files and network rule). An MCP client
has no way to ask AI Lab's user, so a call that the gateway would ask about (changing or
deleting existing files) is refused unless the approval policy is ``auto``. ``chat``
hands a question to a local model. ``ailab-mcp`` serves stdio with a policy built from
the settings and reaches the running gateway over HTTP for ``chat``; ``mount`` serves
streamable HTTP at /mcp inside the gateway, behind the app's middleware like any route.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, Any

import httpx
from fastapi import FastAPI
from mcp.server import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.transport_security import TransportSecuritySettings
from mcp_types import ToolAnnotations
from pydantic import Field

from ailab import tools
from ailab.config import ConfigError, Settings, load_settings
from ailab.errors import AilabError
from ailab.upstream import proxy

if TYPE_CHECKING:
    from ailab.gateway import Gateway

log = logging.getLogger("ailab.mcp.server")

# What each tool may do to the machine it runs on: MCP hosts show these and some decide
# by them. "Destructive" means it can overwrite or remove what exists.
_READS = ToolAnnotations(read_only_hint=True, destructive_hint=False, open_world_hint=False)
_CREATES = ToolAnnotations(read_only_hint=False, destructive_hint=False, open_world_hint=False)
_CHANGES = ToolAnnotations(read_only_hint=False, destructive_hint=True, open_world_hint=False)
_NETWORK = ToolAnnotations(read_only_hint=True, destructive_hint=False, open_world_hint=True)
ANNOTATIONS: dict[str, ToolAnnotations] = {
    "lookup_hostname": _NETWORK,
    "measure_http_latency": _NETWORK,
    "read_file": _READS,
    "list_contents": _READS,
    "search_files": _READS,
    "calculate_directory_size": _READS,
    "get_file_info": _READS,
    "get_current_directory": _READS,
    "find_in_files": _READS,
    "write_file": _CHANGES,
    "create_directory": _CREATES,
    "move_file": _CHANGES,
    "copy_file": _CHANGES,
    "delete_file": _CHANGES,
    "get_system_info": _READS,
    # It may switch the gateway's loaded model: a change, never a loss.
    "chat": _CREATES,
}

# (question, model key or None for the loaded one, max_tokens) -> {"model", "answer", ...}
ChatBackend = Callable[[str, str | None, int], Awaitable[dict[str, Any]]]
PolicySource = Callable[[], tools.ToolPolicy]


def build_server(policy: PolicySource, chat: ChatBackend) -> MCPServer:
    """The MCP server: every catalogue tool, then ``chat``."""
    missing = set(tools.tool_names()) - set(ANNOTATIONS)
    if missing:
        raise RuntimeError(f"MCP annotations missing for {sorted(missing)}; add them here")
    server: MCPServer = MCPServer(
        "ailab",
        instructions="AI Lab's sandboxed file, network and system tools, and local models.",
        version="0.1.0",
        log_level="WARNING",
    )
    descriptions = {t["function"]["name"]: t["function"] for t in tools.get_available_tools()}
    for name in tools.tool_names():
        server.add_tool(
            _bridge(name, policy),
            name=name,
            description=descriptions[name]["description"],
            annotations=ANNOTATIONS[name],
        )
    server.add_tool(_chat_tool(chat), name="chat", annotations=ANNOTATIONS["chat"])
    return server


def _bridge(name: str, policy_of: PolicySource) -> Callable[..., Awaitable[dict[str, Any]]]:
    """An async function with the tool's own signature (so the SDK builds its schema)
    that runs the tool under the current policy in a worker thread."""

    async def call(**arguments: Any) -> dict[str, Any]:
        policy = policy_of()
        needs = await asyncio.to_thread(tools.approval_needed, policy, name, arguments)
        if needs and policy.approval != "auto":
            raise ToolError(
                f"{tools.describe_call(name, arguments)} would change or delete existing "
                "files, and AI Lab's MCP server cannot ask its user: it runs such calls "
                f"only under AILAB_TOOL_APPROVAL=auto (it is {policy.approval})"
            )
        # approved=False: the tool re-checks at run time, so a file that appeared since
        # the check above is still not overwritten without approval.
        result = await asyncio.to_thread(tools.execute_tool, policy, name, arguments)
        if result.get("status") == "error":
            raise ToolError(str(result.get("error")))
        return result

    call.__name__ = name
    call.__signature__ = tools.tool_signature(name)  # type: ignore[attr-defined]
    return call


def _chat_tool(backend: ChatBackend) -> Callable[..., Awaitable[dict[str, Any]]]:
    async def chat(
        question: Annotated[str, Field(min_length=1, description="What to ask the model")],
        model: Annotated[
            str | None,
            Field(description="Model key (see AI Lab's /models); default: the default model"),
        ] = None,
        max_tokens: Annotated[int, Field(ge=1, le=8192, description="Longest answer")] = 512,
    ) -> dict[str, Any]:
        """Ask one of AI Lab's local models a question and get its answer. A model other
        than the default is loaded for it (beside the others, as memory allows)."""
        try:
            return await backend(question, model, max_tokens)
        except (AilabError, httpx.HTTPError) as exc:
            raise ToolError(f"chat failed: {exc}") from None

    return chat


def _answer(body: dict[str, Any], model: str | None) -> dict[str, Any]:
    choice = (body.get("choices") or [{}])[0]
    return {
        "model": model,
        "answer": (choice.get("message") or {}).get("content") or "",
        "finish_reason": choice.get("finish_reason"),
        "tokens_generated": (body.get("usage") or {}).get("completion_tokens"),
    }


def _question(question: str, max_tokens: int) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": question}], "max_tokens": max_tokens}


# --- inside the gateway: /mcp --------------------------------------------------------------


def gateway_chat(gw: Gateway) -> ChatBackend:
    """``chat`` through the gateway's own admission and model pool: a queue place, and the
    named model (the default for none) loaded and serving."""

    async def ask(question: str, model: str | None, max_tokens: int) -> dict[str, Any]:
        source = await gw.source_for(model)
        async with gw.generation(source) as instance:
            body = await proxy.post_json(
                instance.http,
                f"{instance.manager.base_url}/v1/chat/completions",
                _question(question, max_tokens),
            )
        return _answer(body, instance.key)

    return ask


def mount(app: FastAPI, gw: Gateway) -> None:
    """Serve the MCP server at /mcp (streamable HTTP) as a route of ``app``, so the app's
    middleware (Host, Origin and API key) applies to it as to every route."""
    server = build_server(lambda: gw.tool_policy, gateway_chat(gw))
    http_app = server.streamable_http_app(
        streamable_http_path="/mcp",
        # The gateway's own boundary decides Host and Origin for every route, this one too.
        transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
    )
    app.router.routes.extend(http_app.routes)
    outer = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(started: FastAPI) -> AsyncIterator[Any]:
        async with outer(started) as state, server.session_manager.run():
            yield state

    app.router.lifespan_context = lifespan


# --- stdio: ailab-mcp ------------------------------------------------------------------------


def gateway_url(settings: Settings) -> str:
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    return f"http://{host}:{settings.port}"


def http_chat(base_url: str, api_key: str | None = None) -> ChatBackend:
    """``chat`` from the stdio server: the running gateway answers over HTTP, given
    `api_key` when it requires one."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None

    async def ask(question: str, model: str | None, max_tokens: int) -> dict[str, Any]:
        async with httpx.AsyncClient(base_url=base_url, timeout=600, headers=headers) as http:
            try:
                loaded = (await http.get("/health")).json().get("model_key")
                if model is not None and model != loaded:
                    switched = await http.post("/model/switch", json={"model_key": model})
                    _raise_for_status(switched)
                payload = _question(question, max_tokens)
                reply = await http.post("/v1/chat/completions", json=payload)
                _raise_for_status(reply)
            except httpx.TransportError as exc:
                raise ToolError(
                    f"AI Lab's gateway is not reachable at {base_url} ({exc}); "
                    "start it with `make run` or `ailab-server`"
                ) from None
        return _answer(reply.json(), model or loaded)

    return ask


def _raise_for_status(response: httpx.Response) -> None:
    """A gateway error ({"detail"}) or llama-server's, passed through /v1, as a ToolError."""
    if response.status_code < 400:
        return
    try:
        body = response.json()
    except ValueError:
        body = None
    detail = body.get("detail") if isinstance(body, dict) else None
    message = detail or proxy.error_message(response)
    raise ToolError(f"the gateway answered {response.status_code}: {message}")


def main() -> None:
    """``ailab-mcp``: the MCP server over stdio (stdout carries the protocol; logs stderr)."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    try:
        settings = load_settings()
        policy = tools.ToolPolicy.from_settings(settings)
    except ConfigError as exc:
        print(f"ailab-mcp: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    key = settings.gateway_api_key.get_secret_value() if settings.gateway_api_key else None
    build_server(lambda: policy, http_chat(gateway_url(settings), key)).run("stdio")


if __name__ == "__main__":
    main()
