"""The fixed folders install as one `fedmri` namespace; every package is listed."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"common": "fedmri", "client": "fedmri.client", "server": "fedmri.server",
           "strategies": "fedmri.strategies", "simulations": "fedmri.simulations"}


def _declared() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_package_is_listed_in_pyproject() -> None:
    listed = set(_declared()["tool"]["setuptools"]["packages"])
    found = set()
    for folder, name in FOLDERS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([name, *rel.parts]))
    assert found - listed == set(), "add these to [tool.setuptools] packages"


def test_flower_app_components_import() -> None:
    import importlib

    components = _declared()["tool"]["flwr"]["app"]["components"]
    for ref in components.values():
        module, attr = ref.split(":")
        assert getattr(importlib.import_module(module), attr) is not None


def test_common_does_not_import_role_packages() -> None:
    """docs/architecture.md, "Layers and imports": `fedmri` (common) imports no role package except in the CLI."""
    roles = ("fedmri.client", "fedmri.server", "fedmri.strategies", "fedmri.simulations")
    offenders = []
    for path in (ROOT / "common").rglob("*.py"):
        if "cli" in path.relative_to(ROOT / "common").parts:
            continue
        text = path.read_text()
        offenders += [f"{path}: {r}" for r in roles if f"import {r}" in text or f"from {r}" in text]
    assert offenders == []
