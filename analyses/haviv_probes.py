"""Haviv et al. 2022: per-layer linear position probes across position schemes, with controls.

Published (1.3B models on the Pile, 1,024 positions, MAD lower is better): NoPE 337 at layer 0
(chance 341.3), best ≈16.5 in layers 4-7, 133 at the last layer; learned best 6.45 (layer 1);
sinusoidal 0.008 at layer 0; ALiBi best ≈52.7 (layer 11). Here: ridge probes (posprobe's
``probe_position``; MAD/accuracy from rounding the regression) on every residual stream
(depth 0 = embedding output = ``resid_pre.0``; depth l+1 = ``resid_post.l``) of the five zoo
models and SmolLM2, with shuffled-label, random-init and token-identity controls, split by
sequence, without position 0 (the BOS). MAD is compared with the random-guess (N²−1)/(3N).

Usage: ``python analyses/haviv_probes.py [--quick] [--out DIR] [--zoo-root DIR]``
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
from _common import ZOO_ORDER, Output, load_zoo_model, parse_args, skipped_row, with_notes

NAME = "haviv_probes"


def settings(quick: bool) -> dict[str, dict]:
    """Windows × tokens per model family; quick mode is sized for 2 CPU cores.

    ``layers``: the resid_post layers probed (None: all); ``logistic``: depths that also get Haviv's
    classifier (``"first"`` = depth 0 only), fitted on the first ``logistic_windows`` windows.
    """
    if quick:
        return {
            "zoo": {
                "n": 32,
                "seq_len": 128,
                "layers": None,
                "exclude_pos0": True,
                "logistic": "first",
                "logistic_windows": 32,
            },
            "smollm2-135m": {
                "n": 16,
                "seq_len": 128,
                "layers": [*range(0, 30, 3), 29],
                "exclude_pos0": True,
                "logistic": None,
                "logistic_windows": 0,
            },
        }
    return {
        "zoo": {
            "n": 256,
            "seq_len": 128,
            "layers": None,
            "exclude_pos0": "both",
            "logistic": "all",
            "logistic_windows": 64,
        },
        "smollm2-135m": {
            "n": 64,
            "seq_len": 256,
            "layers": None,
            "exclude_pos0": "both",
            "logistic": None,
            "logistic_windows": 0,
        },
    }


def probe_depths(
    model,
    n: int,
    seq_len: int,
    seed: int,
    tmp: str,
    layers: Sequence[int] | None = None,
    exclude_pos0: bool | str = "both",
    logistic: str | None = None,
    logistic_windows: int = 0,
    controls: Sequence[str] = ("shuffled", "random_init", "token"),
    prepend_bos: bool | None = None,
) -> pd.DataFrame:
    """Ridge-probe the embedding output and block outputs of ``model`` for position (controls: its random-init twin).

    With ``logistic`` ("first": depth 0 only; "all"), Haviv's multinomial classifier is fitted too, on the
    first ``logistic_windows`` windows and without controls (it costs ~100x a ridge fit).
    """
    import posprobe as pp
    from posprobe.extraction import extract

    batch = pp.data.text_windows(model, n=n, seq_len=seq_len, seed=seed, prepend_bos=prepend_bos)
    sites = ["resid_pre", "resid_post"]
    post_layers = list(range(model.info.n_layers)) if layers is None else list(layers)
    keys = {"resid_pre": [0], "resid_post": post_layers}
    real = extract(
        model, batch, sites, layers=sorted({0, *post_layers}), out=f"{tmp}/real", batch_size=8, progress=False
    )
    twin = model.random_init_copy(seed)
    rand = extract(
        twin, batch, sites, layers=sorted({0, *post_layers}), out=f"{tmp}/random", batch_size=8, progress=False
    )
    common = {"random_init_store": rand, "seed": seed, "exclude_pos0": exclude_pos0, "controls": tuple(controls)}
    parts = [
        pp.probe_position(real, site=site, layers=ls, **common).table.assign(site=site) for site, ls in keys.items()
    ]
    if logistic:
        k = min(logistic_windows, n)
        mask, toks, pos = real.attention_mask[:k], real.tokens[:k], real.position_ids[:k]
        for site, ls in keys.items():
            ls = ls if logistic == "all" else ([0] if site == "resid_pre" else [])
            if not ls:
                continue
            acts = {layer: real.get(site, layer)[:k] for layer in ls}
            res = pp.probe_position(
                acts,
                site=site,
                kind="logistic",
                controls=(),
                seed=seed,
                exclude_pos0=exclude_pos0,
                attention_mask=mask,
                tokens=toks,
                positions=pos,
            )
            parts.append(res.table.assign(site=site, n_windows_fit=k))
    table = pd.concat(parts, ignore_index=True)
    is_pre = table["site"] == "resid_pre"
    table["depth"] = table["layer"].astype(int) + (~is_pre).astype(int)
    table["depth_site"] = table["site"] + "." + table["layer"].astype(str)
    table["model"] = model.info.name + ("" if prepend_bos is None else f" ({'with' if prepend_bos else 'no'} BOS)")
    table["position_scheme"] = model.info.position_scheme
    table["prepend_bos"] = batch.prepend_bos
    table["n_windows"], table["seq_len"], table["n_layers"] = n, seq_len, model.info.n_layers
    table["mad_over_chance"] = table["mad"] / table["mad_chance"]
    # what always predicting the middle position scores: the floor a regression reaches with no signal
    table["mad_median_guess"] = table["n_positions"].map(lambda m: (m * m - (m % 2)) / (4 * m))
    return table.drop(columns=["neurons"]).sort_values(["kind", "include_pos0", "depth"], ignore_index=True)


def figure(table: pd.DataFrame) -> go.Figure:
    """MAD / chance and R² per depth for every model (ridge, without position 0); random-init control dotted."""
    fig = make_subplots(
        rows=1, cols=2, subplot_titles=("MAD / random-guess MAD (lower = more position)", "R² (held-out sequences)")
    )
    rows = table[(table["kind"] == "ridge") & (~table["include_pos0"].astype(bool))]
    for i, (model, g) in enumerate(rows.groupby("model", sort=False)):
        if g["r2"].isna().all():
            continue
        color = f"hsl({(i * 57) % 360},65%,45%)"
        hover = "depth %{x}<br>MAD %{customdata[0]:.2f} of chance %{customdata[1]:.1f}<extra>" + model + "</extra>"
        fig.add_trace(
            go.Scatter(
                x=g["depth"],
                y=g["mad_over_chance"],
                name=model,
                legendgroup=model,
                line={"color": color},
                customdata=g[["mad", "mad_chance"]].to_numpy(),
                hovertemplate=hover,
            ),
            row=1,
            col=1,
        )
        fig.add_trace(
            go.Scatter(x=g["depth"], y=g["r2"], name=model, legendgroup=model, showlegend=False, line={"color": color}),
            row=1,
            col=2,
        )
        fig.add_trace(
            go.Scatter(
                x=g["depth"],
                y=g["control_random_init"],
                name=f"{model} random-init control",
                legendgroup=model,
                showlegend=False,
                line={"color": color, "dash": "dot", "width": 1},
            ),
            row=1,
            col=2,
        )
    logistic = table[(table["kind"] == "logistic") & (~table["include_pos0"].astype(bool))]
    for model, g in logistic.groupby("model", sort=False):
        fig.add_trace(
            go.Scatter(
                x=g["depth"],
                y=g["mad_over_chance"],
                mode="markers",
                marker={"symbol": "x", "size": 9},
                name=f"{model} classifier (Haviv)",
                customdata=g[["mad", "accuracy"]].to_numpy(),
                hovertemplate="depth %{x}<br>MAD %{customdata[0]:.3f}<br>accuracy %{customdata[1]:.3f}<extra></extra>",
            ),
            row=1,
            col=1,
        )
    fig.add_hline(y=1.0, line_dash="dash", line_color="grey", row=1, col=1, annotation_text="random guess")
    fig.add_hline(y=0.75, line_dash="dot", line_color="grey", row=1, col=1, annotation_text="always the middle")
    fig.update_xaxes(title_text="depth (0 = embedding output, l+1 = after block l)")
    fig.update_yaxes(title_text="MAD / ((N²−1)/(3N))", row=1, col=1)
    fig.update_yaxes(title_text="R²", row=1, col=2)
    fig.update_layout(title="Haviv et al. 2022 reproduced: linear position probes per layer", template="plotly_white")
    return fig


def headline(table: pd.DataFrame) -> dict[str, dict[str, float | int | str]]:
    """Per model (ridge, without position 0): MAD at depth 0, best MAD and its depth, last-layer MAD, chance."""
    out = {}
    rows = table[(table["kind"] == "ridge") & (~table["include_pos0"].astype(bool)) & table["mad"].notna()]
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
            "mad_median_guess": round(float(g["mad_median_guess"].iloc[0]), 2),
        }
    logistic = table[(table["kind"] == "logistic") & (~table["include_pos0"].astype(bool))]
    for model, g in logistic.groupby("model", sort=False):
        out[model]["classifier"] = {
            f"depth{int(r.depth)}": {"accuracy": round(float(r.accuracy), 4), "mad": round(float(r.mad), 3)}
            for r in g.itertuples()
        }
    return out


def main(argv: Sequence[str] | None = None) -> dict:
    import posprobe as pp
    from posprobe.plots.probes import plot_probe_position

    args = parse_args(argv, __doc__.splitlines()[0])
    out = Output(args.out, NAME, args)
    sizes = settings(args.quick)
    out.settings.update(sizes=sizes)
    parts = []
    token_done = False
    for variant in ZOO_ORDER:
        model, note = load_zoo_model(variant, args.zoo_root)
        if model is None:
            parts.append(skipped_row(f"zoo:{variant}", note, position_scheme=variant))
            continue
        # the zoo models share tokenizer and text, so their token-identity baseline is one number: fit it once
        # in quick mode (it is most of a zoo model's ridge time)
        controls = ("shuffled", "random_init") if args.quick and token_done else ("shuffled", "random_init", "token")
        with tempfile.TemporaryDirectory(prefix="haviv-") as tmp:
            parts.append(probe_depths(model, **sizes["zoo"], seed=args.seed, tmp=tmp, controls=controls))
        token_done = True
        if variant == "none":
            # a NoPE model's position signal may ride on the constant BOS (an attention sink): probe without it
            with tempfile.TemporaryDirectory(prefix="haviv-") as tmp:
                no_bos = {**sizes["zoo"], "logistic": None}
                parts.append(
                    probe_depths(model, **no_bos, seed=args.seed, tmp=tmp, controls=controls, prepend_bos=False)
                )
        print(f"[{NAME}] zoo:{variant} probed")
    smol = pp.load_model("smollm2-135m")
    with tempfile.TemporaryDirectory(prefix="haviv-") as tmp:
        parts.append(probe_depths(smol, **sizes["smollm2-135m"], seed=args.seed, tmp=tmp))
    table = with_notes(parts)
    out.table("probes", table)
    out.figure("probe_curves", figure(table))
    smol_rows = table[table["model"] == smol.info.name].assign(site="residual stream (depth)")
    out.figure("smollm2_r2_with_controls", plot_probe_position(smol_rows.assign(layer=smol_rows["depth"])))
    out.summary = headline(table)
    out.summary["skipped"] = {r.model: r.note for r in table[table["note"].notna()].itertuples()}
    return out.finish()


if __name__ == "__main__":
    main()
