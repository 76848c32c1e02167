"""Figures for position patching: layer × position effect maps and the subspace-illusion checks.

``patching_heatmap`` draws a ``patch_positions(...).table`` (one panel per site, rows per layer or
layer.head); ``subspace_bars`` a ``subspace_patch(...).table`` (Makelov et al. 2023 checks);
``shift_invariance_curves`` a ``shift_invariance(...).table`` (output change against the shift).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from posprobe.plots._common import require_columns

METRIC_TITLES = {
    "logprob": "next-token log-prob",
    "kl": "KL(clean ‖ patched), nats",
    "probe_position": "probe-decoded position",
}
VALUE_TITLES = {
    "normalized": "fraction of the full clean→corrupt change",
    "effect": "patched − clean",
    "value": "patched value",
}


def _row_label(df: pd.DataFrame) -> pd.Series:
    layer = df["layer"].astype("string").fillna("–")
    head = df["head"].astype("string")
    return ("L" + layer).where(head.isna(), "L" + layer + ".H" + head.fillna(""))


def _grid(part: pd.DataFrame, column: str, rows: list[str], cols: list[str]) -> np.ndarray:
    return part.pivot(index="row", columns="col", values=column).reindex(index=rows, columns=cols).to_numpy(dtype=float)


def patching_heatmap(table: pd.DataFrame, metric: str = "logprob", value: str = "normalized") -> go.Figure:
    """Layer (× head) by position heatmap of ``value`` for ``metric``, one panel per patched site.

    Whole-sequence patches (position <NA>) appear in a column labelled "all".
    """
    if metric not in METRIC_TITLES:
        raise ValueError(f"unknown metric {metric!r}; accepted: {', '.join(METRIC_TITLES)}")
    if value not in VALUE_TITLES:
        raise ValueError(f"unknown value {value!r}; accepted: {', '.join(VALUE_TITLES)}")
    require_columns(
        table, ["site", "layer", "head", "position", "metric", "effect", "normalized", "value"], "patching_heatmap"
    )
    data = table[table["metric"] == metric]
    if data.empty:
        raise ValueError(f"no rows for metric {metric!r}; the table has {sorted(table['metric'].unique())}")
    data = data.assign(row=_row_label(data), col=data["position"].astype("string").fillna("all"))
    sites = list(dict.fromkeys(data["site"]))
    fig = make_subplots(rows=1, cols=len(sites), subplot_titles=sites, shared_yaxes=False)
    values = data[value].to_numpy(dtype=float)
    bound = float(np.nanmax(np.abs(values))) if np.isfinite(values).any() else 1.0
    for i, site in enumerate(sites, start=1):
        part = data[data["site"] == site]
        rows = list(dict.fromkeys(part.sort_values(["layer", "head"], na_position="first")["row"]))
        cols = list(dict.fromkeys(part.sort_values("position", na_position="last")["col"]))
        grids = {c: _grid(part, c, rows, cols) for c in {"effect", "normalized", value}}
        fig.add_trace(
            go.Heatmap(
                z=grids[value],
                x=cols,
                y=rows,
                customdata=np.stack([grids["effect"], grids["normalized"]], axis=-1),
                zmin=-bound,
                zmax=bound,
                colorscale="RdBu_r",
                showscale=i == len(sites),
                colorbar={"title": VALUE_TITLES[value]},
                hovertemplate=(
                    f"{site} %{{y}}, position %{{x}}<br>{METRIC_TITLES[metric]}: effect %{{customdata[0]:.4g}}, "
                    "normalized %{customdata[1]:.3f}<extra></extra>"
                ),
            ),
            row=1,
            col=i,
        )
        fig.update_xaxes(title_text="patched position (token index)", row=1, col=i)
        fig.update_yaxes(title_text="layer (.head)", row=1, col=i)
    shift = f", shift {table['shift'].iloc[0]} ({table['mode'].iloc[0]})" if "shift" in table else ""
    model = f" — {table['model'].iloc[0]}" if "model" in table else ""
    fig.update_layout(
        title=f"Position patching: {METRIC_TITLES[metric]}, {VALUE_TITLES[value]}{shift}{model}",
        template="plotly_white",
    )
    return fig


def subspace_bars(table: pd.DataFrame, metric: str = "kl") -> go.Figure:
    """Grouped bars: effect of the full, subspace, row-space and null-space patches, one group per split."""
    if metric not in ("kl", "logprob"):
        raise ValueError(f"unknown metric {metric!r}; accepted: kl, logprob")
    require_columns(table, ["split", "patch", "weight", "metric", "effect", "normalized"], "subspace_bars")
    data = table[table["metric"] == metric]
    if data.empty:
        raise ValueError(f"no rows for metric {metric!r}")
    fig = go.Figure()
    for patch, part in data.groupby("patch", sort=False):
        fig.add_trace(
            go.Bar(
                x=part["split"],
                y=part["effect"],
                name=patch,
                customdata=part[["normalized", "weight"]].to_numpy(dtype=float),
                hovertemplate=(
                    f"{patch} patch, %{{x}} prompts<br>effect %{{y:.4g}}<br>normalized %{{customdata[0]:.3f}}"
                    "<br>share of |v|² %{customdata[1]:.3f}<extra></extra>"
                ),
            )
        )
    site = f" at {table['site'].iloc[0]}" if "site" in table else ""
    fig.update_layout(
        barmode="group",
        title=f"Subspace patching checks{site} (Makelov et al. 2023): full vs subspace vs row / null parts",
        xaxis_title="prompts",
        yaxis_title=f"effect on {METRIC_TITLES[metric]} (patched − clean)",
        legend_title="patch",
        template="plotly_white",
    )
    return fig


SHIFT_VALUES = {
    "kl": "KL (nats)",
    "max_abs_logit_diff": "max |Δ|",
    "mean_abs_logit_diff": "mean |Δ|",
}


def shift_invariance_curves(table: pd.DataFrame, value: str | None = None) -> go.Figure:
    """Output change against the shift k on log-log axes, one line per (model, with_bos); values floored at 1e-16.

    ``value``: ``"kl"`` (default where the table compared logits), ``"max_abs_logit_diff"`` or
    ``"mean_abs_logit_diff"`` (default for a model without an LM head: its last hidden state).
    """
    require_columns(table, ["model", "shift", "with_bos", *SHIFT_VALUES], "shift_invariance_curves")
    logits = "output" not in table or (table["output"] == "logits").any()
    chosen = value or ("kl" if logits else "mean_abs_logit_diff")
    if chosen not in SHIFT_VALUES:
        raise ValueError(f"unknown value {chosen!r}; accepted: {', '.join(SHIFT_VALUES)}")
    fig = go.Figure()
    rows = table.dropna(subset=[chosen])
    for (model, bos), g in rows.groupby(["model", "with_bos"], sort=False):
        fig.add_scatter(
            x=g["shift"],
            y=g[chosen].clip(lower=1e-16),
            mode="lines+markers",
            name=f"{model} ({'BOS' if bos else 'no BOS'})",
            customdata=g[["max_abs_logit_diff"]].to_numpy(),
            hovertemplate=(
                f"shift %{{x}}<br>{SHIFT_VALUES[chosen]} %{{y:.3g}}<br>max |Δ| %{{customdata[0]:.3g}}<extra></extra>"
            ),
        )
    what = "KL(original ‖ all position ids + k) per token" if chosen == "kl" else SHIFT_VALUES[chosen]
    compared = "" if logits else " of the last hidden state"
    fig.update_layout(
        title=f"Shift invariance: {what}{compared} (floor 1e-16)",
        xaxis={"title": "shift k (positions)", "type": "log"},
        yaxis={"title": SHIFT_VALUES[chosen], "type": "log"},
        template="plotly_white",
    )
    return fig
