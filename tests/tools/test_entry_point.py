"""The top-level tools.py: imported from the repository root it gives the catalogue."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parents[2]

SCRIPT = """
import json, sys
import tools
from ailab import config
policy = tools.ToolPolicy.from_settings(config.load_settings({"AILAB_DATA_DIR": sys.argv[1]}))
print(json.dumps({
    "file": tools.__file__,
    "names": tools.tool_names(),
    "schemas": len(tools.get_available_tools()),
    "cwd": tools.execute_tool(policy, "get_current_directory", {}),
}))
"""


def test_importing_tools_from_the_repository_root_gives_the_catalogue_and_execute_tool(
    tmp_path: Path,
) -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)],
        cwd=PROJECT_DIR,
        capture_output=True,
        text=True,
        check=True,
    )
    seen = json.loads(done.stdout)
    assert Path(seen["file"]) == PROJECT_DIR / "tools.py"
    assert len(seen["names"]) == seen["schemas"] == 15 and "read_file" in seen["names"]
    assert seen["cwd"] == {
        "status": "success",
        "path": str((tmp_path / "workspace").resolve()),
        "allowed_roots": [str((tmp_path / "workspace").resolve())],
    }
