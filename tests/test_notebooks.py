"""The analysis notebooks: generated from ``notebooks/make_notebooks.py``, stored without outputs, and
each executes top to bottom in a fresh kernel running this interpreter (the project's venv)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import nbformat
import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"


def generator():
    spec = importlib.util.spec_from_file_location("make_notebooks", NOTEBOOK_DIR / "make_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


NAMES = sorted(generator().NOTEBOOKS)


def test_notebooks_match_their_generator_and_carry_no_outputs():
    gen = generator()
    assert sorted(p.name for p in NOTEBOOK_DIR.glob("*.ipynb")) == NAMES
    for name in NAMES:
        stored = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
        nbformat.validate(stored)
        for cell in stored.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, f"{name} was saved with outputs"
        fresh = gen.build(name)
        assert [c.source for c in stored.cells] == [c.source for c in fresh.cells], (
            f"{name} differs from notebooks/make_notebooks.py; run .venv/bin/python notebooks/make_notebooks.py"
        )
        assert stored.cells[0].cell_type == "markdown" and stored.cells[0].source.startswith("# ")


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_top_to_bottom(name, tmp_path, monkeypatch):
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
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
