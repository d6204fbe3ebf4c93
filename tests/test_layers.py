"""The package's layers: imports run one way (see the README's Development section).

A module may import from its own layer and the layers below it, never above: `sobot` knows
nothing of configuration, `tokens` nothing of the server, the server nothing of the CLI.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "proxy"
# Lowest first. The shared modules (errors, logs, coalesce) may be used by every layer.
LAYERS = ("sobot", "config", "upstream", "tokens", "server", "cli", "testing")


def layer_of(module: str) -> str | None:
    """`proxy.tokens.manager` -> "tokens"; a shared module or the package itself -> None."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def proxy_imports(path: Path) -> list[str]:
    imported = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("proxy"):
            if node.module == "proxy":
                imported += [f"proxy.{alias.name}" for alias in node.names]
            else:
                imported.append(node.module)
        elif isinstance(node, ast.Import):
            imported += [alias.name for alias in node.names if alias.name.startswith("proxy")]
    return imported


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda path: str(path.relative_to(PACKAGE)))
def test_imports_run_one_way(path: Path) -> None:
    module = ".".join(("proxy", *path.relative_to(PACKAGE).with_suffix("").parts))
    own = layer_of(module)
    # The testing layer (the fake) sits beside the CLI, which runs it: neither is below the other.
    if module == "proxy.__main__":
        return  # the entry point, above everything
    # A shared module may use the protocol (errors.py answers in Sobot's shape), nothing more.
    allowed = LAYERS[: LAYERS.index(own) + 1] if own is not None else ("sobot",)
    if own == "cli":
        allowed = (*allowed, "testing")
    for imported in proxy_imports(path):
        target = layer_of(imported)
        if target is None:
            continue  # shared modules, and the package's own __init__
        assert target in allowed, f"{module} (layer {own}) imports {imported} (layer {target})"
