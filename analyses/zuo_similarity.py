"""Zuo et al. 2025: without position encodings, nearby tokens' hidden states are more similar.

Published claim: in a causal NoPE transformer the cosine similarity of the hidden states at
positions i and j falls with |i − j|; the first causal attention layer creates it (already at
random initialisation); it predicts position better than attention-output variance (Chi et al.
2023). Here: posprobe's ``embedding_similarity`` on the NoPE zoo model, random-init twin vs
trained, at the token embedding (``embed``) and every block output (``resid_post``): similarity
vs distance, adjacency (is a token's most similar other token its neighbour?) and spectral order
recovery (|Spearman ρ|); then ``compare_position_predictors`` against ``attention_variance``
on the same tokens (similarity read at ``attn_out`` and at ``resid_post``).

Usage: ``python analyses/zuo_similarity.py [--quick] [--out DIR] [--zoo-root DIR]``
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import begin, load_zoo_model, skipped_row

NAME = "zuo_similarity"


def settings(quick: bool) -> dict:
    if quick:
        return {"n": 16, "seq_len": 128}
    return {"n": 64, "seq_len": 256}


def analyse(model, batch, state: str) -> dict[str, pd.DataFrame]:
    """Similarity (embed + resid_post + attn_out), variance and the predictor comparison for one model."""
    import posprobe as pp
    from posprobe.stats.similarity import compare_position_predictors

    label = {"model": "zoo:none", "state": state}
    emb = pp.embedding_similarity(model, batch, site="embed")
    post = pp.embedding_similarity(model, batch, site="resid_post")
    attn = pp.embedding_similarity(model, batch, site="attn_out")
    var = pp.attention_variance(model, batch, site="attn_out")

    def with_depth(df: pd.DataFrame, site: str) -> pd.DataFrame:
        depth = 0 if site == "embed" else df["layer"].astype(int) + 1
        return df.assign(site=site, depth=depth, **label)

    similarity = pd.concat(
        [with_depth(emb.table, "embed"), with_depth(post.table, "resid_post"), with_depth(attn.table, "attn_out")],
        ignore_index=True,
    )
    summary = pd.concat(
        [
            with_depth(emb.summary, "embed"),
            with_depth(post.summary, "resid_post"),
            with_depth(attn.summary, "attn_out"),
        ],
        ignore_index=True,
    )
    compare = pd.concat(
        [
            compare_position_predictors(var, attn).assign(similarity_site="attn_out"),
            compare_position_predictors(var, post).assign(similarity_site="resid_post"),
        ],
        ignore_index=True,
    ).assign(**label)
    return {"similarity": similarity, "summary": summary, "compare": compare}


def figure(similarity: pd.DataFrame, summary: pd.DataFrame) -> go.Figure:
    """Left: cosine vs distance per depth (resid_post + embed), init dashed, trained solid. Right: adjacency."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("cosine similarity vs distance", "adjacency vs chance"))
    rows = similarity[(~similarity["include_pos0"].astype(bool)) & similarity["site"].isin(["embed", "resid_post"])]
    for (state, depth), g in rows.groupby(["state", "depth"], sort=True):
        color = f"hsl({(int(depth) * 70) % 360},65%,45%)"
        fig.add_scatter(
            x=g["distance"],
            y=g["cos_sim"],
            mode="lines",
            name=f"{state} · depth {depth}",
            line={"dash": "dash" if state == "init" else "solid", "color": color},
            row=1,
            col=1,
        )
    summ = summary[(~summary["include_pos0"].astype(bool)) & summary["site"].isin(["embed", "resid_post"])]
    for state, g in summ.groupby("state", sort=False):
        fig.add_bar(x=g["depth"].astype(str), y=g["adjacency"], name=f"adjacency · {state}", row=1, col=2)
    fig.add_scatter(
        x=summ["depth"].astype(str),
        y=summ["adjacency_chance"],
        mode="markers",
        name="chance",
        marker={"symbol": "line-ew-open", "size": 18, "color": "black"},
        row=1,
        col=2,
    )
    fig.update_xaxes(title_text="distance |i − j| (tokens)", type="log", row=1, col=1)
    fig.update_xaxes(title_text="depth (0 = token embedding, l+1 = after block l)", row=1, col=2)
    fig.update_yaxes(title_text="mean cosine similarity", row=1, col=1)
    fig.update_yaxes(title_text="share of tokens whose nearest neighbour is adjacent", row=1, col=2)
    fig.update_layout(
        title="Zuo et al. 2025 reproduced on the NoPE zoo model", template="plotly_white", barmode="group"
    )
    return fig


def headline(similarity: pd.DataFrame, summary: pd.DataFrame, compare: pd.DataFrame) -> dict:
    out = {}
    sim = similarity[~similarity["include_pos0"].astype(bool)]
    summ = summary[~summary["include_pos0"].astype(bool)]
    for (state, site), g in summ.groupby(["state", "site"], sort=False):
        s = sim[(sim["state"] == state) & (sim["site"] == site)]
        near = s[s["distance"] == 1].set_index("depth")["cos_sim"]
        far = s[s["distance"] == s["distance"].max() // 2].set_index("depth")["cos_sim"]
        out[f"{state} · {site}"] = {
            "depth": g["depth"].tolist(),
            "cos_d1": [round(float(v), 3) for v in near.reindex(g["depth"])],
            f"cos_d{int(s['distance'].max() // 2)}": [round(float(v), 3) for v in far.reindex(g["depth"])],
            "adjacency": [round(float(v), 3) for v in g["adjacency"]],
            "adjacency_chance": round(float(g["adjacency_chance"].mean()), 4),
            "spectral_spearman": [round(float(v), 3) for v in g["spectral_spearman"]],
        }
    for (state, site), g in compare.groupby(["state", "similarity_site"], sort=False):
        piv = g.pivot_table(index="layer", columns="predictor", values="abs_spearman")
        out[f"{state} · variance vs similarity({site})"] = {
            col: [round(float(v), 3) for v in piv[col]] for col in piv.columns
        }
    return out


def main(argv: Sequence[str] | None = None) -> dict:
    import posprobe as pp
    from posprobe.plots.attention import position_predictor_comparison

    args, out, cfg = begin(argv, __doc__, NAME, settings)
    nope, note = load_zoo_model("none", args.zoo_root)
    if nope is None:
        out.table("similarity", skipped_row("zoo:none", note))
        out.summary = {"skipped": {"zoo:none": note}}
        return out.finish()
    batch = pp.data.text_windows(nope, **cfg, seed=args.seed)
    parts = [analyse(nope.random_init_copy(args.seed), batch, "init"), analyse(nope, batch, "trained")]
    similarity, summary, compare = (pd.concat([p[k] for p in parts], ignore_index=True) for k in parts[0])
    out.table("similarity_vs_distance", similarity)
    out.table("adjacency_and_order", summary)
    out.table("variance_vs_similarity", compare)
    out.figure("similarity_vs_distance", figure(similarity, summary))
    for state in ("init", "trained"):
        for site in ("attn_out", "resid_post"):
            g = compare[(compare["state"] == state) & (compare["similarity_site"] == site)]
            title = f"Order recovery, NoPE {state}: attention variance vs similarity at {site}"
            out.figure(f"predictors_{state}_{site}", position_predictor_comparison(g, title=title))
    out.summary = headline(similarity, summary, compare)
    return out.finish()


if __name__ == "__main__":
    main()
