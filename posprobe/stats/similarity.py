"""Similarity of nearby embeddings vs distance: the position signal causal attention creates (Zuo et al. 2025).

Zuo et al. 2025, "Position information emerges in causal transformers without positional
encodings via similarity of nearby embeddings": after the first causal attention layer the
cosine similarity of two tokens' hidden states falls with their distance |i − j|, because
their attention outputs average overlapping prefixes. ``embedding_similarity`` measures, per
layer: mean cosine similarity vs distance; an adjacency score; and how well similarity alone
recovers token order. ``compare_position_predictors`` sets that order recovery beside the one
from attention-output variance (Chi et al. 2023, ``variance.py``) on the same footing.

Method for order recovery (spectral seriation, Atkins, Boman & Hendrickson 1998): per sequence,
take its tokens (evenly subsampled to at most ``max_spectral_tokens``), turn cosine distances
d = 1 − cos into a graph with the self-tuning Gaussian kernel of Zelnik-Manor & Perona 2004,
W_ij = exp(−d_ij² / (σ_i σ_j)) with σ_i the distance from token i to its ``n_neighbors``-th
most similar token, and order the tokens by the Fiedler vector (eigenvector of the
second-smallest eigenvalue of the Laplacian diag(W1) − W). If similarity falls with distance
the graph is a thickened path and this vector is monotone in position; the score is |Spearman ρ|
between it and the true positions (the sign is arbitrary), averaged over sequences. Only
similarities enter, never positions. The local scale matters: on the raw cosine matrix the
Fiedler vector isolates weakly connected early tokens (random-init NoPE, attn_out, 128 tokens:
|ρ| 0.67 raw vs 1.00 self-tuned), and unweighted k-NN graphs fold on some sequences.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pandas as pd
import scipy.linalg
import scipy.stats
import torch
import torch.nn.functional as F
from threadpoolctl import threadpool_limits
from torch import Tensor

from posprobe.results import Result, RunInfo, deprecated_alias
from posprobe.stats.streaming import Batch, Source, as_source, sem
from posprobe.stats.variance import AttentionVariance

if TYPE_CHECKING:
    import plotly.graph_objects as go


@dataclass(frozen=True)
class EmbeddingSimilarity(Result):
    """Cosine similarity vs distance per layer, adjacency and order recovery (``embedding_similarity``).

    ``table``: layer, distance, include_pos0, cos_sim (mean over token pairs at that distance),
    cos_sim_std, n_pairs. ``summary``: per layer and include_pos0: adjacency (share of tokens
    whose most similar other token is an immediate neighbour), adjacency_chance (the share a
    random choice would reach), spectral_spearman (|ρ| of the spectral order with position,
    mean over sequences), spectral_spearman_sem, n_seqs. ``info``: the run record (``params``:
    max_distance, max_spectral_tokens, n_neighbors). Figure kinds: ``"curves"`` (option
    ``include_pos0``, default False).
    """

    FIGURES: ClassVar[Mapping[str, str]] = {"curves": "_curves_figure"}
    TABLES: ClassVar[Sequence[str]] = ("summary",)

    table: pd.DataFrame
    summary: pd.DataFrame
    info: RunInfo

    site = property(lambda self: self.info.site)
    max_spectral_tokens = property(lambda self: self.info.params["max_spectral_tokens"])
    n_neighbors = property(lambda self: self.info.params["n_neighbors"])
    causal = property(lambda self: self.info.causal)
    prepend_bos = property(lambda self: self.info.prepend_bos)
    model_name = property(lambda self: self.info.model)

    def figure(self, kind: str | None = None, **options: Any) -> go.Figure:
        """Draw the figure ``kind`` (default ``"curves"``); ``figure(include_pos0)`` still works one release."""
        if isinstance(kind, bool):
            deprecated_alias("EmbeddingSimilarity.figure(include_pos0)", 'figure("curves", include_pos0=...)')
            kind, options = None, {"include_pos0": kind, **options}
        return super().figure(kind, **options)

    def _curves_figure(self, include_pos0: bool = False) -> go.Figure:
        """Mean cosine similarity vs distance, one curve per layer."""
        from posprobe.plots.attention import similarity_curves

        return similarity_curves(
            self.table, include_pos0=include_pos0, title=f"Similarity of nearby {self.site} vectors, {self.model_name}"
        )


def embedding_similarity(
    source: Any,
    tokens: Any = None,
    *,
    site: str = "resid_post",
    layers: int | Sequence[int] | None = None,
    max_distance: int | None = None,
    batch_size: int = 8,
    max_spectral_tokens: int = 512,
    n_neighbors: int = 3,
    progress: bool = False,
) -> EmbeddingSimilarity:
    """Measure how the cosine similarity of hidden states falls with token distance (Zuo et al. 2025).

    ``source``: a model (anything ``load_model`` accepts) run on ``tokens`` or a store holding ``site`` (any
    per-token vector site [n s d]: resid_*, attn_out, mlp_out, mlp_post, embed). ``max_distance``
    crops the distance table; ``max_spectral_tokens`` and ``n_neighbors`` set the order recovery
    (module docstring). Every statistic comes with and without position 0 (a BOS is an
    outlier vector). Memory: one batch's similarity matrices [b s s] at a time.
    """
    if not isinstance(max_spectral_tokens, int) or max_spectral_tokens < 3:
        raise ValueError(f"max_spectral_tokens must be an int ≥ 3, got {max_spectral_tokens!r}")
    if not isinstance(n_neighbors, int) or n_neighbors < 1:
        raise ValueError(f"n_neighbors must be a positive int, got {n_neighbors!r}")
    if max_distance is not None and max_distance < 1:
        raise ValueError(f"max_distance must be ≥ 1 or None, got {max_distance}")
    source = as_source(source, tokens)
    n_pos = source.n_positions
    if n_pos < 3:
        raise ValueError(f"sequences of {n_pos} token(s) have no distances to compare; use at least 3 tokens")
    layer_list = source.resolve_layers(site, layers)
    sums = _SimilaritySums(n_pos, max_spectral_tokens, n_neighbors)
    source.stream(site, layer_list, sums.add, batch_size, progress, "embedding similarity")
    sums.reduce(source)
    table = pd.concat([sums.table(layer, inc) for layer in layer_list for inc in (True, False)], ignore_index=True)
    if max_distance is not None:
        table = table[table["distance"] <= max_distance].reset_index(drop=True)
    summary = pd.DataFrame([sums.summary(layer, inc) for layer in layer_list for inc in (True, False)])
    params = {"max_distance": max_distance, "max_spectral_tokens": max_spectral_tokens, "n_neighbors": n_neighbors}
    info = source.run_info("embedding_similarity", site=site, layers=layer_list, exclude_pos0="both", params=params)
    return EmbeddingSimilarity(table, summary, info)


class _SimilaritySums:
    """Per layer: cosine sums / squares / counts per distance [P] (all pairs, and pairs with position 0),
    adjacency hits and chance per variant, and per-sequence spectral |ρ|."""

    def __init__(self, n_positions: int, max_spectral_tokens: int, n_neighbors: int):
        self.p = n_positions
        self.max_spectral = max_spectral_tokens
        self.n_neighbors = n_neighbors
        self.acc: dict[int | None, dict[str, Tensor]] = {}
        self.rho: dict[int | None, list[list[float]]] = {}
        self.rows: dict[int | None, list[list[int]]] = {}  # the sequence each rho was read from

    def add(self, layer: int | None, x: Tensor, batch: Batch) -> None:
        """Fold one batch of vectors [b s d] into the sums."""
        if x.ndim != 3:
            raise ValueError(f"embedding_similarity needs one vector per token [b s d], got shape {tuple(x.shape)}")
        b = x.shape[0]
        xn = F.normalize(x.float(), dim=-1)
        cos = xn @ xn.transpose(1, 2)  # [b s s]
        mask = batch.attention_mask.bool()
        pos = batch.position_ids.long().masked_fill(~mask, 0)
        delta = pos[:, :, None] - pos[:, None, :]
        pair = mask[:, :, None] & mask[:, None, :]
        lower = pair & (delta > 0)
        is0 = mask & (pos == 0)
        has0 = is0.any(-1)
        col0 = is0.float().argmax(-1)
        rows = torch.arange(b, device=x.device)
        with0 = lower[rows, :, col0] & has0[:, None]  # [b s] pairs (i, key at position 0)
        c0 = cos[rows, :, col0]
        idx = delta.clamp(min=0).flatten()
        part = torch.zeros(6, self.p, device=x.device)  # float32 per batch, float64 across batches
        for k, (weight, values) in enumerate(((lower, cos), (with0, c0))):
            w = weight.float().flatten()
            v = values.flatten() * w
            ix = idx if values is cos else pos.flatten()
            part[3 * k].index_add_(0, ix, v)
            part[3 * k + 1].index_add_(0, ix, v * values.flatten())
            part[3 * k + 2].index_add_(0, ix, w)
        adjacency = torch.stack([_adjacency(cos, pair, delta, mask, is0, drop0) for drop0 in (False, True)])
        if layer not in self.acc:
            self.acc[layer] = {
                "dist": torch.zeros(6, self.p, dtype=torch.float64),
                "adj": torch.zeros(2, 3, dtype=torch.float64),
            }
            self.rho[layer] = [[], []]
            self.rows[layer] = [[], []]
        self.acc[layer]["dist"] += part.double().cpu()
        self.acc[layer]["adj"] += adjacency.double().cpu()
        # one BLAS thread: small LAPACK calls between torch's OpenMP regions otherwise fight for the cores (~20x slower)
        with threadpool_limits(limits=1, user_api="blas"):
            for row in range(b):
                for k, drop0 in enumerate((False, True)):
                    keep = mask[row] & ~(is0[row] & drop0)
                    rho = _spectral_rho(cos[row], pos[row], keep, self.max_spectral, self.n_neighbors)
                    if rho is not None:
                        self.rho[layer][k].append(rho)
                        self.rows[layer][k].append(batch.start + row)

    def reduce(self, source: Source) -> None:
        """Merge the sums of the ranks reading one store: sums added, per-sequence scores in sequence order."""
        if source.store is None or not source.ranks.active:
            return
        layers = sorted(self.acc, key=str)
        source.reduce(t for layer in layers for _, t in sorted(self.acc[layer].items()))
        for layer in layers:
            for k in range(2):
                mine = list(zip(self.rows[layer][k], self.rho[layer][k], strict=True))
                merged = sorted(pair for part in source.ranks.gather(mine) for pair in part)
                self.rows[layer][k] = [row for row, _ in merged]
                self.rho[layer][k] = [rho for _, rho in merged]

    def table(self, layer: int | None, include_pos0: bool) -> pd.DataFrame:
        d = self.acc[layer]["dist"]
        total, sq, n = (d[0], d[1], d[2]) if include_pos0 else (d[0] - d[3], d[1] - d[4], d[2] - d[5])
        keep = torch.nonzero(n > 0.5).squeeze(1)
        n_k = n[keep]
        mean = total[keep] / n_k
        std = (sq[keep] / n_k - mean.square()).clamp(min=0).sqrt()
        return pd.DataFrame(
            {
                "layer": layer,
                "distance": keep.numpy(),
                "include_pos0": include_pos0,
                "cos_sim": mean.numpy(),
                "cos_sim_std": std.numpy(),
                "n_pairs": n_k.numpy().round().astype(np.int64),
            }
        )

    def summary(self, layer: int | None, include_pos0: bool) -> dict[str, Any]:
        hits, chance, n = self.acc[layer]["adj"][0 if include_pos0 else 1].tolist()
        rho = torch.tensor(self.rho[layer][0 if include_pos0 else 1], dtype=torch.float64)
        return {
            "layer": layer,
            "include_pos0": include_pos0,
            "adjacency": hits / n if n else np.nan,
            "adjacency_chance": chance / n if n else np.nan,
            "spectral_spearman": float(rho.mean()) if len(rho) else np.nan,
            "spectral_spearman_sem": sem(rho),
            "n_seqs": len(rho),
        }


def _adjacency(cos: Tensor, pair: Tensor, delta: Tensor, mask: Tensor, is0: Tensor, drop0: bool) -> Tensor:
    """(hits, chance, n): tokens whose most similar other token is at |Δ| = 1, the chance share, token count."""
    s = cos.shape[-1]
    cand = pair & ~torch.eye(s, dtype=torch.bool, device=cos.device)
    queries = mask.clone()
    if drop0:
        cand &= ~is0[:, None, :]
        queries &= ~is0
    n_cand = cand.sum(-1)
    queries &= n_cand > 0
    best = cos.masked_fill(~cand, float("-inf")).argmax(-1, keepdim=True)
    hit = delta.abs().gather(-1, best).squeeze(-1) == 1
    neighbours = (cand & (delta.abs() == 1)).sum(-1)
    chance = neighbours.float() / n_cand.clamp(min=1).float()
    q = queries.float()
    return torch.stack([(hit.float() * q).sum(), (chance * q).sum(), q.sum()])


def _spectral_rho(cos: Tensor, pos: Tensor, keep: Tensor, max_tokens: int, n_neighbors: int) -> float | None:
    """|Spearman ρ| between the Fiedler vector of one sequence's self-tuning similarity graph and position.

    Runs in numpy: these matrices are small, and torch's thread pool costs more than the work here.
    """
    idx = torch.nonzero(keep).squeeze(1)
    if len(idx) < 3:
        return None
    if len(idx) > max_tokens:
        idx = idx[torch.linspace(0, len(idx) - 1, max_tokens).round().long().to(idx.device)]
    dist = np.clip(1.0 - cos[idx][:, idx].cpu().double().numpy(), 0.0, None)
    k = min(n_neighbors, len(idx) - 1)
    others = dist + np.diag(np.full(len(idx), np.inf))
    scale = np.maximum(np.partition(others, k - 1, axis=1)[:, k - 1], 1e-12)
    weights = np.exp(-np.square(dist) / np.outer(scale, scale))
    np.fill_diagonal(weights, 0.0)
    laplacian = np.diag(weights.sum(1)) - weights
    # only the two smallest eigenpairs are needed; LAPACK's subset driver is ~10x faster than a full eigh
    _, vectors = scipy.linalg.eigh(laplacian, subset_by_index=[0, 1], driver="evr")
    rho = scipy.stats.spearmanr(vectors[:, 1], pos[idx].cpu().numpy()).statistic
    return abs(float(rho))


def compare_position_predictors(variance: AttentionVariance, similarity: EmbeddingSimilarity) -> pd.DataFrame:
    """Which signal orders tokens better per layer: attention-output variance or embedding similarity?

    Both scores are |Spearman ρ| between a within-sequence ordering and true position, averaged
    over sequences, without position 0: variance ranks tokens by their attention-output variance
    (Chi et al. 2023), similarity by spectral seriation (Zuo et al. 2025 report that similarity
    predicts position better). Rows: layer, predictor, site, abs_spearman, sem, n_seqs; the
    column ``best`` marks the better predictor of each layer.
    """
    if variance.site != "attn_out":
        raise ValueError(
            f"compare_position_predictors needs attention_variance on site 'attn_out', got {variance.site!r}"
        )
    v = variance.exponents
    sim = similarity.summary[~similarity.summary["include_pos0"]]
    rows = [
        {
            "layer": r.layer,
            "predictor": "attention_variance",
            "site": variance.site,
            "abs_spearman": r.abs_spearman,
            "sem": r.abs_spearman_sem,
            "n_seqs": r.n_seqs,
        }
        for r in v.itertuples(index=False)
    ] + [
        {
            "layer": r.layer,
            "predictor": "embedding_similarity",
            "site": similarity.site,
            "abs_spearman": r.spectral_spearman,
            "sem": r.spectral_spearman_sem,
            "n_seqs": r.n_seqs,
        }
        for r in sim.itertuples(index=False)
    ]
    out = pd.DataFrame(rows).sort_values(["layer", "predictor"], ignore_index=True)
    best = out.groupby("layer")["abs_spearman"].transform("max")
    out["best"] = out["abs_spearman"] == best
    return out
