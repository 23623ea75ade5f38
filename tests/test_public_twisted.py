"""The package uses only Twisted's public names, so it runs on any Twisted release that keeps its public API (no
upper bound on the dependency).

Three ways a private name creeps in, each checked over every module of `gateway/`: an import of a name or module
starting with "_" from `twisted`; reading or writing an attribute starting with "_" of an object that is not one
of the gateway's own (no class of `gateway/` defines that name); and a method of a gateway class overriding a
private method of a Twisted base class.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import gateway

PACKAGE = Path(gateway.__file__).parent
NAMEDTUPLE_API = frozenset({"_replace", "_asdict", "_fields", "_make"})
"""The public methods of a `typing.NamedTuple` (underscored so they cannot clash with field names)."""


def _sources() -> list[tuple[Path, ast.Module]]:
    return [(path, ast.parse(path.read_text(), str(path))) for path in sorted(PACKAGE.rglob("*.py"))]


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _own_names(trees: list[tuple[Path, ast.Module]]) -> set[str]:
    """Every private name the gateway itself defines: functions, methods, classes, attributes it assigns,
    slots, and module-level names."""
    names: set[str] = set()
    for _path, tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names.add(node.target.id)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("_"):
                names.add(node.value)  # __slots__ entries
    return {name for name in names if _private(name)}


def test_nothing_private_is_imported_from_twisted() -> None:
    found = []
    for path, tree in _sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "twisted":
                module_private = any(_private(part) for part in (node.module or "").split("."))
                for alias in node.names:
                    if module_private or _private(alias.name):
                        found.append(f"{path.name}:{node.lineno}: from {node.module} import {alias.name}")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    parts = alias.name.split(".")
                    if parts[0] == "twisted" and any(_private(part) for part in parts):
                        found.append(f"{path.name}:{node.lineno}: import {alias.name}")
    assert found == []


def test_no_private_attribute_of_anything_but_the_gateways_own() -> None:
    trees = _sources()
    own = _own_names(trees)
    found = []
    for path, tree in trees:
        for node in ast.walk(tree):
            name = None
            if isinstance(node, ast.Attribute) and _private(node.attr):
                name = node.attr
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in {"getattr", "setattr", "hasattr", "delattr"}
                and len(node.args) > 1
                and isinstance(node.args[1], ast.Constant)
                and isinstance(node.args[1].value, str)
                and _private(node.args[1].value)
            ):
                name = node.args[1].value
            if name is not None and name not in own and name not in NAMEDTUPLE_API:
                found.append(f"{path.name}:{node.lineno}: {name}")
    assert found == []


def test_no_private_twisted_method_is_overridden() -> None:
    found = []
    for module_info in pkgutil.walk_packages([str(PACKAGE)], prefix="gateway."):
        module = importlib.import_module(module_info.name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ != module.__name__:
                continue
            for name in vars(cls):
                if not _private(name):
                    continue
                for base in cls.__mro__[1:]:
                    if base.__module__.split(".")[0] == "twisted" and name in vars(base):
                        found.append(f"{cls.__module__}.{cls.__qualname__}.{name} overrides {base.__qualname__}")
    assert found == []


def test_the_check_catches_a_private_name() -> None:
    """The scan itself: a module reaching into Twisted's internals is found (so the tests above can fail)."""
    tree = ast.parse("from twisted.web.http import _ChunkedTransferDecoder\nx = headers._rawHeaders\n")
    imports = [a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names if _private(a.name)]
    attributes = [n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and _private(n.attr)]
    assert imports == ["_ChunkedTransferDecoder"]
    assert attributes == ["_rawHeaders"] and "_rawHeaders" not in _own_names(_sources())
