"""The package layout (issue 19): a package per part, each module with one job, so the folder tree is the
architecture. Three checks keep it so: a module of a part's package stays short (past about 400 lines a module has
taken a second job), so does each of the few modules left at the top, and the folder tree that README.md and
docs/architecture.md show names every package."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GATEWAY = ROOT / "gateway"

MAX_LINES = 450
"""The most lines a module of SHORT_PACKAGES may have: about 400, with room to grow a little before it is split."""
SHORT_PACKAGES = ("auth", "config", "tls", "operations", "http1", "proxy", "routing", "redis", "upstreams")
"""The packages whose modules are held to MAX_LINES: every package of gateway/ but those of EXEMPT."""
EXEMPT = ("demo",)
"""Packages not held to MAX_LINES: demo, the demo upstream, is no part of the gateway."""
TOP_MODULES = ("__init__", "addresses", "errors", "headers", "logs", "tap")
"""The modules at the top of gateway/, held to MAX_LINES too: what several parts share (errors, headers, client
addresses), and what twistd names (tap, the plugin's module; logs, the unit's --logger)."""
TREES = (ROOT / "README.md", ROOT / "docs" / "architecture.md")
"""The documents that show the folder tree, in a ```text block that begins with "gateway/"."""


def too_long(paths: list[Path]) -> list[str]:
    """Each module of `paths` longer than MAX_LINES, as "path: N lines"."""
    found = []
    for path in paths:
        count = len(path.read_text().splitlines())
        if count > MAX_LINES:
            found.append(f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}: {count} lines")
    return found


def test_the_modules_of_a_part_are_short() -> None:
    """No module of a package of SHORT_PACKAGES (gateway/auth/ and its settings/, gateway/proxy/, gateway/http1/
    ...) is longer than MAX_LINES."""
    modules = sorted(path for package in SHORT_PACKAGES for path in (GATEWAY / package).rglob("*.py"))
    assert {path.relative_to(GATEWAY).parts[0] for path in modules} == set(SHORT_PACKAGES)
    found = too_long(modules)
    assert not found, f"split by job (at most {MAX_LINES} lines a module): {found}"


def test_every_package_is_held_short() -> None:
    """Every package of gateway/ is in SHORT_PACKAGES, but those EXEMPT names: a new part is held to MAX_LINES
    from the start."""
    packages = {init.parent.name for init in GATEWAY.glob("*/__init__.py")}
    assert not packages - set(SHORT_PACKAGES) - set(EXEMPT), "add the new package to SHORT_PACKAGES"


def test_the_top_level_modules_are_few_and_short() -> None:
    """The modules at the top of gateway/ are those of TOP_MODULES (a part's module belongs in its package), and
    none is longer than MAX_LINES."""
    modules = sorted(GATEWAY.glob("*.py"))
    assert sorted(path.stem for path in modules) == sorted(TOP_MODULES)
    found = too_long(modules)
    assert not found, f"split by job (at most {MAX_LINES} lines a module): {found}"


def test_the_check_names_a_long_module(tmp_path: Path) -> None:
    """The check itself: a module one line too long is named, with its length; one at the limit is not."""
    (tmp_path / "long.py").write_text("x = 1\n" * (MAX_LINES + 1))
    (tmp_path / "short.py").write_text("x = 1\n" * MAX_LINES)
    assert too_long(sorted(tmp_path.glob("*.py"))) == [f"{tmp_path / 'long.py'}: {MAX_LINES + 1} lines"]


def test_the_trees_name_every_package() -> None:
    """The folder tree of README.md and of docs/architecture.md has a line for every package under gateway/."""
    packages = sorted(init.parent.name for init in GATEWAY.glob("*/__init__.py"))
    for document in TREES:
        tree = re.search(r"```text\ngateway/\n(.*?)```", document.read_text(), re.DOTALL)
        assert tree is not None, f"{document.relative_to(ROOT)}: no folder tree (```text, then gateway/)"
        listed = set(re.findall(r"[├└]── (\w+)/", tree.group(1)))
        missing = [package for package in packages if package not in listed]
        assert not missing, f"{document.relative_to(ROOT)}: the folder tree has no line for {missing}"
