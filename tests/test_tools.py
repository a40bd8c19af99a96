"""Every tool on real files, the dispatcher, the schemas and the approval policy."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import pytest

from ailab import config
from ailab import tools_all as tools


def configure(tmp_path: Path, **env: str) -> config.Settings:
    settings = config.load_settings({"AILAB_DATA_DIR": str(tmp_path / "data"), **env})
    tools.configure(settings)
    return settings


@pytest.fixture
def ws(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A configured workspace with approvals on auto; the previous policy comes back after."""
    monkeypatch.setattr(tools, "_POLICY", tools._POLICY)
    return configure(tmp_path, AILAB_TOOL_APPROVAL="auto").workspace_dir


def ok(name: str, **arguments: Any) -> dict[str, Any]:
    result = tools.execute_tool(name, arguments)
    assert result["status"] == "success", result
    return result


def fails(name: str, **arguments: Any) -> str:
    result = tools.execute_tool(name, arguments)
    assert result["status"] == "error", result
    assert set(result) == {"status", "error"}
    return result["error"]


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
        (None, None, "unknown tool"),
    ],
)
def test_dispatcher_never_raises_on_junk_and_names_the_problem(
    ws: Path, name: Any, arguments: Any, expected: str
) -> None:
    result = tools.execute_tool(name, arguments)
    assert result["status"] == "error"
    assert expected in result["error"]


def test_invalid_arguments_error_shows_the_expected_parameters(ws: Path) -> None:
    error = fails("move_file", source="a")
    assert "move_file(source: string, dest: string, overwrite?: boolean)" in error


def test_arguments_may_arrive_as_a_json_string(ws: Path) -> None:
    (ws / "a.txt").write_text("hi\n")
    result = tools.execute_tool("read_file", '{"path": "a.txt"}')
    assert result["content"] == "hi\n"


def test_an_unexpected_exception_in_a_tool_becomes_an_error_result(
    ws: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(path: str) -> dict[str, Any]:
        raise RuntimeError("boom")

    spec = dataclasses.replace(tools._TOOLS["read_file"], func=broken)
    monkeypatch.setitem(tools._TOOLS, "read_file", spec)
    assert "RuntimeError: boom" in fails("read_file", path="x")


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


# --- approval policy -----------------------------------------------------------------


def test_approval_is_needed_for_delete_move_and_overwrites_only(ws: Path) -> None:
    (ws / "a.txt").write_text("a")
    assert tools.approval_needed("delete_file", {"path": "a.txt"})
    assert tools.approval_needed("move_file", {"source": "a.txt", "dest": "b.txt"})
    assert tools.approval_needed("write_file", {"path": "a.txt", "content": "x"})
    assert not tools.approval_needed("write_file", {"path": "new.txt", "content": "x"})
    assert tools.approval_needed("copy_file", '{"source": "new.txt", "dest": "a.txt"}') is False
    (ws / "c.txt").write_text("c")
    assert tools.approval_needed("copy_file", {"source": "c.txt", "dest": "a.txt"})
    assert not tools.approval_needed("copy_file", {"source": "c.txt", "dest": "d.txt"})
    assert not tools.approval_needed("read_file", {"path": "a.txt"})


def test_approval_needed_is_false_for_invalid_calls(ws: Path) -> None:
    assert not tools.approval_needed("delete_file", "{oops")
    assert not tools.approval_needed("delete_file", {"wrong": 1})
    assert not tools.approval_needed("nope", {})


def test_copy_into_a_folder_needs_approval_when_the_file_inside_exists(ws: Path) -> None:
    (ws / "a.txt").write_text("a")
    (ws / "dir").mkdir()
    assert not tools.approval_needed("copy_file", {"source": "a.txt", "dest": "dir"})
    (ws / "dir" / "a.txt").write_text("old")
    assert tools.approval_needed("copy_file", {"source": "a.txt", "dest": "dir"})


def test_ask_policy_runs_only_approved_calls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tools, "_POLICY", tools._POLICY)
    ws = configure(tmp_path, AILAB_TOOL_APPROVAL="ask").workspace_dir
    (ws / "a.txt").write_text("a")
    refused = tools.execute_tool("delete_file", {"path": "a.txt"})
    assert refused["status"] == "error" and "needs the user's approval" in refused["error"]
    assert (ws / "a.txt").exists()
    assert tools.execute_tool("delete_file", {"path": "a.txt"}, approved=True)["status"] == (
        "success"
    )
    assert not (ws / "a.txt").exists()
    assert ok("write_file", path="fresh.txt", content="no approval needed")


def test_deny_policy_refuses_changes_to_existing_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tools, "_POLICY", tools._POLICY)
    ws = configure(tmp_path, AILAB_TOOL_APPROVAL="deny").workspace_dir
    (ws / "a.txt").write_text("a")
    result = tools.execute_tool("write_file", {"path": "a.txt", "content": "b"}, approved=True)
    assert "refused by the approval policy (AILAB_TOOL_APPROVAL=deny)" in result["error"]
    assert (ws / "a.txt").read_text() == "a"
    assert ok("write_file", path="b.txt", content="new files are fine")


def test_auto_policy_runs_without_approval(ws: Path) -> None:
    (ws / "a.txt").write_text("a")
    ok("move_file", source="a.txt", dest="b.txt")
    assert (ws / "b.txt").read_text() == "a"


# --- file I/O ------------------------------------------------------------------------


def test_write_then_read_round_trips_text(ws: Path) -> None:
    written = ok("write_file", path="notes/today.txt", content="one\ntwo\n")
    assert written["bytes_written"] == 8 and written["created"] is True
    read = ok("read_file", path="notes/today.txt")
    assert read["content"] == "one\ntwo\n" and read["lines"] == 2
    assert read["path"] == "notes/today.txt"


def test_write_accepts_lines(ws: Path) -> None:
    ok("write_file", path="l.txt", lines=["a", "b"])
    assert (ws / "l.txt").read_text() == "a\nb\n"


def test_write_needs_exactly_one_of_content_or_lines(ws: Path) -> None:
    assert "exactly one" in fails("write_file", path="x.txt")
    assert "exactly one" in fails("write_file", path="x.txt", content="a", lines=["b"])


def test_overwrite_keeps_file_permissions_and_leaves_no_temp_files(ws: Path) -> None:
    target = ws / "script.sh"
    target.write_text("old")
    target.chmod(0o750)
    result = ok("write_file", path="script.sh", content="new")
    assert result["created"] is False
    assert target.read_text() == "new"
    assert target.stat().st_mode & 0o777 == 0o750
    assert sorted(p.name for p in ws.iterdir()) == ["script.sh"]


def test_read_refuses_binary_files(ws: Path) -> None:
    (ws / "img.bin").write_bytes(b"\x89PNG\x00\x01\x02")
    assert "binary" in fails("read_file", path="img.bin")
    (ws / "latin.txt").write_bytes("café".encode("latin-1"))
    assert "not UTF-8" in fails("read_file", path="latin.txt")


def test_read_refuses_files_over_one_mebibyte_and_says_so(ws: Path) -> None:
    (ws / "big.txt").write_text("x" * (tools.READ_LIMIT_BYTES + 1))
    assert "at most 1 MiB" in fails("read_file", path="big.txt")
    (ws / "edge.txt").write_text("x" * tools.READ_LIMIT_BYTES)
    assert ok("read_file", path="edge.txt")["size_bytes"] == tools.READ_LIMIT_BYTES


def test_write_refuses_more_than_one_mebibyte(ws: Path) -> None:
    error = fails("write_file", path="big.txt", content="x" * (tools.WRITE_LIMIT_BYTES + 1))
    assert "at most 1 MiB" in error
    assert not (ws / "big.txt").exists()


def test_write_refuses_nul_characters(ws: Path) -> None:
    assert "text only" in fails("write_file", path="x.txt", content="a\x00b")


def test_read_of_missing_file_or_folder_says_what_to_do(ws: Path) -> None:
    assert "does not exist" in fails("read_file", path="ghost.txt")
    (ws / "dir").mkdir()
    assert "not a regular file" in fails("read_file", path="dir")


def test_read_of_a_fifo_fails_instead_of_hanging(ws: Path) -> None:
    os.mkfifo(ws / "pipe")
    assert "not a regular file" in fails("read_file", path="pipe")


def test_write_onto_a_folder_is_refused(ws: Path) -> None:
    (ws / "dir").mkdir()
    assert "is a folder" in fails("write_file", path="dir", content="x")


# --- directories ---------------------------------------------------------------------


def make_tree(ws: Path) -> None:
    (ws / "src" / "pkg").mkdir(parents=True)
    (ws / "src" / "main.py").write_text("print('hello')\n")
    (ws / "src" / "pkg" / "util.py").write_text("def hello():\n    return 'Hello'\n")
    (ws / "README.md").write_text("# Hello project\n")
    (ws / ".hidden").write_text("h")


def test_list_contents_lists_types_and_sizes_and_hides_dotfiles(ws: Path) -> None:
    make_tree(ws)
    listing = ok("list_contents")
    assert listing["items"] == [
        {"name": "README.md", "type": "file", "size": 16},
        {"name": "src", "type": "directory", "size": listing["items"][1]["size"]},
    ]
    assert listing["total_items"] == 2 and listing["truncated"] is False
    hidden = ok("list_contents", path=".", show_hidden=True)
    assert ".hidden" in [item["name"] for item in hidden["items"]]


def test_list_contents_stops_at_max_results_and_says_so(ws: Path) -> None:
    for i in range(7):
        (ws / f"f{i}.txt").write_text("x")
    listing = ok("list_contents", max_results=5)
    assert len(listing["items"]) == 5
    assert listing["total_items"] == 7
    assert listing["truncated"] is True and "max_results=5" in listing["note"]


def test_list_contents_of_a_file_is_an_error(ws: Path) -> None:
    (ws / "a.txt").write_text("a")
    assert "not a folder" in fails("list_contents", path="a.txt")


def test_search_files_matches_globs_recursively_or_not(ws: Path) -> None:
    make_tree(ws)
    found = ok("search_files", pattern="*.py")
    assert sorted(found["files"]) == ["src/main.py", "src/pkg/util.py"]
    assert found["count"] == 2 and found["truncated"] is False
    assert ok("search_files", pattern="*.py", recursive=False)["files"] == []
    assert ok("search_files", pattern="pk*")["files"] == ["src/pkg/"]


def test_search_files_truncates_at_max_results(ws: Path) -> None:
    for i in range(150):
        (ws / f"{i:03}.log").write_text("x")
    found = ok("search_files", pattern="*.log")
    assert found["count"] == 100 and found["truncated"] is True
    assert ok("search_files", pattern="*.log", max_results=150)["truncated"] is False


def test_walks_stop_after_the_entry_limit_and_say_so(
    ws: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tools, "WALK_MAX_ENTRIES", 10)
    for i in range(20):
        (ws / f"{i:02}.txt").write_text("needle")
    found = ok("find_in_files", search_text="needle")
    assert found["truncated"] is True and "stopped after 10 entries" in found["note"]
    size = ok("calculate_directory_size")
    assert size["truncated"] is True


def test_walks_stop_after_the_time_limit(ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tools, "WALK_MAX_SECONDS", -1.0)
    (ws / "a.txt").write_text("x")
    assert "stopped after" in ok("search_files")["note"]


def test_calculate_directory_size_adds_file_sizes(ws: Path) -> None:
    (ws / "d" / "e").mkdir(parents=True)
    (ws / "d" / "a.bin").write_bytes(b"x" * 1000)
    (ws / "d" / "e" / "b.bin").write_bytes(b"x" * 2048)
    result = ok("calculate_directory_size", path="d")
    assert result["size_bytes"] == 3048
    assert result["size_human"] == "3.0 KiB"
    assert result["file_count"] == 2 and result["folder_count"] == 1
    shallow = ok("calculate_directory_size", path="d", max_depth=1)
    assert shallow["size_bytes"] == 1000 and shallow["depth_limited"] is True


def test_walk_depth_is_bounded(ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    deep = ws.joinpath(*["d"] * 25)
    deep.mkdir(parents=True)
    (deep / "bottom.txt").write_text("x")
    assert ok("search_files", pattern="bottom.txt")["files"] == []


# --- metadata and management ---------------------------------------------------------


def test_get_file_info_reports_size_times_permissions_and_type(ws: Path) -> None:
    (ws / "a.txt").write_text("hello")
    (ws / "a.txt").chmod(0o640)
    info = ok("get_file_info", path="a.txt")
    assert info["size"] == 5 and info["type"] == "file"
    assert info["permissions"] == "-rw-r-----" and info["permissions_octal"] == "0o640"
    assert info["modified"][:4].isdigit() and "T" in info["created"]
    assert ok("get_file_info", path=".")["type"] == "directory"


def test_create_directory_with_and_without_parents(ws: Path) -> None:
    assert ok("create_directory", path="a/b/c")["created"] is True
    assert (ws / "a" / "b" / "c").is_dir()
    assert ok("create_directory", path="a/b/c")["created"] is False
    assert "pass parents=true" in fails("create_directory", path="x/y", parents=False)
    (ws / "f").write_text("")
    assert "is a file" in fails("create_directory", path="f")


def test_move_renames_and_moves_into_folders(ws: Path) -> None:
    (ws / "a.txt").write_text("a")
    (ws / "dir").mkdir()
    ok("move_file", source="a.txt", dest="dir")
    assert (ws / "dir" / "a.txt").read_text() == "a"
    ok("move_file", source="dir", dest="renamed")
    assert (ws / "renamed" / "a.txt").exists() and not (ws / "dir").exists()


def test_move_does_not_overwrite_unless_asked(ws: Path) -> None:
    (ws / "a.txt").write_text("a")
    (ws / "b.txt").write_text("b")
    assert "overwrite=true" in fails("move_file", source="a.txt", dest="b.txt")
    ok("move_file", source="a.txt", dest="b.txt", overwrite=True)
    assert (ws / "b.txt").read_text() == "a"


def test_copy_copies_files_and_folders(ws: Path) -> None:
    (ws / "a.txt").write_text("a")
    result = ok("copy_file", source="a.txt", dest="b.txt")
    assert result["bytes_copied"] == 1 and (ws / "a.txt").exists()
    make_tree(ws)
    ok("copy_file", source="src", dest="src2")
    assert (ws / "src2" / "pkg" / "util.py").read_text().startswith("def hello")


def test_copy_does_not_overwrite_unless_asked(ws: Path) -> None:
    (ws / "a.txt").write_text("a")
    (ws / "b.txt").write_text("b")
    assert "overwrite=true" in fails("copy_file", source="a.txt", dest="b.txt")
    ok("copy_file", source="a.txt", dest="b.txt", overwrite=True)
    assert (ws / "b.txt").read_text() == "a"


def test_copy_of_binary_files_is_allowed(ws: Path) -> None:
    (ws / "img.bin").write_bytes(bytes(range(256)))
    ok("copy_file", source="img.bin", dest="img2.bin")
    assert (ws / "img2.bin").read_bytes() == bytes(range(256))


def test_copy_folder_into_itself_is_refused(ws: Path) -> None:
    (ws / "d").mkdir()
    assert "into itself" in fails("copy_file", source="d", dest="d/inner")


def test_delete_files_empty_and_full_folders(ws: Path) -> None:
    (ws / "a.txt").write_text("a")
    ok("delete_file", path="a.txt")
    assert not (ws / "a.txt").exists()
    (ws / "full").mkdir()
    (ws / "full" / "x").write_text("x")
    assert "recursive=true" in fails("delete_file", path="full")
    ok("delete_file", path="full", recursive=True)
    assert not (ws / "full").exists()


def test_delete_of_the_workspace_itself_is_refused(ws: Path) -> None:
    assert "shared root" in fails("delete_file", path=".", recursive=True)
    assert ws.is_dir()


def test_get_current_directory_is_the_first_root_not_the_process_cwd(ws: Path) -> None:
    result = ok("get_current_directory")
    assert result["path"] == str(ws.resolve()) != os.getcwd()
    assert result["allowed_roots"] == [str(ws.resolve())]


def test_find_in_files_returns_file_line_number_and_line(ws: Path) -> None:
    make_tree(ws)
    (ws / "blob.bin").write_bytes(b"hello\x00world")
    found = ok("find_in_files", search_text="hello")
    assert {(m["file"], m["line_number"]) for m in found["matches"]} == {
        ("README.md", 1),
        ("src/main.py", 1),
        ("src/pkg/util.py", 1),
        ("src/pkg/util.py", 2),
    }
    assert found["files_skipped"] == 1
    exact = ok("find_in_files", search_text="Hello", case_sensitive=True, file_pattern="*.py")
    assert [m["line"] for m in exact["matches"]] == ["    return 'Hello'"]


def test_find_in_files_truncates_at_max_results(ws: Path) -> None:
    (ws / "many.txt").write_text("hit\n" * 30)
    found = ok("find_in_files", search_text="hit", max_results=10)
    assert found["count"] == 10 and found["truncated"] is True


def test_find_in_a_single_file(ws: Path) -> None:
    (ws / "a.txt").write_text("x\ny needle\n")
    found = ok("find_in_files", search_text="needle", path="a.txt")
    assert found["matches"] == [{"file": "a.txt", "line_number": 2, "line": "y needle"}]


def test_get_system_info_reports_os_cpu_memory_and_workspace_disk(ws: Path) -> None:
    info = ok("get_system_info")
    assert info["cpu_count"] >= 1 and len(info["load_average"]) == 3
    assert info["os"] and info["memory"]["total"].endswith("iB")
    assert info["workspace_disk"]["path"] == str(ws.resolve())


# --- configuration -------------------------------------------------------------------


def test_configure_creates_the_workspace_and_uses_it_as_the_root(ws: Path) -> None:
    assert ws.is_dir()
    assert tools.get_allowed_roots() == [ws.resolve()]


def test_configure_uses_tool_roots_when_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tools, "_POLICY", tools._POLICY)
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    configure(tmp_path, AILAB_TOOL_ROOTS=f"{one}{os.pathsep}{two}")
    assert tools.get_allowed_roots() == [one.resolve(), two.resolve()]


def test_configure_reports_a_missing_root_as_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tools, "_POLICY", tools._POLICY)
    with pytest.raises(config.ConfigError, match=r"AILAB_TOOL_ROOTS: .* does not exist"):
        configure(tmp_path, AILAB_TOOL_ROOTS=str(tmp_path / "missing"))


def test_set_allowed_roots_validates_each_folder(ws: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    assert tools.set_allowed_roots([ws, str(other)]) == [ws.resolve(), other.resolve()]
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="not a folder"):
        tools.set_allowed_roots([tmp_path / "file"])
    with pytest.raises(ValueError, match="does not exist"):
        tools.set_allowed_roots([tmp_path / "nope"])
    with pytest.raises(ValueError, match="protected system path"):
        tools.set_allowed_roots(["/etc"])
    with pytest.raises(ValueError, match="protected system path"):
        tools.set_allowed_roots(["/"])
    with pytest.raises(ValueError, match="at least one"):
        tools.set_allowed_roots([])
    assert tools.get_allowed_roots() == [ws.resolve(), other.resolve()]


def test_tools_refuse_to_work_before_any_root_is_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tools, "_POLICY", tools._Policy())
    assert "no folder is shared" in fails("list_contents")
