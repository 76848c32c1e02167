"""Figure for length generalisation: held-out loss against position, one line per model."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative

REQUIRED = ["model", "bucket_start", "bucket_end", "loss", "n_tokens", "available", "n_ctx"]


def length_generalization_figure(df: pd.DataFrame, title: str | None = None) -> go.Figure:
    """Plot the table of ``length_generalization`` (``LengthGeneralization.table``): loss vs position, n_ctx marked.

    Solid lines: each model reading the whole sequence; buckets it could not run (absolute schemes
    past their context) are gaps. Dotted lines, when the table has ``window_loss``: the same
    targets read through a sliding window of n_ctx tokens, the baseline a longer context should beat.
    """
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise ValueError(f"length_generalization_figure needs columns {missing}; got {list(df.columns)}")
    fig = go.Figure()
    palette = qualitative.Plotly
    for i, (name, rows) in enumerate(df.groupby("model", sort=False)):
        rows = rows.sort_values("bucket_start")
        middle = (rows["bucket_start"] + rows["bucket_end"] - 1) / 2
        color = palette[i % len(palette)]
        fig.add_scatter(
            x=middle,
            y=rows["loss"].where(rows["available"]),
            mode="lines+markers",
            name=str(name),
            legendgroup=str(name),
            line={"color": color},
            customdata=rows[["bucket_start", "bucket_end", "n_tokens"]].to_numpy(),
            hovertemplate="positions %{customdata[0]}–%{customdata[1]}<br>loss %{y:.3f} nats"
            "<br>%{customdata[2]} tokens<extra>%{fullData.name}</extra>",
        )
        if "window_loss" in rows and (rows["bucket_start"] >= rows["n_ctx"]).any():
            beyond = rows[rows["bucket_end"] >= rows["n_ctx"]]
            fig.add_scatter(
                x=(beyond["bucket_start"] + beyond["bucket_end"] - 1) / 2,
                y=beyond["window_loss"],
                mode="lines",
                name=f"{name} (sliding window)",
                legendgroup=str(name),
                line={"color": color, "dash": "dot"},
                hovertemplate="sliding window of n_ctx tokens<br>loss %{y:.3f} nats<extra>%{fullData.name}</extra>",
            )
    for n_ctx in sorted(df["n_ctx"].unique()):
        fig.add_vline(x=n_ctx, line_dash="dash", line_color="grey", annotation_text=f"training context {n_ctx}")
    fig.update_layout(
        title=title or "Held-out loss by position (Press et al. 2022: train short, test long)",
        xaxis_title="position",
        yaxis_title="next-token loss (nats)",
        legend_title="model",
    )
    return fig
