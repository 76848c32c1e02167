"""Kazemnejad et al. 2023: length generalisation by position scheme (train short, test long).

Published: decoder-only ~107M models trained on algorithmic tasks of length ≤ 20 and tested to
40; NoPE generalises best, then T5's relative bias; ALiBi and RoPE degrade; absolute sinusoidal
fails. Here: posprobe's ``length_generalization``, held-out sotu loss per 64-token position
bucket up to 4× the training context (256 → 1,024 tokens) for the five zoo models (language
modelling, not algorithmic tasks). Learned and sinusoidal absolute positions cannot run past
their table and are reported unavailable there.

Usage: ``python analyses/kazemnejad_length.py [--quick] [--out DIR] [--zoo-root DIR]``
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ZOO_ORDER, Output, load_zoo_model, parse_args, skipped_row  # noqa: E402

NAME = "kazemnejad_length"


def settings(quick: bool) -> dict:
    return {"n": 4 if quick else 48, "length_factor": 4, "bucket": 64}


def headline(table: pd.DataFrame) -> dict:
    """Per model: mean loss inside the training context, and in each further context-length span."""
    out = {}
    for model, g in table.dropna(subset=["loss"]).groupby("model", sort=False):
        n_ctx = int(g["n_ctx"].iloc[0])
        spans = {}
        for k in range(4):
            part = g[(g["bucket_start"] >= k * n_ctx) & (g["bucket_start"] < (k + 1) * n_ctx)]
            if len(part):
                spans[f"{k * n_ctx}-{(k + 1) * n_ctx - 1}"] = round(
                    float((part["loss"] * part["n_tokens"]).sum() / part["n_tokens"].sum()), 4
                )
        inside = spans.get(f"0-{n_ctx - 1}")
        beyond = [v for k, v in spans.items() if not k.startswith("0-")]
        out[model] = {
            "loss_by_span": spans,
            "degradation_beyond_context": round(max(beyond) - inside, 4) if beyond and inside else None,
            "runs_past_context": bool(beyond),
        }
    return out


def main(argv: Sequence[str] | None = None) -> dict:
    import posprobe as pp
    from posprobe.plots.length import length_generalization_figure

    args = parse_args(argv, __doc__.splitlines()[0])
    out = Output(args.out, NAME, args)
    cfg = settings(args.quick)
    out.settings.update(cfg)
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
        table = pp.length_generalization(
            models, cfg["n"], max_len=cfg["length_factor"] * n_ctx, bucket=cfg["bucket"], batch_size=4, seed=args.seed
        )
        parts.insert(0, table)
    table = pd.concat(parts, ignore_index=True)
    if "note" not in table:
        table["note"] = None
    out.table("loss_by_position", table)
    done = table.dropna(subset=["loss"])
    if len(done):
        title = "Kazemnejad et al. 2023 on the zoo: held-out loss by position, trained on 256 tokens"
        out.figure("loss_by_position", length_generalization_figure(done, title=title))
    out.summary = headline(table)
    out.summary["skipped"] = {r.model: r.note for r in table[table["note"].notna()].drop_duplicates("model").itertuples()}
    return out.finish()


if __name__ == "__main__":
    main()
