"""The built wheel: one import package, its data files inside, usable outside the checkout."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

from conftest import PROJECT_DIR

IMPORT_EVERYTHING = """
import importlib, pkgutil, sys
import ailab
assert not ailab.__file__.startswith(sys.argv[1]), ailab.__file__  # not the checkout's copy
for module in pkgutil.walk_packages(ailab.__path__, "ailab."):
    importlib.import_module(module.name)
from ailab import config
assert config.template_path("chatml-tools.jinja").is_file()
from importlib import resources
assert (resources.files("ailab.web") / "index.html").is_file()
print("imported", ailab.__file__)
"""


def _built_wheel(out: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(out), "."],
        cwd=PROJECT_DIR,
        check=True,
    )
    return next(out.glob("ailab-*.whl"))


def test_the_wheel_installs_one_package_that_works_outside_the_checkout(tmp_path: Path) -> None:
    wheel = _built_wheel(tmp_path / "dist")
    with zipfile.ZipFile(wheel) as archive:
        top_level = {name.split("/")[0] for name in archive.namelist()}
    assert {name for name in top_level if not name.endswith(".dist-info")} == {"ailab"}

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-deps"]
    # Away from the checkout, whose ailab.egg-info would tell pip ailab is already there.
    clean = {"PATH": "/usr/bin:/bin"}
    subprocess.run([*pip, str(wheel)], cwd=tmp_path, env=clean, check=True)
    # The fresh venv has the wheel alone; its dependencies come from the test's own venv.
    deps = sysconfig.get_paths()["purelib"]
    run = subprocess.run(
        [str(venv / "bin" / "python"), "-c", IMPORT_EVERYTHING, str(PROJECT_DIR)],
        cwd=tmp_path,
        env={**clean, "PYTHONPATH": deps},
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert str(venv) in run.stdout
    for script in ("ailab-server", "ailab-chat", "ailab-mcp"):
        assert (venv / "bin" / script).is_file()
