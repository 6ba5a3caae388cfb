"""No tuneoff module reaches into another's private names (``_x``); the layers themselves are `lint-imports`'s.

A name that starts with one underscore is its module's own business: another module that needs it should get a
public name for it. Checked by reading the source (no import): ``from tuneoff.a import _b`` and ``tuneoff.a._b``
(or ``a._b`` after ``from tuneoff import a``) in any module other than ``tuneoff.a`` itself.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = SRC / "tuneoff"

KNOWN: set = set()
"""(importing module, private name) pairs tolerated for now: none."""


def module_name(path: Path, src: Path) -> str:
    parts = path.relative_to(src).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str, src: Path) -> bool:
    path = src.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def absolute(node: ast.ImportFrom, here: str, is_package: bool) -> str:
    """The module an ``from ... import`` names, relative imports resolved against ``here``."""
    if not node.level:
        return node.module or ""
    base = here.split(".")
    base = base[: len(base) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def dotted(node: ast.AST, aliases: dict[str, str]) -> str | None:
    """``a.b.c`` as a dotted name with its first part replaced by the module it is bound to, if any."""
    if isinstance(node, ast.Name):
        return aliases.get(node.id)
    if isinstance(node, ast.Attribute):
        base = dotted(node.value, aliases)
        return f"{base}.{node.attr}" if base else None
    return None


def private_uses(path: Path, src: Path = SRC) -> set[tuple[str, str]]:
    """(this module, tuneoff.X._name) for every private name of another tuneoff module this file uses."""
    here = module_name(path, src)
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    aliases: dict[str, str] = {}  # local name -> tuneoff module it is bound to
    found: set[tuple[str, str]] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "tuneoff":
                    if alias.asname:
                        aliases[alias.asname] = alias.name
                    else:
                        aliases["tuneoff"] = "tuneoff"
                    if any(private(part) for part in alias.name.split(".")):
                        found.add((here, alias.name))
        elif isinstance(node, ast.ImportFrom):
            source = absolute(node, here, path.name == "__init__.py")
            if source.split(".")[0] != "tuneoff":
                continue
            for alias in node.names:
                if private(alias.name) and source != here:
                    found.add((here, f"{source}.{alias.name}"))
                if is_module(f"{source}.{alias.name}", src):
                    aliases[alias.asname or alias.name] = f"{source}.{alias.name}"
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and private(node.attr):
            owner = dotted(node.value, aliases)
            if owner and owner != here and is_module(owner, src):
                found.add((here, f"{owner}.{node.attr}"))
    return found


def test_no_module_uses_another_modules_private_names():
    found = set().union(*(private_uses(path) for path in sorted(PACKAGE.rglob("*.py"))))
    new = sorted(found - KNOWN)
    assert not new, "private names used across modules (give them a public name):\n" + "\n".join(
        f"  {module} uses {name}" for module, name in new
    )
    stale = sorted(KNOWN - found)
    assert not stale, "fixed, so remove from KNOWN:\n" + "\n".join(f"  {module} uses {name}" for module, name in stale)


def test_the_scan_sees_each_form(tmp_path):
    """from-imports, relative imports, module attributes: each is found; a module's own names are not."""
    package = tmp_path / "tuneoff"
    (package / "a").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "a" / "__init__.py").write_text("")
    (package / "a" / "util.py").write_text("_hidden = 1\n_mine = _hidden\n")
    (package / "b.py").write_text("from tuneoff.a.util import _hidden\n")
    (package / "a" / "c.py").write_text("from .util import _hidden\n")
    (package / "d.py").write_text(
        "from tuneoff.a import util\nimport tuneoff.a.util as u\nimport tuneoff\n"
        "x = util._hidden + u._hidden + tuneoff.a.util._hidden + util.__name__.__len__()\n"
    )
    found = set().union(*(private_uses(path, tmp_path) for path in sorted(package.rglob("*.py"))))
    assert found == {
        ("tuneoff.b", "tuneoff.a.util._hidden"),
        ("tuneoff.a.c", "tuneoff.a.util._hidden"),
        ("tuneoff.d", "tuneoff.a.util._hidden"),
    }
