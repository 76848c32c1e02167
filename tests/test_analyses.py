"""The reproduction scripts in analyses/: their helpers on known answers, and the quick run end to end (slow)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import tiny_zoo_checkpoint

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


def test_zoo_v2_models_load_by_name_and_one_still_training_is_skipped(tmp_path: Path) -> None:
    tiny_zoo_checkpoint(tmp_path / "rope", "rope", {"step": 8000, "steps": 8000})
    tiny_zoo_checkpoint(tmp_path / "none", "none", {"step": 1500, "steps": 8000})
    model, note = _common.load_zoo_model("rope", tmp_path, zoo="v2")
    assert note is None and model.info.name == "zoo2:rope" and _common.zoo_name("rope", "v2") == "zoo2:rope"
    twin, _ = _common.load_zoo_model("rope", tmp_path, random_init=True, zoo="v2")
    assert twin.info.name.startswith("zoo2:rope (random init")
    model, note = _common.load_zoo_model("none", tmp_path, zoo="v2")
    assert model is None and "still training (step 1500 of 8000)" in note
    assert _common.zoo_dir("v2") == _common.zoo_dir("v1") / "v2"
    v1, _ = _common.load_zoo_model("rope", None)
    assert v1.info.name == "zoo:rope"


def test_the_zoo_option_picks_v1_v2_or_both_and_says_what_it_cannot_do(tmp_path: Path, capsys) -> None:
    parse = _common.parse_args
    assert parse([], "t").zoo == ["v1"]  # a script that knows only v1 has no --zoo
    with pytest.raises(SystemExit):
        parse(["--zoo", "v2"], "t")
    assert parse([], "t", default_zoo="v1,v2").zoo == ["v1", "v2"]
    args = parse(["--zoo", "v2"], "t", default_zoo="v1")
    assert args.zoo == ["v2"] and Path(args.out) == _common.DEFAULT_OUT / "zoo2"
    assert parse(["--zoo", "v2", "--out", "x"], "t", default_zoo="v1").out == "x"
    args = parse(["--zoo", "v2", "--out", str(tmp_path)], "t", default_zoo="v1")
    out = _common.Output(args.out, "demo", args)
    out.settings.update({"zoo": {"n": 8}})  # a script's own sizes, as begin() adds them
    assert out.settings["zoo_version"] == "v2" and out.settings["zoo_root"] == "posprobe/zoo_checkpoints/v2"
    for bad in ("v3", "v1,v1", ""):
        with pytest.raises(SystemExit):
            parse(["--zoo", bad], "t", default_zoo="v1")
        assert "expected v1, v2 or v1,v2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse(["--zoo-root", "d"], "t", default_zoo="v1,v2")
    assert "pick one zoo with --zoo v1 or --zoo v2" in capsys.readouterr().err


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


def test_run_all_rejects_unknown_script_names(capsys) -> None:
    with pytest.raises(SystemExit):
        run_all.main(["--only", "not_a_script"])
    with pytest.raises(SystemExit):  # only some scripts know the zoo v2
        run_all.main(["--zoo", "v2", "--only", "chi_variance"])
    assert "known with --zoo v2: attention_zoo, voita_neurons" in capsys.readouterr().err


def test_every_zoo_script_takes_the_zoo_option() -> None:
    for name in run_all.SCRIPTS:
        proc = subprocess.run([sys.executable, str(ANALYSES / f"{name}.py"), "--help"], capture_output=True, text=True)
        assert proc.returncode == 0 and ("--zoo " in proc.stdout) == (name in run_all.ZOO_SCRIPTS), name


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
