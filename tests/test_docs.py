"""The documentation site: ``mkdocs build --strict`` offline, every public name in the API reference, the
notebooks executed and rendered, nothing loaded from the network, and the pages drawn in headless Chromium."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_cli_report import CHROMIUM_FLAGS

import posprobe
from posprobe.sites import SITES

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(p.stem for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.py"))
EXTERNAL = re.compile(r"<(script|link|img|iframe)\b[^>]*\s(src|href)=[\"']https?://", re.IGNORECASE)
#: no request leaves the browser: every host resolves to nothing
OFFLINE = "--host-resolver-rules=MAP * ~NOTFOUND"


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "NO_MKDOCS_2_WARNING": "1", "POSPROBE_DOCS_EXECUTE": "true", "POSPROBE_DOCS_CACHE": "false"}  # fmt: skip
    mkdocs = [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)]
    proc = subprocess.run(mkdocs, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3000)
    assert proc.returncode == 0, proc.stderr[-4000:]
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("WARNING") and "Location" not in line]
    assert not warnings, warnings
    return out


@pytest.mark.slow
def test_every_page_is_built_and_loads_nothing_from_the_network(site):
    pages = {p.relative_to(site).as_posix() for p in site.rglob("*.html")}
    expected = {"index.html", "questions.html", "vocabulary.html", "api.html", "results.html", "benchmarks.html",
                "changelog.html", *(f"notebooks/{name}.html" for name in NOTEBOOKS)}  # fmt: skip
    assert expected <= pages, expected - pages
    for page in pages:
        text = (site / page).read_text()
        found = EXTERNAL.search(text)
        assert not found, f"{page} loads {text[found.start() : found.start() + 160]}"
        assert "fonts.googleapis" not in text, page


@pytest.mark.slow
def test_the_api_reference_documents_every_public_name(site):
    api = (site / "api.html").read_text()
    for name in posprobe.__all__:
        assert re.search(rf'id="[\w.]*\b{re.escape(name)}"', api), f"pp.{name} has no entry in the API reference"
    assert "Fit position probes with controls" in api  # the docstring itself is rendered
    vocabulary = (site / "vocabulary.html").read_text()
    for site_name in SITES:
        assert f"<code>{site_name}</code>" in vocabulary, site_name


@pytest.mark.slow
def test_notebook_pages_hold_their_executed_figures(site):
    for name in NOTEBOOKS:
        html = (site / "notebooks" / f"{name}.html").read_text()
        assert "Traceback" not in html and 'class="jp-OutputArea' in html, name
    assert (site / "notebooks" / "01_quickstart.html").read_text().count("plotly-graph-div") >= 1


def chromium() -> str:
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    assert browser, "headless Chromium is needed (scripts/test.sh installs Debian's chromium)"
    return browser


@pytest.mark.slow
@pytest.mark.parametrize("page", ["api.html", "notebooks/01_quickstart.html"])
def test_pages_render_offline_in_headless_chromium(site, page, tmp_path):
    url = (site / page).resolve().as_uri()
    base = [chromium(), *CHROMIUM_FLAGS, OFFLINE, f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=300).stdout
    if page == "api.html":
        assert "probe_position" in dom and "attention_stats" in dom
    else:
        n_figures = dom.count('class="plotly-graph-div')
        assert n_figures >= 1 and dom.count('class="main-svg"') >= n_figures, "plotly did not draw every figure"
    shot = tmp_path / "shot.png"
    subprocess.run([*base, f"--screenshot={shot}", "--window-size=1280,2400", url], capture_output=True,
                   timeout=300, check=True)  # fmt: skip
    assert shot.read_bytes().startswith(b"\x89PNG") and shot.stat().st_size > 30_000
