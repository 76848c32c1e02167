"""The reproduction scripts in analyses/: their helpers on known answers, and the quick run end to end (slow)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parent.parent
ANALYSES = ROOT / "analyses"
sys.path.insert(0, str(ANALYSES))

import _common  # noqa: E402
import run_all  # noqa: E402


def test_zoo_status_names_missing_and_unfinished_checkpoints(tmp_path: Path) -> None:
    assert "no config.json" in _common.zoo_status("rope", tmp_path)
    folder = tmp_path / "rope"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert "no model.safetensors" in _common.zoo_status("rope", tmp_path)
    (folder / "model.safetensors").write_bytes(b"x")
    (folder / "train_state.json").write_text(json.dumps({"step": 200, "steps": 400}))
    assert "still training (step 200 of 400)" in _common.zoo_status("rope", tmp_path)
    (folder / "train_state.json").write_text(json.dumps({"step": 400, "steps": 400}))
    assert _common.zoo_status("rope", tmp_path) is None


def test_missing_zoo_model_is_skipped_not_raised(tmp_path: Path) -> None:
    model, note = _common.load_zoo_model("alibi", tmp_path)
    assert model is None and note.startswith("skipped:")
    row = _common.skipped_row("zoo:alibi", note, position_scheme="alibi")
    assert row.loc[0, "note"] == note and row.loc[0, "model"] == "zoo:alibi"


def test_output_writes_tables_figures_and_manifest(tmp_path: Path) -> None:
    import plotly.graph_objects as go

    args = _common.parse_args(["--out", str(tmp_path), "--quick"], "test")
    out = _common.Output(args.out, "demo", args)
    out.table("t", pd.DataFrame({"a": [1, 2]}))
    out.figure("f", go.Figure(go.Scatter(x=[0, 1], y=[1, 0])))
    out.summary = {"x": 1}
    out.finish()
    html = (tmp_path / "demo" / "f.html").read_text()
    assert 'src="../plotly.min.js"' in html and "cdn.plot.ly" not in html
    assert (tmp_path / "plotly.min.js").stat().st_size > 1_000_000
    assert json.loads((tmp_path / "demo" / "manifest.json").read_text())["files"] == ["t.csv", "f.html"]
    assert json.loads((tmp_path / "demo" / "summary.json").read_text())["headline"] == {"x": 1}


def test_run_all_rejects_unknown_script_names() -> None:
    with pytest.raises(SystemExit):
        run_all.main(["--only", "not_a_script"])


@pytest.mark.slow
def test_quick_run_writes_every_table_and_figure(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ANALYSES / "run_all.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=3600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    runs = json.loads((tmp_path / "run_all.json").read_text())["runs"]
    assert set(runs) == set(run_all.SCRIPTS)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert set(manifest) == set(run_all.SCRIPTS)
    zoo_ready = all(_common.zoo_status(v, None) is None for v in _common.ZOO_ORDER)
    for script, files in manifest.items():
        assert any(f.endswith(".csv") for f in files), f"{script} wrote no table"
        if zoo_ready:
            assert any(f.endswith(".html") for f in files), f"{script} wrote no figure"
        for f in files:
            path = tmp_path / f
            assert path.exists() and path.stat().st_size > 0, f"{f} missing or empty"
            if f.endswith(".csv"):
                assert len(pd.read_csv(path)) > 0, f"{f} has no rows"
        summary = json.loads((tmp_path / script / "summary.json").read_text())
        assert summary["headline"], f"{script} has no headline numbers"
    assert (tmp_path / "plotly.min.js").stat().st_size > 1_000_000
