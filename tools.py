"""Entry point to the tool catalogue: the sandboxed tools live in the ailab.tools package.

`import tools` from the repository root gives the tool definitions and `execute_tool`.
"""

from ailab.tools_all import execute_tool, get_available_tools, tool_names

__all__ = ["execute_tool", "get_available_tools", "tool_names"]
