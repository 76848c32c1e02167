"""Attention-output variance vs position: the latent position signal of causal models without PE (Chi et al. 2023).

Chi, Fan, Rudnicky & Ramadge, "Latent positional information is in the self-attention
variance of transformer language models without positional embeddings" (ACL 2023): a causal
query at position t averages t + 1 value vectors, so with near-uniform attention the variance
across hidden units of the attention output shrinks like σ²/(t + 1) — already at random
initialisation. ``attention_variance`` measures that variance per layer (site ``attn_out``;
or per head on ``z``) and position, fits variance ∝ n_keys^(−a) with n_keys = t + 1 the
number of keys a causal query sees, and scores how well the variance alone orders the tokens
of a sequence (Spearman correlation with position), to set beside ``embedding_similarity``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, cast

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from posprobe.results import Result, RunInfo

if TYPE_CHECKING:
    import plotly.graph_objects as go
from posprobe.stats.streaming import Batch, Source, as_source, sem, spearman_rows

#: Sites ``attention_variance`` reads: the attention sub-block output, or each head's output.
VARIANCE_SITES = ("attn_out", "z")


@dataclass(frozen=True)
class AttentionVariance(Result):
    """Attention-output variance per layer (and head for ``z``) and position, with power-law fits.

    ``table``: layer, [head], position, n_keys (keys a causal query there sees: position + 1,
    capped by a sliding window), n_tokens, variance (across hidden units, mean over
    sequences), std (over sequences), sem. ``exponents``: per layer [and head] the fitted
    exponent a of variance ∝ n_keys^(−a) (log-log least squares over position ≥
    ``min_position``; Chi's law predicts a = 1), r2, log_intercept, n_positions; the same fit
    against the position index itself, variance ∝ position^(−a), over positions ≥ 1
    (``exponent_vs_position``, ``r2_vs_position``: it bends at small positions, so it reads
    below 1 on short sequences); and the Spearman correlation of
    variance with position within a sequence (mean ``spearman``, mean ``abs_spearman`` and
    its ``abs_spearman_sem``, over ``n_seqs`` sequences; tokens at position ≥ min_position).
    ``info``: the run record (``params``: min_position). Figure kinds: ``"curves"``.
    """

    FIGURES: ClassVar[Mapping[str, str]] = {"curves": "_curves_figure"}
    TABLES: ClassVar[Sequence[str]] = ("exponents",)

    table: pd.DataFrame
    exponents: pd.DataFrame
    info: RunInfo

    site = property(lambda self: self.info.site)
    min_position = property(lambda self: self.info.params["min_position"])
    causal = property(lambda self: self.info.causal)
    prepend_bos = property(lambda self: self.info.prepend_bos)
    model_name = property(lambda self: self.info.model)
    notes = property(lambda self: self.info.notes)

    def _curves_figure(self) -> go.Figure:
        """Variance vs number of visible keys on log-log axes, with the fitted power laws."""
        from posprobe.plots.attention import variance_curves

        return variance_curves(self.table, self.exponents, title=f"Attention-output variance of {self.model_name}")


def attention_variance(
    source: Any,
    tokens: Any = None,
    *,
    layers: int | Sequence[int] | None = None,
    batch_size: int = 8,
    site: str = "attn_out",
    min_position: int = 1,
    progress: bool = False,
) -> AttentionVariance:
    """Measure how the attention output's variance across hidden units falls with position (Chi et al. 2023).

    ``source``: a model (anything ``load_model`` accepts) run on ``tokens`` (TokenBatch, ids [n s] or texts), or
    a store holding ``site`` (``attn_out`` [n s d_model] or ``z`` [n s heads d_head], per head).
    Expect an exponent near 1 for a causal NoPE model at random initialisation. Position 0
    (often a BOS) is left out of the fit and the Spearman scores unless ``min_position=0``.
    """
    if site not in VARIANCE_SITES:
        raise ValueError(f"attention_variance reads site 'attn_out' or 'z', got {site!r}")
    if not isinstance(min_position, int) or min_position < 0:
        raise ValueError(f"min_position must be a non-negative int, got {min_position!r}")
    source = as_source(source, tokens)
    n_pos = source.n_positions
    if n_pos < min_position + 3:
        raise ValueError(
            f"sequences of {n_pos} token(s) leave fewer than 3 positions ≥ min_position={min_position} "
            "to fit a power law; use longer sequences"
        )
    layer_list = cast("list[int]", source.resolve_layers(site, layers))  # attn_out and z have layers
    sums = _VarianceSums(n_pos, min_position)
    source.stream(site, layer_list, sums.add, batch_size, progress, "attention variance")
    table = pd.concat([sums.table(layer, source) for layer in layer_list], ignore_index=True)
    exponents = pd.concat([sums.fit(layer, table, min_position) for layer in layer_list], ignore_index=True)
    if site == "attn_out":
        table = table.drop(columns="head")
        exponents = exponents.drop(columns="head")
    notes = (
        ()
        if source.causal
        else (
            f"{source.name} attends bidirectionally: every query sees every key, so Chi et al.'s 1/(t + 1) law "
            "does not apply; the fit is reported for comparison only",
        )
    )
    info = source.run_info(
        "attention_variance", site=site, layers=layer_list, notes=notes, params={"min_position": min_position}
    )
    return AttentionVariance(table, exponents, info)


class _VarianceSums:
    """Per layer: token counts [P], sums and sums of squares of the variance [heads P], per-sequence Spearman ρ."""

    def __init__(self, n_positions: int, min_position: int):
        self.p = n_positions
        self.min_position = min_position
        self.acc: dict[int, dict[str, Tensor]] = {}
        self.rho: dict[int, list[Tensor]] = {}

    def add(self, layer: int, act: Tensor, batch: Batch) -> None:
        """Fold one batch of ``attn_out`` [b s d] or ``z`` [b s heads d_head] into the sums."""
        if act.ndim == 3:
            act = act.unsqueeze(2)
        # the per-token variances are small [b s heads]: sum them on the CPU in float64
        var = act.float().var(-1, unbiased=False).cpu().double()
        b, s, n_heads = var.shape
        mask = batch.attention_mask.bool().cpu()
        pos = batch.position_ids.long().cpu().masked_fill(~mask, 0)
        if layer not in self.acc:
            self.acc[layer] = {
                "n": torch.zeros(self.p, dtype=torch.float64),
                "sum": torch.zeros(n_heads, self.p, dtype=torch.float64),
                "sumsq": torch.zeros(n_heads, self.p, dtype=torch.float64),
            }
            self.rho[layer] = []
        acc = self.acc[layer]
        w = mask.double().flatten()
        flat = var.reshape(b * s, n_heads) * w[:, None]
        idx = pos.flatten()
        acc["n"].index_add_(0, idx, w)
        acc["sum"].index_add_(1, idx, flat.T)
        acc["sumsq"].index_add_(1, idx, (flat * flat).T)
        for row in range(b):
            keep = mask[row] & (pos[row] >= self.min_position)
            if int(keep.sum()) >= 3:
                y = pos[row, keep].double()[:, None].expand(-1, n_heads)
                self.rho[layer].append(spearman_rows(var[row, keep], y))

    def table(self, layer: int, source: Source) -> pd.DataFrame:
        acc = self.acc[layer]
        keep = torch.nonzero(acc["n"] > 0).squeeze(1)
        n = acc["n"][keep]
        window = source.sliding_window(layer)
        n_keys = keep + 1 if not window else (keep + 1).clamp(max=window)
        frames = []
        for head in range(acc["sum"].shape[0]):
            mean = acc["sum"][head, keep] / n
            var_over_seqs = (acc["sumsq"][head, keep] / n - mean.square()).clamp(min=0) * n / (n - 1).clamp(min=1)
            std = var_over_seqs.sqrt()
            frames.append(
                pd.DataFrame(
                    {
                        "layer": layer,
                        "head": head,
                        "position": keep.numpy(),
                        "n_keys": n_keys.numpy(),
                        "n_tokens": n.numpy().astype(np.int64),
                        "variance": mean.numpy(),
                        "std": std.numpy(),
                        "sem": (std / n.sqrt()).numpy(),
                    }
                )
            )
        return pd.concat(frames, ignore_index=True)

    def fit(self, layer: int, table: pd.DataFrame, min_position: int) -> pd.DataFrame:
        rho = torch.stack(self.rho[layer]) if self.rho[layer] else torch.empty(0, self.acc[layer]["sum"].shape[0])
        rows = []
        for head, part in table[table["layer"] == layer].groupby("head"):
            part = part[(part["position"] >= min_position) & (part["variance"] > 0)]
            a, intercept, r2 = _power_law(part["n_keys"].to_numpy(float), part["variance"].to_numpy(float))
            from_one = part[part["position"] >= 1]
            a_pos, _, r2_pos = _power_law(from_one["position"].to_numpy(float), from_one["variance"].to_numpy(float))
            r = rho[:, head] if len(rho) else torch.empty(0)
            rows.append(
                {
                    "layer": layer,
                    "head": head,
                    "exponent": a,
                    "r2": r2,
                    "log_intercept": intercept,
                    "n_positions": len(part),
                    "exponent_vs_position": a_pos,
                    "r2_vs_position": r2_pos,
                    "spearman": float(r.mean()) if len(r) else np.nan,
                    "abs_spearman": float(r.abs().mean()) if len(r) else np.nan,
                    "abs_spearman_sem": sem(r.abs()),
                    "n_seqs": len(r),
                }
            )
        return pd.DataFrame(rows)


def _power_law(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Least-squares fit log y = c − a log x; returns (a, c, R²), NaNs with fewer than 2 distinct x."""
    if len(np.unique(x)) < 2:
        return np.nan, np.nan, np.nan
    lx, ly = np.log(x), np.log(y)
    slope, intercept = np.polyfit(lx, ly, 1)
    resid = ly - (slope * lx + intercept)
    total = ((ly - ly.mean()) ** 2).sum()
    r2 = 1.0 - (resid**2).sum() / total if total > 0 else np.nan
    return float(-slope), float(intercept), float(r2)
