"""Figures for attention sinks (``AttentionSinks``, Gu et al. 2025): sink rate, massive activations, moved token.

Each function takes a table of ``posprobe.stats.sinks`` and returns a plotly Figure with one line
per input kind and BOS choice: color is the input kind, a dashed line is the run without BOS.
NaN values (a layer without sink heads, a sequence of one token) leave gaps; none runs a model.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from posprobe.plots._common import require_columns

_INPUT_COLORS = {"natural": "#1f77b4", "random": "#ff7f0e", "repeated": "#2ca02c", "given": "#9467bd"}


def sink_rate_by_layer(by_layer: pd.DataFrame, k: int = 0, title: str = "Attention sinks") -> go.Figure:
    """Sink^ε_k per layer (``AttentionSinks.by_layer``): the percent of a layer's heads whose α_k exceeds ε."""
    require_columns(
        by_layer, ["input", "bos", "layer", "k", "sink_rate", "n_sink_heads", "n_heads"], "sink_rate_by_layer"
    )
    rows = by_layer[by_layer["k"] == k]
    fig = _lines(
        rows,
        "sink_rate",
        hover="layer %{x}: %{y:.1f}% of heads (%{customdata[0]} of %{customdata[1]})",
        custom=["n_sink_heads", "n_heads"],
    )
    fig.update_layout(
        title=title,
        xaxis_title="layer",
        yaxis={"title": f"heads with α_{k} > ε (%)", "range": [-2, 102]},
        legend_title="input",
    )
    return _empty_note(fig, rows, f"no layer was measured at k = {k}")


def massive_activation_ratio(massive: pd.DataFrame, title: str = "Massive activations") -> go.Figure:
    """The first token's residual norm ÷ the median norm of the others, per layer (``AttentionSinks.massive``),
    log scale: 1 is an ordinary token; Sun et al. 2024 report orders of magnitude on sink tokens."""
    require_columns(
        massive, ["input", "bos", "layer", "ratio_mean", "first_norm", "median_norm"], "massive_activation_ratio"
    )
    fig = _lines(
        massive,
        "ratio_mean",
        hover="layer %{x}: ×%{y:.3g} (first %{customdata[0]:.3g}, median %{customdata[1]:.3g})",
        custom=["first_norm", "median_norm"],
    )
    fig.update_layout(
        title=title,
        xaxis_title="layer",
        yaxis={"title": "‖first token‖ ÷ median ‖token‖ (resid_post)", "type": "log"},
        legend_title="input",
    )
    return _empty_note(fig, massive, "no layer was measured")


def moved_sink_shares(moved: pd.DataFrame, title: str = "Does the sink follow the first token?") -> go.Figure:
    """Per layer, the percent of sink heads whose sink follows the first token when it is moved behind fillers
    (``AttentionSinks.moved``); the rest stay on the fillers at the start or dissolve (in the hover). Gaps: no
    sink heads."""
    columns = ["input", "bos", "layer", "n_sink_heads", "share_follows_token", "share_stays_at_start"]
    require_columns(moved, columns, "moved_sink_shares")
    rows = moved.assign(percent=100.0 * moved["share_follows_token"])
    rows = rows.assign(stays=100.0 * rows["share_stays_at_start"])
    fig = _lines(
        rows,
        "percent",
        hover="layer %{x}: %{y:.0f}% follow the token, %{customdata[1]:.0f}% stay on the fillers "
        "(of %{customdata[0]} sink heads)",
        custom=["n_sink_heads", "stays"],
    )
    fig.update_layout(
        title=title,
        xaxis_title="layer",
        yaxis={"title": "sink heads that follow the moved token (%)", "range": [-2, 102]},
        legend_title="input",
    )
    no_sinks = rows.empty or not bool(np.isfinite(rows["percent"].to_numpy(dtype=float)).any())
    return _empty_note(fig, rows.iloc[:0] if no_sinks else rows, "no sink heads to move")


def _lines(table: pd.DataFrame, y: str, hover: str, custom: list[str]) -> go.Figure:
    """One line per (input, bos) over layers: color by input kind, dashed without BOS."""
    fig = go.Figure()
    for (kind, bos), part in table.groupby(["input", "bos"], sort=False):
        part = part.sort_values("layer")
        name = f"{kind}, {'BOS' if bos else 'no BOS'}"
        fig.add_scatter(
            x=part["layer"],
            y=part[y],
            mode="lines+markers",
            name=name,
            line={"color": _INPUT_COLORS.get(str(kind)), "dash": "solid" if bos else "dash"},
            customdata=part[custom].to_numpy(),
            hovertemplate=f"{name}<br>{hover}<extra></extra>",
        )
    return fig


def _empty_note(fig: go.Figure, rows: pd.DataFrame, note: str) -> go.Figure:
    if rows.empty:
        fig.add_annotation(text=note, showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5)
    return fig
