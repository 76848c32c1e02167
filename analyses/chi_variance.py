"""Chi et al. 2023: in a causal NoPE model the attention output's variance shrinks with position.

Published claim: averaging n = t + 1 value vectors gives variance ≈ σ²/n, so at random
initialisation the variance across hidden units of the attention output at position t falls
as 1/(t + 1) (exponent 1), and the shrinkage survives training. Here: posprobe's
``attention_variance`` (site ``attn_out``; fit of variance ∝ n_keys^(−a) over positions ≥ 1)
on the NoPE zoo model at initialisation (several seeds; real text and uniformly random tokens)
and after training, and on SmolLM2 (RoPE) trained and at initialisation for comparison.

Usage: ``python analyses/chi_variance.py [--quick] [--out DIR] [--zoo-root DIR]``
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import begin, load_zoo_model, skipped_row, with_notes

NAME = "chi_variance"


def settings(quick: bool) -> dict:
    if quick:
        return {"zoo": {"n": 16, "seq_len": 128}, "smol": {"n": 8, "seq_len": 128}, "init_seeds": [0]}
    return {"zoo": {"n": 64, "seq_len": 256}, "smol": {"n": 32, "seq_len": 512}, "init_seeds": [0, 1, 2]}


def measure(model, batch, state: str, tokens: str, seed: int | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """attention_variance of ``model`` on ``batch``: (per-position table, per-layer exponents), labelled."""
    import posprobe as pp

    res = pp.attention_variance(model, batch, site="attn_out", batch_size=8)
    label = {"model": model.info.name.split(" (")[0].split("[")[0], "state": state, "tokens": tokens, "init_seed": seed}
    table = res.table.assign(**label)
    exps = res.exponents.assign(**label, n_windows=batch.tokens.shape[0], seq_len=batch.tokens.shape[1])
    return table, exps


def exponent_figure(exps: pd.DataFrame) -> go.Figure:
    """Fitted exponent a (variance ∝ keys^−a) per layer; Chi's law predicts 1 at initialisation."""
    fig = go.Figure()
    rows = exps[exps["exponent"].notna()]
    for (model, state, tokens), g in rows.groupby(["model", "state", "tokens"], sort=False):
        g = g.groupby("layer", as_index=False).agg(
            exponent=("exponent", "mean"), sd=("exponent", "std"), r2=("r2", "mean")
        )
        fig.add_scatter(
            x=g["layer"],
            y=g["exponent"],
            mode="lines+markers",
            name=f"{model} · {state} · {tokens} tokens",
            error_y={"type": "data", "array": g["sd"].fillna(0), "visible": True},
            customdata=g[["r2"]].to_numpy(),
            hovertemplate="layer %{x}<br>exponent %{y:.3f}<br>fit R² %{customdata[0]:.3f}<extra></extra>",
        )
    fig.add_hline(y=1.0, line_dash="dash", line_color="grey", annotation_text="Chi et al.: 1/(t+1)")
    fig.update_layout(
        title="Attention-output variance ∝ (keys)^−a: fitted exponent a per layer",
        xaxis_title="layer",
        yaxis_title="exponent a",
        template="plotly_white",
        legend_title="model · state",
    )
    return fig


def headline(exps: pd.DataFrame) -> dict:
    out = {}
    for (model, state, tokens), g in exps[exps["exponent"].notna()].groupby(["model", "state", "tokens"], sort=False):
        per_layer = g.groupby("layer")["exponent"].mean()
        out[f"{model} · {state} · {tokens}"] = {
            "exponent_per_layer": [round(float(v), 3) for v in per_layer],
            "mean_exponent": round(float(per_layer.mean()), 3),
            "mean_fit_r2": round(float(g["r2"].mean()), 3),
            "mean_abs_spearman": round(float(g["abs_spearman"].mean()), 3),
        }
    return out


def main(argv: Sequence[str] | None = None) -> dict:
    import posprobe as pp
    from posprobe.plots.attention import variance_curves

    args, out, cfg = begin(argv, __doc__, NAME, settings)
    tables, exps = [], []

    def add(pair: tuple[pd.DataFrame, pd.DataFrame]) -> None:
        tables.append(pair[0])
        exps.append(pair[1])

    nope, note = load_zoo_model("none", args.zoo_root)
    if nope is None:
        exps.append(skipped_row("zoo:none", note))
    else:
        text = pp.data.text_windows(nope, **cfg["zoo"], seed=args.seed)
        rand = pp.data.random_tokens(nope, **cfg["zoo"], seed=args.seed)
        for seed in cfg["init_seeds"]:
            twin = nope.random_init_copy(seed)
            add(measure(twin, text, "init", "text", seed))
            add(measure(twin, rand, "init", "random", seed))
        add(measure(nope, text, "trained", "text", None))
        add(measure(nope, rand, "trained", "random", None))
    smol = pp.load_model("smollm2-135m")
    smol_text = pp.data.text_windows(smol, **cfg["smol"], seed=args.seed)
    add(measure(smol, smol_text, "trained", "text", None))
    add(measure(smol.random_init_copy(args.seed), smol_text, "init", "text", args.seed))
    table, exponents = pd.concat(tables, ignore_index=True), with_notes(exps)
    out.table("variance_by_position", table)
    out.table("exponents", exponents)
    out.figure("exponents_per_layer", exponent_figure(exponents))
    first_seed = table["init_seed"].isna() | (table["init_seed"] == table["init_seed"].min())
    for (model, state), g in table[(table["tokens"] == "text") & first_seed].groupby(["model", "state"], sort=False):
        fit = exponents[(exponents["model"] == model) & (exponents["state"] == state) & (exponents["tokens"] == "text")]
        fit = fit[fit["init_seed"].isna() | (fit["init_seed"] == g["init_seed"].min())]
        stem = f"curves_{model.replace(':', '_').replace('-', '_')}_{state}"
        out.figure(stem, variance_curves(g, fit, title=f"Attention-output variance, {model} ({state}, text)"))
    out.summary = headline(exponents)
    out.summary["skipped"] = {r.model: r.note for r in exponents[exponents["note"].notna()].itertuples()}
    return out.finish()


if __name__ == "__main__":
    main()
