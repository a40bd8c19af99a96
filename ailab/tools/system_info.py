"""The system information tool: OS, CPU, memory and the workspace's disk."""

from __future__ import annotations

import platform
from typing import Any

import psutil

from ailab.tools.catalogue import tool
from ailab.tools.policy import ToolPolicy
from ailab.tools.results import human_size
from ailab.tools.sandbox import require_roots


@tool()
def get_system_info(policy: ToolPolicy) -> dict[str, Any]:
    """Operating system, CPU count and load, memory, and disk usage of the workspace."""
    roots = require_roots(policy)
    memory = psutil.virtual_memory()
    disk = psutil.disk_usage(str(roots[0]))
    return {
        "os": platform.system(),
        "os_release": platform.release(),
        "architecture": platform.machine(),
        "python": platform.python_version(),
        "cpu_count": psutil.cpu_count(),
        "cpu_percent": psutil.cpu_percent(interval=0.1),
        "load_average": [round(x, 2) for x in psutil.getloadavg()],
        "memory": {
            "total": human_size(memory.total),
            "available": human_size(memory.available),
            "used_percent": memory.percent,
        },
        "workspace_disk": {
            "path": str(roots[0]),
            "total": human_size(disk.total),
            "free": human_size(disk.free),
            "used_percent": disk.percent,
        },
    }
