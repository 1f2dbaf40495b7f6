"""The layers of design.md: dependencies point down, and the sans-IO layers do no I/O."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "nbdtrack"

# What each layer may import from nbdtrack (besides itself).
ALLOWED = {
    "protocol": set(),
    "storage": set(),
    "tracking": {"storage"},
    "exports": {"protocol", "storage", "tracking"},
    "control": {"exports", "protocol", "storage", "tracking", "__init__"},
    "server": {"control", "exports", "protocol", "storage", "tracking", "__init__"},
    "client": {"protocol"},
    "backup": {"client", "protocol", "tracking"},
}
# Sans-IO layers: bytes in, events out; no sockets, no event loop.
NO_IO = {"protocol": {"socket", "asyncio", "selectors", "ssl"}, "control": {"socket", "asyncio"}}


def layer_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0].removesuffix(".py")


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            if node.module == "nbdtrack":  # submodules by name; the rest is __init__'s
                found.update(
                    f"nbdtrack.{alias.name}"
                    for alias in node.names
                    if (PACKAGE / alias.name).is_dir() or (PACKAGE / f"{alias.name}.py").exists()
                )
    return found


SOURCES = sorted(p for p in PACKAGE.rglob("*.py") if layer_of(p) in ALLOWED)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_dependencies_point_down(path: Path):
    layer = layer_of(path)
    for name in imports(path):
        if name.startswith("nbdtrack."):
            target = name.split(".")[1]
            if target != layer:
                assert target in ALLOWED[layer], f"{layer} must not import {name}"
        elif name == "nbdtrack":
            assert "__init__" in ALLOWED[layer] or layer == "protocol", name
        for forbidden in NO_IO.get(layer, ()):
            assert name != forbidden and not name.startswith(forbidden + "."), (
                f"{layer} is sans-IO but imports {name}"
            )
