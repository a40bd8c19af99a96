"""The reading tools on real files: contents, listings, searches, sizes and metadata."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from tool_helpers import Workspace, make_tree

from ailab.tools import file_reading, sandbox


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    return Workspace.create(tmp_path, AILAB_TOOL_APPROVAL="auto")


# --- read_file -----------------------------------------------------------------------


def test_read_refuses_binary_files(ws: Workspace) -> None:
    (ws / "img.bin").write_bytes(b"\x89PNG\x00\x01\x02")
    assert "binary" in ws.fails("read_file", path="img.bin")
    (ws / "latin.txt").write_bytes("café".encode("latin-1"))
    assert "not UTF-8" in ws.fails("read_file", path="latin.txt")


def test_read_refuses_files_over_one_mebibyte_and_says_so(ws: Workspace) -> None:
    (ws / "big.txt").write_text("x" * (file_reading.READ_LIMIT_BYTES + 1))
    assert "at most 1 MiB" in ws.fails("read_file", path="big.txt")
    (ws / "edge.txt").write_text("x" * file_reading.READ_LIMIT_BYTES)
    assert ws.ok("read_file", path="edge.txt")["size_bytes"] == file_reading.READ_LIMIT_BYTES


def test_read_of_missing_file_or_folder_says_what_to_do(ws: Workspace) -> None:
    assert "does not exist" in ws.fails("read_file", path="ghost.txt")
    (ws / "dir").mkdir()
    assert "not a regular file" in ws.fails("read_file", path="dir")


def test_read_of_a_fifo_fails_instead_of_hanging(ws: Workspace) -> None:
    os.mkfifo(ws / "pipe")
    assert "not a regular file" in ws.fails("read_file", path="pipe")


# --- listings and searches -----------------------------------------------------------


def test_list_contents_lists_types_and_sizes_and_hides_dotfiles(ws: Workspace) -> None:
    make_tree(ws)
    listing = ws.ok("list_contents")
    assert listing["items"] == [
        {"name": "README.md", "type": "file", "size": 16},
        {"name": "src", "type": "directory", "size": listing["items"][1]["size"]},
    ]
    assert listing["total_items"] == 2 and listing["truncated"] is False
    hidden = ws.ok("list_contents", path=".", show_hidden=True)
    assert ".hidden" in [item["name"] for item in hidden["items"]]


def test_list_contents_stops_at_max_results_and_says_so(ws: Workspace) -> None:
    for i in range(7):
        (ws / f"f{i}.txt").write_text("x")
    listing = ws.ok("list_contents", max_results=5)
    assert len(listing["items"]) == 5
    assert listing["total_items"] == 7
    assert listing["truncated"] is True and "max_results=5" in listing["note"]


def test_list_contents_of_a_file_is_an_error(ws: Workspace) -> None:
    (ws / "a.txt").write_text("a")
    assert "not a folder" in ws.fails("list_contents", path="a.txt")


def test_search_files_matches_globs_recursively_or_not(ws: Workspace) -> None:
    make_tree(ws)
    found = ws.ok("search_files", pattern="*.py")
    assert sorted(found["files"]) == ["src/main.py", "src/pkg/util.py"]
    assert found["count"] == 2 and found["truncated"] is False
    assert ws.ok("search_files", pattern="*.py", recursive=False)["files"] == []
    assert ws.ok("search_files", pattern="pk*")["files"] == ["src/pkg/"]


def test_search_files_truncates_at_max_results(ws: Workspace) -> None:
    for i in range(150):
        (ws / f"{i:03}.log").write_text("x")
    found = ws.ok("search_files", pattern="*.log")
    assert found["count"] == 100 and found["truncated"] is True
    assert ws.ok("search_files", pattern="*.log", max_results=150)["truncated"] is False


def test_walks_stop_after_the_entry_limit_and_say_so(
    ws: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sandbox, "WALK_MAX_ENTRIES", 10)
    for i in range(20):
        (ws / f"{i:02}.txt").write_text("needle")
    found = ws.ok("find_in_files", search_text="needle")
    assert found["truncated"] is True and "stopped after 10 entries" in found["note"]
    size = ws.ok("calculate_directory_size")
    assert size["truncated"] is True


def test_walks_stop_after_the_time_limit(ws: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sandbox, "WALK_MAX_SECONDS", -1.0)
    (ws / "a.txt").write_text("x")
    assert "stopped after" in ws.ok("search_files")["note"]


def test_calculate_directory_size_adds_file_sizes(ws: Workspace) -> None:
    (ws / "d" / "e").mkdir(parents=True)
    (ws / "d" / "a.bin").write_bytes(b"x" * 1000)
    (ws / "d" / "e" / "b.bin").write_bytes(b"x" * 2048)
    result = ws.ok("calculate_directory_size", path="d")
    assert result["size_bytes"] == 3048
    assert result["size_human"] == "3.0 KiB"
    assert result["file_count"] == 2 and result["folder_count"] == 1
    shallow = ws.ok("calculate_directory_size", path="d", max_depth=1)
    assert shallow["size_bytes"] == 1000 and shallow["depth_limited"] is True


def test_walk_depth_is_bounded(ws: Workspace) -> None:
    deep = ws.path.joinpath(*["d"] * 25)
    deep.mkdir(parents=True)
    (deep / "bottom.txt").write_text("x")
    assert ws.ok("search_files", pattern="bottom.txt")["files"] == []


def test_find_in_files_returns_file_line_number_and_line(ws: Workspace) -> None:
    make_tree(ws)
    (ws / "blob.bin").write_bytes(b"hello\x00world")
    found = ws.ok("find_in_files", search_text="hello")
    assert {(m["file"], m["line_number"]) for m in found["matches"]} == {
        ("README.md", 1),
        ("src/main.py", 1),
        ("src/pkg/util.py", 1),
        ("src/pkg/util.py", 2),
    }
    assert found["files_skipped"] == 1
    exact = ws.ok("find_in_files", search_text="Hello", case_sensitive=True, file_pattern="*.py")
    assert [m["line"] for m in exact["matches"]] == ["    return 'Hello'"]


def test_find_in_files_truncates_at_max_results(ws: Workspace) -> None:
    (ws / "many.txt").write_text("hit\n" * 30)
    found = ws.ok("find_in_files", search_text="hit", max_results=10)
    assert found["count"] == 10 and found["truncated"] is True


def test_find_in_a_single_file(ws: Workspace) -> None:
    (ws / "a.txt").write_text("x\ny needle\n")
    found = ws.ok("find_in_files", search_text="needle", path="a.txt")
    assert found["matches"] == [{"file": "a.txt", "line_number": 2, "line": "y needle"}]


# --- metadata ------------------------------------------------------------------------


def test_get_file_info_reports_size_times_permissions_and_type(ws: Workspace) -> None:
    (ws / "a.txt").write_text("hello")
    (ws / "a.txt").chmod(0o640)
    info = ws.ok("get_file_info", path="a.txt")
    assert info["size"] == 5 and info["type"] == "file"
    assert info["permissions"] == "-rw-r-----" and info["permissions_octal"] == "0o640"
    assert info["modified"][:4].isdigit() and "T" in info["created"]
    assert ws.ok("get_file_info", path=".")["type"] == "directory"


def test_get_current_directory_is_the_first_root_not_the_process_cwd(ws: Workspace) -> None:
    result = ws.ok("get_current_directory")
    assert result["path"] == str(ws.path.resolve()) != os.getcwd()
    assert result["allowed_roots"] == [str(ws.path.resolve())]
