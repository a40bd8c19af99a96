"""ToolPolicy from the settings: the shared folders, their checks, and the other rules."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from tool_helpers import Workspace, settings_for

from ailab import config
from ailab.tools import ToolPolicy, execute_tool


def test_from_settings_creates_the_workspace_and_uses_it_as_the_root(tmp_path: Path) -> None:
    ws = Workspace.create(tmp_path)
    assert ws.path.is_dir()
    assert ws.policy.roots == (ws.path.resolve(),)


def test_from_settings_uses_tool_roots_when_given(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    policy = ToolPolicy.from_settings(
        settings_for(tmp_path, AILAB_TOOL_ROOTS=f"{one}{os.pathsep}{two}")
    )
    assert policy.roots == (one.resolve(), two.resolve())


def test_from_settings_takes_the_approval_mode_and_the_network_rule(tmp_path: Path) -> None:
    default = ToolPolicy.from_settings(settings_for(tmp_path))
    assert (default.approval, default.net_allow_private) == ("ask", False)
    env = {"AILAB_TOOL_APPROVAL": "deny", "AILAB_NET_ALLOW_PRIVATE": "1"}
    chosen = ToolPolicy.from_settings(settings_for(tmp_path, **env))
    assert (chosen.approval, chosen.net_allow_private) == ("deny", True)


def test_from_settings_reports_a_missing_root_as_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match=r"AILAB_TOOL_ROOTS: .* does not exist"):
        ToolPolicy.from_settings(settings_for(tmp_path, AILAB_TOOL_ROOTS=str(tmp_path / "no")))


def test_with_roots_validates_each_folder(tmp_path: Path) -> None:
    ws = Workspace.create(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    policy = ws.policy.with_roots([ws.path, str(other)])
    assert policy.roots == (ws.path.resolve(), other.resolve())
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="not a folder"):
        policy.with_roots([tmp_path / "file"])
    with pytest.raises(ValueError, match="does not exist"):
        policy.with_roots([tmp_path / "nope"])
    with pytest.raises(ValueError, match="protected system path"):
        policy.with_roots(["/etc"])
    with pytest.raises(ValueError, match="protected system path"):
        policy.with_roots(["/"])
    with pytest.raises(ValueError, match="at least one"):
        policy.with_roots([])
    assert policy.roots == (ws.path.resolve(), other.resolve())


def test_with_roots_keeps_the_other_rules_and_leaves_the_old_policy_alone(
    tmp_path: Path,
) -> None:
    ws = Workspace.create(tmp_path, AILAB_TOOL_APPROVAL="deny")
    other = tmp_path / "other"
    other.mkdir()
    moved = ws.policy.with_roots([other])
    assert moved.roots == (other.resolve(),) and ws.policy.roots == (ws.path.resolve(),)
    assert (moved.approval, moved.protected) == (ws.policy.approval, ws.policy.protected)


def test_tools_refuse_to_work_before_any_root_is_set() -> None:
    result = execute_tool(ToolPolicy(), "list_contents", {})
    assert set(result) == {"status", "error"} and result["status"] == "error"
    assert "no folder is shared" in result["error"]


def test_roots_set_while_running_may_not_be_the_home_folder_unless_set_at_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "alice"
    (home / "project").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    policy = ToolPolicy()
    with pytest.raises(ValueError, match="whole home folder"):
        policy.with_runtime_roots([str(home)], start_roots=())
    widened = policy.with_runtime_roots([str(home)], start_roots=(home,))
    assert widened.roots == (Path(os.path.realpath(home)),)
    project = policy.with_runtime_roots([str(home / "project")], start_roots=())
    assert project.roots == (Path(os.path.realpath(home / "project")),)
