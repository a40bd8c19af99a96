"""The tools the model may call: the policy they run under, the catalogue, every tool.

Importing the package registers the tool families with the catalogue; the import order
below is the order the model sees the tools in.
"""

# isort: off
from ailab.tools import network_tools, file_reading, file_changing, system_info  # noqa: F401

# isort: on
from ailab.tools.catalogue import (
    TOOL_OUTPUT_MARKER,
    approval_needed,
    describe_call,
    execute_tool,
    format_result_for_model,
    get_available_tools,
    tool_names,
    tool_signature,
)
from ailab.tools.errors import SandboxError, ToolError
from ailab.tools.policy import ToolPolicy

__all__ = [
    "TOOL_OUTPUT_MARKER",
    "SandboxError",
    "ToolError",
    "ToolPolicy",
    "approval_needed",
    "describe_call",
    "execute_tool",
    "format_result_for_model",
    "get_available_tools",
    "tool_names",
    "tool_signature",
]
