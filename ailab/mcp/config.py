"""The ``mcpServers`` file (Claude Desktop's and llama-server's format) AI Lab reads.

``{"mcpServers": {"<name>": {...}}}``: a stdio server has ``command`` (``args``, ``env``,
``cwd``), a streamable HTTP server has ``url`` (``headers``). AI Lab adds, per server,
``approval`` (``auto``/``ask``/``deny``) and ``allow``/``deny`` lists of tool names. A
misspelt key is an error rather than silently ignored: it could be one of those rules.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

# The model sees `<server>__<tool>`; a server name without "__" keeps the split unambiguous.
SERVER_NAME = re.compile(r"^(?!.*__)[A-Za-z0-9][A-Za-z0-9_-]{0,31}$")

Approval = Literal["auto", "ask", "deny"]


class McpConfigError(ValueError):
    """The file cannot be used; the message says which server and key."""


class McpServerConfig(BaseModel):
    """One server: how to reach it and what AI Lab lets the model do with it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # "type" is written by VS Code; it only has to agree with command/url.
    type: Literal["stdio", "http", "streamableHttp", "streamable-http"] | None = None
    command: str | None = None
    args: list[str] = []
    env: dict[str, str] = {}
    cwd: Path | None = None
    url: Annotated[str, Field(pattern=r"^https?://")] | None = None
    headers: dict[str, str] = {}
    disabled: bool = False
    approval: Approval | None = None  # None: AILAB_TOOL_APPROVAL applies
    allow: list[str] | None = None  # None: every tool the server lists
    deny: list[str] = []

    @model_validator(mode="after")
    def one_transport(self) -> McpServerConfig:
        if (self.command is None) == (self.url is None):
            raise ValueError("give either `command` (a stdio server) or `url` (streamable HTTP)")
        wants_stdio = self.type in (None, "stdio")
        if self.type is not None and wants_stdio != (self.command is not None):
            raise ValueError(f'"type": "{self.type}" does not match the server\'s command/url')
        if self.url is not None and (self.args or self.env or self.cwd):
            raise ValueError("`args`, `env` and `cwd` are for stdio servers, not `url` ones")
        if self.command is not None and self.headers:
            raise ValueError("`headers` are for streamable HTTP servers, not `command` ones")
        return self

    @property
    def transport(self) -> Literal["stdio", "http"]:
        return "stdio" if self.command is not None else "http"

    def offers(self, tool: str) -> bool:
        """Whether the allow/deny lists let the model see this tool."""
        return (self.allow is None or tool in self.allow) and tool not in self.deny


class McpServersFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mcpServers: dict[str, McpServerConfig]  # the name every client of the format uses

    @field_validator("mcpServers")
    @classmethod
    def usable_names(cls, servers: dict[str, McpServerConfig]) -> dict[str, McpServerConfig]:
        for name in servers:
            if not SERVER_NAME.match(name):
                raise ValueError(
                    f"server name {name!r}: use 1-32 letters, digits, '-' or '_' "
                    "(not starting with '-' or '_', no '__')"
                )
        return servers


def parse_servers(text: str, source: str) -> dict[str, McpServerConfig]:
    """The servers in a file's text; McpConfigError naming the server and key if bad."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise McpConfigError(f"{source} is not JSON: {exc}") from None
    try:
        parsed = McpServersFile.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "the top level"
        raise McpConfigError(f"{source}: {where}: {first['msg']}") from None
    return parsed.mcpServers


def load_servers(path: Path) -> dict[str, McpServerConfig]:
    """Read and validate the file (blocking: run it in a thread on the event loop)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise McpConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    return parse_servers(text, str(path))
