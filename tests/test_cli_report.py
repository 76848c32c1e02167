"""The ``posprobe`` command line, the HTML report and figure export.

CLI contract: every subcommand's ``--help`` shows an example; bad input exits 2 with one line on
stderr and no traceback (``--debug`` shows it). The report end to end runs ``posprobe report
--quick`` in a subprocess and renders the page in headless Chromium, as a reader would see it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import pytest

from posprobe.cli import COMMANDS, main
from posprobe.plots.export import ExportError, image_export_problem, save_figure

ZOO_NONE = Path(__file__).resolve().parents[1] / "posprobe" / "zoo_checkpoints" / "none"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--virtual-time-budget=20000",
]


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        [sys.executable, "-m", "posprobe", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, command: str, *fragments: str) -> None:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1, f"expected one line on stderr, got:\n{proc.stderr}"
    assert lines[0].startswith(f"posprobe {command}: error: "), lines[0]
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0]


# -- help and model list ---------------------------------------------------------------------------


def test_top_level_help_lists_every_subcommand():
    proc = run_cli("--help")
    assert proc.returncode == 0, proc.stderr
    for command in COMMANDS:
        assert command in proc.stdout


def test_models_lists_packaged_and_zoo_names():
    proc = run_cli("models")
    assert proc.returncode == 0, proc.stderr
    names = [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]
    for name in (
        "smollm2-135m",
        "gemma-3-270m",
        "minilm-l6",
        "zoo:none",
        "zoo:learned",
        "zoo:sinusoidal",
        "zoo:rope",
        "zoo:alibi",
        "zoo:p-rope",
    ):
        assert name in names, proc.stdout


# -- bad input: exit 2, one line, no traceback -------------------------------------------------------


def test_unknown_model_is_one_line(tmp_path):
    proc = run_cli("probe", "--model", "no-such-model", "--out", str(tmp_path / "out"))
    assert_one_line_error(proc, "probe", "unknown model 'no-such-model'", "smollm2-135m", "zoo:none")
    assert not (tmp_path / "out").exists()


def test_layer_out_of_range_is_one_line(tmp_path):
    assert (ZOO_NONE / "config.json").exists(), f"the zoo checkpoint {ZOO_NONE} is missing (shipped in the package)"
    proc = run_cli(
        "extract",
        "--model",
        "zoo:none",
        "--layers",
        "99",
        "--n",
        "2",
        "--seq-len",
        "16",
        "--out",
        str(tmp_path / "out"),
    )
    assert_one_line_error(proc, "extract", "layer 99", "0..3")


def test_positions_writes_tables_figures_and_a_summary(tmp_path, capsys):
    out = tmp_path / "positions"
    assert main(["positions", "--model", "zoo:learned", "--components", "4", "--out", str(out)]) == 0
    summary = json.loads(next(line for line in capsys.readouterr().out.splitlines() if line.startswith("{")))
    assert summary["shape"] == [256, 128] and len(summary["explained_variance_pc1_3"]) == 3
    assert "random_init_neighbour_cos_d1" in summary
    assert len(pd.read_csv(out / "table.csv")) == 4  # the components, saved by Result.save
    for name in ("neighbours.csv", "coords.csv", "info.json", "helix.html", "components.html", "neighbours.html"):
        assert (out / name).stat().st_size > 0


def test_positions_on_a_model_without_a_table_is_one_line(tmp_path, capsys):
    assert main(["positions", "--model", "zoo:rope", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs absolute positions" in err[0] and "'rope'" in err[0]
    assert not (tmp_path / "out").exists()


def test_debug_shows_the_traceback(tmp_path):
    proc = run_cli("probe", "--model", "no-such-model", "--out", str(tmp_path / "out"), "--debug")
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "unknown model 'no-such-model'" in proc.stderr


# -- figure export -------------------------------------------------------------------------------------


def small_figure() -> go.Figure:
    return go.Figure(go.Scatter(x=[0, 1, 2], y=[2.0, 0.5, 1.0], name="probe R²"), layout={"title": "export check"})


def test_save_figure_writes_self_contained_html(tmp_path):
    written = save_figure(small_figure(), tmp_path / "sub" / "fig.html")
    assert written == [tmp_path / "sub" / "fig.html"]
    page = written[0].read_text()
    assert "export check" in page and page.count("plotly.js v") == 1 and not re.search(r"<script[^>]+src=", page)


def test_save_figure_rejects_unknown_formats(tmp_path):
    with pytest.raises(ValueError, match=r"unknown figure format '\.jpg'.*\.png"):
        save_figure(small_figure(), tmp_path / "fig.jpg")
    with pytest.raises(ValueError, match="unknown static format 'eps'"):
        save_figure(small_figure(), tmp_path / "fig", formats=["eps"])


def test_save_figure_without_kaleido_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "kaleido", None)  # import kaleido now raises ImportError
    assert "kaleido is not installed" in image_export_problem()
    with pytest.raises(ExportError, match=r"pip install kaleido.*apt-get install chromium"):
        save_figure(small_figure(), tmp_path / "fig.png")
    assert (tmp_path / "fig.html").exists() and not (tmp_path / "fig.png").exists()


def test_save_figure_without_chromium_says_what_to_install(tmp_path, monkeypatch):
    pytest.importorskip("kaleido", reason="the no-Chromium branch is reached only with kaleido installed")
    from choreographer.browsers.chromium import Chromium

    monkeypatch.setattr(Chromium, "find_browser", classmethod(lambda cls, **kwargs: None))  # as if none installed
    assert "no Chrome/Chromium" in image_export_problem()
    with pytest.raises(ExportError, match=r"no Chrome/Chromium.*apt-get install chromium"):
        save_figure(small_figure(), tmp_path / "fig.svg")
    assert (tmp_path / "fig.html").exists() and not (tmp_path / "fig.svg").exists()


@pytest.mark.slow
def test_save_figure_writes_png_and_svg(tmp_path):
    problem = image_export_problem()
    if problem is not None:
        pytest.fail(f"static export is part of posprobe[export] and CI installs it: {problem}")
    written = save_figure(small_figure(), tmp_path / "fig.png", formats=["svg"], width=400, height=300)
    assert [p.name for p in written] == ["fig.html", "fig.png", "fig.svg"]
    assert (tmp_path / "fig.png").read_bytes().startswith(b"\x89PNG")
    assert "<svg" in (tmp_path / "fig.svg").read_text()[:2000]


# -- the report -----------------------------------------------------------------------------------------


def test_report_composes_a_page_for_two_tiny_models(tmp_path):
    """Composition only, fast: tiny random zoo models, a two-column page, tables and summary beside it."""
    from posprobe.models.zoo import ZooConfig, ZooModel, ZooTransformer
    from posprobe.reporting import ReportSettings, build_report

    tiny = dict(d_model=32, n_layers=2, n_heads=2, d_head=16, d_mlp=64, n_ctx=64)
    rope = ZooModel(ZooTransformer(ZooConfig(pe="rope", **tiny)), name="tiny-rope")
    nope = ZooModel(ZooTransformer(ZooConfig(pe="none", **tiny)), name="tiny-none")
    settings = ReportSettings(n=10, seq_len=24, seed=0, device="cpu")
    page = build_report(rope, tmp_path, compare=nope, settings=settings, progress=False)
    text = page.read_text()
    assert text.count("plotly.js v") == 1, "plotly.js must be inlined exactly once"
    for key in ("model", "probes", "rope", "neurons", "attention", "shift"):
        assert f"<section id='{key}'>" in text
    assert "not applicable to tiny-none" in text  # no RoPE section for NoPE
    assert "<section id='positions'>" not in text  # neither has a position table
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["models"]) == {"tiny-rope", "tiny-none"}
    assert summary["meta"]["settings"]["n"] == 10
    for name in (
        "tiny-rope.probes.table",
        "tiny-none.probes.table",
        "tiny-rope.rope.table",
        "tiny-rope.rope.head_roles",
    ):
        assert (tmp_path / "tables" / f"{name}.csv").stat().st_size > 0
        assert (tmp_path / "tables" / f"{name}.parquet").exists()
        assert f"tables/{name}.csv" in text


def test_report_on_an_encoder_without_lm_head(tiny_bert, tmp_path):
    """MiniLM-style models: no logits, bidirectional attention; every section still says something true."""
    from posprobe.reporting import ReportSettings, build_report

    page = build_report(
        tiny_bert, tmp_path, settings=ReportSettings(n=6, seq_len=12, seed=0, device="cpu"), progress=False
    )
    text = page.read_text()
    for key in ("model", "probes", "positions", "neurons", "attention", "shift"):
        assert f"<section id='{key}'>" in text
    summary = json.loads((tmp_path / "summary.json").read_text())["models"][tiny_bert.info.name]
    assert summary["positions"].startswith("W_pos [64 × 64]") and "at random init" in summary["positions"]
    assert (tmp_path / "tables" / "tiny-bert.w_pos.table.csv").stat().st_size > 0
    assert json.loads((tmp_path / "tables" / "tiny-bert.w_pos.info.json").read_text())["model"] == "tiny-bert"
    assert "bidirectional model" in summary["attention"]
    assert "hidden state" in summary["shift"] and "KL" not in summary["shift"]


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail(
            "headless Chromium is needed to check that the report renders: install Debian's chromium "
            "(apt-get install chromium); CI's .ci/run installs it"
        )
    return path


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report")
    proc = run_cli("report", "--quick", "--out", str(out), timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "wrote index.html" in proc.stdout
    return out


@pytest.mark.slow
def test_quick_report_writes_page_tables_and_summary(quick_report):
    page = (quick_report / "index.html").read_text()
    assert page.count("plotly.js v") == 1 and not re.search(r"<script[^>]+src=", page)  # opens offline
    summary = json.loads((quick_report / "summary.json").read_text())
    assert summary["meta"]["settings"]["quick"] is True
    assert set(summary["models"]["smollm2-135m"]) >= {"model", "probes", "rope", "neurons", "attention", "shift"}
    csvs = sorted((quick_report / "tables").glob("*.csv"))
    assert {p.name for p in csvs} >= {
        "smollm2-135m.probes.table.csv",
        "smollm2-135m.rope.table.csv",
        "smollm2-135m.neurons.table.csv",
        "smollm2-135m.shift_invariance.table.csv",
    }
    assert all(p.stat().st_size > 0 for p in csvs)


@pytest.mark.slow
def test_quick_report_renders_in_headless_chromium(quick_report, tmp_path):
    browser = chromium()
    url = (quick_report / "index.html").resolve().as_uri()
    base = [browser, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=180).stdout
    n_figures = dom.count('class="plotly-graph-div')
    assert n_figures >= 6, "the report should hold at least six figures"
    assert dom.count('class="main-svg"') >= n_figures, "plotly did not draw every figure"
    shot = tmp_path / "shot.png"
    subprocess.run(
        [*base, f"--screenshot={shot}", "--window-size=1400,3000", url], capture_output=True, timeout=180, check=True
    )
    assert shot.read_bytes().startswith(b"\x89PNG") and shot.stat().st_size > 50_000


def _saved_tiny(family: str, folder: Path) -> Path:
    """A tiny random-weight model of ``family`` with the zoo's BPE tokenizer (real text), saved as safetensors."""
    from families import FAMILIES, build

    from posprobe.models.zoo_tokenizer import VOCAB_SIZE, load_zoo_tokenizer

    FAMILIES[f"{family}-4k"] = (FAMILIES[family][0], FAMILIES[family][1] | {"vocab_size": VOCAB_SIZE})
    try:
        model = build(f"{family}-4k")
    finally:
        del FAMILIES[f"{family}-4k"]
    model.save_pretrained(folder)
    load_zoo_tokenizer().save_pretrained(folder)
    return folder


@pytest.mark.parametrize(("family", "scheme"), [("gpt2", "learned"), ("gpt_neox", "rope")])
def test_quick_report_on_a_tiny_gpt2_and_pythia_from_disk(family, scheme, tmp_path):
    """pp.load_model(path) of a GPT-2 / Pythia (GPT-NeoX) checkpoint, then `posprobe report --quick` on it."""
    import posprobe as pp

    folder = _saved_tiny(family, tmp_path / family)
    model = pp.load_model(str(folder))
    assert model.info.position_scheme == scheme and model.source == "path"
    out = tmp_path / "report"
    proc = run_cli("report", "--quick", "--model", str(folder), "--out", str(out), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = (out / "index.html").read_text()
    for key in ("model", "probes", "neurons", "attention", "shift"):
        assert f"<section id='{key}'>" in text
    assert ("<section id='rope'>" in text) == (scheme == "rope")
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["models"]) == [str(folder)]


def test_train_takes_the_flags_of_posprobe_train(tmp_path):
    """`posprobe train --pe rope …` as the README writes it (it used to stop at 'unrecognized arguments: --pe')."""
    out = tmp_path / "rope"
    tiny = ["--d-model", "32", "--n-layers", "1", "--n-heads", "2", "--d-head", "16", "--d-mlp", "64", "--n-ctx", "16"]
    proc = run_cli("train", "--pe", "rope", "--steps", "2", "--out", str(out), *tiny, "--eval-windows", "2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((out / "config.json").read_text())["pe"] == "rope"
    helped = run_cli("train", "--help")
    assert helped.returncode == 0 and "--pe" in helped.stdout and "--steps" in helped.stdout


def test_seq_len_beyond_the_context_is_refused_not_capped(tmp_path):
    proc = run_cli("probe", "--model", "zoo:learned", "--seq-len", "5000", "--n", "6", "--out", str(tmp_path / "p"))
    assert_one_line_error(proc, "probe", "--seq-len 5000 is beyond zoo:learned's context of 256 tokens")
    assert not (tmp_path / "p").exists()


def test_out_naming_an_existing_file_is_refused_before_any_work(tmp_path):
    taken = tmp_path / "taken.txt"
    taken.write_text("keep me")
    proc = run_cli("rope", "--model", "zoo:rope", "--out", str(taken))
    assert_one_line_error(proc, "rope", f"--out {taken} is an existing file; give a folder")
    assert taken.read_text() == "keep me"
