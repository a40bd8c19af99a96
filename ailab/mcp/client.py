"""MCP servers' tools for the model: one supervised connection per server, one hub for all.

``McpHub`` reads the ``mcpServers`` file (``AILAB_MCP_CONFIG``) and keeps an
``McpConnection`` per server. Each connection's MCP session lives in an asyncio task of
its own (the SDK's transports are anyio task groups, entered and left in one task), which
connects, lists the tools, then checks the server every ``HEALTH_INTERVAL_S`` or at once
after a failed call; a server that fails to start, exits or stops answering is restarted
with backoff, its tools withdrawn meanwhile. The hub offers the tools to the agent loop
as ``<server>__<tool>`` (the engine's ``ExtraTools``) and decides approval from the
tools' annotations: under ``ask`` only ``readOnlyHint: true`` runs without a person.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

import httpx2
import mcp_types
from mcp import Client
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from ailab.mcp.config import McpConfigError, McpServerConfig, load_servers

log = logging.getLogger("ailab.mcp")

State = Literal["starting", "ready", "restarting", "disabled"]

SEPARATOR = "__"
# A request that gets no answer in this time (connecting, listing, checking) is a hang.
ANSWER_TIMEOUT_S = 30.0
STREAM_READ_TIMEOUT_S = 300.0
HEALTH_INTERVAL_S = 30.0
BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 60.0
# How long start-up and a reload wait for the servers; a slow one joins when it is ready.
FIRST_ATTEMPT_WAIT_S = 10.0
CLIENT_INFO = mcp_types.Implementation(name="ailab", version="0.1.0")


@dataclass(frozen=True)
class OfferedTool:
    """One server tool as the model sees it."""

    exposed: str  # <server>__<tool>, in the characters function names allow
    name: str  # the server's own name for it
    description: str
    parameters: dict[str, Any]
    read_only: bool

    def schema(self) -> dict[str, Any]:
        return {
            "type": "function",
            "function": {
                "name": self.exposed,
                "description": self.description,
                "parameters": self.parameters,
            },
        }


class ToolUnavailable(Exception):
    """The server is not connected (or no longer lists the tool); the message says why."""


class McpConnection:
    """One server: its session task, its state and the tools it offers right now."""

    def __init__(
        self,
        name: str,
        config: McpServerConfig,
        log_dir: Path,
        call_timeout_s: float,
        answer_timeout_s: float,
    ) -> None:
        self.name = name
        self.config = config
        self.log_dir = log_dir
        self.call_timeout_s = call_timeout_s
        self.answer_timeout_s = answer_timeout_s
        self.state: State = "disabled" if config.disabled else "starting"
        self.error: str | None = None
        self.restarts = 0
        self.tools: dict[str, OfferedTool] = {}
        self._client: Client | None = None
        self._check_now = asyncio.Event()
        self.first_attempt = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.config.disabled:
            self.first_attempt.set()
            return
        self._task = asyncio.create_task(self._supervise(), name=f"mcp-{self.name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._withdraw()

    # --- the session task ------------------------------------------------------------

    async def _supervise(self) -> None:
        delay = BACKOFF_FIRST_S
        while True:
            try:
                await self._serve()
            except Exception as exc:  # the gateway outlives any server failure
                self.error = _reason(exc)
                if isinstance(exc, OSError):  # the command could not be started
                    self.error += f" (command {self.config.command!r})"
                log.warning("MCP server %s: %s", self.name, self.error)
            was_ready = self.state == "ready"
            self._withdraw()
            self.state = "restarting"
            self.first_attempt.set()
            delay = BACKOFF_FIRST_S if was_ready else min(delay * 2, BACKOFF_MAX_S)
            await asyncio.sleep(delay)
            self.restarts += 1

    async def _serve(self) -> None:
        """Connect, offer the tools, then check the server until it fails a check."""
        self.state = "starting"
        async with AsyncExitStack() as stack:
            client = Client(
                await self._transport(stack),
                read_timeout_seconds=self.answer_timeout_s,
                client_info=CLIENT_INFO,
            )
            await stack.enter_async_context(client)
            self._offer(await _list_tools(client))
            self._client, self.state, self.error = client, "ready", None
            self.first_attempt.set()
            log.info("MCP server %s: ready, %d tools", self.name, len(self.tools))
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._check_now.wait(), HEALTH_INTERVAL_S)
                self._check_now.clear()
                self._offer(await _list_tools(client))

    async def _transport(self, stack: AsyncExitStack) -> Any:
        config = self.config
        if config.command is not None:
            errlog = await asyncio.to_thread(self._open_log)
            stack.callback(errlog.close)
            params = StdioServerParameters(
                command=config.command, args=config.args, env=config.env, cwd=config.cwd
            )
            return stdio_client(params, errlog=errlog)
        assert config.url is not None
        # Reads wait long: the server may hold its event stream open between messages.
        timeout = httpx2.Timeout(self.answer_timeout_s, read=STREAM_READ_TIMEOUT_S)
        http = httpx2.AsyncClient(headers=config.headers, timeout=timeout)
        stack.push_async_callback(http.aclose)
        return streamable_http_client(config.url, http_client=http)

    def _open_log(self) -> IO[str]:
        """The server's stderr goes to <data>/logs/mcp-<name>.log, not through Python."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        return (self.log_dir / f"mcp-{self.name}.log").open("a", encoding="utf-8")

    def _offer(self, listed: list[mcp_types.Tool]) -> None:
        offered: dict[str, OfferedTool] = {}
        for tool in listed:
            if not self.config.offers(tool.name):
                continue
            exposed = f"{self.name}{SEPARATOR}{re.sub(r'[^A-Za-z0-9_-]', '_', tool.name)}"
            if exposed in offered:
                log.warning("MCP server %s: two tools share the name %s", self.name, exposed)
                continue
            parameters = {k: v for k, v in tool.input_schema.items() if k != "$schema"}
            annotations = tool.annotations
            offered[exposed] = OfferedTool(
                exposed=exposed,
                name=tool.name,
                description=" ".join((tool.description or tool.name).split()),
                parameters=parameters,
                read_only=bool(annotations and annotations.read_only_hint is True),
            )
        self.tools = offered

    def _withdraw(self) -> None:
        self._client = None
        self.tools = {}

    # --- calls (from the engine's task) -----------------------------------------------

    async def call(self, tool: OfferedTool, arguments: dict[str, Any]) -> mcp_types.CallToolResult:
        client = self._client
        if client is None:
            raise ToolUnavailable(self.unavailable_reason())
        try:
            return await client.call_tool(
                tool.name, arguments, read_timeout_seconds=self.call_timeout_s
            )
        except Exception:
            self._check_now.set()  # timed out or the connection broke: is it still alive?
            raise

    def unavailable_reason(self) -> str:
        why = f" ({self.error})" if self.error else ""
        return (
            f"MCP server {self.name!r} is {self.state}{why}; its tools are unavailable "
            "for now. Tell the user, or do without them."
        )

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "transport": self.config.transport,
            "state": self.state,
            "error": self.error,
            "restarts": self.restarts,
            "approval": self.config.approval,
            "tools": [tool.exposed for tool in self.tools.values()],
        }


async def _list_tools(client: Client) -> list[mcp_types.Tool]:
    listed: list[mcp_types.Tool] = []
    cursor: str | None = None
    for _ in range(100):  # a server whose pages never end cannot hold the check forever
        page = await client.list_tools(cursor=cursor, cache_mode="refresh")
        listed.extend(page.tools)
        cursor = page.next_cursor
        if cursor is None:
            break
    return listed


def _reason(exc: BaseException) -> str:
    """The first real failure inside the SDK's nested exception groups, in one line."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    text = str(exc) or type(exc).__name__
    return " ".join(f"{type(exc).__name__}: {text}".split())[:300]


def result_for_model(result: mcp_types.CallToolResult) -> dict[str, Any]:
    """A tool result as AI Lab's tools give theirs: status plus the server's text."""
    parts = [_block_text(block) for block in result.content]
    text = "\n".join(parts)
    if result.is_error:
        return {"status": "error", "error": text or "the tool reported an error"}
    answer: dict[str, Any] = {"status": "success", "content": text}
    if not text and result.structured_content is not None:
        answer["structured_content"] = result.structured_content
    return answer


def _block_text(block: mcp_types.ContentBlock) -> str:
    if isinstance(block, mcp_types.TextContent):
        return block.text
    if isinstance(block, mcp_types.ImageContent | mcp_types.AudioContent):
        return f"[{block.type}: {block.mime_type}, {len(block.data) * 3 // 4} bytes]"
    if isinstance(block, mcp_types.EmbeddedResource):
        resource = block.resource
        text = getattr(resource, "text", None)
        return text if text is not None else f"[binary resource {resource.uri}]"
    return f"[resource link {block.uri}]"


class McpHub:
    """Every configured server, and the engine's view of their tools."""

    def __init__(
        self,
        config_file: Path | None,
        log_dir: Path,
        call_timeout_s: float,
        answer_timeout_s: float = ANSWER_TIMEOUT_S,
    ) -> None:
        self.config_file = config_file
        self.log_dir = log_dir
        self.call_timeout_s = call_timeout_s
        self.answer_timeout_s = answer_timeout_s
        self.connections: dict[str, McpConnection] = {}
        self.error: str | None = None  # why the file could not be used, if it could not

    async def start(self) -> None:
        """Read the file and start every server's task; returns without waiting for them."""
        if self.config_file is None:
            return
        try:
            servers = await asyncio.to_thread(load_servers, self.config_file)
        except McpConfigError as exc:
            self.error = str(exc)  # changed since start-up: run without, /command mcp says why
            log.error("MCP servers not started: %s", exc)
            return
        self._start(servers)

    def _start(self, servers: dict[str, McpServerConfig]) -> None:
        self.error = None
        self.connections = {
            name: McpConnection(
                name, config, self.log_dir, self.call_timeout_s, self.answer_timeout_s
            )
            for name, config in servers.items()
        }
        for connection in self.connections.values():
            connection.start()

    async def wait_started(self, timeout_s: float = FIRST_ATTEMPT_WAIT_S) -> None:
        """Wait, at most ``timeout_s``, until every server has connected or failed once."""
        waits = [c.first_attempt.wait() for c in self.connections.values()]
        if waits:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*waits), timeout_s)

    async def reload(self) -> None:
        """Re-read the file and restart every server; a bad file keeps the running ones."""
        if self.config_file is None:
            raise McpConfigError("AILAB_MCP_CONFIG is not set; there is no file to reload")
        servers = await asyncio.to_thread(load_servers, self.config_file)
        await self.close()
        self._start(servers)
        await self.wait_started()

    async def close(self) -> None:
        await asyncio.gather(*(c.stop() for c in self.connections.values()))

    def describe(self) -> list[dict[str, Any]]:
        return [connection.describe() for connection in self.connections.values()]

    # --- the engine's ExtraTools ------------------------------------------------------

    def schemas(self) -> list[dict[str, Any]]:
        return [
            tool.schema()
            for connection in self.connections.values()
            for tool in connection.tools.values()
        ]

    def _connection(self, name: str) -> McpConnection | None:
        server, separator, _ = name.partition(SEPARATOR)
        return self.connections.get(server) if separator else None

    def owns(self, name: str) -> bool:
        return self._connection(name) is not None

    def origin(self, name: str) -> tuple[str | None, str]:
        """(server, the server's tool name) for the audit log."""
        connection = self._connection(name)
        if connection is None:
            return None, name
        tool = connection.tools.get(name)
        return connection.name, tool.name if tool else name.partition(SEPARATOR)[2]

    def approval(self, name: str, policy_mode: str) -> tuple[bool, str]:
        """(whether the call needs a person's approval, the approval mode that applies).

        A server's ``approval`` replaces AILAB_TOOL_APPROVAL for its tools, except that
        ``deny`` there is never loosened. A tool the server has not listed (it is down)
        needs none: its call fails without running."""
        connection = self._connection(name)
        assert connection is not None, "approval() is asked only for names owns() accepts"
        mode = policy_mode
        if policy_mode != "deny" and connection.config.approval is not None:
            mode = connection.config.approval
        tool = connection.tools.get(name)
        return (tool is not None and not tool.read_only), mode

    async def call(
        self, name: str, arguments: dict[str, Any] | str, policy_mode: str, approved: bool
    ) -> dict[str, Any]:
        """Run one call under the approval rules; never raises (errors are for the model)."""
        connection = self._connection(name)
        assert connection is not None, "call() is made only for names owns() accepts"
        tool = connection.tools.get(name)
        if tool is None:
            if connection.state == "ready":
                offered = ", ".join(connection.tools) or "none"
                return _error(
                    f"MCP server {connection.name!r} offers no tool {name!r}; its tools: {offered}"
                )
            return _error(connection.unavailable_reason())
        if not isinstance(arguments, dict):
            return _error(f"the arguments for {name} must be a JSON object")
        needed, mode = self.approval(name, policy_mode)
        if needed and mode == "deny":
            return _error(
                f"{name} may change things and the approval policy for MCP server "
                f"{connection.name!r} is deny; tell the user what you wanted to do"
            )
        if needed and mode == "ask" and not approved:
            return _error(f"{name} needs the user's approval, which was not given")
        try:
            return result_for_model(await connection.call(tool, arguments))
        except ToolUnavailable as exc:
            return _error(str(exc))
        except MCPError as exc:
            if exc.code == mcp_types.REQUEST_TIMEOUT:
                return _error(
                    f"{name} got no answer within {self.call_timeout_s:g} s; "
                    f"MCP server {connection.name!r} is being checked"
                )
            return _error(f"{name} failed: {exc.message} (MCP error {exc.code})")
        except Exception as exc:
            return _error(f"{name} failed: {_reason(exc)}")


def _error(message: str) -> dict[str, Any]:
    return {"status": "error", "error": message}
