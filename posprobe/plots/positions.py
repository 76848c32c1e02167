"""Figures for absolute position tables (``posprobe.stats.position_table``): helix, components, smoothness.

Each takes a long table with a ``model`` column, so one figure can set several models side by side;
none runs a model.
"""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from posprobe.plots._common import require_columns


def helix_3d(coords: pd.DataFrame) -> go.Figure:
    """W_pos rows on their top three principal components, one 3-D panel per model, coloured by position."""
    require_columns(coords, ["model", "position", "pc1", "pc2", "pc3"], "helix_3d", nonempty=True)
    models = list(coords["model"].unique())
    fig = make_subplots(rows=1, cols=len(models), specs=[[{"type": "scene"}] * len(models)], subplot_titles=models)
    for i, model in enumerate(models):
        g = coords[coords["model"] == model]
        fig.add_trace(
            go.Scatter3d(
                x=g["pc1"],
                y=g["pc2"],
                z=g["pc3"],
                mode="markers+lines",
                name=model,
                marker={
                    "size": 3,
                    "color": g["position"],
                    "colorscale": "Viridis",
                    "showscale": i == 0,
                    "colorbar": {"title": "position"},
                },
                line={"color": "rgba(120,120,120,0.4)", "width": 1},
                customdata=g[["position"]].to_numpy(),
                hovertemplate="position %{customdata[0]}<br>PC1 %{x:.3f}<br>PC2 %{y:.3f}<br>PC3 %{z:.3f}"
                "<extra></extra>",
            ),
            row=1,
            col=i + 1,
        )
    fig.update_scenes(xaxis_title="PC1", yaxis_title="PC2", zaxis_title="PC3")
    fig.update_layout(title="Position embeddings W_pos on their top 3 principal components", showlegend=False)
    return fig


def components_by_position(coords: pd.DataFrame, n: int = 4) -> go.Figure:
    """The top ``n`` principal-component scores of W_pos against position, one panel per model."""
    require_columns(coords, ["model", "position", "pc1"], "components_by_position", nonempty=True)
    models = list(coords["model"].unique())
    fig = make_subplots(rows=len(models), cols=1, subplot_titles=models)
    for i, model in enumerate(models):
        g = coords[coords["model"] == model]
        for c in range(1, n + 1):
            if f"pc{c}" in g:
                fig.add_scatter(x=g["position"], y=g[f"pc{c}"], mode="lines", name=f"{model} PC{c}", row=i + 1, col=1)
    fig.update_xaxes(title_text="position")
    fig.update_yaxes(title_text="PC score")
    fig.update_layout(title="Top principal components of W_pos against position (a helix: a circle + a slow drift)")
    return fig


def neighbour_similarity(neighbours: pd.DataFrame) -> go.Figure:
    """Mean cosine similarity of W_pos rows Δ apart, per model, with the random-init twin dotted when present."""
    require_columns(neighbours, ["model", "distance", "cos_sim"], "neighbour_similarity", nonempty=True)
    fig = go.Figure()
    for model, g in neighbours.groupby("model", sort=False):
        fig.add_scatter(x=g["distance"], y=g["cos_sim"], mode="lines", name=str(model))
        if "cos_sim_random_init" in g:
            fig.add_scatter(
                x=g["distance"],
                y=g["cos_sim_random_init"],
                mode="lines",
                line={"dash": "dot"},
                name=f"{model}, random init",
            )
    fig.update_layout(
        title="How similar are position embeddings Δ apart?",
        xaxis_title="distance Δ (positions)",
        yaxis_title="mean cosine similarity",
        template="plotly_white",
    )
    return fig
