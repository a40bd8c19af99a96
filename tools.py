"""Entry point to the tool catalogue: the sandboxed tools live in the ailab.tools package.

`import tools` from the repository root gives the tool definitions, `execute_tool` and
the `ToolPolicy` it runs under, e.g.
`tools.execute_tool(tools.ToolPolicy.from_settings(load_settings()), "read_file", {...})`.
"""

from ailab.tools import ToolPolicy, execute_tool, get_available_tools, tool_names

__all__ = ["ToolPolicy", "execute_tool", "get_available_tools", "tool_names"]
