"""Headline sentences computed from a score *and* its control, so no sentence says more than the controls allow.

Used by the report, the command line and ``summary.json``. The rules, one per analysis:

- **probes**: R² ≤ 0 at every layer → "not linearly decodable"; the best layer no more than
  ``MARGIN`` above the shuffled-label control → "no more than shuffled labels"; no layer more
  than ``MARGIN`` above the random-init twin → "no more than the random-init twin" (the
  architecture gives the position, not training); otherwise the best layer, with its gain over
  the twin, the layer where that gain is largest and at how many layers the twin keeps up. A twin
  whose R² is below 0 counts as 0 (it decodes nothing; its R² is not a floor to beat).
- **roles** (attention heads, RoPE heads) and **neurons**: each count beside the random-init
  twin's; a count that does not exceed the twin's is "no more than the random-init twin".
  Heads or neurons whose score is NaN are counted as undetermined, never as a role.
- **shift invariance**: the output change against float rounding (``SHIFT_TOLERANCE``): below
  it, position enters only relatively; above it, absolute position changes the output.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd

from posprobe.labels import UNDETERMINED

#: An R² gain at or below this is not a win over a control (the spread of 5-fold R² on a few thousand tokens).
MARGIN = 0.05
#: Mean KL (nats) at or below this is float rounding: the output did not move.
SHIFT_TOLERANCE = 1e-6
#: The same for a model without an LM head: mean |Δ| of its last hidden state.
HIDDEN_TOLERANCE = 1e-4


def probe_headline(table: pd.DataFrame, site: str = "resid_post", target: str = "absolute") -> str:
    """One sentence on ``table`` (``ProbeResult.table``): score, controls and the verdict they allow."""
    rows = _main_probe_rows(table, target)
    if rows.empty or rows["r2"].isna().all():
        return f"no {target}-position probe rows for {site}"
    rows = rows.sort_values("layer", kind="stable")
    best = rows.loc[rows["r2"].idxmax()]
    layer, r2 = _layer(best["layer"]), float(best["r2"])
    what = f"{target} position"
    if r2 <= 0:
        return (
            f"{what} is not linearly decodable from {site}: R² ≤ 0 at every layer (best {r2:.3f} at layer {layer}), "
            "no better than predicting the mean position"
        )
    score = f"best at layer {layer} (R² {r2:.3f}, MAE {float(best['mae']):.1f} tokens)"
    shuffled = float(best.get("control_shuffled", math.nan))
    if not math.isnan(shuffled) and r2 <= shuffled + MARGIN:
        return f"{what} is no more decodable from {site} than shuffled labels: {score} vs R² {shuffled:.3f} shuffled"
    twin = rows["control_random_init"] if "control_random_init" in rows else pd.Series(math.nan, index=rows.index)
    if twin.isna().all():
        return f"{what} is linearly decodable from {site}, {score}; the random-init control was not run"
    gain = rows["r2"] - twin.clip(lower=0)  # a twin below R² 0 decodes nothing: the floor is the mean, not its R²
    top = rows.loc[gain.idxmax()]
    top_gain, twin_best = float(gain.max()), float(twin.loc[best.name])
    if top_gain <= MARGIN:
        return (
            f"{what} is decodable from {site} ({score}) but no more than from the random-init twin (R² {twin_best:.3f} "
            f"there; the largest gain at any layer is {top_gain:+.3f}): the architecture, not training, provides it"
        )
    gain_at = (
        "" if top.name == best.name else f"; the largest gain is at layer {_layer(top['layer'])} ({top_gain:+.3f})"
    )
    matched = int((gain <= MARGIN).sum())
    if matched:
        gain_at += f"; the twin comes within {MARGIN:g} or above at {matched} of {len(rows)} layers"
    twin_text = f"R² {twin_best:.3f}" + (", below 0: it decodes nothing" if twin_best < 0 else "")
    return (
        f"{what} is linearly decodable from {site}, {score}: {r2 - max(twin_best, 0.0):+.3f} R² above the "
        f"random-init twin ({twin_text}){gain_at}; shuffled labels R² {shuffled:.3f}"
    )


def counts_headline(
    what: str,
    labels: pd.Series,
    twin_labels: pd.Series | None,
    order: Sequence[str],
    background: Sequence[str] = (),
) -> str:
    """Counts of each label beside the random-init twin's; ``background`` labels (fallbacks) are only counted.

    A label whose count does not exceed the twin's is said to be "no more than the random-init twin".
    """
    counts = labels.value_counts()
    twin = twin_labels.value_counts() if twin_labels is not None else None
    above, not_above, plain = [], [], []
    for label in order:
        n = int(counts.get(label, 0))
        if label in background or twin is None:
            if n or label not in background:
                plain.append(f"{n} {label}")
            continue
        t = int(twin.get(label, 0))
        if n > t:
            above.append(f"{n} {label} (random-init twin: {t})")
        elif n or t:
            not_above.append(f"{n} {label} (twin: {t})")
    parts = []
    if above:
        parts.append(", ".join(above))
    if not_above:
        parts.append("no more than the random-init twin: " + ", ".join(not_above))
    if plain:
        parts.append(", ".join(plain))
    undetermined = int(counts.get(UNDETERMINED, 0))
    if undetermined:
        parts.append(f"{undetermined} undetermined (a NaN score)")
    if twin is None:
        parts.append("no random-init control")
    return f"{what}: " + "; ".join(parts) if parts else f"{what}: none"


def roles_headline(roles: pd.DataFrame, twin_roles: pd.DataFrame | None, order: Sequence[str], fallback: str) -> str:
    """Head roles (``AttentionStats.roles`` or RoPE ``head_roles``) beside the random-init twin's."""
    twin = twin_roles["role"] if twin_roles is not None else None
    return counts_headline("head roles", roles["role"], twin, order, background=(fallback,))


def neurons_headline(table: pd.DataFrame, twin_table: pd.DataFrame | None) -> str:
    """Positional neurons (``PositionalNeurons.table``) beside the random-init twin's."""
    n, total = int(table["is_positional"].sum()), len(table)
    categories = table.loc[table["is_positional"], "category"].value_counts()
    kinds = ", ".join(f"{c} {k}" for k, c in categories.items())
    undetermined = int((table["category"] == UNDETERMINED).sum())
    tail = f"; {undetermined} undetermined (a NaN score)" if undetermined else ""
    if twin_table is None:
        return f"{n} of {total} MLP neurons are positional ({kinds or 'none'}); no random-init control{tail}"
    t = int(twin_table["is_positional"].sum())
    if n <= t:
        return (
            f"{n} of {total} MLP neurons are positional, no more than the random-init twin ({t}): "
            f"position dependence the architecture gives, not training{tail}"
        )
    return f"{n} of {total} MLP neurons are positional against {t} in the random-init twin; categories: {kinds}{tail}"


def shift_headline(table: pd.DataFrame, tolerance: float = SHIFT_TOLERANCE) -> str:
    """Whether shifting every position id moves the output (``shift_invariance``'s table), against float rounding."""
    if table.empty:
        return "no shift rows"
    logits = (table["output"] == "logits").all()
    value = table["kl"] if logits else table["mean_abs_logit_diff"]
    name = "KL" if logits else "mean |Δ hidden|"
    numbers = ", ".join(f"k={int(r.shift)}: {name} {v:.2e}" for r, v in zip(table.itertuples(), value, strict=True))
    if value.isna().any():
        return f"shift invariance undetermined ({numbers}: a NaN)"
    limit = tolerance if logits else HIDDEN_TOLERANCE
    if float(value.max()) <= limit:
        unit = "nats" if logits else ""
        return (
            f"the {'output' if logits else 'last hidden state'} does not move when every position id shifts "
            f"({numbers}; ≤ {limit:g} {unit} is float rounding): position enters only relatively"
        ).replace("  is", " is")
    what = "output" if logits else "last hidden state (no LM head)"
    return f"the {what} moves when every position id shifts ({numbers}): the model reads absolute position"


def _main_probe_rows(table: pd.DataFrame, target: str) -> pd.DataFrame:
    rows = table
    for column, value in (("target", target), ("kind", "ridge")):
        if column in rows:
            rows = rows[rows[column] == value]
    pos0 = "include_pos0" if "include_pos0" in rows else "with_pos0"  # with_pos0: its name in older tables
    if pos0 in rows and (~rows[pos0].astype(bool)).any():
        rows = rows[~rows[pos0].astype(bool)]
    return rows


def _layer(value) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else str(int(value))


__all__ = ["MARGIN", "SHIFT_TOLERANCE", "counts_headline", "neurons_headline", "probe_headline", "roles_headline",
           "shift_headline"]  # fmt: skip
