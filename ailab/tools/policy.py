"""ToolPolicy: the folders a gateway shares with tools, what stays protected, when to ask."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from ailab import config
from ailab.tools.sandbox import validated_roots

# The gateway's configuration: the module that holds it, its entry point and the .env.
CONFIGURATION_FILES = tuple(
    Path(os.path.realpath(path))
    for path in (
        config.PACKAGE_DIR / "config.py",
        config.PROJECT_DIR / "server_config.py",
        config.PROJECT_DIR / ".env",
    )
)


@dataclass(frozen=True)
class ToolPolicy:
    """The rules every tool call runs under; the Gateway owns one.

    Immutable: sharing other folders makes a new policy (``with_roots``), so a call in
    flight keeps the rules it started with. The default shares nothing.
    """

    roots: tuple[Path, ...] = ()
    approval: Literal["ask", "auto", "deny"] = "ask"
    net_allow_private: bool = False
    # Gateway files and folders: refused themselves and everything inside them.
    protected: tuple[Path, ...] = CONFIGURATION_FILES

    @classmethod
    def from_settings(cls, settings: config.Settings) -> ToolPolicy:
        """The policy the settings ask for; creates the workspace folder (file system work).

        Raises ConfigError naming AILAB_TOOL_ROOTS when a root cannot be shared."""
        settings.workspace_dir.mkdir(parents=True, exist_ok=True)
        db = settings.database_path
        gateway_paths = [
            db,
            *(db.with_name(db.name + suffix) for suffix in ("-wal", "-shm", "-journal")),
            settings.log_dir,
        ]
        protected = (*(Path(os.path.realpath(p)) for p in gateway_paths), *CONFIGURATION_FILES)
        try:
            roots = validated_roots(settings.effective_tool_roots, protected)
        except ValueError as exc:
            raise config.ConfigError(f"AILAB_TOOL_ROOTS: {exc}") from None
        return cls(
            roots=roots,
            approval=settings.tool_approval,
            net_allow_private=settings.net_allow_private,
            protected=protected,
        )

    def with_roots(self, roots: Iterable[str | Path]) -> ToolPolicy:
        """This policy sharing other folders; raise ValueError naming one that cannot be."""
        return replace(self, roots=validated_roots(roots, self.protected))

    def with_runtime_roots(
        self, requested: Iterable[str | Path], start_roots: Iterable[Path]
    ) -> ToolPolicy:
        """Roots set while running (/command roots, or saved by it): as with_roots, but the
        whole file system or the bare home folder only if the start-up configuration
        (AILAB_TOOL_ROOTS) shared it. Blocking: it resolves paths."""
        at_start = {Path(os.path.realpath(p)) for p in start_roots}
        everything = {
            Path("/"): "the whole file system",
            Path(os.path.realpath(Path.home())): "your whole home folder",
        }
        for raw in requested:
            real = Path(os.path.realpath(os.path.expanduser(str(raw))))
            if real in everything and real not in at_start:
                raise ValueError(
                    f"{raw} would share {everything[real]} with tools; share a project "
                    "folder, or set AILAB_TOOL_ROOTS at start-up if you really mean it"
                )
        return self.with_roots(requested)
