"""The zoo v2's tables for ``posprobe/zoo_checkpoints/README.md``: held-out loss, length generalisation, the curve.

Issue #21, point 3 ("report held-out loss and the length table as for v1"). For every v2 scheme that
has finished training (``zoo2_variants()``), beside its v1 namesake:

- held-out loss per source (sotu, the v1 units; the stdlib) with each source's unigram baseline,
  from ``train_state.json``'s final evaluation; weights size and training time;
- length generalisation as for v1 (``length_generalization``: 64 sotu held-out windows of 1,024
  tokens, buckets of 64, averaged over 256-position ranges, the sliding-window gap in brackets),
  the per-bucket table written to ``posprobe/zoo_checkpoints/v2/length_generalization.csv``;
- the training curve (``v2/curve.csv``: Sink^0.3_0 on natural text with BOS and held-out loss every
  500 steps) as one row per step.

Prints the three as Markdown tables. ``--skip-length`` leaves out the length table (the slow part:
~1 minute per model on 2 cores).

    python analyses/zoo2_tables.py
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import pandas as pd

#: 256-position ranges of the length table (n_ctx = 256: the first is inside the training context)
RANGES = ((0, 256), (256, 512), (512, 768), (768, 1024))


def heldout_table(schemes: Sequence[str]) -> pd.DataFrame:
    """One row per (zoo, scheme): held-out loss of sotu and the stdlib, unigram baselines, MB, training hours."""
    from posprobe.models.zoo import ZOO2_DIR, ZOO_DIR

    rows = []
    for scheme in schemes:
        for zoo, folder in (("v1", ZOO_DIR / scheme), ("v2", ZOO2_DIR / scheme)):
            state = json.loads((folder / "train_state.json").read_text())
            scores = state["eval"]
            stdlib = scores.get("by_source", {}).get("stdlib", {})
            rows.append(
                {
                    "zoo": zoo,
                    "scheme": scheme,
                    "steps": state["steps"],
                    "heldout_sotu": scores["heldout_loss"],
                    "unigram_sotu": scores["unigram_loss"],
                    "heldout_stdlib": stdlib.get("heldout_loss"),
                    "unigram_stdlib": stdlib.get("unigram_loss"),
                    "weights_mb": (folder / "model.safetensors").stat().st_size / 1e6,
                    "train_hours": state.get("elapsed_s", float("nan")) / 3600,
                }
            )
    return pd.DataFrame(rows)


def length_table(schemes: Sequence[str]) -> pd.DataFrame:
    """``length_generalization`` of the v2 models, as v1's table was made."""
    from posprobe.models.zoo import load_zoo2
    from posprobe.stats.length import length_generalization

    models = [load_zoo2(s) for s in schemes]
    return length_generalization(models, 64, max_len=1024, bucket=64, batch_size=8).table


def length_markdown(table: pd.DataFrame) -> str:
    """v1's layout: mean loss per 256-position range, the gap to the sliding window in brackets."""
    lines = ["| model | " + " | ".join(f"{a}-{b - 1}" for a, b in RANGES) + " |", "|---" * (len(RANGES) + 1) + "|"]
    for model, g in table.groupby("model", sort=False):
        cells = []
        for a, b in RANGES:
            part = g[(g["bucket_start"] >= a) & (g["bucket_end"] <= b)]
            if not part["available"].all():
                cells.append(f"n/a (window {part['window_loss'].mean():.3f})")
            elif a == 0:
                cells.append(f"{part['loss'].mean():.3f}")
            else:
                gap = part["gap"].mean()
                cells.append(f"{part['loss'].mean():.3f} ({'+' if gap >= 0 else '−'}{abs(gap):.3f})")
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def heldout_markdown(table: pd.DataFrame) -> str:
    lines = [
        "| scheme | v1 sotu (1,600 steps) | v2 sotu | v2 stdlib | unigram sotu / stdlib | v2 weights "
        "| v2 training (CPU, 1 thread) |",
        "|---|---|---|---|---|---|---|",
    ]
    for scheme, g in table.groupby("scheme", sort=False):
        v1, v2 = g[g["zoo"] == "v1"].iloc[0], g[g["zoo"] == "v2"].iloc[0]
        lines.append(
            f"| {scheme} | {v1.heldout_sotu:.3f} | {v2.heldout_sotu:.3f} | {v2.heldout_stdlib:.3f} | "
            f"{v2.unigram_sotu:.3f} / {v2.unigram_stdlib:.3f} | {v2.weights_mb:.2f} MB | {v2.train_hours:.2f} h |"
        )
    return "\n".join(lines)


def curve_markdown(curve: pd.DataFrame) -> str:
    """One row per step: Sink^0.3_0 (%) and held-out sotu / stdlib loss of each scheme."""
    schemes = list(dict.fromkeys(curve["scheme"]))
    head = "| step | " + " | ".join(f"{s}: sink % · sotu · stdlib" for s in schemes) + " |"
    lines = [head, "|---:" + "|---" * len(schemes) + "|"]
    for step, g in curve.groupby("step"):
        cells = []
        for s in schemes:
            r = g[g["scheme"] == s]
            cells.append(
                ""
                if r.empty
                else f"{r.sink_rate.iloc[0]:.1f} · {r.heldout_sotu.iloc[0]:.3f} · {r.heldout_stdlib.iloc[0]:.3f}"
            )
        lines.append(f"| {step:,} | " + " | ".join(cells) + " |")
    twins = curve.groupby("scheme", sort=False)["twin_sink_rate"].first()
    lines.append("")
    lines.append("Random-init twins: " + ", ".join(f"{s} {v:.1f} %" for s, v in twins.items()) + ".")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    from posprobe.models.zoo import ZOO2_DIR, zoo2_variants

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--skip-length", action="store_true", help="leave out the length table (the slow part)")
    args = parser.parse_args(list(argv) if argv is not None else None)
    done = list(zoo2_variants())
    curve_file = ZOO2_DIR / "curve.csv"
    if curve_file.exists():
        print("## Training curve\n")
        print(curve_markdown(pd.read_csv(curve_file)))
    if not done:
        print("\nNo zoo v2 scheme has finished training yet (analyses/zoo2_train.py).")
        return 0
    print("\n## Held-out loss\n")
    print(heldout_markdown(heldout_table(done)))
    if not args.skip_length:
        table = length_table(done)
        table.to_csv(ZOO2_DIR / "length_generalization.csv", index=False)
        print("\n## Length generalisation\n")
        print(length_markdown(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
