"""The system information tool on this machine."""

from __future__ import annotations

from pathlib import Path

from tool_helpers import Workspace


def test_get_system_info_reports_os_cpu_memory_and_workspace_disk(tmp_path: Path) -> None:
    ws = Workspace.create(tmp_path)
    info = ws.ok("get_system_info")
    assert info["cpu_count"] >= 1 and len(info["load_average"]) == 3
    assert info["os"] and info["memory"]["total"].endswith("iB")
    assert info["workspace_disk"]["path"] == str(ws.path.resolve())
