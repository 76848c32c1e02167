"""Figures for position probes: score per layer beside its controls (Haviv et al. 2022, Fig. 2 style)."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

METRICS = {
    "r2": "R² (held-out sequences)",
    "mae": "mean absolute error (target units)",
    "accuracy": "accuracy",
    "mad": "mean absolute distance (positions)",
    "selectivity": "selectivity (R² − best control R²)",
}
CONTROL_COLUMNS = {
    "control_shuffled": ("shuffled labels", "dash"),
    "control_random_init": ("random-init model", "dot"),
    "control_token": ("token identity", "dashdot"),
}


def plot_probe_position(table: pd.DataFrame, metric: str = "r2") -> go.Figure:
    """Plot ``metric`` per layer for each target × kind × with/without position 0, controls dashed.

    Takes the ``probe_position(...).table``. Controls are R², so they are drawn for ``metric="r2"``;
    for ``mad`` the random-guess baseline (N²−1)/(3N) is drawn instead. Tables saved before the
    ``include_pos0`` column was named so (``with_pos0``) draw too.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; accepted: {', '.join(METRICS)}")
    if table.empty:
        raise ValueError("the probe table is empty; nothing to plot")
    fig = go.Figure()
    x_of = table["layer"].astype("object").where(table["layer"].notna(), table["site"]).astype(str)
    pos0 = "include_pos0" if "include_pos0" in table else "with_pos0"
    groups = table.assign(_x=x_of).groupby(["target", "kind", pos0], sort=False)
    for (target, kind, include_pos0), g in groups:
        name = f"{target} · {kind} · {'with' if include_pos0 else 'without'} pos 0"
        _add_metric_trace(fig, g, metric, name)
        if metric == "r2":
            _add_control_traces(fig, g, name)
        if metric == "mad":
            _add_chance_trace(fig, g, name)
    site = ", ".join(table["site"].unique())
    fig.update_layout(
        title=f"Position probes at {site} ({table['model'].iloc[0]})",
        xaxis_title=f"layer ({site})",
        yaxis_title=METRICS[metric],
        legend_title="target · probe · tokens",
        template="plotly_white",
    )
    return fig


def _add_metric_trace(fig: go.Figure, g: pd.DataFrame, metric: str, name: str) -> None:
    hover = (
        "layer %{x}<br>"
        + f"{METRICS[metric]}: "
        + "%{y:.4f}<br>"
        + "n samples %{customdata[0]}<br>alpha %{customdata[1]:.3g}<extra>"
        + name
        + "</extra>"
    )
    fig.add_trace(
        go.Scatter(
            x=g["_x"],
            y=g[metric],
            mode="lines+markers",
            name=name,
            legendgroup=name,
            customdata=g[["n_samples", "alpha"]].to_numpy(),
            hovertemplate=hover,
        )
    )


def _add_control_traces(fig: go.Figure, g: pd.DataFrame, name: str) -> None:
    """The control R² curves that were run, thin and dashed in the legend group of their probe."""
    for column, (label, dash) in CONTROL_COLUMNS.items():
        if g[column].notna().any():
            fig.add_trace(
                go.Scatter(
                    x=g["_x"],
                    y=g[column],
                    mode="lines",
                    name=f"{name} · control: {label}",
                    legendgroup=name,
                    line={"dash": dash, "width": 1},
                    hovertemplate=f"layer %{{x}}<br>{label} R²: %{{y:.4f}}<extra></extra>",
                )
            )


def _add_chance_trace(fig: go.Figure, g: pd.DataFrame, name: str) -> None:
    fig.add_trace(
        go.Scatter(
            x=g["_x"],
            y=g["mad_chance"],
            mode="lines",
            name=f"{name} · random guess",
            legendgroup=name,
            line={"dash": "dash", "width": 1},
            hovertemplate="random-guess MAD: %{y:.2f}<extra></extra>",
        )
    )
