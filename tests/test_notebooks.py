"""The analysis notebooks: jupytext percent-format ``notebooks/*.py`` (linted by ruff like any module), paired
with ``.ipynb`` for Jupyter (generated, not tracked), each executed top to bottom in a fresh kernel running this
interpreter (the project's venv)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jupytext
import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NAMES = sorted(p.name for p in NOTEBOOK_DIR.glob("[0-9][0-9]_*.py"))


def test_five_notebooks_each_one_percent_format_file_paired_with_ipynb():
    assert len(NAMES) == 5, NAMES
    for name in NAMES:
        nb = jupytext.read(NOTEBOOK_DIR / name)
        nbformat.validate(nb)
        assert nb.metadata["jupytext"]["formats"] == "ipynb,py:percent"  # Jupyter with jupytext saves both
        assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")
        assert sum(c.cell_type == "code" for c in nb.cells) >= 3
        # what Jupyter (with jupytext) writes back when the notebook is saved keeps every cell and stays ruff-clean
        saved = jupytext.writes(nb, fmt="py:percent")
        assert [c.source for c in jupytext.reads(saved, fmt="py:percent").cells] == [c.source for c in nb.cells]
        lint = subprocess.run([sys.executable, "-m", "ruff", "check", "--config", str(ROOT / "pyproject.toml"),
                               "--stdin-filename", f"notebooks/{name}", "-"], input=saved, text=True,
                              capture_output=True, cwd=ROOT)  # fmt: skip
        assert lint.returncode == 0, lint.stdout
    tracked = {p.name for p in NOTEBOOK_DIR.iterdir()} - {".ipynb_checkpoints"}
    assert tracked - {n.replace(".py", ".ipynb") for n in NAMES} == set(NAMES), tracked


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_top_to_bottom(name, tmp_path, monkeypatch):
    from nbclient import NotebookClient

    nb = jupytext.read(NOTEBOOK_DIR / name)
    nb.cells.insert(0, nbformat.v4.new_code_cell("import sys; print(sys.executable)"))
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):  # the kernel inherits this process's environment
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    client = NotebookClient(nb, kernel_name="python3", timeout=900, resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    kernel_python = nb.cells[0].outputs[0]["text"].strip()
    assert Path(kernel_python).resolve() == Path(sys.executable).resolve(), (
        f"the python3 kernel runs {kernel_python}, not this interpreter {sys.executable}"
    )
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
