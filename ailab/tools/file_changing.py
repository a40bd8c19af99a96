"""Tools that change files: write, create folders, move, copy, delete; and when each asks."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path
from typing import IO, Annotated, Any

from pydantic import Field

from ailab.tools.catalogue import ApprovalRule, PathArg, always, tool
from ailab.tools.errors import ToolError
from ailab.tools.policy import ToolPolicy
from ailab.tools.results import human_size, shown_path
from ailab.tools.sandbox import (
    check_tree,
    is_within,
    open_file_checked,
    resolve_in_sandbox,
    write_atomic,
)

WRITE_LIMIT_BYTES = 1024 * 1024


def _final_destination(
    policy: ToolPolicy, source: str, dest: str, *, follow_source: bool
) -> tuple[Path, Path]:
    """Source and target paths; an existing folder as dest means 'into it'."""
    src = resolve_in_sandbox(policy, source, follow_final=follow_source)
    target = resolve_in_sandbox(policy, dest, for_write=True)
    if target.is_dir() and src != target:
        target = resolve_in_sandbox(policy, str(target / src.name), for_write=True)
    return src, target


def _target_exists(key: str) -> ApprovalRule:
    """Approval rule: the call would replace the file named by argument ``key``."""

    def rule(policy: ToolPolicy, arguments: dict[str, Any]) -> bool:
        try:
            if "source" in arguments:
                _, target = _final_destination(
                    policy, arguments["source"], arguments[key], follow_source=True
                )
            else:
                target = resolve_in_sandbox(policy, arguments[key], for_write=True)
        except ToolError:
            return False
        return os.path.lexists(target)

    return rule


@tool(needs_approval=_target_exists("path"))
def write_file(
    policy: ToolPolicy,
    path: PathArg,
    content: Annotated[str | None, Field(description="The text to write")] = None,
    lines: Annotated[list[str] | None, Field(description="Or the text as a list of lines")] = None,
) -> dict[str, Any]:
    """Write UTF-8 text to a file (at most 1 MiB), creating it and its folders if needed.
    Give content or lines. Replacing an existing file needs the user's approval."""
    if (content is None) == (lines is None):
        raise ToolError("give exactly one of content (a string) or lines (a list of strings)")
    text = content if content is not None else "\n".join(lines or []) + "\n"
    if "\x00" in text:
        raise ToolError("the text contains NUL characters; write_file writes text only")
    data = text.encode("utf-8")
    if len(data) > WRITE_LIMIT_BYTES:
        raise ToolError(
            f"the text is {human_size(len(data))}; write_file writes at most 1 MiB. "
            "Split it across several files."
        )
    real = resolve_in_sandbox(policy, path, for_write=True)
    existed = real.exists()
    written = write_atomic(policy, real, lambda handle: handle.write(data), path)
    return {"path": shown_path(policy, real), "bytes_written": written, "created": not existed}


@tool()
def create_directory(
    policy: ToolPolicy,
    path: PathArg,
    parents: Annotated[bool, Field(description="Also create missing parent folders")] = True,
) -> dict[str, Any]:
    """Create a folder. Succeeds with created=false when it already exists."""
    real = resolve_in_sandbox(policy, path, for_write=True)
    if real.is_dir():
        return {"path": shown_path(policy, real), "created": False}
    if real.exists():
        raise ToolError(f"{path!r} exists and is a file")
    if not parents and not real.parent.is_dir():
        raise ToolError(f"the parent of {path!r} does not exist; pass parents=true")
    real.mkdir(parents=parents)
    return {"path": shown_path(policy, real), "created": True}


@tool(needs_approval=always)
def move_file(
    policy: ToolPolicy,
    source: Annotated[str, Field(description="The file or folder to move or rename")],
    dest: Annotated[str, Field(description="New path, or an existing folder to move into")],
    overwrite: Annotated[bool, Field(description="Replace an existing file at dest")] = False,
) -> dict[str, Any]:
    """Move or rename a file or folder. Always needs the user's approval."""
    src, target = _final_destination(policy, source, dest, follow_source=False)
    check_tree(policy, src, "move", source)
    if os.path.lexists(target) and not overwrite:
        raise ToolError(
            f"{shown_path(policy, target)} already exists; pass overwrite=true to replace it"
        )
    if os.path.isdir(target) and not os.path.islink(target):
        raise ToolError(f"{shown_path(policy, target)} is a folder; folders are never replaced")
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(src, target)
    return {"source": shown_path(policy, src), "dest": shown_path(policy, target)}


@tool(needs_approval=_target_exists("dest"))
def copy_file(
    policy: ToolPolicy,
    source: Annotated[str, Field(description="The file or folder to copy")],
    dest: Annotated[str, Field(description="New path, or an existing folder to copy into")],
    overwrite: Annotated[bool, Field(description="Replace an existing file at dest")] = False,
) -> dict[str, Any]:
    """Copy a file, or a folder with everything in it. Replacing a file needs approval."""
    src, target = _final_destination(policy, source, dest, follow_source=True)
    shown = {"source": shown_path(policy, src), "dest": shown_path(policy, target)}
    if os.path.lexists(target) and (not overwrite or src.is_dir()):
        raise ToolError(f"{shown['dest']} already exists; pass overwrite=true to replace a file")
    if src.is_dir():
        check_tree(policy, src, "copy", source)
        if is_within(target, src):
            raise ToolError("cannot copy a folder into itself")
        shutil.copytree(src, target, symlinks=True)
        return {**shown, "bytes_copied": None}
    fd = open_file_checked(policy, src, source)
    with os.fdopen(fd, "rb") as reader:
        mode = stat.S_IMODE(os.fstat(reader.fileno()).st_mode)

        def fill(handle: IO[bytes]) -> None:
            os.fchmod(handle.fileno(), mode)
            shutil.copyfileobj(reader, handle)

        copied = write_atomic(policy, target, fill, dest)
    return {**shown, "bytes_copied": copied}


@tool(needs_approval=always)
def delete_file(
    policy: ToolPolicy,
    path: PathArg,
    recursive: Annotated[bool, Field(description="Delete a folder with its contents")] = False,
) -> dict[str, Any]:
    """Delete a file, a link, or a folder (recursive=true for a non-empty one). Always needs
    the user's approval."""
    real = resolve_in_sandbox(policy, path, follow_final=False)
    check_tree(policy, real, "delete", path)
    if real.is_symlink() or not real.is_dir():
        real.unlink()
        return {"deleted": shown_path(policy, real), "type": "file"}
    if not recursive and any(real.iterdir()):
        raise ToolError(f"{path!r} is a folder that is not empty; pass recursive=true")
    shutil.rmtree(real)
    return {"deleted": shown_path(policy, real), "type": "directory"}
