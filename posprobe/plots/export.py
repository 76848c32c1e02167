"""Save a figure where a paper or a slide can use it: HTML always, PNG / SVG / PDF when an exporter is present.

HTML needs nothing beyond plotly (the plotly.js bundle is inlined, so the page opens offline).
Static images go through kaleido 1.x, which drives a system Chrome or Chromium; on Debian:
``apt-get install chromium`` and ``pip install kaleido`` (or ``pip install posprobe[export]``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import plotly.graph_objects as go

__all__ = ["IMAGE_FORMATS", "ExportError", "image_export_problem", "save_figure"]

#: static formats kaleido writes
IMAGE_FORMATS = ("png", "svg", "pdf")

INSTALL_HINT = (
    "static export needs kaleido and a Chrome/Chromium: `pip install kaleido` (or `pip install posprobe[export]`) "
    "and, on Debian/Ubuntu, `apt-get install chromium` (or set BROWSER_PATH to a Chrome binary)"
)


class ExportError(RuntimeError):
    """A static image was asked for but cannot be written on this machine."""


def image_export_problem() -> str | None:
    """Why PNG/SVG/PDF export cannot run here (kaleido or Chromium missing), or None when it can."""
    try:
        import kaleido  # noqa: F401  (imported only to see whether it is installed)
        from choreographer.browsers.chromium import Chromium
    except ImportError:
        return f"kaleido is not installed; {INSTALL_HINT}"
    if Chromium.find_browser(skip_local=False) is None:
        return f"kaleido found no Chrome/Chromium on PATH; {INSTALL_HINT}"
    return None


def save_figure(
    fig: go.Figure,
    path: str | os.PathLike,
    formats: Sequence[str] = (),
    *,
    width: int | None = None,
    height: int | None = None,
    scale: float = 2.0,
) -> list[Path]:
    """Write ``fig`` to ``path`` as a self-contained HTML page and, if asked, as static images; return the files.

    ``path`` names the output: ``fig.html`` (or no suffix) writes HTML only; ``fig.png`` /
    ``fig.svg`` / ``fig.pdf`` writes ``fig.html`` and that image. ``formats`` adds more static
    formats (e.g. ``("png", "svg")``). ``width`` / ``height`` are in layout pixels (default: the
    figure's own, else 700 × 500) and ``scale`` multiplies the PNG resolution.

    The HTML is always written first. A static format raises ``ExportError`` naming what to
    install when kaleido or a Chromium is missing (see ``image_export_problem``).
    """
    path = Path(path)
    suffix = path.suffix.lower().lstrip(".")
    wanted = [f.lower().lstrip(".") for f in formats]
    if suffix in IMAGE_FORMATS:
        wanted.insert(0, suffix)
    elif suffix not in ("", "html"):
        raise ValueError(f"unknown figure format {path.suffix!r} in {path}; accepted: .html, .png, .svg, .pdf")
    bad = [f for f in wanted if f not in IMAGE_FORMATS]
    if bad:
        raise ValueError(f"unknown static format {bad[0]!r}; accepted: {', '.join(IMAGE_FORMATS)}")
    stem = path.with_suffix("") if suffix else path
    stem.parent.mkdir(parents=True, exist_ok=True)
    page = stem.with_name(stem.name + ".html")
    fig.write_html(page, include_plotlyjs=True)
    written = [page]
    if not wanted:
        return written
    problem = image_export_problem()
    if problem is not None:
        raise ExportError(f"wrote {page}, but cannot write {', '.join(wanted)}: {problem}")
    for fmt in dict.fromkeys(wanted):
        target = stem.with_name(f"{stem.name}.{fmt}")
        fig.write_image(target, format=fmt, width=width, height=height, scale=scale)
        written.append(target)
    return written
