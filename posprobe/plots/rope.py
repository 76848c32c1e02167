"""Figures for RoPE frequency analyses (Barbero et al. 2024; Hong et al. 2024).

Each function takes a table from ``posprobe.stats.rope`` or ``posprobe.stats.rope_ablation`` and
returns a plotly Figure; hover text names the layer, head, frequency θ and wavelength.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from posprobe.plots._common import require_columns

_ROLE_COLORS = {"positional": "#d62728", "semantic": "#1f77b4", "mixed": "#7f7f7f"}
_VALUE_TITLES = {
    "share": "share of the head's q·k norm product",
    "q_share": "share of the query norm",
    "q_norm": "mean query plane norm",
    "k_norm": "mean key plane norm",
}


def _head_label(df: pd.DataFrame) -> pd.Series:
    return "L" + df["layer"].astype(str) + ".H" + df["head"].astype(str)


def frequency_usage_heatmap(table: pd.DataFrame, value: str = "share") -> go.Figure:
    """Layer.head × plane heatmap of ``value`` (``share``, ``q_share``, ``q_norm``, ``k_norm``) from the usage table."""
    if value not in _VALUE_TITLES:
        raise ValueError(f"unknown value {value!r}; choose one of {', '.join(_VALUE_TITLES)}")
    require_columns(table, ["layer", "head", "plane", "theta", "wavelength", "base", value], "frequency_usage_heatmap")
    ordered = table.sort_values(["layer", "head", "plane"]).assign(label=lambda d: _head_label(d))
    rows = list(dict.fromkeys(ordered["label"]))
    grid = lambda column: ordered.pivot(index="label", columns="plane", values=column).reindex(rows)  # noqa: E731
    hover = np.stack([grid(c).to_numpy(dtype=float) for c in ("layer", "head", "theta", "wavelength", "base")], axis=-1)
    z = grid(value)
    fig = go.Figure(
        go.Heatmap(
            z=z.to_numpy(dtype=float),
            x=z.columns,
            y=rows,
            customdata=hover,
            colorscale="Viridis",
            colorbar={"title": _VALUE_TITLES[value]},
            hovertemplate=(
                "layer %{customdata[0]} head %{customdata[1]}<br>plane %{x}: θ %{customdata[2]:.4g} rad/token, "
                "wavelength %{customdata[3]:.4g} tokens (base %{customdata[4]:.3g})<br>"
                + value
                + " %{z:.3g}<extra></extra>"
            ),
        )
    )
    fig.update_layout(
        title="RoPE frequency usage per head (Barbero et al. 2024); plane 0 = highest frequency",
        xaxis_title="plane (rotary planes from highest to lowest frequency, then non-rotary)",
        yaxis_title="layer.head",
        yaxis={"autorange": "reversed"},
    )
    return fig


def frequency_spectra(table: pd.DataFrame, layer: int | None = None) -> go.Figure:
    """Each head's ``share`` per rotary plane against wavelength (log axis); ``layer`` picks one layer."""
    require_columns(table, ["layer", "head", "plane", "rotary", "theta", "wavelength", "share"], "frequency_spectra")
    rows = table[table["rotary"]]
    if layer is not None:
        if layer not in set(rows["layer"]):
            raise ValueError(f"layer {layer} not in the table; layers: {sorted(set(rows['layer']))}")
        rows = rows[rows["layer"] == layer]
    fig = go.Figure()
    for (lay, head), g in rows.sort_values("wavelength").groupby(["layer", "head"], sort=True):
        fig.add_scatter(
            x=g["wavelength"],
            y=g["share"],
            mode="lines+markers",
            name=f"L{lay}.H{head}",
            legendgroup=f"layer {lay}",
            customdata=g[["plane", "theta"]].to_numpy(),
            hovertemplate=(
                f"layer {lay} head {head}<br>plane %{{customdata[0]}}: θ %{{customdata[1]:.4g}} rad/token, "
                "wavelength %{x:.4g} tokens<br>share %{y:.3g}<extra></extra>"
            ),
        )
    fig.update_layout(
        title="Per-head RoPE frequency spectra"
        + ("" if layer is None else f", layer {layer}")
        + " (non-rotary planes omitted)",
        xaxis_title="wavelength 2π/θ (tokens, log scale)",
        yaxis_title=_VALUE_TITLES["share"],
        xaxis_type="log",
    )
    return fig


def distance_contributions(
    contributions: pd.DataFrame, table: pd.DataFrame, layer: int, head: int, top: int = 8
) -> go.Figure:
    """One head's per-plane logit contribution against distance Δ: the ``top`` planes by peak |value|, and the sum."""
    require_columns(contributions, ["layer", "head", "plane", "delta", "contribution"], "distance_contributions")
    require_columns(table, ["layer", "head", "plane", "theta", "wavelength"], "distance_contributions")
    rows = contributions[(contributions["layer"] == layer) & (contributions["head"] == head)]
    if rows.empty:
        raise ValueError(f"no contributions for layer {layer} head {head}")
    if top < 1:
        raise ValueError(f"top must be ≥ 1, got {top}")
    freq = table[(table["layer"] == layer) & (table["head"] == head)].set_index("plane")[["theta", "wavelength"]]
    peak = rows.groupby("plane")["contribution"].agg(lambda s: s.abs().max()).sort_values(ascending=False)
    fig = go.Figure()
    total = rows.groupby("delta", as_index=False)["contribution"].sum()
    fig.add_scatter(
        x=total["delta"],
        y=total["contribution"],
        mode="lines",
        name="sum over planes",
        line={"color": "black", "width": 3},
        hovertemplate=f"layer {layer} head {head}<br>Δ %{{x}}: mean logit %{{y:.4g}}<extra></extra>",
    )
    for plane in peak.index[:top]:
        g = rows[rows["plane"] == plane].sort_values("delta")
        theta, wavelength = freq.loc[plane, "theta"], freq.loc[plane, "wavelength"]
        fig.add_scatter(
            x=g["delta"],
            y=g["contribution"],
            mode="lines",
            name=f"plane {plane} (λ {wavelength:.3g})",
            hovertemplate=(
                f"layer {layer} head {head} plane {plane}<br>θ {theta:.4g} rad/token, "
                f"wavelength {wavelength:.4g} tokens<br>Δ %{{x}}: contribution %{{y:.4g}}<extra></extra>"
            ),
        )
    fig.update_layout(
        title=f"Layer {layer} head {head}: logit contribution by plane and distance (Hong et al. 2024)",
        xaxis_title="distance Δ = query position − key position (tokens)",
        yaxis_title="mean contribution to the attention logit",
        legend_title=f"top {min(top, len(peak))} planes",
    )
    return fig


def head_roles_scatter(head_roles: pd.DataFrame) -> go.Figure:
    """High-frequency share against the sharper of previous-token / diagonal attention, coloured by role."""
    require_columns(
        head_roles,
        ["layer", "head", "high_freq_share", "low_freq_share", "prev_token_score", "diag_score", "role", "rule"],
        "head_roles_scatter",
    )
    fig = go.Figure()
    for role, g in head_roles.groupby("role", sort=False):
        fig.add_scatter(
            x=g["high_freq_share"],
            y=g[["prev_token_score", "diag_score"]].max(axis=1),
            mode="markers",
            name=role,
            marker={"color": _ROLE_COLORS.get(role, "#bcbd22"), "size": 8},
            text=_head_label(g),
            customdata=g[["low_freq_share", "prev_token_score", "diag_score", "rule"]].to_numpy(),
            hovertemplate=(
                "%{text}: " + role + "<br>high-frequency share %{x:.3f}, low %{customdata[0]:.3f}<br>"
                "previous-token %{customdata[1]:.3f}, diagonal %{customdata[2]:.3f}<br>%{customdata[3]}<extra></extra>"
            ),
        )
    fig.update_layout(
        title="Head roles: positional heads use high frequencies and attend sharply (Barbero et al. 2024)",
        xaxis_title="share of q·k norm product in the high-frequency band",
        yaxis_title="max(previous-token, diagonal) attention",
        xaxis_range=[-0.02, 1.02],
        yaxis_range=[-0.02, 1.02],
        legend_title="role",
    )
    return fig


def ablation_loss(loss: pd.DataFrame) -> go.Figure:
    """Loss change (nats/token) against the ablated fraction p: one line per layer group and direction."""
    require_columns(
        loss, ["group", "which", "p", "delta_loss", "loss", "base_loss", "n_planes_ablated"], "ablation_loss"
    )
    fig = go.Figure()
    for (group, which), g in loss.sort_values("p").groupby(["group", "which"], sort=False):
        fig.add_scatter(
            x=g["p"],
            y=g["delta_loss"],
            mode="lines+markers",
            name=f"{group}, {which}",
            line={"dash": "solid" if which == "lowest" else "dash"},
            customdata=g[["loss", "base_loss", "n_planes_ablated"]].to_numpy(),
            hovertemplate=(
                f"{group}: {which} frequencies<br>p %{{x}}: Δloss %{{y:.4f}} nats/token<br>"
                "loss %{customdata[0]:.4f} vs %{customdata[1]:.4f}; %{customdata[2]} planes ablated<extra></extra>"
            ),
        )
    fig.update_layout(
        title="Loss change when RoPE frequencies are removed (p-RoPE, Barbero et al. 2024)",
        xaxis_title="fraction p of rotary planes removed",
        yaxis_title="Δ loss (nats/token)",
        legend_title="layer group, frequencies",
    )
    return fig


def ablation_prev_token(heads: pd.DataFrame, group: str = "all", which: str = "lowest") -> go.Figure:
    """Each head's previous-token score before (x) and after (y) an ablation, one colour per p."""
    require_columns(
        heads, ["group", "which", "p", "layer", "head", "prev_token_before", "prev_token_after"], "ablation_prev_token"
    )
    rows = heads[(heads["group"] == group) & (heads["which"] == which)]
    if rows.empty:
        raise ValueError(
            f"no rows for group {group!r}, which {which!r}; groups: {sorted(set(heads['group']))}, "
            f"which: {sorted(set(heads['which']))}"
        )
    fig = go.Figure()
    for p, g in rows.groupby("p", sort=True):
        fig.add_scatter(
            x=g["prev_token_before"],
            y=g["prev_token_after"],
            mode="markers",
            name=f"p = {p:g}",
            text=_head_label(g),
            hovertemplate="%{text}<br>previous-token score %{x:.3f} → %{y:.3f}<extra></extra>",
        )
    fig.add_scatter(
        x=[0, 1], y=[0, 1], mode="lines", line={"dash": "dot", "color": "grey"}, name="unchanged", hoverinfo="skip"
    )
    fig.update_layout(
        title=f"Previous-token attention per head, {which} frequencies removed in layers '{group}'",
        xaxis_title="previous-token score, intact model",
        yaxis_title="previous-token score, ablated",
        legend_title="fraction removed",
    )
    return fig
