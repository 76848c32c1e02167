"""mkdocs hooks: keep the built site offline.

plotly's notebook renderer puts a MathJax ``<script src>`` from a CDN beside every figure (for LaTeX
labels, which posprobe's figures do not use); plotly.js itself is inlined once per notebook page. The
tag is dropped so that every page loads nothing from the network.
"""

from __future__ import annotations

import re

CDN_SCRIPT = re.compile(r'<script[^>]*\ssrc="https?://[^"]*mathjax[^"]*"[^>]*>\s*</script>', re.IGNORECASE)


def on_post_page(output: str, page, config) -> str:
    return CDN_SCRIPT.sub("", output)
