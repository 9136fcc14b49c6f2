"""The wheel ships every package of the application (a subpackage left out of
[tool.setuptools] packages works from a checkout and breaks an installed `mqi`)."""

from __future__ import annotations

import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_package_under_the_shipped_roots_is_listed():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())
                 ["tool"]["setuptools"]["packages"])
    roots = {name for name in listed if "." not in name}
    found = {".".join(init.parent.relative_to(REPO).parts)
             for root in roots for init in (REPO / root).rglob("__init__.py")}
    assert found == listed
