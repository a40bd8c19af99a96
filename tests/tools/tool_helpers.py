"""Helpers for the tool tests: a real workspace with the policy a gateway would give it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ailab import config
from ailab.tools import ToolPolicy, execute_tool


def settings_for(tmp_path: Path, **env: str) -> config.Settings:
    return config.load_settings({"AILAB_DATA_DIR": str(tmp_path / "data"), **env})


@dataclass(frozen=True)
class Workspace:
    """The settings' workspace folder and the policy a gateway with those settings runs
    tools under; ``ws / "a.txt"`` is a path inside the folder."""

    path: Path
    policy: ToolPolicy

    @classmethod
    def create(cls, tmp_path: Path, **env: str) -> Workspace:
        settings = settings_for(tmp_path, **env)
        return cls(settings.workspace_dir, ToolPolicy.from_settings(settings))

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def run(self, name: Any, arguments: Any, approved: bool = False) -> dict[str, Any]:
        return execute_tool(self.policy, name, arguments, approved=approved)

    def ok(self, name: str, **arguments: Any) -> dict[str, Any]:
        result = self.run(name, arguments)
        assert result["status"] == "success", result
        return result

    def fails(self, name: str, **arguments: Any) -> str:
        result = self.run(name, arguments)
        assert result["status"] == "error", result
        assert set(result) == {"status", "error"}
        return result["error"]


def make_tree(ws: Workspace) -> None:
    (ws / "src" / "pkg").mkdir(parents=True)
    (ws / "src" / "main.py").write_text("print('hello')\n")
    (ws / "src" / "pkg" / "util.py").write_text("def hello():\n    return 'Hello'\n")
    (ws / "README.md").write_text("# Hello project\n")
    (ws / ".hidden").write_text("h")
