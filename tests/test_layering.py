"""Dependencies run one way: ``stats`` computes tables without plotly, ``plots`` draws them without ``stats``
or ``models``, and both read their labels from the leaf module ``posprobe.labels``."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "posprobe"
STATS = sorted(p.stem for p in (PACKAGE / "stats").glob("*.py") if p.stem != "__init__")
PLOTS = sorted((PACKAGE / "plots").glob("*.py"))


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def test_no_stats_module_loads_plotly():
    code = (
        "import sys\n"
        + "".join(f"import posprobe.stats.{m}\n" for m in STATS)
        + ("print(sorted(m for m in sys.modules if m.split('.')[0] == 'plotly'))")
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]", f"importing posprobe.stats loads {proc.stdout.strip()}"


@pytest.mark.parametrize("path", PLOTS, ids=lambda p: p.name)
def test_plots_never_import_stats_or_models(path):
    bad = {m for m in imported_modules(path) if m.startswith(("posprobe.stats", "posprobe.models"))}
    assert not bad, f"{path.name} imports {sorted(bad)}: figures take tables, labels come from posprobe.labels"


def test_labels_is_a_leaf():
    assert not {m for m in imported_modules(PACKAGE / "labels.py") if m.startswith("posprobe")}


def test_the_check_sees_a_lazy_import(tmp_path):
    """The AST walk finds an import inside a function, the kind a lazy import would hide."""
    sample = tmp_path / "sample.py"
    sample.write_text("import math\n\n\ndef f():\n    from posprobe.stats.attention import ROLES\n    return ROLES\n")
    assert imported_modules(sample) == {"math", "posprobe.stats.attention"}


#: STYLE: a function reads as named steps; one over this many lines (def to last line) is split
MAX_FUNCTION_LINES = 60


def test_no_function_is_a_god_function():
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "split into named steps: " + "; ".join(long)
