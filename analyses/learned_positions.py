"""Learned absolute positions: the geometry of W_pos (GPT-2's helix) and how decodable position stays by layer.

Published (RESEARCH.md §6, for GPT-2): the learned position matrix W_pos forms a helix — its top
principal components are smooth, low-frequency, cosine-like functions of position — and
position is linearly decodable from learned-APE models almost perfectly at layer 0. Here, for
MiniLM-L6 (BERT, 512 learned positions) and the learned zoo model (256): W_pos read through the
``pos_embed`` hook and measured by ``pp.position_embedding_geometry`` (PCA: explained variance;
PC1-3 in 3-D coloured by position; each PC's dominant period and how pure it is; whether PC1-PC2
turn at a constant rate — a helix; cosine similarity of neighbouring rows beside the random-init
twin's);
and ridge probes of absolute position per layer (``probe_position``, split by sequence, with
shuffled / random-init / token controls), as in ``haviv_probes.py``.

Usage: ``python analyses/learned_positions.py [--quick] [--out DIR] [--zoo-root DIR] [--zoo v1|v2|v1,v2]``
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import begin, load_zoo_model, skipped_row, with_notes, zoo_name
from haviv_probes import probe_depths

NAME = "learned_positions"


def settings(quick: bool) -> dict:
    if quick:
        return {"minilm-l6": {"n": 16, "seq_len": 128}, "zoo:learned": {"n": 32, "seq_len": 128}}
    return {"minilm-l6": {"n": 64, "seq_len": 512}, "zoo:learned": {"n": 128, "seq_len": 256}}


def decodability_figure(probes: pd.DataFrame) -> go.Figure:
    fig = go.Figure()
    rows = probes[(probes["kind"] == "ridge") & (~probes["include_pos0"].astype(bool))]
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


def headline(
    components: pd.DataFrame, helices: dict[str, dict], neighbours: pd.DataFrame, probes: pd.DataFrame
) -> dict:
    out = {}
    for model, g in components.groupby("model", sort=False):
        nb = neighbours[neighbours["model"] == model].set_index("distance")["cos_sim"]
        p = probes[(probes["model"] == model) & (probes["kind"] == "ridge") & (~probes["include_pos0"].astype(bool))]
        out[model] = {
            "explained_variance_pc1_3": [round(float(v), 3) for v in g["explained_variance"].head(3)],
            "period_pc1_3": [round(float(v), 2) for v in g["period"].head(3)],
            "period_power_pc1_3": [round(float(v), 3) for v in g["period_power"].head(3)],
            **{k: round(v, 4) for k, v in helices[model].items()},
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
    from posprobe.plots import positions
    from posprobe.stats.position_table import position_embedding_geometry

    args, out, cfg = begin(argv, __doc__, NAME, settings, default_zoo="v1")
    coords, comps, neigh, probes, skipped, helices = [], [], [], [], {}, {}
    for name, zoo in [("minilm-l6", None), *((zoo_name("learned", zoo), zoo) for zoo in args.zoo)]:
        if zoo is not None:
            model, note = load_zoo_model("learned", args.zoo_root, zoo=zoo)
            if model is None:
                skipped[name] = note
                comps.append(skipped_row(name, note))
                continue
        else:
            model = pp.load_model(name)
        geometry = position_embedding_geometry(model, seed=args.seed, model_name=name)
        coords.append(geometry.coords.assign(model=name))
        comps.append(geometry.components.assign(model=name))
        helices[name] = geometry.helix
        neigh.append(geometry.neighbours[["distance", "cos_sim"]].assign(model=name))
        twin = geometry.neighbours[["distance", "cos_sim_random_init"]].rename(
            columns={"cos_sim_random_init": "cos_sim"}
        )
        neigh.append(twin.assign(model=f"{name} (random init)"))
        with tempfile.TemporaryDirectory(prefix="learned-") as tmp:
            sizes = cfg["minilm-l6" if zoo is None else "zoo:learned"]
            probes.append(probe_depths(model, **sizes, seed=args.seed, tmp=tmp).assign(model=name))
        print(f"[{NAME}] {name} done")
    coords_t, comps_t = pd.concat(coords, ignore_index=True), with_notes(comps)
    neigh_t, probes_t = pd.concat(neigh, ignore_index=True), pd.concat(probes, ignore_index=True)
    out.table("w_pos_pca_coordinates", coords_t)
    out.table("w_pos_components", comps_t)
    out.table("w_pos_neighbour_similarity", neigh_t)
    out.table("position_probes", probes_t)
    out.figure("w_pos_helix_3d", positions.helix_3d(coords_t))
    out.figure("w_pos_components", positions.components_by_position(coords_t))
    out.figure("decodability_by_layer", decodability_figure(probes_t))
    out.summary = headline(comps_t.dropna(subset=["component"]), helices, neigh_t, probes_t)
    out.summary["skipped"] = skipped
    return out.finish()


if __name__ == "__main__":
    main()
