"""The changing tools on real files: write, create, move, copy, delete, and when they ask."""

from __future__ import annotations

from pathlib import Path

import pytest
from tool_helpers import Workspace, make_tree

from ailab import tools
from ailab.tools import file_changing


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    return Workspace.create(tmp_path, AILAB_TOOL_APPROVAL="auto")


# --- which calls need approval -------------------------------------------------------


def test_approval_is_needed_for_delete_move_and_overwrites_only(ws: Workspace) -> None:
    (ws / "a.txt").write_text("a")
    policy = ws.policy
    assert tools.approval_needed(policy, "delete_file", {"path": "a.txt"})
    assert tools.approval_needed(policy, "move_file", {"source": "a.txt", "dest": "b.txt"})
    assert tools.approval_needed(policy, "write_file", {"path": "a.txt", "content": "x"})
    assert not tools.approval_needed(policy, "write_file", {"path": "new.txt", "content": "x"})
    copy_onto_a = '{"source": "new.txt", "dest": "a.txt"}'
    assert tools.approval_needed(policy, "copy_file", copy_onto_a) is False
    (ws / "c.txt").write_text("c")
    assert tools.approval_needed(policy, "copy_file", {"source": "c.txt", "dest": "a.txt"})
    assert not tools.approval_needed(policy, "copy_file", {"source": "c.txt", "dest": "d.txt"})
    assert not tools.approval_needed(policy, "read_file", {"path": "a.txt"})


def test_copy_into_a_folder_needs_approval_when_the_file_inside_exists(ws: Workspace) -> None:
    (ws / "a.txt").write_text("a")
    (ws / "dir").mkdir()
    assert not tools.approval_needed(ws.policy, "copy_file", {"source": "a.txt", "dest": "dir"})
    (ws / "dir" / "a.txt").write_text("old")
    assert tools.approval_needed(ws.policy, "copy_file", {"source": "a.txt", "dest": "dir"})


# --- write_file ----------------------------------------------------------------------


def test_write_then_read_round_trips_text(ws: Workspace) -> None:
    written = ws.ok("write_file", path="notes/today.txt", content="one\ntwo\n")
    assert written["bytes_written"] == 8 and written["created"] is True
    read = ws.ok("read_file", path="notes/today.txt")
    assert read["content"] == "one\ntwo\n" and read["lines"] == 2
    assert read["path"] == "notes/today.txt"


def test_write_accepts_lines(ws: Workspace) -> None:
    ws.ok("write_file", path="l.txt", lines=["a", "b"])
    assert (ws / "l.txt").read_text() == "a\nb\n"


def test_write_needs_exactly_one_of_content_or_lines(ws: Workspace) -> None:
    assert "exactly one" in ws.fails("write_file", path="x.txt")
    assert "exactly one" in ws.fails("write_file", path="x.txt", content="a", lines=["b"])


def test_overwrite_keeps_file_permissions_and_leaves_no_temp_files(ws: Workspace) -> None:
    target = ws / "script.sh"
    target.write_text("old")
    target.chmod(0o750)
    result = ws.ok("write_file", path="script.sh", content="new")
    assert result["created"] is False
    assert target.read_text() == "new"
    assert target.stat().st_mode & 0o777 == 0o750
    assert sorted(p.name for p in ws.path.iterdir()) == ["script.sh"]


def test_write_refuses_more_than_one_mebibyte(ws: Workspace) -> None:
    too_big = "x" * (file_changing.WRITE_LIMIT_BYTES + 1)
    assert "at most 1 MiB" in ws.fails("write_file", path="big.txt", content=too_big)
    assert not (ws / "big.txt").exists()


def test_write_refuses_nul_characters(ws: Workspace) -> None:
    assert "text only" in ws.fails("write_file", path="x.txt", content="a\x00b")


def test_write_onto_a_folder_is_refused(ws: Workspace) -> None:
    (ws / "dir").mkdir()
    assert "is a folder" in ws.fails("write_file", path="dir", content="x")


# --- folders, moves, copies, deletes -------------------------------------------------


def test_create_directory_with_and_without_parents(ws: Workspace) -> None:
    assert ws.ok("create_directory", path="a/b/c")["created"] is True
    assert (ws / "a" / "b" / "c").is_dir()
    assert ws.ok("create_directory", path="a/b/c")["created"] is False
    assert "pass parents=true" in ws.fails("create_directory", path="x/y", parents=False)
    (ws / "f").write_text("")
    assert "is a file" in ws.fails("create_directory", path="f")


def test_move_renames_and_moves_into_folders(ws: Workspace) -> None:
    (ws / "a.txt").write_text("a")
    (ws / "dir").mkdir()
    ws.ok("move_file", source="a.txt", dest="dir")
    assert (ws / "dir" / "a.txt").read_text() == "a"
    ws.ok("move_file", source="dir", dest="renamed")
    assert (ws / "renamed" / "a.txt").exists() and not (ws / "dir").exists()


def test_move_does_not_overwrite_unless_asked(ws: Workspace) -> None:
    (ws / "a.txt").write_text("a")
    (ws / "b.txt").write_text("b")
    assert "overwrite=true" in ws.fails("move_file", source="a.txt", dest="b.txt")
    ws.ok("move_file", source="a.txt", dest="b.txt", overwrite=True)
    assert (ws / "b.txt").read_text() == "a"


def test_copy_copies_files_and_folders(ws: Workspace) -> None:
    (ws / "a.txt").write_text("a")
    result = ws.ok("copy_file", source="a.txt", dest="b.txt")
    assert result["bytes_copied"] == 1 and (ws / "a.txt").exists()
    make_tree(ws)
    ws.ok("copy_file", source="src", dest="src2")
    assert (ws / "src2" / "pkg" / "util.py").read_text().startswith("def hello")


def test_copy_does_not_overwrite_unless_asked(ws: Workspace) -> None:
    (ws / "a.txt").write_text("a")
    (ws / "b.txt").write_text("b")
    assert "overwrite=true" in ws.fails("copy_file", source="a.txt", dest="b.txt")
    ws.ok("copy_file", source="a.txt", dest="b.txt", overwrite=True)
    assert (ws / "b.txt").read_text() == "a"


def test_copy_of_binary_files_is_allowed(ws: Workspace) -> None:
    (ws / "img.bin").write_bytes(bytes(range(256)))
    ws.ok("copy_file", source="img.bin", dest="img2.bin")
    assert (ws / "img2.bin").read_bytes() == bytes(range(256))


def test_copy_folder_into_itself_is_refused(ws: Workspace) -> None:
    (ws / "d").mkdir()
    assert "into itself" in ws.fails("copy_file", source="d", dest="d/inner")


def test_delete_files_empty_and_full_folders(ws: Workspace) -> None:
    (ws / "a.txt").write_text("a")
    ws.ok("delete_file", path="a.txt")
    assert not (ws / "a.txt").exists()
    (ws / "full").mkdir()
    (ws / "full" / "x").write_text("x")
    assert "recursive=true" in ws.fails("delete_file", path="full")
    ws.ok("delete_file", path="full", recursive=True)
    assert not (ws / "full").exists()


def test_delete_of_the_workspace_itself_is_refused(ws: Workspace) -> None:
    assert "shared root" in ws.fails("delete_file", path=".", recursive=True)
    assert ws.path.is_dir()
