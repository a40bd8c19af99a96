"""A tiny stdio MCP server whose `crash` tool exits the process in the middle of the call
and whose `freeze` tool stops it answering anything."""

from __future__ import annotations

import os
import time

from mcp.server import MCPServer

server: MCPServer = MCPServer("crashing")


@server.tool()
def crash() -> str:
    """Start a job (the process dies before it answers)."""
    os._exit(3)


@server.tool()
async def freeze() -> str:
    """Start a job (the server hangs: its event loop is blocked)."""
    time.sleep(3600)  # noqa: ASYNC251 -- blocking the loop is the point
    return "never"


@server.tool()
def greet(name: str) -> str:
    """Greet someone by name."""
    return f"Hello, {name}!"


if __name__ == "__main__":
    server.run("stdio")
