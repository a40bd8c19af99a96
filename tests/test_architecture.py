"""The layout CLAUDE.md describes is the layout of the code: every module is on the map,
and each imports only what its row says it may."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from conftest import PROJECT_DIR

ENTRY_MODULES = {"ai_server.py", "ai_client.py", "server_config.py", "llama_manager.py"}
TOP_LEVEL = ENTRY_MODULES | {"tools.py", "test_server.py"}


def _package_map() -> dict[str, set[str]]:
    """Module path -> the allowed-import words of its row in CLAUDE.md's package map."""
    rows: dict[str, set[str]] = {}
    for line in (PROJECT_DIR / "CLAUDE.md").read_text().splitlines():
        if not line.startswith("| `ailab/"):
            continue
        cells = [cell.strip() for cell in line.strip("|").split(" | ")]
        names = re.findall(r"`([^`]+\.py|[^`]+/)`", cells[0])
        folder = str(Path(names[0]).parent)
        # "finetune.*" allows every module of that subpackage.
        allowed = {word.strip().removesuffix(".*") for word in cells[-1].split(",")}
        for name in names:
            rows[name if "/" in name else f"{folder}/{name}"] = allowed
    return rows


def _ailab_imports(path: Path) -> set[str]:
    imports: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ailab"):
            for alias in node.names:
                # `from ailab.upstream import proxy` imports the module ailab.upstream.proxy.
                submodule = f"{node.module}.{alias.name}"
                where = PROJECT_DIR / submodule.replace(".", "/")
                is_module = where.with_suffix(".py").is_file() or where.is_dir()
                imports.add(submodule if is_module else node.module)
        elif isinstance(node, ast.Import):
            imports |= {a.name for a in node.names if a.name.startswith("ailab")}
    return imports


def _permitted(module: str, allowed: set[str], own: str, above: set[str]) -> bool:
    if module == own or (
        module.startswith(own.rsplit(".", 1)[0] + ".") and "its own modules" in allowed
    ):
        return True
    if "everything above" in allowed and module in above:
        return True
    dotted = module.removeprefix("ailab.")
    return any(
        dotted == word or dotted.endswith("." + word) or dotted.startswith(word + ".")
        for word in allowed
    )


def test_every_module_of_the_package_is_on_the_map() -> None:
    mapped = _package_map()
    modules = {
        str(p.relative_to(PROJECT_DIR))
        for p in (PROJECT_DIR / "ailab").rglob("*.py")
        if p.name != "__init__.py" or p.parent.name == "tools"
    }
    folders = {name for name in mapped if name.endswith("/")}
    unmapped = {m for m in modules if m not in mapped and not any(m.startswith(f) for f in folders)}
    assert not unmapped, f"modules missing from CLAUDE.md's package map: {sorted(unmapped)}"


def test_each_module_imports_only_what_the_map_allows() -> None:
    mapped = _package_map()
    seen: set[str] = set()
    wrong = []
    for name, allowed in mapped.items():
        if name.endswith("/"):
            continue
        dotted = name.removesuffix(".py").replace("/", ".").removesuffix(".__init__")
        for module in _ailab_imports(PROJECT_DIR / name):
            if not _permitted(module, allowed, dotted, seen):
                wrong.append(f"{name} imports {module} (allowed: {', '.join(sorted(allowed))})")
        seen.add(dotted)
    assert not wrong, "\n".join(wrong)


def test_the_checkout_has_only_the_documented_top_level_modules() -> None:
    assert {p.name for p in PROJECT_DIR.glob("*.py")} == TOP_LEVEL


def test_entry_modules_hold_no_logic() -> None:
    for name in ENTRY_MODULES | {"tools.py"}:
        tree = ast.parse((PROJECT_DIR / name).read_text())
        defined = [n for n in tree.body if isinstance(n, ast.FunctionDef | ast.ClassDef)]
        assert not defined, f"{name} defines {[n.name for n in defined]}; put it in ailab"
