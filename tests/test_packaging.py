"""Tests for the packaging: what `pip install .` puts in the wheel (README command 1 runs from it, not from the
source tree, so a package left out breaks the installed gateway while every test of the tree passes)."""

from __future__ import annotations

import ast
import importlib
import os
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_gateway_package_is_in_the_wheel() -> None:
    """pyproject.toml lists the packages by hand (twisted.plugins has no __init__.py): every package under
    gateway/ must be among them."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "gateway").rglob("__init__.py")}
    assert found <= listed, f"packages missing from [tool.setuptools] packages: {sorted(found - listed)}"
    assert "twisted.plugins" in listed


def _requirement_names(requirements: list[str]) -> dict[str, str]:
    return {req.split(">")[0].split("[")[0].strip().lower(): req for req in requirements}


def test_the_build_has_every_dependency_mypyc_type_checks() -> None:
    """mypyc type-checks the whole package to compile the request path (setup.py), so the isolated build
    environment needs every package the gateway imports, at the same lower bound: one missing fails the build."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    build = _requirement_names(project["build-system"]["requires"])
    for name, requirement in _requirement_names(project["project"]["dependencies"]).items():
        assert build.get(name) == requirement, f"[build-system] requires: {requirement!r} missing or different"
    assert {"mypy", "mypy-zope", "setuptools"} <= build.keys()


def _compiled_list() -> list[str]:
    tree = ast.parse((ROOT / "setup.py").read_text())
    [value] = [
        node.value for node in tree.body if isinstance(node, ast.Assign) and ast.unparse(node.targets[0]) == "COMPILED"
    ]
    return list(ast.literal_eval(value))


def test_every_compiled_module_exists() -> None:
    """setup.py names the modules mypyc compiles by path: each is a module of the package."""
    compiled = _compiled_list()
    assert compiled == sorted(compiled)
    for path in compiled:
        assert (ROOT / path).is_file(), f"setup.py COMPILED names {path}, which does not exist"


def test_no_compiled_module_is_older_than_its_source() -> None:
    """A module compiled in place (an editable install) shadows its source: after an edit or a checkout it must be
    built again (`pip install -e .`) or removed (GATEWAY_MYPYC=0 builds none), or the tests run the old code."""
    for library in (ROOT / "gateway").rglob("*.so"):
        source = library.parent / (library.name.split(".")[0] + ".py")
        assert source.is_file(), f"{library} has no source"
        assert library.stat().st_mtime >= source.stat().st_mtime, f"{library} is older than {source.name}: rebuild"


def _is_compiled(path: str) -> bool:
    module = importlib.import_module(path.removesuffix(".py").removesuffix("/__init__").replace("/", "."))
    return str(module.__file__).endswith(".so")


def test_the_request_path_is_compiled_all_or_none() -> None:
    """setup.py builds every listed module or none (a module's shim without the group's shared library would not
    import). With GATEWAY_MYPYC=0 the package is interpreted; with GATEWAY_REQUIRE_COMPILED=1 (CI's second run,
    on a machine it gave a C compiler and Python's headers) it must be compiled, so a build that fell back to
    plain Python, which only warns, fails the run instead of passing on the interpreted code."""
    from gateway.operations.about import build

    compiled = {path: _is_compiled(path) for path in _compiled_list()}
    modes = set(compiled.values())
    assert len(modes) == 1, f"some modules compiled, some not: {compiled}"
    assert build() == ("compiled" if modes == {True} else "interpreted")  # what --version and the metric say
    if os.environ.get("GATEWAY_MYPYC") == "0":
        assert modes == {False}, "GATEWAY_MYPYC=0, but the request path runs compiled (an earlier build's .so files)"
    elif os.environ.get("GATEWAY_REQUIRE_COMPILED") == "1":
        assert modes == {True}, "GATEWAY_REQUIRE_COMPILED=1, but the build fell back to plain Python (pip -v says why)"
