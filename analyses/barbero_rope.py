"""Barbero et al. 2024: which RoPE frequencies do heads use, and can the lowest ones stop rotating?

Published (Gemma 7B): split each head's q and k into RoPE's 2-D planes; (1) the lowest
frequencies carry most of the norm (likely semantic channels), (2) the highest frequencies
build robust positional heads (diagonal, previous-token), (3) p-RoPE (the lowest fraction p of
frequencies stops rotating) matches or beats RoPE. Here, on SmolLM2-135M, Gemma 3 270M, the
RoPE zoo model and its p-RoPE twin (``zoo:p-rope``: trained with the same data, steps and seed,
its lowest 25 % of frequencies never rotating; the direct test of (3)): posprobe's
``rope_frequency_usage`` (each plane's share of the head's q·k norm product; head roles from
frequency use + attention pattern), and ``rope_ablation`` applied to the trained models at
inference: ``unrotate`` (p-RoPE post hoc) and ``zero`` (drop the planes)
for the lowest and, as a control, the highest fraction p. Barbero trained with p-RoPE; a
post-hoc ablation of a model trained with full RoPE is the closest test on the pretrained models.
On ``zoo:p-rope`` the ablations act on the planes that still rotate.

Usage: ``python analyses/barbero_rope.py [--quick] [--out DIR] [--zoo-root DIR]``
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import begin, load_zoo_model, skipped_row

NAME = "barbero_rope"
MODELS = ("smollm2-135m", "gemma-3-270m", "zoo:rope", "zoo:p-rope")


def settings(quick: bool) -> dict:
    """``ablations``: (mode, layer groups) pairs; "all" = every layer at once, "default" = all, thirds, local/global."""
    if quick:
        return {
            "usage": {"n": 4, "seq_len": 128},
            "ablation": {"n": 4, "seq_len": 128},
            "ps": [0.25, 0.5],
            "ablations": [["unrotate", "all"]],
        }
    return {
        "usage": {"n": 16, "seq_len": 256},
        "ablation": {"n": 8, "seq_len": 256},
        "ps": [0.25, 0.5],
        "ablations": [["unrotate", "default"], ["zero", "all"]],
    }


def band_shares(table: pd.DataFrame) -> pd.DataFrame:
    """Per model: mean over heads of the q·k norm share in each quarter of the rotary planes (by θ, highest first)."""
    rows = table[table["rotary"]].copy()
    rank = rows.groupby(["model", "layer", "head"])["theta"].rank(ascending=False, method="first") - 1
    n = rows.groupby(["model", "layer", "head"])["theta"].transform("size")
    rows["quarter"] = np.minimum((4 * rank // n).astype(int), 3)
    per_head = rows.groupby(["model", "layer", "head", "quarter"], as_index=False)[["share", "q_share"]].sum()
    out = per_head.groupby(["model", "quarter"], as_index=False).agg(
        share=("share", "mean"), q_share=("q_share", "mean"), n_heads=("share", "size")
    )
    out["band"] = out["quarter"].map({0: "highest θ (Q1)", 1: "Q2", 2: "Q3", 3: "lowest θ (Q4)"})
    return out


def band_figure(bands: pd.DataFrame) -> go.Figure:
    fig = go.Figure()
    for model, g in bands.groupby("model", sort=False):
        fig.add_bar(x=g["band"], y=g["share"], name=model, hovertemplate="%{x}: %{y:.3f}<extra>" + model + "</extra>")
    fig.add_hline(y=0.25, line_dash="dash", line_color="grey", annotation_text="uniform use")
    fig.update_layout(
        title="Share of the q·k norm product per quarter of RoPE frequencies (mean over heads)",
        xaxis_title="frequency band (rotary planes sorted by θ)",
        yaxis_title="share of Σ_planes |q||k|",
        barmode="group",
        template="plotly_white",
    )
    return fig


def positional_heads(roles: pd.DataFrame) -> pd.DataFrame:
    """High-band share of heads with a sharp fixed-offset pattern (prev-token or diagonal ≥ 0.5) vs all other heads."""
    r = roles.assign(pattern=roles[["prev_token_score", "diag_score"]].max(axis=1))
    r["sharp_pattern"] = r["pattern"] >= 0.5
    return r.groupby(["model", "sharp_pattern"], as_index=False).agg(
        n_heads=("head", "size"), high_freq_share=("high_freq_share", "mean"), low_freq_share=("low_freq_share", "mean")
    )


def headline(bands: pd.DataFrame, roles: pd.DataFrame, pos_heads: pd.DataFrame, loss: pd.DataFrame) -> dict:
    out: dict = {}
    for model, g in bands.groupby("model", sort=False):
        q = g.set_index("quarter")
        m = out.setdefault(model, {})
        m["share_lowest_quarter"] = round(float(q.loc[3, "share"]), 3)
        m["share_highest_quarter"] = round(float(q.loc[0, "share"]), 3)
        m["q_share_lowest_quarter"] = round(float(q.loc[3, "q_share"]), 3)
        m["roles"] = roles[roles["model"] == model]["role"].value_counts().to_dict()
        ph = pos_heads[pos_heads["model"] == model].set_index("sharp_pattern")
        m["sharp_pattern_heads"] = int(ph["n_heads"].get(True, 0))
        m["high_share_sharp_heads"] = round(float(ph["high_freq_share"].get(True, np.nan)), 3)
        m["high_share_other_heads"] = round(float(ph["high_freq_share"].get(False, np.nan)), 3)
        lo = loss[(loss["model"] == model) & (loss["group"] == "all")]
        m["base_loss"] = round(float(lo["base_loss"].iloc[0]), 4) if len(lo) else None
        m["delta_loss_all_layers"] = {
            f"{r.mode} {r.which} p={r.p}": round(float(r.delta_loss), 4) for r in lo.itertuples()
        }
    return out


def main(argv: Sequence[str] | None = None) -> dict:
    import posprobe as pp
    from posprobe.plots.rope import ablation_loss

    args, out, cfg = begin(argv, __doc__, NAME, settings)
    usage_tables, roles, losses, heads, skipped, trained_loss = [], [], [], [], {}, {}
    for name in MODELS:
        if name.startswith("zoo:"):
            model, note = load_zoo_model(name[4:], args.zoo_root)
            if model is None:
                skipped[name] = note
                continue
            # trained p-RoPE vs RoPE: the held-out eval posprobe.training recorded, read with the checkpoint
            trained_loss[name] = (model.info.extra.get("eval") or {}).get("heldout_loss")
        else:
            model = pp.load_model(name)
        usage_batch = pp.data.text_windows(model, **cfg["usage"], seed=args.seed)
        usage = pp.rope_frequency_usage(model, usage_batch, batch_size=4)
        usage_tables.append(usage.table.assign(model=name))
        roles.append(usage.head_roles.assign(model=name))
        stem = name.replace(":", "_").replace("-", "_")
        out.figure(f"usage_heatmap_{stem}", usage.figure())
        out.figure(f"head_roles_{stem}", usage.figure("roles"))
        abl_batch = pp.data.text_windows(model, **cfg["ablation"], seed=args.seed + 1)
        for mode, which_groups in cfg["ablations"]:
            groups = None if which_groups == "default" else {"all": tuple(range(model.info.n_layers))}
            abl = pp.rope_ablation(model, abl_batch, ps=cfg["ps"], layer_groups=groups, mode=mode, batch_size=2)
            losses.append(abl.table.assign(model=name))
            heads.append(abl.heads.assign(model=name))
            out.figure(f"ablation_loss_{stem}_{mode}", ablation_loss(abl.table))
        print(f"[{NAME}] {name} done")
        del model
    if not usage_tables:
        out.table("frequency_usage", pd.concat([skipped_row(m, n) for m, n in skipped.items()]))
        out.summary = {"skipped": skipped}
        return out.finish()
    usage_table, roles_table = pd.concat(usage_tables, ignore_index=True), pd.concat(roles, ignore_index=True)
    loss_table = pd.concat(losses, ignore_index=True)
    bands = band_shares(usage_table)
    pos_heads = positional_heads(roles_table)
    for m, note in skipped.items():
        bands = pd.concat([bands, skipped_row(m, note)], ignore_index=True)
    out.table("frequency_usage", usage_table)
    out.table("band_shares", bands)
    out.table("head_roles", roles_table)
    out.table("positional_heads_vs_frequency", pos_heads)
    out.table("ablation_loss", loss_table)
    out.table("ablation_heads", pd.concat(heads, ignore_index=True))
    out.figure("band_shares", band_figure(bands.dropna(subset=["share"])))
    out.summary = headline(bands.dropna(subset=["share"]), roles_table, pos_heads, loss_table)
    for name, loss in trained_loss.items():
        out.summary[name]["trained_heldout_loss"] = loss
    out.summary["skipped"] = skipped
    return out.finish()


if __name__ == "__main__":
    main()
