"""Learned absolute positions: the geometry of W_pos (GPT-2's helix) and how decodable position stays by layer.

Published (RESEARCH.md §6, for GPT-2): the learned position matrix W_pos forms a helix — its top
principal components are smooth, low-frequency, cosine-like functions of position — and
position is linearly decodable from learned-APE models almost perfectly at layer 0. Here, for
MiniLM-L6 (BERT, 512 learned positions) and the learned zoo model (256): W_pos read through the
``pos_embed`` hook, PCA (explained variance; PC1-3 in 3-D coloured by position; each PC's best
dominant period and how pure it is; whether PC1-PC2 turn at a constant rate — a helix), cosine
similarity of neighbouring rows;
and ridge probes of absolute position per layer (``probe_position``, split by sequence, with
shuffled / random-init / token controls), as in ``haviv_probes.py``.

Usage: ``python analyses/learned_positions.py [--quick] [--out DIR] [--zoo-root DIR]``
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import begin, load_zoo_model, skipped_row, with_notes
from haviv_probes import probe_depths

NAME = "learned_positions"
N_COMPONENTS = 6


def settings(quick: bool) -> dict:
    if quick:
        return {"minilm-l6": {"n": 16, "seq_len": 128}, "zoo:learned": {"n": 32, "seq_len": 128}}
    return {"minilm-l6": {"n": 64, "seq_len": 512}, "zoo:learned": {"n": 128, "seq_len": 256}}


def position_matrix(model) -> np.ndarray:
    """W_pos [n_ctx d_model]: the ``pos_embed`` activation for positions 0..n_ctx−1 of one sequence."""
    from posprobe.sites import SiteKey

    n_ctx = model.info.n_ctx
    filler = model.info.bos_token_id if model.info.bos_token_id is not None else 0
    tokens = torch.full((1, n_ctx), int(filler), dtype=torch.long)
    key = SiteKey("pos_embed", None)
    return model.capture(tokens, [key])[key][0].double().cpu().numpy()


def pca(w_pos: np.ndarray, model_name: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per-position coordinates on the top PCs, per-PC explained variance, dominant period and its power share).

    A PC's dominant period is N / k* for the peak bin k* ≥ 1 of its power spectrum over positions;
    ``period_power`` is the share of the spectral power in bins k*−1..k*+1 (1 = a pure sinusoid).
    """
    n = w_pos.shape[0]
    centred = w_pos - w_pos.mean(0)
    u, s, _ = np.linalg.svd(centred, full_matrices=False)
    scores = u[:, :N_COMPONENTS] * s[:N_COMPONENTS]
    explained = s**2 / (s**2).sum()
    t = np.arange(n)
    rows = []
    for c in range(N_COMPONENTS):
        power = np.abs(np.fft.rfft(scores[:, c] - scores[:, c].mean())) ** 2
        power[0] = 0.0
        k = int(power.argmax())
        rows.append(
            {
                "model": model_name,
                "component": c + 1,
                "explained_variance": float(explained[c]),
                "period": n / k,
                "period_power": float(power[max(k - 1, 1) : k + 2].sum() / power.sum()),
                "spearman_with_position": float(pd.Series(scores[:, c]).corr(pd.Series(t), method="spearman")),
            }
        )
    coords = pd.DataFrame(scores, columns=[f"pc{c + 1}" for c in range(N_COMPONENTS)]).assign(
        position=t, model=model_name
    )
    return coords, pd.DataFrame(rows)


def helix_turn(coords: pd.DataFrame) -> dict[str, float]:
    """Does W_pos turn around a circle in the PC1-PC2 plane? Linear fit of the unwrapped angle against position."""
    angle = np.unwrap(np.arctan2(coords["pc2"].to_numpy(), coords["pc1"].to_numpy()))
    t = coords["position"].to_numpy(dtype=float)
    slope, intercept = np.polyfit(t, angle, 1)
    resid = angle - (slope * t + intercept)
    r2 = 1 - (resid**2).sum() / ((angle - angle.mean()) ** 2).sum()
    return {"pc12_turn_period": float(2 * np.pi / abs(slope)), "pc12_angle_linear_r2": float(r2)}


def neighbour_similarity(w_pos: np.ndarray, model_name: str) -> pd.DataFrame:
    """Mean cosine similarity of W_pos rows at distance Δ (Δ = 1..N/2): a smooth curve means a smooth embedding."""
    unit = w_pos / np.linalg.norm(w_pos, axis=1, keepdims=True).clip(1e-12)
    cos = unit @ unit.T
    n = len(unit)
    return pd.DataFrame(
        [
            {"model": model_name, "distance": d, "cos_sim": float(np.diagonal(cos, d).mean())}
            for d in range(1, n // 2 + 1)
        ]
    )


def helix_figure(coords: pd.DataFrame) -> go.Figure:
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
    fig.update_layout(title="Learned position embeddings W_pos on their top 3 principal components", showlegend=False)
    return fig


def components_figure(coords: pd.DataFrame) -> go.Figure:
    models = list(coords["model"].unique())
    fig = make_subplots(rows=len(models), cols=1, subplot_titles=models)
    for i, model in enumerate(models):
        g = coords[coords["model"] == model]
        for c in range(1, 5):
            fig.add_scatter(x=g["position"], y=g[f"pc{c}"], mode="lines", name=f"{model} PC{c}", row=i + 1, col=1)
    fig.update_xaxes(title_text="position")
    fig.update_yaxes(title_text="PC score")
    fig.update_layout(
        title="Top principal components of W_pos against position (a helix: a fast circle + a slow drift)"
    )
    return fig


def decodability_figure(probes: pd.DataFrame) -> go.Figure:
    fig = go.Figure()
    rows = probes[(probes["kind"] == "ridge") & (~probes["with_pos0"].astype(bool))]
    for model, g in rows.groupby("model", sort=False):
        fig.add_scatter(x=g["depth"], y=g["r2"], mode="lines+markers", name=f"{model} R²")
        fig.add_scatter(
            x=g["depth"],
            y=g["control_random_init"],
            mode="lines",
            line={"dash": "dot"},
            name=f"{model} random-init control",
        )
    fig.update_layout(
        title="Linear decodability of absolute position per layer (ridge, held-out sequences)",
        xaxis_title="depth (0 = embedding output, l+1 = after block l)",
        yaxis_title="R²",
        template="plotly_white",
    )
    return fig


def headline(components: pd.DataFrame, coords: pd.DataFrame, neighbours: pd.DataFrame, probes: pd.DataFrame) -> dict:
    out = {}
    for model, g in components.groupby("model", sort=False):
        nb = neighbours[neighbours["model"] == model].set_index("distance")["cos_sim"]
        p = probes[(probes["model"] == model) & (probes["kind"] == "ridge") & (~probes["with_pos0"].astype(bool))]
        out[model] = {
            "explained_variance_pc1_3": [round(float(v), 3) for v in g["explained_variance"].head(3)],
            "period_pc1_3": [round(float(v), 2) for v in g["period"].head(3)],
            "period_power_pc1_3": [round(float(v), 3) for v in g["period_power"].head(3)],
            **{k: round(v, 4) for k, v in helix_turn(coords[coords["model"] == model]).items()},
            "neighbour_cos_d1": round(float(nb.loc[1]), 3),
            "random_init_neighbour_cos_d1": round(
                float(neighbours[neighbours["model"] == f"{model} (random init)"]["cos_sim"].iloc[0]), 3
            ),
            f"neighbour_cos_d{int(nb.index.max())}": round(float(nb.iloc[-1]), 3),
            "probe_r2_by_depth": [round(float(v), 4) for v in p["r2"]],
            "probe_mad_by_depth": [round(float(v), 3) for v in p["mad"]],
            "probe_mad_chance": round(float(p["mad_chance"].iloc[0]), 2) if len(p) else None,
            "random_init_r2_by_depth": [round(float(v), 4) for v in p["control_random_init"]],
        }
    return out


def main(argv: Sequence[str] | None = None) -> dict:
    import posprobe as pp

    args, out, cfg = begin(argv, __doc__, NAME, settings)
    coords, comps, neigh, probes, skipped = [], [], [], [], {}
    for name in ("minilm-l6", "zoo:learned"):
        if name.startswith("zoo:"):
            model, note = load_zoo_model("learned", args.zoo_root)
            if model is None:
                skipped[name] = note
                comps.append(skipped_row(name, note))
                continue
        else:
            model = pp.load_model(name)
        w_pos = position_matrix(model)
        c, comp = pca(w_pos, name)
        coords.append(c)
        comps.append(comp)
        neigh.append(neighbour_similarity(w_pos, name))
        twin_pos = position_matrix(model.random_init_copy(args.seed))
        neigh.append(neighbour_similarity(twin_pos, f"{name} (random init)"))
        with tempfile.TemporaryDirectory(prefix="learned-") as tmp:
            probes.append(probe_depths(model, **cfg[name], seed=args.seed, tmp=tmp).assign(model=name))
        print(f"[{NAME}] {name} done")
    coords_t, comps_t = pd.concat(coords, ignore_index=True), with_notes(comps)
    neigh_t, probes_t = pd.concat(neigh, ignore_index=True), pd.concat(probes, ignore_index=True)
    out.table("w_pos_pca_coordinates", coords_t)
    out.table("w_pos_components", comps_t)
    out.table("w_pos_neighbour_similarity", neigh_t)
    out.table("position_probes", probes_t)
    out.figure("w_pos_helix_3d", helix_figure(coords_t))
    out.figure("w_pos_components", components_figure(coords_t))
    out.figure("decodability_by_layer", decodability_figure(probes_t))
    out.summary = headline(comps_t.dropna(subset=["component"]), coords_t, neigh_t, probes_t)
    out.summary["skipped"] = skipped
    return out.finish()


if __name__ == "__main__":
    main()
