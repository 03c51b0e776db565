"""The layers point one way (text -> data/models/metrics -> tasks/callbacks -> run/report), and only report/
draws figures: checked on the source, import by import (those inside functions too)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "gptft"
LOWER = ("text", "data", "metrics", "models")
UPPER = ("gptft.tasks", "gptft.callbacks", "gptft.report", "gptft.run", "gptft.cli", "gptft.search")


def imports(path: Path) -> set[str]:
    """Every module `path` imports, at any depth of its code."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def modules(*parts: str) -> list[Path]:
    return sorted(p for part in parts for p in (PACKAGE / part).rglob("*.py"))


@pytest.mark.parametrize("path", modules(*LOWER), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_lower_layers_never_import_upper_ones(path):
    upward = {m for m in imports(path) if m.startswith(UPPER)}
    assert not upward, f"{path.relative_to(PACKAGE)} imports {sorted(upward)}"


def test_only_report_draws_figures():
    drawing = [
        str(p.relative_to(PACKAGE))
        for p in sorted(PACKAGE.rglob("*.py"))
        if "report" not in p.relative_to(PACKAGE).parts[:1] and any(m.startswith("matplotlib") for m in imports(p))
    ]
    assert drawing == []


def test_the_walk_sees_imports_inside_functions(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from gptft.tasks import CausalLM\n    import matplotlib.pyplot\n")
    assert imports(source) == {"gptft.tasks", "matplotlib.pyplot"}
