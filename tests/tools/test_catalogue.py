"""The catalogue: schemas built from the tools, the dispatcher, and the approval modes."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from tool_helpers import Workspace

from ailab import tools
from ailab.tools import catalogue


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    return Workspace.create(tmp_path, AILAB_TOOL_APPROVAL="auto")


# --- schemas -------------------------------------------------------------------------


def test_there_are_fifteen_tools_with_openai_function_schemas() -> None:
    schemas = tools.get_available_tools()
    assert len(schemas) == 15
    assert [s["function"]["name"] for s in schemas] == tools.tool_names()
    for schema in schemas:
        assert schema["type"] == "function"
        function = schema["function"]
        assert function["description"].strip()
        parameters = function["parameters"]
        assert parameters["type"] == "object"
        assert parameters["additionalProperties"] is False
        assert set(parameters["required"]) <= set(parameters["properties"])
        for prop in parameters["properties"].values():
            assert "type" in prop and "title" not in prop


def test_schemas_name_every_spec_tool() -> None:
    assert set(tools.tool_names()) == {
        "lookup_hostname",
        "measure_http_latency",
        "read_file",
        "write_file",
        "list_contents",
        "search_files",
        "calculate_directory_size",
        "get_file_info",
        "create_directory",
        "move_file",
        "copy_file",
        "delete_file",
        "get_current_directory",
        "find_in_files",
        "get_system_info",
    }


def test_schema_marks_required_and_optional_parameters() -> None:
    by_name = {
        s["function"]["name"]: s["function"]["parameters"] for s in tools.get_available_tools()
    }
    assert by_name["read_file"]["required"] == ["path"]
    assert by_name["move_file"]["required"] == ["source", "dest"]
    assert by_name["list_contents"]["properties"]["max_results"]["default"] == 100
    assert by_name["write_file"]["properties"]["lines"]["type"] == "array"


def test_the_policy_parameter_is_never_shown_to_the_model() -> None:
    for schema in tools.get_available_tools():
        assert "policy" not in schema["function"]["parameters"]["properties"]


def test_a_tool_without_the_policy_parameter_is_refused_at_registration() -> None:
    def no_policy(path: str) -> dict[str, Any]:
        return {}

    with pytest.raises(TypeError, match="first parameter must be policy"):
        catalogue.tool()(no_policy)
    assert "no_policy" not in tools.tool_names()


# --- dispatcher ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "arguments", "expected"),
    [
        ("no_such_tool", {}, "unknown tool"),
        ("read_file", "{not json", "not valid JSON"),
        ("read_file", "[1, 2]", "JSON object"),
        ("read_file", {}, "path: Field required"),
        ("read_file", {"path": 5}, "valid string"),
        ("read_file", {"path": "a", "mode": "rb"}, "mode: Extra inputs"),
        ("list_contents", {"max_results": 0}, "greater than or equal to 1"),
        ("list_contents", {"max_results": "lots"}, "valid integer"),
        ("read_file", {"policy": "auto", "path": "a"}, "policy: Extra inputs"),
        (None, None, "unknown tool"),
    ],
)
def test_dispatcher_never_raises_on_junk_and_names_the_problem(
    ws: Workspace, name: Any, arguments: Any, expected: str
) -> None:
    result = ws.run(name, arguments)
    assert result["status"] == "error"
    assert expected in result["error"]


def test_invalid_arguments_error_shows_the_expected_parameters(ws: Workspace) -> None:
    error = ws.fails("move_file", source="a")
    assert "move_file(source: string, dest: string, overwrite?: boolean)" in error


def test_arguments_may_arrive_as_a_json_string(ws: Workspace) -> None:
    (ws / "a.txt").write_text("hi\n")
    result = ws.run("read_file", '{"path": "a.txt"}')
    assert result["content"] == "hi\n"


def test_an_unexpected_exception_in_a_tool_becomes_an_error_result(
    ws: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(policy: tools.ToolPolicy, path: str) -> dict[str, Any]:
        raise RuntimeError("boom")

    spec = dataclasses.replace(catalogue._TOOLS["read_file"], func=broken)
    monkeypatch.setitem(catalogue._TOOLS, "read_file", spec)
    assert "RuntimeError: boom" in ws.fails("read_file", path="x")


def test_describe_call_is_one_short_line() -> None:
    assert tools.describe_call("lookup_hostname", {"hostname": "google.com"}) == (
        "lookup_hostname(google.com)"
    )
    assert tools.describe_call("read_file", '{"path": "notes.txt"}') == "read_file(notes.txt)"
    long = tools.describe_call("write_file", {"path": "a.txt", "content": "x\n" * 500})
    assert "\n" not in long and len(long) < 100
    assert tools.describe_call("list_contents", {"path": ".", "show_hidden": True}) == (
        "list_contents(., show_hidden=true)"
    )
    assert tools.describe_call("read_file", "{bad") == "read_file(<invalid arguments>)"


def test_format_result_for_model_marks_data_and_caps_size() -> None:
    small = tools.format_result_for_model({"status": "success", "x": 1})
    assert small.startswith(tools.TOOL_OUTPUT_MARKER)
    assert json.loads(small.split("\n", 1)[1]) == {"status": "success", "x": 1}
    big = tools.format_result_for_model({"content": "y" * 20_000}, limit=1000)
    assert len(big) < 1200
    assert "cut: 1000 of" in big


# --- approval modes ------------------------------------------------------------------


def test_approval_needed_is_false_for_invalid_calls(ws: Workspace) -> None:
    assert not tools.approval_needed(ws.policy, "delete_file", "{oops")
    assert not tools.approval_needed(ws.policy, "delete_file", {"wrong": 1})
    assert not tools.approval_needed(ws.policy, "nope", {})


def test_ask_policy_runs_only_approved_calls(tmp_path: Path) -> None:
    ws = Workspace.create(tmp_path, AILAB_TOOL_APPROVAL="ask")
    (ws / "a.txt").write_text("a")
    refused = ws.run("delete_file", {"path": "a.txt"})
    assert refused["status"] == "error" and "needs the user's approval" in refused["error"]
    assert (ws / "a.txt").exists()
    assert ws.run("delete_file", {"path": "a.txt"}, approved=True)["status"] == "success"
    assert not (ws / "a.txt").exists()
    assert ws.ok("write_file", path="fresh.txt", content="no approval needed")


def test_deny_policy_refuses_changes_to_existing_files(tmp_path: Path) -> None:
    ws = Workspace.create(tmp_path, AILAB_TOOL_APPROVAL="deny")
    (ws / "a.txt").write_text("a")
    result = ws.run("write_file", {"path": "a.txt", "content": "b"}, approved=True)
    assert "refused by the approval policy (AILAB_TOOL_APPROVAL=deny)" in result["error"]
    assert (ws / "a.txt").read_text() == "a"
    assert ws.ok("write_file", path="b.txt", content="new files are fine")


def test_auto_policy_runs_without_approval(ws: Workspace) -> None:
    (ws / "a.txt").write_text("a")
    ws.ok("move_file", source="a.txt", dest="b.txt")
    assert (ws / "b.txt").read_text() == "a"


def test_one_gateways_policy_does_not_leak_into_another(tmp_path: Path) -> None:
    asking = Workspace.create(tmp_path / "one", AILAB_TOOL_APPROVAL="ask")
    automatic = Workspace.create(tmp_path / "two", AILAB_TOOL_APPROVAL="auto")
    (asking / "a.txt").write_text("a")
    (automatic / "a.txt").write_text("a")
    assert "needs the user's approval" in asking.fails("delete_file", path="a.txt")
    automatic.ok("delete_file", path="a.txt")
    assert (asking / "a.txt").exists() and not (automatic / "a.txt").exists()
    assert "outside the folders shared" in automatic.fails("read_file", path=str(asking / "a.txt"))
