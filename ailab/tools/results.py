"""How tool results show paths, sizes, times and cut-short listings to the model."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

from ailab.tools.policy import ToolPolicy
from ailab.tools.sandbox import WalkReport, is_within


def shown_path(policy: ToolPolicy, path: Path) -> str:
    """A path as the model should see it: relative to the workspace when inside it."""
    roots = policy.roots
    if roots and is_within(path, roots[0]):
        return path.relative_to(roots[0]).as_posix() or "."
    return str(path)


def human_size(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def iso_time(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp).astimezone().isoformat(timespec="seconds")


def walk_notes(result: dict[str, Any], report: WalkReport, cut_at: int | None) -> dict:
    """Say how a listing or search was cut short, if it was."""
    notes = []
    if cut_at is not None:
        notes.append(f"stopped at max_results={cut_at}; narrow the search or raise max_results")
    if report.stopped:
        notes.append(f"{report.stopped}; search a smaller folder")
    result["truncated"] = bool(notes)
    if notes:
        result["note"] = "; ".join(notes)
    return result
