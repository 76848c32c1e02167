"""Figures for attention diagnostics: pattern viewer, variance and similarity curves, head-role map.

Each function takes a table from ``posprobe.stats.attention`` / ``variance`` / ``similarity``
and returns a plotly Figure; none runs a model.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from posprobe.labels import ROLES
from posprobe.plots._common import require_columns

_ROLE_COLORS = {
    "previous-token": "#d62728",
    "sink": "#1f77b4",
    "local/positional": "#ff7f0e",
    "broad/semantic": "#2ca02c",
}


def attention_pattern_viewer(patterns: pd.DataFrame, title: str = "Attention pattern") -> go.Figure:
    """Interactive heatmap of one sequence's attention (``attention_patterns``), a dropdown picks layer and head.

    Hover shows the query token, the key token and the weight. Keep the table small
    (a few layers, ≤ ~128 tokens): every head becomes one heatmap in the HTML.
    """
    columns = ["layer", "head", "query_pos", "key_pos", "query_token", "key_token", "weight"]
    require_columns(patterns, columns, "attention_pattern_viewer", nonempty=True)
    labels = _position_labels(patterns)
    n = len(labels)
    hover = np.array([[f"query {labels[q]}<br>key {labels[k]}" for k in range(n)] for q in range(n)])
    fig = go.Figure()
    groups = list(patterns.groupby(["layer", "head"], sort=True))
    for i, ((layer, head), part) in enumerate(groups):
        z = np.full((n, n), np.nan)
        z[part["query_pos"].to_numpy(), part["key_pos"].to_numpy()] = part["weight"].to_numpy()
        fig.add_heatmap(
            z=z,
            x=list(range(n)),
            y=list(range(n)),
            text=hover,
            hovertemplate="%{text}<br>weight %{z:.3f}<extra></extra>",
            colorscale="Viridis",
            zmin=0.0,
            zmax=1.0,
            colorbar={"title": "weight"},
            visible=i == 0,
            name=f"L{layer} H{head}",
        )
    keys = [key for key, _ in groups]
    first_layer, first_head = keys[0]
    fig.update_layout(
        title=f"{title}: layer {first_layer}, head {first_head}",
        updatemenus=[
            {"buttons": _head_buttons(keys, title), "direction": "down", "x": 1.0, "xanchor": "right", "y": 1.15}
        ],
        xaxis={
            "title": "key position (token)",
            "tickvals": list(range(n)),
            "ticktext": labels,
            "showticklabels": n <= 48,
        },
        yaxis={
            "title": "query position (token)",
            "autorange": "reversed",
            "tickvals": list(range(n)),
            "ticktext": labels,
            "showticklabels": n <= 48,
        },
    )
    return fig


def _position_labels(patterns: pd.DataFrame) -> list[str]:
    """``"position: token"`` for every position 0..n−1 of the table (a blank token where none is named)."""
    n = int(max(patterns["query_pos"].max(), patterns["key_pos"].max())) + 1
    words = [""] * n
    for col, tok in (("query_pos", "query_token"), ("key_pos", "key_token")):
        for p, w in patterns[[col, tok]].drop_duplicates(col).itertuples(index=False):
            words[int(p)] = str(w)
    return [f"{i}: {w}" for i, w in enumerate(words)]


def _head_buttons(keys: list[tuple[int, int]], title: str) -> list[dict]:
    """One dropdown entry per (layer, head): it shows that head's heatmap alone and retitles the figure."""
    return [
        {
            "label": f"layer {layer} head {head}",
            "method": "update",
            "args": [
                {"visible": [j == i for j in range(len(keys))]},
                {"title.text": f"{title}: layer {layer}, head {head}"},
            ],
        }
        for i, (layer, head) in enumerate(keys)
    ]


def variance_curves(
    table: pd.DataFrame, exponents: pd.DataFrame | None = None, title: str = "Attention-output variance"
) -> go.Figure:
    """Log-log curves of attention-output variance vs visible keys (``AttentionVariance.table``) and power-law fits.

    Chi et al. 2023 predict slope −1 for a causal NoPE model at initialisation.
    """
    require_columns(
        table, ["layer", "position", "n_keys", "variance", "sem", "n_tokens"], "variance_curves", nonempty=True
    )
    by = ["layer", "head"] if "head" in table.columns else ["layer"]
    fig = go.Figure()
    for key, part in table[table["variance"] > 0].groupby(by):
        key = key if isinstance(key, tuple) else (key,)
        name = " ".join(f"{c[0].upper()}{v}" for c, v in zip(by, key, strict=True))
        fig.add_scatter(
            x=part["n_keys"],
            y=part["variance"],
            mode="lines",
            name=name,
            legendgroup=name,
            error_y={"type": "data", "array": part["sem"], "visible": True, "thickness": 0.5},
            customdata=part[["position", "n_tokens"]].to_numpy(),
            hovertemplate=f"{name}<br>position %{{customdata[0]}} (%{{x}} keys)<br>variance %{{y:.3g}}"
            "<br>%{customdata[1]} tokens<extra></extra>",
        )
        if exponents is not None:
            fit = exponents
            for c, v in zip(by, key, strict=True):
                fit = fit[fit[c] == v]
            if len(fit) and np.isfinite(fit["exponent"].iloc[0]):
                a, c0, r2 = fit[["exponent", "log_intercept", "r2"]].iloc[0]
                x = np.array([part["n_keys"].min(), part["n_keys"].max()], dtype=float)
                fig.add_scatter(
                    x=x,
                    y=np.exp(c0) * x ** (-a),
                    mode="lines",
                    line={"dash": "dash", "width": 1},
                    name=f"{name} fit",
                    legendgroup=name,
                    showlegend=False,
                    hovertemplate=f"{name}: variance ∝ keys^(−{a:.2f}), R² {r2:.3f}<extra></extra>",
                )
    fig.update_layout(
        title=title,
        xaxis={"title": "keys visible to the query (position + 1)", "type": "log"},
        yaxis={"title": "variance across hidden units", "type": "log"},
        legend_title="layer",
    )
    return fig


def similarity_curves(
    table: pd.DataFrame, include_pos0: bool = False, title: str = "Similarity of nearby embeddings"
) -> go.Figure:
    """Mean cosine similarity vs token distance, a curve per layer (``EmbeddingSimilarity.table``, Zuo et al. 2025)."""
    require_columns(
        table,
        ["layer", "distance", "include_pos0", "cos_sim", "cos_sim_std", "n_pairs"],
        "similarity_curves",
        nonempty=True,
    )
    rows = table[table["include_pos0"] == include_pos0]
    fig = go.Figure()
    for layer, part in rows.groupby("layer", dropna=False):
        fig.add_scatter(
            x=part["distance"],
            y=part["cos_sim"],
            mode="lines",
            name=str(layer),
            customdata=part[["cos_sim_std", "n_pairs"]].to_numpy(),
            hovertemplate=f"layer {layer}<br>distance %{{x}}<br>cosine %{{y:.3f}} ± %{{customdata[0]:.3f}}"
            "<br>%{customdata[1]} pairs<extra></extra>",
        )
    fig.update_layout(
        title=f"{title} ({'with' if include_pos0 else 'without'} position 0)",
        xaxis={"title": "distance |i − j| (tokens)", "type": "log"},
        yaxis_title="mean cosine similarity",
        legend_title="layer",
    )
    return fig


def head_role_map(roles: pd.DataFrame, title: str = "Head roles") -> go.Figure:
    """Layer × head heatmap colored by role (``AttentionStats.roles``), hover with the scores behind it."""
    scores = ["first_token_mass", "previous_token", "local_mass", "normalized_entropy", "mean_distance"]
    require_columns(roles, ["layer", "head", "role", *scores], "head_role_map", nonempty=True)
    layers = sorted(roles["layer"].unique())
    heads = sorted(roles["head"].unique())
    code = {r: i for i, r in enumerate(ROLES)}
    z = np.full((len(layers), len(heads)), np.nan)
    text = np.full((len(layers), len(heads)), "", dtype=object)
    for r in roles.itertuples(index=False):
        i, j = layers.index(r.layer), heads.index(r.head)
        z[i, j] = code.get(r.role, np.nan)  # an undetermined head stays blank
        text[i, j] = (
            f"layer {r.layer} head {r.head}: <b>{r.role}</b><br>first-token mass {r.first_token_mass:.2f}"
            f"<br>previous-token {r.previous_token:.2f}<br>local mass {r.local_mass:.2f}"
            f"<br>normalized entropy {r.normalized_entropy:.2f}<br>mean distance {r.mean_distance:.1f} tokens"
        )
    k = len(ROLES)
    colorscale = []
    for i, role in enumerate(ROLES):
        colorscale += [[i / k, _ROLE_COLORS[role]], [(i + 1) / k, _ROLE_COLORS[role]]]
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=heads,
            y=layers,
            text=text,
            hovertemplate="%{text}<extra></extra>",
            colorscale=colorscale,
            zmin=-0.5,
            zmax=k - 0.5,
            xgap=1,
            ygap=1,
            colorbar={"title": "role", "tickvals": list(range(k)), "ticktext": list(ROLES)},
        )
    )
    fig.update_layout(title=title, xaxis={"title": "head", "dtick": 1}, yaxis={"title": "layer", "dtick": 1})
    return fig


def attention_by_distance(table: pd.DataFrame, title: str = "Attention mass by distance") -> go.Figure:
    """Share of a query's attention at each distance Δ, one curve per (layer, head) (``AttentionStats.by_distance``)."""
    require_columns(table, ["layer", "head", "distance", "mass", "n_pairs"], "attention_by_distance", nonempty=True)
    fig = go.Figure()
    for (layer, head), part in table.groupby(["layer", "head"]):
        fig.add_scatter(
            x=part["distance"],
            y=part["mass"],
            mode="lines",
            name=f"L{layer} H{head}",
            customdata=part[["n_pairs"]].to_numpy(),
            hovertemplate=f"layer {layer} head {head}<br>Δ %{{x}}<br>mass %{{y:.3f}}<br>%{{customdata[0]}} pairs"
            "<extra></extra>",
        )
    fig.update_layout(
        title=title,
        xaxis_title="distance Δ = query − key position (tokens)",
        yaxis={"title": "share of the query's attention", "type": "log"},
        legend_title="head",
    )
    return fig


def position_predictor_comparison(table: pd.DataFrame, title: str = "Which signal orders tokens?") -> go.Figure:
    """Grouped bars per layer: |Spearman ρ| of each position predictor (``compare_position_predictors``)."""
    require_columns(
        table, ["layer", "predictor", "abs_spearman", "sem", "n_seqs"], "position_predictor_comparison", nonempty=True
    )
    fig = go.Figure()
    for predictor, part in table.groupby("predictor"):
        fig.add_bar(
            x=part["layer"].astype(str),
            y=part["abs_spearman"],
            name=predictor,
            error_y={"type": "data", "array": part["sem"].fillna(0)},
            customdata=part[["n_seqs"]].to_numpy(),
            hovertemplate=f"{predictor}<br>layer %{{x}}<br>|ρ| %{{y:.3f}}"
            "<br>over %{customdata[0]} sequences<extra></extra>",
        )
    fig.update_layout(
        title=title,
        barmode="group",
        xaxis_title="layer",
        yaxis={"title": "|Spearman ρ| with position", "range": [0, 1]},
        legend_title="predictor",
    )
    return fig
