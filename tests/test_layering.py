"""The import matrix of docs/architecture.md, "Layers and imports", checked on every import in the tree.

Every ``import fedmri...`` and ``from fedmri... import`` statement counts, at
module level or inside a function. A role package reaches another only where the
matrix allows it, and never for a private name (one that starts with ``_``).
Benchmarks may use every layer, through its public names only.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Folder -> layer of its files (common/cli is the user-facing CLI: it may reach every role).
FOLDERS = {"common": "fedmri", "client": "client", "server": "server", "strategies": "strategies",
           "simulations": "simulations", "benchmarks": "benchmarks"}
# Layer -> the layers it may import.
ALLOWED = {
    "fedmri": {"fedmri"},
    "cli": {"fedmri", "cli", "client", "server", "strategies", "simulations"},
    "client": {"fedmri", "client"},
    "strategies": {"fedmri", "strategies"},
    "server": {"fedmri", "server", "strategies"},
    "simulations": {"fedmri", "simulations", "server", "client", "strategies"},
    "benchmarks": {"fedmri", "cli", "client", "server", "strategies", "simulations"},
}


def layer_of_module(module: str) -> str | None:
    """The layer of an absolute module name; None outside fedmri."""
    parts = module.split(".")
    if parts[0] != "fedmri":
        return None
    if len(parts) > 1 and parts[1] in ("client", "server", "strategies", "simulations", "cli"):
        return parts[1]
    return "fedmri"


def layer_of_file(path: Path) -> str:
    rel = path.relative_to(ROOT)
    if rel.parts[:2] == ("common", "cli"):
        return "cli"
    return FOLDERS[rel.parts[0]]


def imports(source: str) -> list[tuple[int, str, list[str]]]:
    """(line, module, imported names) of every absolute fedmri import in ``source``."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name, []) for alias in node.names if alias.name.startswith("fedmri")]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("fedmri"):
            names = [alias.name for alias in node.names]
            if node.module == "fedmri":  # from fedmri import stages, wire: modules of the namespace
                out += [(node.lineno, f"fedmri.{name}", []) for name in names if not _dunder(name)]
            else:
                out.append((node.lineno, node.module, names))
    return out


def _dunder(name: str) -> bool:
    return name.startswith("__") and name.endswith("__")


def violations(path: Path, source: str) -> list[str]:
    """Every import of ``source`` (the file at ``path``) that the matrix forbids."""
    src = layer_of_file(path)
    found = []
    for line, module, names in imports(source):
        dst = layer_of_module(module)
        if dst is None or dst == src:
            continue
        where = f"{path.relative_to(ROOT)}:{line}"
        if dst not in ALLOWED[src]:
            found.append(f"{where}: {src} imports {module} ({dst})")
        private = [p for p in [*module.split("."), *names] if p.startswith("_") and not _dunder(p)]
        if private:
            found.append(f"{where}: {src} imports private {module}.{private[0]}")
    return found


def _files() -> list[Path]:
    return sorted(p for folder in FOLDERS for p in (ROOT / folder).rglob("*.py"))


def test_every_import_between_layers_is_allowed() -> None:
    problems = [v for path in _files() for v in violations(path, path.read_text(encoding="utf-8"))]
    assert not problems, "imports the layering forbids (docs/architecture.md):\n" + "\n".join(problems)


@pytest.mark.parametrize(("file", "line", "why"), [
    ("client/app.py", "from fedmri.server.pipeline import Pipeline", "client imports fedmri.server.pipeline"),
    ("common/wire.py", "import fedmri.client.app", "fedmri imports fedmri.client.app"),
    ("strategies/validation.py", "from fedmri.client.policy import check_request", "strategies imports"),
    ("server/pipeline.py", "    from fedmri.simulations.runner import load_simulation", "server imports"),
    ("simulations/runner.py", "from fedmri.server.pipeline import _aggregator", "private fedmri.server.pipeline._aggregator"),
    ("benchmarks/bench_ceiling.py", "from fedmri.simulations.runner import _ceiling", "benchmarks imports private"),
])
def test_a_forbidden_import_added_to_a_file_is_caught(file: str, line: str, why: str) -> None:
    path = ROOT / file
    source = path.read_text(encoding="utf-8")
    if line.startswith("    "):
        source += f"\n\ndef _added() -> None:\n{line}\n"
    else:
        source += f"\n{line}\n"
    assert any(why in v for v in violations(path, source)), violations(path, source)
