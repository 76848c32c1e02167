"""mkdocs hooks: the notebooks' figures drawn in the page, and nothing loaded from the network.

A kernel's default plotly renderer emits only plotly's own mime type, which an HTML page cannot show;
the ``notebook`` renderer emits HTML with plotly.js inlined once per notebook. It also puts a MathJax
``<script src>`` from a CDN beside every figure (for LaTeX labels, which posprobe's figures do not
use): that tag is dropped, so every page loads nothing from the network.
"""

from __future__ import annotations

import os
import re

CDN_SCRIPT = re.compile(r'<script[^>]*\ssrc="https?://[^"]*mathjax[^"]*"[^>]*>\s*</script>', re.IGNORECASE)


def on_config(config):
    os.environ.setdefault("PLOTLY_RENDERER", "notebook")  # the executing kernels inherit it
    return config


def on_post_page(output: str, page, config) -> str:
    return CDN_SCRIPT.sub("", output)
