"""The file sandbox: which paths tools may use, checked opens, atomic writes, bounded walks.

Every path a tool touches goes through ``resolve_in_sandbox``; every open re-checks where
the descriptor really landed. The folders shared and the protected gateway files come
from the caller's ``ToolPolicy``.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import os
import secrets
import stat
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, NamedTuple

from ailab.tools.errors import SandboxError, ToolError

if TYPE_CHECKING:
    from ailab.tools.policy import ToolPolicy

WALK_MAX_DEPTH = 20
WALK_MAX_ENTRIES = 10_000
WALK_MAX_SECONDS = 5.0
MAX_PATH_CHARS = 4096
MAX_NAME_CHARS = 255

# Refused as the path itself (a root may live below them).
SYSTEM_PATHS = frozenset({"/", "/root", "/home", "/Users", "/var", "c:/"})
# Refused together with everything inside them.
SYSTEM_TREES = (
    "/etc",
    "/proc",
    "/sys",
    "/dev",
    "/bin",
    "/sbin",
    "/boot",
    "/usr",
    "/lib",
    "/lib64",
    "/System",
    "/private/etc",
    "c:/windows",
    "c:/program files",
    "c:/program files (x86)",
)
SECRET_NAMES = frozenset(
    {".ssh", ".gnupg", ".aws", ".netrc", ".env", ".pgpass", ".git-credentials", ".kube", ".docker"}
)
SECRET_PATTERNS = (".env.*", "*.pem", "*.key", "id_rsa*", "id_ed25519*", "id_ecdsa*", "id_dsa*")


# --- What may be shared ----------------------------------------------------------------


def validated_roots(roots: Iterable[str | Path], protected: tuple[Path, ...]) -> tuple[Path, ...]:
    """The real folders to share; raise ValueError naming a folder that cannot be one."""
    validated: list[Path] = []
    for root in roots:
        real = Path(os.path.realpath(os.path.expanduser(str(root))))
        if not real.exists():
            raise ValueError(f"{root} does not exist; create the folder first")
        if not real.is_dir():
            raise ValueError(f"{root} is not a folder")
        problem = _system_path_problem(real) or _secret_problem(real)
        problem = problem or _protected_problem(real, protected)
        if problem:
            raise ValueError(f"{root} cannot be shared with tools: {problem}")
        if real not in validated:
            validated.append(real)
    if not validated:
        raise ValueError("give at least one folder to share with tools")
    return tuple(validated)


def is_within(path: Path, folder: Path) -> bool:
    """Whole-component containment: /data/work2 is not within /data/work."""
    return path == folder or folder in path.parents


def _system_path_problem(path: Path) -> str | None:
    text = path.as_posix().replace("\\", "/")
    folded = text.casefold()
    if text in SYSTEM_PATHS or folded in SYSTEM_PATHS or folded.rstrip("/") == "c:":
        return f"{text} is a protected system path"
    for tree in SYSTEM_TREES:
        key = tree.casefold() if tree.startswith("c:") else tree
        candidate = folded if tree.startswith("c:") else text
        if candidate == key or candidate.startswith(key + "/"):
            return f"{text} is inside the protected system path {tree}"
    return None


def _is_secret_name(name: str) -> bool:
    folded = name.casefold()
    return folded in SECRET_NAMES or any(fnmatch.fnmatchcase(folded, p) for p in SECRET_PATTERNS)


def _secret_problem(path: Path) -> str | None:
    for part in path.parts:
        if _is_secret_name(part):
            return f"{part!r} holds secrets (keys, credentials); tools never touch it"
    return None


def _protected_problem(path: Path, protected: tuple[Path, ...]) -> str | None:
    for guarded in protected:
        if is_within(path, guarded):
            return f"{guarded} belongs to the AI Lab gateway (database, logs or configuration)"
    return None


# --- Resolving a path ------------------------------------------------------------------


def require_roots(policy: ToolPolicy) -> tuple[Path, ...]:
    """The shared folders, the first being the workspace; refuse when there are none."""
    if not policy.roots:
        raise SandboxError(
            "no folder is shared with tools yet; the gateway sets one at start-up "
            "(AILAB_TOOL_ROOTS, default data/workspace)"
        )
    return policy.roots


def _check_location(policy: ToolPolicy, real: Path, shown: str) -> None:
    """Refuse a resolved path outside every root, or protected anywhere."""
    roots = require_roots(policy)
    if len(str(real)) > MAX_PATH_CHARS:
        raise SandboxError(f"{shown!r} is longer than {MAX_PATH_CHARS} characters")
    if not any(is_within(real, root) for root in roots):
        listed = ", ".join(str(r) for r in roots)
        raise SandboxError(
            f"{shown!r} resolves to {real}, outside the folders shared with tools ({listed}). "
            "Use a path inside them; the user can share another folder with /roots or "
            "AILAB_TOOL_ROOTS."
        )
    problem = (
        _system_path_problem(real)
        or _secret_problem(real)
        or _protected_problem(real, policy.protected)
    )
    if problem:
        raise SandboxError(f"{shown!r} is refused: {problem}")


def _check_raw(path: str) -> None:
    if "\x00" in path:
        raise SandboxError("the path contains a NUL byte; give a plain path")
    if not path.strip():
        raise SandboxError("the path is empty; use '.' for the workspace")
    if len(path) > MAX_PATH_CHARS:
        raise SandboxError(f"the path is longer than {MAX_PATH_CHARS} characters")
    parts = path.replace("\\", "/").split("/")
    if any(len(part) > MAX_NAME_CHARS for part in parts):
        raise SandboxError(f"a name in the path is longer than {MAX_NAME_CHARS} characters")
    problem = _system_path_problem(Path(path)) if path.casefold().startswith("c:") else None
    problem = problem or _secret_problem(Path(path))
    if problem:
        raise SandboxError(f"{path!r} is refused: {problem}")


def resolve_in_sandbox(
    policy: ToolPolicy, path: str, *, for_write: bool = False, follow_final: bool = True
) -> Path:
    """Decide whether ``path`` may be used and return its real location.

    Relative paths start at the first root; ``~``, ``..`` and every symlink are resolved
    before the result is compared, component by component, against the roots. Only a
    write target may be missing (with its missing parents); a dangling link never is.
    ``follow_final=False`` keeps a final symlink itself (delete and move act on the link).
    """
    _check_raw(path)
    roots = require_roots(policy)
    expanded = os.path.expanduser(path)
    if not os.path.isabs(expanded):
        expanded = os.path.join(roots[0], expanded)
    head, name = os.path.split(expanded)
    if follow_final or name in ("", ".", ".."):
        real = Path(os.path.realpath(expanded))
    else:
        real = Path(os.path.realpath(head)) / name
    _check_location(policy, real, path)
    if os.path.exists(real) or (not follow_final and os.path.lexists(real)):
        return real
    if os.path.lexists(real) or (os.path.islink(expanded) and not os.path.exists(expanded)):
        raise SandboxError(f"{path!r} is a dangling symbolic link or a link loop; refused")
    if not for_write:
        raise ToolError(f"{path!r} does not exist; check the name with list_contents")
    existing = real.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ToolError(f"cannot create {path!r}: {existing} is a file, not a folder")
    return real


# --- Checked opens and atomic writes ---------------------------------------------------


def _opened_path(fd: int) -> Path:
    """Where an open descriptor really is, as the kernel sees it now."""
    if sys.platform == "darwin":
        import fcntl

        raw = fcntl.fcntl(fd, fcntl.F_GETPATH, bytes(1024))
        return Path(os.fsdecode(raw.rstrip(b"\x00")))
    return Path(os.readlink(f"/proc/self/fd/{fd}"))


def _open_checked(policy: ToolPolicy, path: Path, flags: int, shown: str) -> int:
    """Open without following a final link, then re-check where the descriptor landed.

    This closes the window between ``resolve_in_sandbox`` and the operation: a folder
    swapped for a symlink in between is caught here.
    """
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR) and os.path.islink(path):
            raise SandboxError(
                f"{shown!r} was replaced by a symbolic link while the tool ran; refused"
            ) from None
        raise
    try:
        _check_location(policy, _opened_path(fd), shown)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_dir_checked(policy: ToolPolicy, path: Path, shown: str) -> int:
    return _open_checked(policy, path, os.O_RDONLY | os.O_DIRECTORY, shown)


def open_file_checked(policy: ToolPolicy, path: Path, shown: str) -> int:
    """A descriptor for reading a regular file inside the sandbox, re-checked once open."""
    # O_NONBLOCK: opening a FIFO must not hang the tool; regular files ignore it.
    fd = _open_checked(policy, path, os.O_RDONLY | os.O_NONBLOCK, shown)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ToolError(f"{shown!r} is not a regular file")
    return fd


def write_atomic(
    policy: ToolPolicy, target: Path, fill: Callable[[IO[bytes]], None], shown: str
) -> int:
    """Write through a temp file in the verified parent folder, then rename into place.

    Both steps are relative to the parent's descriptor, so a link swapped in anywhere
    on the way cannot carry the write out of the sandbox. Returns bytes written.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    parent_fd = _open_dir_checked(policy, target.parent, shown)
    tmp_name = f".ailab-{secrets.token_hex(6)}.tmp"
    try:
        mode = _existing_file_mode(target.name, parent_fd, shown)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(tmp_name, flags, 0o666, dir_fd=parent_fd)
        with os.fdopen(fd, "wb") as handle:
            if mode is not None:
                os.fchmod(handle.fileno(), mode)
            fill(handle)
            written = handle.tell()
        os.replace(tmp_name, target.name, src_dir_fd=parent_fd, dst_dir_fd=parent_fd)
        return written
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name, dir_fd=parent_fd)
        raise
    finally:
        os.close(parent_fd)


def _existing_file_mode(name: str, parent_fd: int, shown: str) -> int | None:
    try:
        st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    if stat.S_ISDIR(st.st_mode):
        raise ToolError(f"{shown!r} is a folder; give a file name")
    return stat.S_IMODE(st.st_mode)


# --- Bounded walking -------------------------------------------------------------------


class Entry(NamedTuple):
    rel: str  # relative to the walk's top, "/"-separated
    name: str
    kind: str  # file, directory, symlink, other
    size: int
    dir_fd: int  # the containing folder; valid only while the walk is at this entry


@dataclass
class WalkReport:
    stopped: str | None = None  # why the walk ended before visiting everything
    depth_limited: bool = False
    skipped_protected: int = 0
    entries: int = 0


def kind(mode: int) -> str:
    """A stat mode as the tools name it: file, directory, symlink or other."""
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISDIR(mode):
        return "directory"
    return "file" if stat.S_ISREG(mode) else "other"


def walk(
    policy: ToolPolicy, top: Path, report: WalkReport, max_depth: int = WALK_MAX_DEPTH
) -> Iterator[Entry]:
    """Every entry below ``top``; never follows links; bounded in depth, entries and time.

    Secret and gateway files are skipped and counted, never yielded.
    """
    deadline = time.monotonic() + WALK_MAX_SECONDS
    top_fd = _open_dir_checked(policy, top, str(top))
    walker = os.fwalk(".", dir_fd=top_fd, follow_symlinks=False)
    try:
        for dirpath, dirnames, filenames, dir_fd in walker:
            rel_dir = "" if dirpath == "." else dirpath[2:].replace(os.sep, "/") + "/"
            depth = rel_dir.count("/") + 1
            kept_dirs = []
            for name in sorted(dirnames + filenames):
                report.entries += 1
                if report.entries > WALK_MAX_ENTRIES:
                    report.stopped = f"stopped after {WALK_MAX_ENTRIES} entries"
                    return
                if time.monotonic() > deadline:
                    report.stopped = f"stopped after {WALK_MAX_SECONDS:g} s"
                    return
                if _is_secret_name(name) or _protected_problem(
                    top / rel_dir / name, policy.protected
                ):
                    report.skipped_protected += 1
                    continue
                try:
                    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                except FileNotFoundError:
                    continue
                entry = Entry(rel_dir + name, name, kind(st.st_mode), st.st_size, dir_fd)
                if entry.kind == "directory":
                    kept_dirs.append(name)
                yield entry
            if depth >= max_depth and kept_dirs:
                report.depth_limited = True
                kept_dirs = []
            dirnames[:] = kept_dirs
    finally:
        walker.close()
        os.close(top_fd)


def check_tree(policy: ToolPolicy, path: Path, action: str, shown: str) -> None:
    """Refuse to delete, move or copy a folder holding protected files or too many entries."""
    for root in policy.roots:
        if is_within(root, path):
            raise SandboxError(f"cannot {action} {shown!r}: it is (or holds) a shared root")
    if not path.is_dir() or path.is_symlink():
        return
    report = WalkReport()
    for _ in walk(policy, path, report):
        pass
    if report.stopped or report.depth_limited:
        raise ToolError(
            f"cannot {action} {shown!r}: the folder is too large for a tool "
            f"({report.stopped or f'deeper than {WALK_MAX_DEPTH} levels'}); ask the user"
        )
    if report.skipped_protected:
        raise SandboxError(
            f"cannot {action} {shown!r}: it holds secret or gateway files that tools never touch"
        )
