"""AI Lab as an MCP server, driven by the official `mcp` SDK's client: over stdio
(`ailab-mcp`, here `python -m ailab.mcp.server`) and over streamable HTTP at /mcp."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx2
import pytest
import requests
from conftest import PROJECT_DIR, GatewayProcess
from mcp import Client
from mcp.client.stdio import StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp_types import CallToolResult

from ailab import tools

T = TypeVar("T")


def stdio_server(root: Path, data_dir: Path, **env: str) -> StdioServerParameters:
    """`ailab-mcp` as an MCP host starts it, sharing ``root`` with its tools."""
    return StdioServerParameters(
        command=sys.executable,
        args=["-m", "ailab.mcp.server"],
        cwd=PROJECT_DIR,
        env={
            "PYTHONPATH": os.environ.get("PYTHONPATH", str(PROJECT_DIR)),
            "AILAB_DATA_DIR": str(data_dir),
            "AILAB_TOOL_ROOTS": str(root),
            **env,
        },
    )


def with_client(server: StdioServerParameters | str, use: Callable[[Client], Awaitable[T]]) -> T:
    async def session() -> T:
        async with Client(server) as client:
            return await use(client)

    return asyncio.run(session())


def text_of(result: CallToolResult) -> str:
    return "\n".join(getattr(block, "text", "") for block in result.content)


async def list_and_call(client: Client, root: Path) -> dict[str, Any]:
    """Everything a host does first: list the tools, read inside and outside the roots,
    try a destructive call."""
    listed = await client.list_tools()
    return {
        "tools": {tool.name: tool for tool in listed.tools},
        "inside": await client.call_tool("read_file", {"path": str(root / "notes.txt")}),
        "outside": await client.call_tool("read_file", {"path": "/etc/hostname"}),
        "delete": await client.call_tool("delete_file", {"path": str(root / "notes.txt")}),
    }


def check_listing_and_sandbox(seen: dict[str, Any], root: Path) -> None:
    listed = seen["tools"]
    assert set(listed) == {*tools.tool_names(), "chat"}
    assert listed["read_file"].annotations.read_only_hint is True
    assert listed["read_file"].annotations.open_world_hint is False
    assert listed["delete_file"].annotations.read_only_hint is False
    assert listed["delete_file"].annotations.destructive_hint is True
    assert listed["create_directory"].annotations.destructive_hint is False
    assert listed["measure_http_latency"].annotations.open_world_hint is True
    assert "path" in listed["read_file"].input_schema["properties"]
    assert "policy" not in listed["read_file"].input_schema["properties"]

    inside = seen["inside"]
    assert not inside.is_error, text_of(inside)
    assert inside.structured_content["content"] == "keep me\n"
    outside = seen["outside"]
    assert outside.is_error
    assert "outside the folders shared with tools" in text_of(outside)


@pytest.fixture
def shared_root(tmp_path: Path) -> Path:
    root = tmp_path / "shared"
    root.mkdir()
    (root / "notes.txt").write_text("keep me\n")
    return root


def test_over_stdio_the_tools_are_listed_sandboxed_and_destructive_calls_refused(
    shared_root: Path, tmp_path: Path
) -> None:
    server = stdio_server(shared_root, tmp_path / "data")
    seen = with_client(server, lambda client: list_and_call(client, shared_root))
    check_listing_and_sandbox(seen, shared_root)
    assert seen["delete"].is_error
    assert "AILAB_TOOL_APPROVAL=auto" in text_of(seen["delete"])
    assert (shared_root / "notes.txt").read_text() == "keep me\n"


def test_over_stdio_with_approval_auto_a_destructive_call_runs(
    shared_root: Path, tmp_path: Path
) -> None:
    server = stdio_server(shared_root, tmp_path / "data", AILAB_TOOL_APPROVAL="auto")
    seen = with_client(server, lambda client: list_and_call(client, shared_root))
    assert not seen["delete"].is_error, text_of(seen["delete"])
    assert not (shared_root / "notes.txt").exists()


def test_over_http_at_mcp_the_gateway_serves_the_same_tools_and_rules(
    gateway: GatewayProcess,
) -> None:
    root = gateway.data_dir / "workspace"
    (root / "notes.txt").write_text("keep me\n")
    seen = with_client(f"{gateway.url}/mcp", lambda client: list_and_call(client, root))
    check_listing_and_sandbox(seen, root)
    assert seen["delete"].is_error
    assert "AILAB_TOOL_APPROVAL=auto" in text_of(seen["delete"])
    assert (root / "notes.txt").read_text() == "keep me\n"


def test_the_chat_tool_asks_the_loaded_model_over_http_and_over_stdio(
    gateway: GatewayProcess, tmp_path: Path
) -> None:
    question = {"question": "Say hello.", "model": "smollm2-135m", "max_tokens": 8}

    async def ask(client: Client) -> CallToolResult:
        return await client.call_tool("chat", question)

    over_http = with_client(f"{gateway.url}/mcp", ask)
    # The stdio server reaches the running gateway over HTTP for chat.
    stdio = stdio_server(tmp_path, tmp_path / "data", AILAB_PORT=str(gateway.port))
    over_stdio = with_client(stdio, ask)
    for result in (over_http, over_stdio):
        assert not result.is_error, text_of(result)
        assert result.structured_content["model"] == "smollm2-135m"
        assert result.structured_content["answer"].strip()
        assert 0 < result.structured_content["tokens_generated"] <= 8

    question["model"] = "no-such-model"
    for server in (f"{gateway.url}/mcp", stdio):
        refused = with_client(server, ask)
        assert refused.is_error
        assert "unknown model 'no-such-model'" in text_of(refused)


def test_chat_over_stdio_without_a_gateway_is_a_tool_error_naming_the_fix(
    tmp_path: Path,
) -> None:
    from conftest import free_port

    stdio = stdio_server(tmp_path, tmp_path / "data", AILAB_PORT=str(free_port()))
    result = with_client(stdio, lambda client: client.call_tool("chat", {"question": "Hi"}))
    assert result.is_error
    assert "gateway is not reachable" in text_of(result)
    assert "ailab-server" in text_of(result)


MCP_KEY = "mcp-test-key-0123456789"


@pytest.fixture
def keyed_gateway(make_gateway) -> GatewayProcess:  # type: ignore[no-untyped-def]
    return make_gateway({"AILAB_API_KEYS": MCP_KEY})


def test_chat_over_stdio_sends_AILAB_API_KEY_to_a_keyed_gateway(
    keyed_gateway: GatewayProcess, tmp_path: Path
) -> None:
    question = {"question": "Say hello.", "max_tokens": 4}
    port = str(keyed_gateway.port)

    def ask(**env: str) -> CallToolResult:
        stdio = stdio_server(tmp_path, tmp_path / "data", AILAB_PORT=port, **env)
        return with_client(stdio, lambda client: client.call_tool("chat", question))

    keyless = ask()
    assert keyless.is_error
    assert "401" in text_of(keyless)
    keyed = ask(AILAB_API_KEY=MCP_KEY)
    assert not keyed.is_error, text_of(keyed)
    assert keyed.structured_content["tokens_generated"] > 0


def test_over_http_at_mcp_the_api_key_rules_apply(keyed_gateway: GatewayProcess) -> None:
    key = MCP_KEY
    server = keyed_gateway
    hello = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": "t", "version": "1"},
        },
    }
    refused = requests.post(f"{server.url}/mcp", json=hello, timeout=30)
    assert refused.status_code == 401
    assert refused.headers["www-authenticate"].startswith("Bearer")

    async def names_with_key() -> list[str]:
        http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {key}"})
        transport = streamable_http_client(f"{server.url}/mcp", http_client=http)
        async with Client(transport) as client:
            return [tool.name for tool in (await client.list_tools()).tools]

    assert "read_file" in asyncio.run(names_with_key())
