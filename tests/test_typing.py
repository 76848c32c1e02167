"""py.typed is honoured: the package ships it, and the mypy settings CI runs on it catch a wrong return type."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_py_typed_ships_with_the_package():
    assert (ROOT / "posprobe" / "py.typed").exists()
    assert '"py.typed"' in (ROOT / "pyproject.toml").read_text()


def test_the_ci_mypy_settings_catch_a_wrong_return_type(tmp_path):
    snippet = tmp_path / "wrong.py"
    snippet.write_text(
        "from dataclasses import dataclass\n\n\n"
        "@dataclass\nclass Key:\n    name: str\n\n\n"
        "def name(key: Key) -> int:\n"
        "    return key.name  # a str where an int is promised\n"
    )
    mypy = [
        sys.executable,
        "-m",
        "mypy",
        "--config-file",
        str(ROOT / "pyproject.toml"),
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    proc = subprocess.run([*mypy, str(snippet)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stdout
    assert 'Incompatible return value type (got "str", expected "int")' in proc.stdout
