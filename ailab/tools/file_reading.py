"""Tools that read: file contents, folder listings, name and text search, sizes, metadata."""

from __future__ import annotations

import fnmatch
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field

from ailab.tools.catalogue import MaxResults, PathArg, tool
from ailab.tools.errors import ToolError
from ailab.tools.policy import ToolPolicy
from ailab.tools.results import human_size, iso_time, shown_path, walk_notes
from ailab.tools.sandbox import (
    WALK_MAX_DEPTH,
    WalkReport,
    kind,
    open_file_checked,
    require_roots,
    resolve_in_sandbox,
    walk,
)

READ_LIMIT_BYTES = 1024 * 1024
RESULT_LINE_CHARS = 300


@tool()
def read_file(policy: ToolPolicy, path: PathArg) -> dict[str, Any]:
    """Read a UTF-8 text file (at most 1 MiB). Returns its content and number of lines."""
    real = resolve_in_sandbox(policy, path)
    fd = open_file_checked(policy, real, path)
    with os.fdopen(fd, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size > READ_LIMIT_BYTES:
            raise ToolError(
                f"{path!r} is {human_size(size)}; read_file reads at most 1 MiB. "
                "Use find_in_files to look for specific text in it."
            )
        data = handle.read(READ_LIMIT_BYTES + 1)
    if len(data) > READ_LIMIT_BYTES:
        raise ToolError(f"{path!r} grew past 1 MiB while being read; try again")
    content = _decode_text(data, path)
    return {
        "path": shown_path(policy, real),
        "content": content,
        "lines": len(content.splitlines()),
        "size_bytes": len(data),
    }


def _decode_text(data: bytes, shown: str) -> str:
    if b"\x00" in data[:8192]:
        raise ToolError(f"{shown!r} is a binary file; only UTF-8 text files can be read")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ToolError(
            f"{shown!r} is not UTF-8 text (binary or another encoding); only UTF-8 text is read"
        ) from None


@tool()
def list_contents(
    policy: ToolPolicy,
    path: PathArg = ".",
    show_hidden: Annotated[bool, Field(description="Include names starting with a dot")] = False,
    max_results: MaxResults = 100,
) -> dict[str, Any]:
    """List the files and folders directly inside a folder, with their type and size."""
    real = resolve_in_sandbox(policy, path)
    if not real.is_dir():
        raise ToolError(f"{path!r} is a file, not a folder; use get_file_info or read_file")
    report = WalkReport()
    items = [
        {"name": e.name, "type": e.kind, "size": e.size}
        for e in walk(policy, real, report, max_depth=1)
        if show_hidden or not e.name.startswith(".")
    ]
    result = {
        "path": shown_path(policy, real),
        "items": items[:max_results],
        "total_items": len(items),
    }
    return walk_notes(result, report, max_results if len(items) > max_results else None)


@tool()
def search_files(
    policy: ToolPolicy,
    path: PathArg = ".",
    pattern: Annotated[str, Field(description="Glob on names, e.g. *.py or report*")] = "*",
    recursive: Annotated[bool, Field(description="Also search sub-folders")] = True,
    max_results: MaxResults = 100,
) -> dict[str, Any]:
    """Find files and folders whose names match a glob pattern. Folders end with '/'."""
    real = resolve_in_sandbox(policy, path)
    if not real.is_dir():
        raise ToolError(f"{path!r} is a file, not a folder")
    report = WalkReport()
    files: list[str] = []
    cut_at = None
    for entry in walk(policy, real, report, max_depth=WALK_MAX_DEPTH if recursive else 1):
        if fnmatch.fnmatch(entry.name, pattern):
            if len(files) == max_results:
                cut_at = max_results
                break
            suffix = "/" if entry.kind == "directory" else ""
            files.append(shown_path(policy, real / entry.rel) + suffix)
    return walk_notes({"files": files, "count": len(files)}, report, cut_at)


@tool()
def calculate_directory_size(
    policy: ToolPolicy,
    path: PathArg = ".",
    max_depth: Annotated[int, Field(ge=1, le=WALK_MAX_DEPTH, description="Levels")] = 20,
) -> dict[str, Any]:
    """Add up the sizes of the files in a folder and its sub-folders (links not followed)."""
    real = resolve_in_sandbox(policy, path)
    if not real.is_dir():
        raise ToolError(f"{path!r} is a file; use get_file_info for its size")
    report = WalkReport()
    total, files, folders = 0, 0, 0
    for entry in walk(policy, real, report, max_depth=max_depth):
        if entry.kind == "file":
            total, files = total + entry.size, files + 1
        elif entry.kind == "directory":
            folders += 1
    result = {
        "path": shown_path(policy, real),
        "size_bytes": total,
        "size_human": human_size(total),
        "file_count": files,
        "folder_count": folders,
        "depth_limited": report.depth_limited,
    }
    return walk_notes(result, report, None)


@tool()
def get_file_info(policy: ToolPolicy, path: PathArg) -> dict[str, Any]:
    """Size, times, permissions and type of a file or folder. 'created' is the metadata
    change time where the system does not record creation."""
    real = resolve_in_sandbox(policy, path)
    st = os.stat(real)
    created = getattr(st, "st_birthtime", st.st_ctime)
    return {
        "path": shown_path(policy, real),
        "type": kind(st.st_mode),
        "size": st.st_size,
        "size_human": human_size(st.st_size),
        "created": iso_time(created),
        "modified": iso_time(st.st_mtime),
        "accessed": iso_time(st.st_atime),
        "permissions": stat.filemode(st.st_mode),
        "permissions_octal": oct(stat.S_IMODE(st.st_mode)),
    }


@tool()
def get_current_directory(policy: ToolPolicy) -> dict[str, Any]:
    """The workspace folder that relative paths start from, and every folder tools may use."""
    roots = require_roots(policy)
    return {"path": str(roots[0]), "allowed_roots": [str(r) for r in roots]}


@tool()
def find_in_files(
    policy: ToolPolicy,
    search_text: Annotated[str, Field(min_length=1, description="Text to look for")],
    path: PathArg = ".",
    file_pattern: Annotated[str, Field(description="Only files matching, e.g. *.md")] = "*",
    case_sensitive: Annotated[bool, Field(description="Match upper/lower case exactly")] = False,
    max_results: MaxResults = 100,
) -> dict[str, Any]:
    """Search text files under a folder for a string. Returns each matching line with its
    file and line number. Binary files and files over 1 MiB are skipped."""
    real = resolve_in_sandbox(policy, path)
    needle = search_text if case_sensitive else search_text.casefold()
    report = WalkReport()
    matches: list[dict[str, Any]] = []
    searched, skipped, cut_at = 0, 0, None
    for file, text in _text_files(policy, real, file_pattern, report):
        if text is None:
            skipped += 1
            continue
        searched += 1
        for number, line in enumerate(text.splitlines(), start=1):
            if needle not in (line if case_sensitive else line.casefold()):
                continue
            if len(matches) == max_results:
                cut_at = max_results
                break
            matches.append(
                {
                    "file": shown_path(policy, file),
                    "line_number": number,
                    "line": line[:RESULT_LINE_CHARS],
                }
            )
        if cut_at:
            break
    result = {
        "matches": matches,
        "count": len(matches),
        "files_searched": searched,
        "files_skipped": skipped,
    }
    return walk_notes(result, report, cut_at)


def _text_files(
    policy: ToolPolicy, real: Path, pattern: str, report: WalkReport
) -> Iterator[tuple[Path, str | None]]:
    """(path, text) for each file to search; text is None for binary, large or unreadable."""
    if not real.is_dir():
        yield real, _read_text_fd(open_file_checked(policy, real, str(real)))
        return
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    for entry in walk(policy, real, report):
        if entry.kind != "file" or not fnmatch.fnmatch(entry.name, pattern):
            continue
        try:
            fd = os.open(entry.name, flags, dir_fd=entry.dir_fd)
        except OSError:
            yield real / entry.rel, None
            continue
        yield real / entry.rel, _read_text_fd(fd)


def _read_text_fd(fd: int) -> str | None:
    with os.fdopen(fd, "rb") as handle:
        data = handle.read(READ_LIMIT_BYTES + 1)
    if len(data) > READ_LIMIT_BYTES or b"\x00" in data[:8192]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None
