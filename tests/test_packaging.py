"""Tests for the packaging: what `pip install .` puts in the wheel (README command 1 runs from it, not from the
source tree, so a package left out breaks the installed gateway while every test of the tree passes)."""

from __future__ import annotations

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
