"""Haviv et al. 2022: per-layer linear position probes across position schemes, with controls.

Published (1.3B models on the Pile, 1,024 positions, MAD lower is better): NoPE 337 at layer 0
(chance 341.3), best ≈16.5 in layers 4-7, 133 at the last layer; learned best 6.45 (layer 1);
sinusoidal 0.008 at layer 0; ALiBi best ≈52.7 (layer 11). Here: ridge probes (posprobe's
``probe_position``; MAD/accuracy from rounding the regression) on every residual stream
(depth 0 = embedding output = ``resid_pre.0``; depth l+1 = ``resid_post.l``) of the five zoo
models and SmolLM2, with shuffled-label, random-init and token-identity controls, split by
sequence, without position 0 (the BOS). MAD is compared with the random-guess (N²−1)/(3N).

Usage: ``python analyses/haviv_probes.py [--quick] [--out DIR] [--zoo-root DIR] [--logistic]``
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ZOO_ORDER, Output, load_zoo_model, parse_args, skipped_row  # noqa: E402

NAME = "haviv_probes"


def settings(quick: bool) -> dict[str, dict[str, int]]:
    """Windows × tokens per model family; quick mode is sized for 2 CPU cores."""
    if quick:
        return {"zoo": {"n": 32, "seq_len": 128}, "smollm2-135m": {"n": 16, "seq_len": 128}}
    return {"zoo": {"n": 256, "seq_len": 256}, "smollm2-135m": {"n": 64, "seq_len": 512}}


def probe_depths(model, n: int, seq_len: int, seed: int, kinds: Sequence[str], tmp: str) -> pd.DataFrame:
    """Probe the embedding output and every block output of ``model`` (and its random-init twin) for position."""
    import posprobe as pp
    from posprobe.extract import extract

    batch = pp.data.text_windows(model, n=n, seq_len=seq_len, seed=seed)
    sites = ["resid_pre", "resid_post"]
    real = extract(model, batch, sites, layers=None, out=f"{tmp}/real", batch_size=8, progress=False)
    twin = model.random_init_copy(seed)
    rand = extract(twin, batch, sites, layers=None, out=f"{tmp}/random", batch_size=8, progress=False)
    common = {"random_init_store": rand, "seed": seed, "kind": list(kinds), "exclude_bos": "both"}
    emb = pp.probe_position(real, "resid_pre", layers=[0], **common).table.assign(depth=0, depth_site="resid_pre.0")
    post = pp.probe_position(real, "resid_post", **common).table
    post = post.assign(depth=post["layer"].astype(int) + 1, depth_site="resid_post." + post["layer"].astype(str))
    table = pd.concat([emb, post], ignore_index=True)
    table["model"] = model.info.name
    table["position_scheme"] = model.info.position_scheme
    table["n_windows"], table["seq_len"], table["n_layers"] = n, seq_len, model.info.n_layers
    table["mad_over_chance"] = table["mad"] / table["mad_chance"]
    return table.drop(columns=["neurons"])


def figure(table: pd.DataFrame) -> go.Figure:
    """MAD / chance and R² per depth for every model (ridge, without position 0); random-init control dotted."""
    fig = make_subplots(
        rows=1, cols=2, subplot_titles=("MAD / random-guess MAD (lower = more position)", "R² (held-out sequences)")
    )
    rows = table[(table["kind"] == "ridge") & (~table["with_pos0"].astype(bool))]
    for i, (model, g) in enumerate(rows.groupby("model", sort=False)):
        color = f"hsl({(i * 57) % 360},65%,45%)"
        hover = "depth %{x}<br>MAD %{customdata[0]:.2f} of chance %{customdata[1]:.1f}<extra>" + model + "</extra>"
        fig.add_trace(
            go.Scatter(
                x=g["depth"], y=g["mad_over_chance"], name=model, legendgroup=model, line={"color": color},
                customdata=g[["mad", "mad_chance"]].to_numpy(), hovertemplate=hover,
            ),
            row=1, col=1,
        )
        fig.add_trace(
            go.Scatter(x=g["depth"], y=g["r2"], name=model, legendgroup=model, showlegend=False, line={"color": color}),
            row=1, col=2,
        )
        fig.add_trace(
            go.Scatter(
                x=g["depth"], y=g["control_random_init"], name=f"{model} random-init control", legendgroup=model,
                showlegend=False, line={"color": color, "dash": "dot", "width": 1},
            ),
            row=1, col=2,
        )
    fig.add_hline(y=1.0, line_dash="dash", line_color="grey", row=1, col=1, annotation_text="random guess")
    fig.update_xaxes(title_text="depth (0 = embedding output, l+1 = after block l)")
    fig.update_yaxes(title_text="MAD / ((N²−1)/(3N))", row=1, col=1)
    fig.update_yaxes(title_text="R²", row=1, col=2)
    fig.update_layout(title="Haviv et al. 2022 reproduced: linear position probes per layer", template="plotly_white")
    return fig


def headline(table: pd.DataFrame) -> dict[str, dict[str, float | int | str]]:
    """Per model (ridge, without position 0): MAD at depth 0, best MAD and its depth, last-layer MAD, chance."""
    out = {}
    rows = table[(table["kind"] == "ridge") & (~table["with_pos0"].astype(bool)) & table["mad"].notna()]
    for model, g in rows.groupby("model", sort=False):
        best = g.loc[g["mad"].idxmin()]
        out[model] = {
            "chance_mad": round(float(g["mad_chance"].iloc[0]), 2),
            "mad_depth0": round(float(g.loc[g["depth"] == 0, "mad"].iloc[0]), 3),
            "best_mad": round(float(best["mad"]), 3),
            "best_depth": int(best["depth"]),
            "mad_last": round(float(g.loc[g["depth"].idxmax(), "mad"]), 3),
            "r2_depth0": round(float(g.loc[g["depth"] == 0, "r2"].iloc[0]), 4),
            "best_r2": round(float(g["r2"].max()), 4),
            "best_random_init_r2": round(float(g["control_random_init"].max()), 4),
            "max_shuffled_r2": round(float(g["control_shuffled"].max()), 4),
            "token_r2": round(float(g["control_token"].iloc[0]), 4),
            "best_selectivity": round(float(g["selectivity"].max()), 4),
            "n_layers": int(g["n_layers"].iloc[0]),
        }
    return out


def main(argv: Sequence[str] | None = None) -> dict:
    import posprobe as pp

    from posprobe.plots.probes import plot_probe_position

    def logistic_flag(parser) -> None:
        parser.add_argument("--logistic", action="store_true", help="also fit Haviv's classifier (slow: minutes)")

    args = parse_args(argv, __doc__.splitlines()[0], logistic_flag)
    out = Output(args.out, NAME, args)
    sizes = settings(args.quick)
    kinds = ["ridge", "logistic"] if args.logistic else ["ridge"]
    out.settings.update(sizes=sizes, kinds=kinds)
    parts = []
    for variant in ZOO_ORDER:
        model, note = load_zoo_model(variant, args.zoo_root)
        if model is None:
            parts.append(skipped_row(f"zoo:{variant}", note, position_scheme=variant))
            continue
        with tempfile.TemporaryDirectory(prefix="haviv-") as tmp:
            parts.append(probe_depths(model, **sizes["zoo"], seed=args.seed, kinds=kinds, tmp=tmp))
        print(f"[{NAME}] zoo:{variant} probed")
    smol = pp.load_model("smollm2-135m")
    with tempfile.TemporaryDirectory(prefix="haviv-") as tmp:
        parts.append(probe_depths(smol, **sizes["smollm2-135m"], seed=args.seed, kinds=kinds, tmp=tmp))
    table = pd.concat(parts, ignore_index=True)
    if "note" not in table:
        table["note"] = None
    out.table("probes", table)
    out.figure("probe_curves", figure(table))
    smol_rows = table[table["model"] == smol.info.name].assign(site="residual stream (depth)")
    out.figure("smollm2_r2_with_controls", plot_probe_position(smol_rows.assign(layer=smol_rows["depth"])))
    out.summary = headline(table)
    out.summary["skipped"] = {r.model: r.note for r in table[table["note"].notna()].itertuples()}
    return out.finish()


if __name__ == "__main__":
    main()
