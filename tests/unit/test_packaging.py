"""pyproject.toml: what the install needs to stay warning-free and find every package."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_license_is_an_spdx_string() -> None:
    # a TOML table ({ text = "MIT" }) makes setuptools >= 77 warn three times per install
    assert PYPROJECT["project"]["license"] == "MIT"
    assert "setuptools>=77" in PYPROJECT["build-system"]["requires"][0]


def test_console_script_and_packages() -> None:
    assert PYPROJECT["project"]["scripts"]["mtaq"] == "mtaq.cli:main"
    packages = set(PYPROJECT["tool"]["setuptools"]["packages"])
    # every package and subpackage (mtaq.ops, mtaq.runtime): setuptools installs only those listed
    tops = [p.parent for p in ROOT.glob("*/__init__.py") if p.parent.name not in {"tests", "bench"}]
    found = {".".join(i.parent.relative_to(ROOT).parts) for top in tops for i in top.rglob("__init__.py")}
    assert {"common.smtp", "mtaq.ops", "mtaq.runtime"} <= found
    assert packages == found
