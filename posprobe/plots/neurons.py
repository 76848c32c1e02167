"""Figures for positional neurons (Voita et al. 2023): counts per layer, one neuron's profile, a heatmap.

Each function takes a table from ``posprobe.stats.neurons`` and returns a plotly Figure.
"""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from posprobe.labels import CATEGORIES
from posprobe.plots._common import require_columns

_COLORS = {
    "oscillatory": "#1f77b4",
    "both-extremes": "#ff7f0e",
    "one-extreme": "#2ca02c",
    "other-strong": "#9467bd",
    "other-weak": "#c5b0d5",
}


def positional_neuron_counts(layer_summary: pd.DataFrame) -> go.Figure:
    """Stacked bars: positional neurons per layer by category (``PositionalNeurons.layer_summary``)."""
    require_columns(layer_summary, ["layer", "n_neurons", "dead", "always_on", *CATEGORIES], "positional_neuron_counts")
    layers = layer_summary["layer"].astype(str)
    fig = go.Figure()
    for category in CATEGORIES:
        fig.add_bar(
            x=layers,
            y=layer_summary[category],
            name=category,
            marker_color=_COLORS[category],
            customdata=layer_summary[["n_neurons", "dead", "always_on"]].to_numpy(),
            hovertemplate=(
                f"layer %{{x}}<br>{category}: %{{y}}<br>of %{{customdata[0]}} neurons "
                "(%{customdata[1]} dead, %{customdata[2]} always on)<extra></extra>"
            ),
        )
    fig.update_layout(
        barmode="stack",
        title="Positional neurons per layer (Voita et al. 2023)",
        xaxis_title="layer",
        yaxis_title="positional neurons (count)",
        legend_title="category",
    )
    return fig


def neuron_position_profile(profile: pd.DataFrame) -> go.Figure:
    """One neuron's mean activation ± 1 std over position, with its firing rate on a second axis."""
    columns = ["layer", "neuron", "position", "mean", "std", "firing_rate", "n_tokens"]
    require_columns(profile, columns, "neuron_position_profile")
    if profile[["layer", "neuron"]].drop_duplicates().shape[0] != 1:
        raise ValueError("neuron_position_profile draws one neuron; filter the table to a single (layer, neuron)")
    layer, neuron = profile["layer"].iloc[0], profile["neuron"].iloc[0]
    pos = profile["position"]
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_scatter(
        x=pd.concat([pos, pos[::-1]]),
        y=pd.concat([profile["mean"] + profile["std"], (profile["mean"] - profile["std"])[::-1]]),
        fill="toself",
        fillcolor="rgba(31,119,180,0.2)",
        line={"width": 0},
        name="mean ± 1 std",
        hoverinfo="skip",
    )
    fig.add_scatter(
        x=pos,
        y=profile["mean"],
        mode="lines",
        name="mean activation",
        line={"color": "#1f77b4"},
        customdata=profile[["std", "n_tokens"]].to_numpy(),
        hovertemplate="position %{x}<br>mean %{y:.4g} ± %{customdata[0]:.3g}<br>%{customdata[1]} tokens<extra></extra>",
    )
    fig.add_scatter(
        x=pos,
        y=profile["firing_rate"],
        mode="lines",
        name="firing rate",
        line={"color": "#d62728"},
        fill="tozeroy",
        fillcolor="rgba(214,39,40,0.12)",
        hovertemplate="position %{x}<br>fires on %{y:.1%} of tokens<extra></extra>",
        secondary_y=True,
    )
    fig.update_layout(title=f"Layer {layer} neuron {neuron}: activation by position", legend_title="")
    fig.update_xaxes(title_text="position (token index)")
    fig.update_yaxes(title_text="activation", secondary_y=False)
    fig.update_yaxes(
        title_text="firing rate (share of tokens active)", range=[0, 1], tickformat=".0%", secondary_y=True
    )
    return fig


def positional_neuron_heatmap(profiles: pd.DataFrame, value: str = "mean_z") -> go.Figure:
    """Neuron × position heatmap of ``value`` (``mean_z``, ``mean`` or ``firing_rate``) from ``stats.profiles``."""
    require_columns(profiles, ["layer", "neuron", "position", value], "positional_neuron_heatmap")
    labels = "L" + profiles["layer"].astype(str) + " n" + profiles["neuron"].astype(str)
    order = list(dict.fromkeys(labels))
    grid = profiles.assign(label=labels).pivot(index="label", columns="position", values=value).reindex(order)
    titles = {"mean_z": "mean activation (z over positions)", "mean": "mean activation", "firing_rate": "firing rate"}
    fig = go.Figure(
        go.Heatmap(
            z=grid.to_numpy(),
            x=grid.columns,
            y=grid.index,
            colorscale="RdBu_r" if value != "firing_rate" else "Viridis",
            zmid=0 if value != "firing_rate" else None,
            colorbar={"title": titles.get(value, value)},
            hovertemplate="%{y}<br>position %{x}<br>" + value + " %{z:.3g}<extra></extra>",
        )
    )
    fig.update_layout(
        title="Top positional neurons by position",
        xaxis_title="position (token index)",
        yaxis_title="neuron (layer, index)",
        yaxis={"autorange": "reversed"},
    )
    return fig
