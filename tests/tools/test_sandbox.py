"""The sandbox against a real directory tree with real symlinks in and out of the root."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ailab import config
from ailab.tools import SandboxError, ToolError, ToolPolicy, execute_tool, sandbox

SECRET_PARTS = {".ssh", ".env", "id_rsa", "server.pem"}


@dataclass(frozen=True)
class Tree:
    """root/ (shared), root2/ (a sibling sharing the prefix), outside/ (never shared), and
    the policy that shares root/ with approvals on auto."""

    root: Path
    root2: Path
    outside: Path
    policy: ToolPolicy


def build_tree(base: Path) -> Tree:
    root, root2, outside = base / "root", base / "root2", base / "outside"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "sub" / "file.txt").write_text("inside\n")
    (root / ".ssh").mkdir()
    (root / ".ssh" / "id_rsa").write_text("PRIVATE KEY\n")
    (root / ".env").write_text("TOKEN=secret\n")
    (root / "server.pem").write_text("CERT\n")
    root2.mkdir()
    (root2 / "file.txt").write_text("sibling\n")
    outside.mkdir()
    (outside / "secret.txt").write_text("outside secret\n")
    (root / "link_in").symlink_to(root / "sub")
    (root / "link_out").symlink_to(outside)
    (root / "link_out_file").symlink_to(outside / "secret.txt")
    (root / "dangling").symlink_to(outside / "nothing")
    (root / "dangling_in").symlink_to(root / "sub" / "missing.txt")
    (root / "loop").symlink_to(root / "loop")
    (root / "innocent.txt").symlink_to(root / ".env")
    settings_ = config.load_settings(
        {
            "AILAB_DATA_DIR": str(base / "data"),
            "AILAB_TOOL_ROOTS": str(root),
            "AILAB_TOOL_APPROVAL": "auto",
        }
    )
    real = [Path(os.path.realpath(p)) for p in (root, root2, outside)]
    return Tree(*real, policy=ToolPolicy.from_settings(settings_))


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Tree:
    return build_tree(tmp_path_factory.mktemp("sandbox"))


@pytest.fixture
def fresh(tmp_path: Path) -> Tree:
    """A tree of its own for tests that change files."""
    return build_tree(tmp_path)


def refused(policy: ToolPolicy, name: str, **arguments: Any) -> str:
    result = execute_tool(policy, name, arguments)
    assert result["status"] == "error", result
    return result["error"]


# --- property ------------------------------------------------------------------------

SEGMENTS = [
    "..",
    ".",
    "",
    "~",
    "sub",
    "deeper",
    "file.txt",
    "new.txt",
    "link_in",
    "link_out",
    "link_out_file",
    "dangling",
    "dangling_in",
    "loop",
    "innocent.txt",
    ".ssh",
    "id_rsa",
    ".env",
    "server.pem",
    "root",
    "root2",
    "outside",
    "secret.txt",
    "etc",
    "x\x00y",
    "n" * 256,
    "C:\\Windows",
]


@st.composite
def path_strings(draw: st.DrawFn) -> str:
    parts = draw(st.lists(st.sampled_from(SEGMENTS), max_size=8))
    prefix = draw(st.sampled_from(["", "/", "~/", "<base>/", "<root>/", "/tmp/", "../"]))
    if draw(st.booleans()):
        parts.append(draw(st.text(max_size=12)))
    return prefix + "/".join(parts)


def kernel_location(real: Path, follow_final: bool) -> Path:
    """Independent of the sandbox: what the path really names (the link itself if not followed)."""
    if follow_final:
        return Path(os.path.realpath(real))
    return Path(os.path.realpath(real.parent)) / real.name


def lands_inside(real: Path, root: Path, follow_final: bool) -> bool:
    checked = kernel_location(real, follow_final)
    return os.path.commonpath([root, checked]) == str(root)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=path_strings(), for_write=st.booleans(), follow_final=st.booleans())
def test_an_accepted_path_always_resolves_inside_the_root_and_is_not_protected(
    tree: Tree, raw: str, for_write: bool, follow_final: bool
) -> None:
    root = tree.root
    raw = raw.replace("<base>", str(root.parent)).replace("<root>", str(root))
    try:
        real = sandbox.resolve_in_sandbox(
            tree.policy, raw, for_write=for_write, follow_final=follow_final
        )
    except ToolError:
        return
    assert real.is_absolute()
    assert lands_inside(real, root, follow_final)
    assert not SECRET_PARTS & set(real.parts)
    assert not SECRET_PARTS & set(kernel_location(real, follow_final).parts)
    assert "\x00" not in raw and len(raw) <= sandbox.MAX_PATH_CHARS
    assert all(len(part) <= 255 for part in raw.split("/"))
    if not for_write:
        assert os.path.lexists(real)


@settings(max_examples=200, deadline=None)
@given(raw=st.text(max_size=60))
def test_arbitrary_text_never_crashes_the_resolver_and_never_escapes(tree: Tree, raw: str) -> None:
    try:
        real = sandbox.resolve_in_sandbox(tree.policy, raw, for_write=True)
    except ToolError:
        return
    assert lands_inside(real, tree.root, follow_final=True)


# --- one concrete attack per rule ----------------------------------------------------


def test_dot_dot_escape_is_refused(tree: Tree) -> None:
    assert "outside the folders shared" in refused(
        tree.policy, "read_file", path="../outside/secret.txt"
    )
    assert "outside the folders shared" in refused(
        tree.policy, "read_file", path="sub/../../outside/secret.txt"
    )


def test_absolute_path_outside_the_root_is_refused(tree: Tree) -> None:
    target = tree.outside / "secret.txt"
    assert "outside the folders shared" in refused(tree.policy, "read_file", path=str(target))
    assert "outside" in refused(
        tree.policy, "write_file", path=str(tree.outside / "new.txt"), content="x"
    )
    assert not (tree.outside / "new.txt").exists()


def test_tilde_expands_to_home_and_is_refused_outside_the_root(tree: Tree) -> None:
    assert "outside the folders shared" in refused(tree.policy, "list_contents", path="~")
    assert "outside the folders shared" in refused(tree.policy, "read_file", path="~/.bashrc")


def test_symlink_inside_root_pointing_out_is_refused_for_reading(tree: Tree) -> None:
    assert "outside" in refused(tree.policy, "read_file", path="link_out_file")
    assert "outside" in refused(tree.policy, "read_file", path="link_out/secret.txt")
    assert "outside" in refused(tree.policy, "list_contents", path="link_out")


def test_symlink_inside_root_pointing_out_is_refused_for_writing(fresh: Tree) -> None:
    assert "outside" in refused(fresh.policy, "write_file", path="link_out_file", content="pwned")
    assert "outside" in refused(
        fresh.policy, "write_file", path="link_out/new.txt", content="pwned"
    )
    assert "outside" in refused(
        fresh.policy, "copy_file", source="sub/file.txt", dest="link_out/copy.txt"
    )
    assert "outside" in refused(fresh.policy, "move_file", source="sub/file.txt", dest="link_out")
    assert (fresh.outside / "secret.txt").read_text() == "outside secret\n"
    assert sorted(p.name for p in fresh.outside.iterdir()) == ["secret.txt"]


def test_copy_and_move_validate_the_source_too(fresh: Tree) -> None:
    secret = str(fresh.outside / "secret.txt")
    assert "outside" in refused(fresh.policy, "copy_file", source=secret, dest="stolen.txt")
    assert "outside" in refused(
        fresh.policy, "copy_file", source="link_out_file", dest="stolen.txt"
    )
    assert "outside" in refused(fresh.policy, "move_file", source=secret, dest="stolen.txt")
    assert not (fresh.root / "stolen.txt").exists()


def test_symlink_pointing_inside_the_root_is_followed(tree: Tree) -> None:
    result = execute_tool(tree.policy, "read_file", {"path": "link_in/file.txt"})
    assert result["content"] == "inside\n"


def test_root_prefix_sibling_is_not_inside_the_root(tree: Tree) -> None:
    sibling = tree.root2 / "file.txt"
    assert str(sibling).startswith(str(tree.root))
    assert "outside the folders shared" in refused(tree.policy, "read_file", path=str(sibling))
    assert "outside the folders shared" in refused(
        tree.policy, "read_file", path="../root2/file.txt"
    )


def test_dangling_symlink_as_write_target_is_refused(fresh: Tree) -> None:
    assert "outside" in refused(fresh.policy, "write_file", path="dangling", content="x")
    assert "dangling" in refused(fresh.policy, "write_file", path="dangling_in", content="x")
    assert not (fresh.outside / "nothing").exists()
    assert not (fresh.root / "sub" / "missing.txt").exists()


def test_symlink_loop_is_refused(tree: Tree) -> None:
    assert "link loop" in refused(tree.policy, "read_file", path="loop")
    assert "link loop" in refused(tree.policy, "write_file", path="loop", content="x")


def test_directory_swapped_for_a_symlink_after_validation_cannot_carry_a_write_out(
    fresh: Tree,
) -> None:
    root, outside = fresh.root, fresh.outside
    (root / "work").mkdir()
    target = sandbox.resolve_in_sandbox(fresh.policy, "work/out.txt", for_write=True)
    (root / "work").rmdir()
    (root / "work").symlink_to(outside)
    with pytest.raises(SandboxError):
        sandbox.write_atomic(
            fresh.policy, target, lambda handle: handle.write(b"pwned"), "work/out.txt"
        )
    assert sorted(p.name for p in outside.iterdir()) == ["secret.txt"]


def test_parent_of_a_folder_swapped_for_a_symlink_is_caught_where_the_write_lands(
    fresh: Tree,
) -> None:
    root, outside = fresh.root, fresh.outside
    (root / "work" / "deep").mkdir(parents=True)
    (outside / "deep").mkdir()
    target = sandbox.resolve_in_sandbox(fresh.policy, "work/deep/out.txt", for_write=True)
    (root / "work" / "deep").rmdir()
    (root / "work").rmdir()
    (root / "work").symlink_to(outside)
    with pytest.raises(SandboxError, match="outside the folders shared"):
        sandbox.write_atomic(
            fresh.policy, target, lambda handle: handle.write(b"pwned"), "work/deep/out.txt"
        )
    assert list((outside / "deep").iterdir()) == []


def test_directory_swapped_for_a_symlink_after_validation_cannot_carry_a_read_out(
    fresh: Tree,
) -> None:
    root, outside = fresh.root, fresh.outside
    (root / "work").mkdir()
    (root / "work" / "secret.txt").write_text("harmless")
    target = sandbox.resolve_in_sandbox(fresh.policy, "work/secret.txt")
    (root / "work" / "secret.txt").unlink()
    (root / "work").rmdir()
    (root / "work").symlink_to(outside)
    with pytest.raises(SandboxError):
        sandbox.open_file_checked(fresh.policy, target, "work/secret.txt")


def test_file_swapped_for_a_symlink_after_validation_is_not_followed(
    fresh: Tree,
) -> None:
    root = fresh.root
    (root / "plain.txt").write_text("plain")
    target = sandbox.resolve_in_sandbox(fresh.policy, "plain.txt")
    (root / "plain.txt").unlink()
    (root / "plain.txt").symlink_to(fresh.outside / "secret.txt")
    with pytest.raises(SandboxError, match="replaced by a symbolic link"):
        sandbox.open_file_checked(fresh.policy, target, "plain.txt")


def test_nul_byte_is_refused(tree: Tree) -> None:
    assert "NUL byte" in refused(tree.policy, "read_file", path="sub/file.txt\x00.png")


def test_overlong_paths_and_names_are_refused(tree: Tree) -> None:
    assert "longer than 4096" in refused(tree.policy, "read_file", path="a/" * 2100)
    assert "longer than 255" in refused(tree.policy, "write_file", path="n" * 256, content="x")


@pytest.mark.parametrize(
    "path", ["/etc/passwd", "/proc/self/environ", "/sys", "/dev/null", "/boot", "/usr/bin/env"]
)
def test_protected_system_paths_are_refused(tree: Tree, path: str) -> None:
    assert "refused" in refused(tree.policy, "read_file", path=path) or "outside" in refused(
        tree.policy, "read_file", path=path
    )


@pytest.mark.parametrize(
    "path",
    ["/", "/etc", "/etc/ssh", "/proc", "/sys", "/dev", "/bin", "/sbin", "/boot", "/usr", "/root"],
)
def test_protected_system_paths_cannot_become_roots(path: str) -> None:
    with pytest.raises(ValueError, match="protected system path"):
        sandbox.validated_roots([path], ())


@pytest.mark.parametrize(
    "path", ["C:\\", "C:\\Windows\\System32", "c:\\program files\\x", "C:/Program Files (x86)"]
)
def test_windows_system_paths_are_refused(tree: Tree, path: str) -> None:
    assert "protected system path" in refused(tree.policy, "read_file", path=path)


@pytest.mark.parametrize(
    "path", [".ssh/id_rsa", ".env", "server.pem", "keys/id_ed25519.pub", "a/.aws/credentials"]
)
def test_secrets_inside_the_root_are_refused(tree: Tree, path: str) -> None:
    assert "holds secrets" in refused(tree.policy, "read_file", path=path)
    assert "holds secrets" in refused(tree.policy, "write_file", path=path, content="x")


def test_innocent_looking_link_to_a_secret_is_refused(tree: Tree) -> None:
    assert "holds secrets" in refused(tree.policy, "read_file", path="innocent.txt")


def test_secrets_cannot_be_copied_moved_or_deleted(fresh: Tree) -> None:
    assert "holds secrets" in refused(fresh.policy, "copy_file", source=".env", dest="env.txt")
    assert "holds secrets" in refused(fresh.policy, "move_file", source=".ssh", dest="keys")
    assert "holds secrets" in refused(fresh.policy, "delete_file", path=".env")
    (fresh.root / "project").mkdir()
    (fresh.root / "project" / ".env").write_text("K=V")
    assert "secret or gateway files" in refused(
        fresh.policy, "delete_file", path="project", recursive=True
    )
    assert "secret or gateway files" in refused(
        fresh.policy, "copy_file", source="project", dest="p2"
    )
    assert (fresh.root / "project" / ".env").exists()


def test_gateway_database_logs_and_config_are_refused_even_inside_a_root(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    settings_ = config.load_settings(
        {"AILAB_DATA_DIR": str(data), "AILAB_TOOL_ROOTS": str(data), "AILAB_TOOL_APPROVAL": "auto"}
    )
    policy = ToolPolicy.from_settings(settings_)
    settings_.database_path.write_bytes(b"SQLite format 3\x00")
    settings_.log_dir.mkdir()
    (settings_.log_dir / "gateway.log").write_text("secret request\n")
    for path in ("ailab.sqlite3", "ailab.sqlite3-wal", "logs/gateway.log", "logs/new.log"):
        assert "belongs to the AI Lab gateway" in refused(
            policy, "write_file", path=path, content="x"
        )
    assert "belongs to the AI Lab gateway" in refused(policy, "read_file", path="ailab.sqlite3")
    assert "belongs to the AI Lab gateway" in refused(
        policy, "delete_file", path="logs", recursive=True
    )
    found = execute_tool(policy, "find_in_files", {"search_text": "secret"})
    assert found["matches"] == []
    assert (settings_.log_dir / "gateway.log").read_text() == "secret request\n"


@pytest.mark.parametrize("path", ["server_config.py", "ailab/config.py"])
def test_gateway_configuration_is_refused_even_when_the_project_is_shared(
    tmp_path: Path, path: str
) -> None:
    policy = ToolPolicy.from_settings(config.load_settings({"AILAB_DATA_DIR": str(tmp_path)}))
    policy = policy.with_roots([config.PROJECT_DIR])
    assert "belongs to the AI Lab gateway" in refused(policy, "read_file", path=path)
    assert "belongs to the AI Lab gateway" in refused(policy, "write_file", path=path, content="x")
    assert execute_tool(policy, "read_file", {"path": "pyproject.toml"})["status"] == "success"


def test_recursion_does_not_follow_a_link_out_of_the_root(tree: Tree) -> None:
    found = execute_tool(tree.policy, "find_in_files", {"search_text": "secret"})
    assert found["status"] == "success" and found["matches"] == []
    names = execute_tool(tree.policy, "search_files", {"pattern": "secret*"})
    assert names["files"] == []
    size = execute_tool(tree.policy, "calculate_directory_size", {})
    assert size["size_bytes"] == len("inside\n")
    listing = execute_tool(tree.policy, "list_contents", {"show_hidden": True})
    types = {item["name"]: item["type"] for item in listing["items"]}
    assert types["link_out"] == "symlink" and types["link_in"] == "symlink"


def test_deleting_a_link_that_points_out_removes_only_the_link(fresh: Tree) -> None:
    result = execute_tool(fresh.policy, "delete_file", {"path": "link_out_file"})
    assert result["status"] == "success"
    assert not (fresh.root / "link_out_file").is_symlink()
    assert (fresh.outside / "secret.txt").exists()


def test_deleting_through_a_link_out_is_refused(fresh: Tree) -> None:
    assert "outside" in refused(fresh.policy, "delete_file", path="link_out/secret.txt")
    assert (fresh.outside / "secret.txt").exists()


@pytest.mark.parametrize(
    ("path", "for_write"),
    [
        ("sub/file.txt", False),
        ("link_in/file.txt", False),
        ("sub/deeper/../file.txt", False),
        ("<root>/sub", False),
        (".", False),
        ("sub/../new/dir/new.txt", True),
        ("link_in/new.txt", True),
    ],
)
def test_ordinary_paths_inside_the_root_are_accepted(
    tree: Tree, path: str, for_write: bool
) -> None:
    raw = path.replace("<root>", str(tree.root))
    real = sandbox.resolve_in_sandbox(tree.policy, raw, for_write=for_write)
    assert lands_inside(real, tree.root, follow_final=True)
