"""Per-head attention diagnostics: entropy, attended distance, sinks, previous-token and local heads, head roles.

``attention_stats(model, tokens)`` measures every head of every layer from its attention
probabilities (site ``pattern`` [b heads s t]) without ever storing a map: a pattern hook
folds each batch into running sums and returns None, so only one layer's pattern exists at
a time and 4k-token sequences on SmolLM2 run in bounded memory. The sums are, per layer and
head, in float64: per query position (entropy, entropy / log(visible keys), mass on the
first token) and per signed distance Δ = query position − key position (attention mass and
the number of (query, key) pairs at Δ). Previous-token, diagonal and local-window scores
and the mean attended distance are read off the per-distance sums.

Attention sinks (Xiao et al. 2023, "Efficient streaming language models with attention
sinks"; RESEARCH.md §6): the first token draws large attention whatever its content. A
causal query at position 0 can only attend to itself, so every metric is reported with and
without queries at position 0 (``include_pos0``), together with whether a BOS was prepended.
Head roles (previous-token, sink, local/positional, broad/semantic) follow the rules of
``HeadRoleRules``, read on the metrics without position 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, cast

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

from posprobe.data import TokenBatch
from posprobe.finite import undetermined
from posprobe.labels import ROLES, UNDETERMINED
from posprobe.results import DataFrameAlias, Result, RunInfo, deprecated_alias
from posprobe.stats.streaming import Batch, LayerOutOfRange, Source, as_source

if TYPE_CHECKING:
    import plotly.graph_objects as go

#: A batch is shrunk so that one layer's attention map [b heads s s] in float32 stays below this.
PATTERN_BUDGET_BYTES = 1 << 30

#: How each statistic reads when attention is bidirectional (encoders such as BERT).
BIDIRECTIONAL_NOTES = (
    "distances are signed (query position − key position); negative distances are keys after the query",
    "local_mass counts keys on both sides of the query (|Δ| < window)",
    "previous_token is the mass on the key just before the query; the key just after is not counted",
    "first_token_mass is not a causal sink: every query sees every key, so position 0 is not special by construction",
    "include_pos0=False removes the query at position 0, which in a causal model can only attend to itself; "
    "in a bidirectional model that query is ordinary",
)


@dataclass(frozen=True)
class HeadRoleRules:
    """Thresholds that assign each head one role from its metrics without position-0 queries.

    Tried in this order (first match wins):

    1. ``previous-token``: previous_token ≥ ``previous_token`` and previous_token > first_token_mass;
    2. ``sink``: first_token_mass ≥ ``sink`` (Xiao et al. 2023);
    3. ``local/positional``: local_mass (mass on keys with |Δ| < window) ≥ ``local``;
    4. ``broad/semantic``: everything else — attention spread beyond the window and not parked on the
       first token: content-driven (semantic) or near-uniform heads; read ``normalized_entropy`` to tell them apart.

    The previous-token rule compares with the first-token mass because for the query at position 1
    the previous token *is* the first token.
    """

    previous_token: float = 0.5
    sink: float = 0.5
    local: float = 0.5

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not 0.0 < value <= 1.0:
                raise ValueError(f"HeadRoleRules.{name} must lie in (0, 1], got {value}")

    def classify(self, previous_token: float, first_token_mass: float, local_mass: float) -> str:
        """The role of one head (see the class docstring); ``UNDETERMINED`` when a score is NaN."""
        if undetermined({"p": previous_token, "f": first_token_mass, "l": local_mass}):
            return UNDETERMINED
        if previous_token >= self.previous_token and previous_token > first_token_mass:
            return ROLES[0]
        if first_token_mass >= self.sink:
            return ROLES[1]
        if local_mass >= self.local:
            return ROLES[2]
        return ROLES[3]

    def table(self, window: int) -> pd.DataFrame:
        """The rules as a table (role, rule), in the order they are tried."""
        return pd.DataFrame(
            {
                "role": list(ROLES),
                "rule": [
                    f"previous_token >= {self.previous_token} and previous_token > first_token_mass",
                    f"first_token_mass >= {self.sink}",
                    f"local_mass (keys with |Δ| < {window}) >= {self.local}",
                    "otherwise",
                ],
            }
        )


@dataclass(frozen=True)
class AttentionStats(Result):
    """Per-head attention diagnostics of one run (``attention_stats``).

    ``table`` (also ``heads``): one row per (layer, head, include_pos0) with n_queries, entropy (nats),
    normalized_entropy (entropy / log(visible keys), 1 = uniform), mean_distance (mean |Δ| of
    the attention, in tokens), first_token_mass (attention sink; BOS when ``prepend_bos``),
    previous_token (mean attention on t − 1), diagonal (on t), local_mass (on |Δ| < window).
    ``roles``: one row per (layer, head) with its role and the scores it was read from
    (include_pos0 False); role ``"undetermined"`` and a ``note`` naming the score when one of them
    is NaN. ``rules``: the thresholds; ``rules_table``: them as text.
    ``info``: the run record (``notes``: how the statistics read for non-causal models, empty for
    causal ones; ``params``: window and the role thresholds). Figure kinds: ``"roles"`` (the head-role
    map) and ``"distance"`` (mass vs distance of one ``layer``).
    """

    FIGURES: ClassVar[Mapping[str, str]] = {"roles": "_roles_figure", "distance": "_distance_figure"}
    SAVED: ClassVar[Sequence[str]] = ("roles",)
    TABLES: ClassVar[Sequence[str]] = ("roles", "rules_table")

    table: pd.DataFrame
    roles: pd.DataFrame
    rules_table: pd.DataFrame
    info: RunInfo
    rules: HeadRoleRules
    sums: dict[int, dict[str, Tensor]] = field(repr=False)

    heads = property(lambda self: self.table)
    window = property(lambda self: self.info.params["window"])
    causal = property(lambda self: self.info.causal)
    prepend_bos = property(lambda self: self.info.prepend_bos)
    model_name = property(lambda self: self.info.model)
    notes = property(lambda self: self.info.notes)

    def by_position(self) -> pd.DataFrame:
        """Per (layer, head, query position): n_queries, entropy, normalized_entropy, uniform_entropy, first_token_mass.

        ``uniform_entropy`` is the mean log(visible keys): the entropy a uniform head would have.
        ``normalized_entropy`` is NaN where a query sees a single key.
        """
        frames = []
        for layer, acc in self.sums.items():
            n = acc["n_queries"]
            keep = torch.nonzero(n > 0).squeeze(1)
            n_k, n_norm = n[keep], acc["n_norm"][keep]
            for head in range(acc["entropy"].shape[0]):
                frames.append(
                    pd.DataFrame(
                        {
                            "layer": layer,
                            "head": head,
                            "position": keep.numpy(),
                            "n_queries": n_k.numpy().astype(np.int64),
                            "entropy": (acc["entropy"][head, keep] / n_k).numpy(),
                            "normalized_entropy": (acc["norm_entropy"][head, keep] / n_norm).numpy(),
                            "uniform_entropy": (acc["log_keys"][keep] / n_k).numpy(),
                            "first_token_mass": (acc["first"][head, keep] / n_k).numpy(),
                        }
                    )
                )
        return pd.concat(frames, ignore_index=True)

    def by_distance(self, include_pos0: bool = False, max_distance: int | None = None) -> pd.DataFrame:
        """Per (layer, head, distance Δ = query − key position): mass, mean_weight, n_pairs.

        ``mass`` is the share of a query's attention that lands at Δ, averaged over queries
        (it sums to 1 over Δ); ``mean_weight`` is the mean probability of one key at Δ.
        Causal models report Δ ≥ 0 only.
        """
        frames = []
        for layer, acc in self.sums.items():
            dist, pairs, nq = _distance_sums(acc, include_pos0)
            p = (dist.shape[1] + 1) // 2
            delta = torch.arange(-(p - 1), p)
            keep = pairs > 0
            if self.causal:
                keep &= delta >= 0
            if max_distance is not None:
                keep &= delta.abs() <= max_distance
            for head in range(dist.shape[0]):
                frames.append(
                    pd.DataFrame(
                        {
                            "layer": layer,
                            "head": head,
                            "distance": delta[keep].numpy(),
                            "mass": (dist[head, keep] / nq).numpy(),
                            "mean_weight": (dist[head, keep] / pairs[keep]).numpy(),
                            "n_pairs": pairs[keep].numpy().astype(np.int64),
                            "include_pos0": include_pos0,
                        }
                    )
                )
        return pd.concat(frames, ignore_index=True)

    def _roles_figure(self) -> go.Figure:
        """Head-role map: layer × head, colored by role."""
        from posprobe.plots.attention import head_role_map

        return head_role_map(self.roles, title=f"Head roles of {self.model_name} (BOS prepended: {self.prepend_bos})")

    def _distance_figure(self, layer: int, max_distance: int | None = 64) -> go.Figure:
        """Attention mass vs distance for every head of ``layer`` (queries at position 0 excluded)."""
        from posprobe.plots.attention import attention_by_distance

        table = self.by_distance(include_pos0=False, max_distance=max_distance)
        return attention_by_distance(table[table["layer"] == layer])

    def distance_figure(self, layer: int, max_distance: int | None = 64) -> go.Figure:
        """Deprecated: ``figure("distance", layer=..., max_distance=...)``."""
        deprecated_alias("AttentionStats.distance_figure(layer)", 'AttentionStats.figure("distance", layer=layer)')
        return self.figure("distance", layer=layer, max_distance=max_distance)


def attention_stats(
    source: Any,
    tokens: Any = None,
    *,
    layers: int | Sequence[int] | None = None,
    window: int = 8,
    batch_size: int = 8,
    rules: HeadRoleRules | None = None,
    progress: bool = False,
    query_block: int | str | None = "auto",
) -> AttentionStats:
    """Measure every head's entropy, distance, sink, previous-token and local scores; assign head roles.

    ``source`` is a model (anything ``load_model`` accepts) run on ``tokens`` (TokenBatch, ids [n s]
    or texts) with a streaming pattern hook — no attention map is stored, and ``batch_size`` is
    lowered so one layer's map [b heads s s] stays under 1 GiB — or a store holding ``pattern``
    (``pp.extract(model, tokens, ["pattern"])``), for small runs. ``window`` (tokens) sets the
    local-window mass: keys with 0 ≤ Δ < window (|Δ| < window for bidirectional models).
    Sinks: Xiao et al. 2023; roles: ``HeadRoleRules``. Sequences need at least two tokens.

    ``query_block``: the statistics read the map ``query_block`` queries at a time (one block against
    every key, flash-attention style) while the forward runs fused, so memory is O(block × s) per
    layer instead of O(s²), and causal blocks skip the keys after their last query (half the work);
    ``"auto"``: blocks of ``QUERY_BLOCK`` from a model, whole maps from a store; None: whole maps. Models
    whose attention posprobe does not run (the zoo's own code, Bloom, Falcon) hand whole maps.
    """
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive number of tokens, got {window!r}")
    rules = rules or HeadRoleRules()
    source = as_source(source, tokens)
    n_pos = source.n_positions
    if n_pos < 2:
        raise ValueError(
            "sequences of length 1 hold only position 0, whose causal query can attend only to itself: "
            "attention statistics need sequences of at least 2 tokens"
        )
    layer_list = pattern_layers(source, layers)
    block = _query_block(source, query_block)
    sums = _PatternSums(source, n_pos)
    size = capped_batch(source, batch_size, block)
    source.stream("pattern", layer_list, sums.add, size, progress, "attention stats", query_block=block)
    source.reduce(t for layer in sorted(sums.acc) for _, t in sorted(sums.acc[layer].items()))  # over ranks
    heads = pd.concat(
        [_head_table(layer, acc, window, inc) for layer, acc in sums.acc.items() for inc in (True, False)]
    )
    heads = heads.sort_values(["layer", "include_pos0", "head"], ignore_index=True)
    heads["bos_prepended"] = source.prepend_bos
    info = source.run_info(
        "attention_stats",
        site="pattern",
        layers=layer_list,
        exclude_pos0="both",
        notes=() if source.causal else BIDIRECTIONAL_NOTES,
        params={"window": window, "rules": asdict(rules), "query_block": block},
    )
    return AttentionStats(heads, _roles(heads, rules), rules.table(window), info, rules, sums.acc)


#: queries per block of ``query_block="auto"``
QUERY_BLOCK = 256


def _query_block(source: Source, query_block: int | str | None) -> int | None:
    return query_block_of(query_block, source.model is not None)


def query_block_of(query_block: int | str | None, from_model: bool) -> int | None:
    """The queries per block that ``query_block`` asks for (checked): ``"auto"`` is ``QUERY_BLOCK`` when a model
    runs, and a store hands whole maps (None) whatever was asked."""
    if query_block == "auto":
        return QUERY_BLOCK if from_model else None
    if query_block is not None and (
        isinstance(query_block, bool) or not isinstance(query_block, int) or query_block < 1
    ):
        raise ValueError(f"query_block must be a positive int, 'auto' or None, got {query_block!r}")
    return query_block if from_model else None


def pattern_layers(source: Source, layers: int | Sequence[int] | None) -> list[int]:
    """The layers of ``pattern`` to read; a model or store without attention weights is said as such."""
    try:
        return cast("list[int]", source.resolve_layers("pattern", layers))  # pattern has layers
    except LayerOutOfRange:
        raise
    except ValueError as err:
        raise ValueError(f"{source.name} does not expose attention weights (site 'pattern'): {err}") from err


def _roles(heads: pd.DataFrame, rules: HeadRoleRules) -> pd.DataFrame:
    """One row per (layer, head) of the scores without position 0, with its role and a note when undetermined."""
    roles = heads[~heads["include_pos0"]].drop(columns=["include_pos0"]).reset_index(drop=True)
    roles.insert(
        2,
        "role",
        [rules.classify(r.previous_token, r.first_token_mass, r.local_mass) for r in roles.itertuples(index=False)],
    )
    roles["note"] = [
        undetermined(
            {"previous_token": r.previous_token, "first_token_mass": r.first_token_mass, "local_mass": r.local_mass}
        )
        for r in roles.itertuples(index=False)
    ]
    return roles


def capped_batch(source: Source, batch_size: int, block: int | None = None) -> int:
    """``batch_size``, lowered so that one layer's (block of the) attention map [b heads block s] in float32 stays
    under ``PATTERN_BUDGET_BYTES`` when a model runs."""
    if source.model is None or not isinstance(batch_size, int) or batch_size < 1:
        return batch_size
    assert source.tokens is not None  # a Source with a model holds its tokens
    s = source.tokens.tokens.shape[1]
    per_row = source.model.info.n_heads * min(block or s, s) * s * 4
    return max(1, min(batch_size, PATTERN_BUDGET_BYTES // per_row))


class _PatternSums:
    """Running float64 sums of attention maps per layer (see the module docstring), filled one batch at a time.

    Per layer: ``entropy``, ``norm_entropy``, ``first`` [heads P] and ``n_queries``, ``n_norm``,
    ``log_keys`` [P] indexed by query position; ``dist``, ``dist_q0`` [heads 2P−1] and ``pairs``,
    ``pairs_q0`` [2P−1] indexed by Δ + P − 1 (``_q0``: the part from queries at position 0).
    """

    def __init__(self, source: Source, n_positions: int):
        self.source = source
        self.p = n_positions
        self.acc: dict[int, dict[str, Tensor]] = {}
        self._geo_for: Batch | None = None
        self._geos: dict[tuple[int | None, int, int], dict[str, Any]] = {}

    def _layer(self, layer: int, n_heads: int) -> dict[str, Tensor]:
        if layer not in self.acc:
            p, d = self.p, 2 * self.p - 1
            self.acc[layer] = {
                **{k: torch.zeros(n_heads, p, dtype=torch.float64) for k in ("entropy", "norm_entropy", "first")},
                **{k: torch.zeros(p, dtype=torch.float64) for k in ("n_queries", "n_norm", "log_keys")},
                **{k: torch.zeros(n_heads, d, dtype=torch.float64) for k in ("dist", "dist_q0")},
                **{k: torch.zeros(d, dtype=torch.float64) for k in ("pairs", "pairs_q0")},
            }
        return self.acc[layer]

    def add(self, layer: int, pattern: Tensor, batch: Batch, q0: int = 0, entropy: Tensor | None = None) -> None:
        """Fold one batch's pattern [b heads s t] of ``layer`` into the sums: the whole map, or the rows of
        queries ``q0 : q0 + s`` (a block of a long sequence; blocks of every query add up to the whole).
        ``entropy`` [b heads s]: each query's entropy when the attention computed it (else read off the map)."""
        _, n_heads, s, seen = pattern.shape
        t = batch.attention_mask.shape[1]
        if seen > t or q0 + s > t or (q0 == 0 and s == t and seen != t):
            raise ValueError(
                f"attention_stats needs self-attention maps with s == t, got pattern of shape {tuple(pattern.shape)}"
            )
        acc = self._layer(layer, n_heads)
        geo = self._geometry(batch, self.source.sliding_window(layer), q0, s)
        if seen < t and not geo["aligned"]:  # keys past the block's last visible one were left out: they are 0
            pattern, seen = F.pad(pattern, (0, t - seen)), t
        p, rows, col0 = self.p, geo["rows"], geo["col0"]
        # masked keys already hold probability 0; only padded query rows need zeroing
        ph = pattern.float()  # [b heads s seen]
        if geo["padded"]:
            ph = ph * geo["maskf"][:, None, :, None]
        ent = -torch.special.xlogy(ph, ph).sum(-1) if entropy is None else entropy.float()  # [b heads s]
        norm = torch.where(geo["norm_ok"][:, None], ent / geo["log_keys"][:, None], 0.0)
        first = ph[rows, :, :, col0] * geo["has0"][:, :, None]
        per_pos = torch.zeros(3, n_heads, p, device=pattern.device)
        for i, value in enumerate((ent * geo["maskf"][:, None], norm, first * geo["maskf"][:, None])):
            per_pos[i].index_add_(1, geo["pos_flat"], _by_head(value))
        # distance sums add up to s·t values per bin: float64, so whole maps and blocks of them agree
        dist = torch.zeros(2, n_heads, 2 * p - 1, device=pattern.device, dtype=torch.float64)
        if geo["aligned"]:  # positions are columns: a distance is a diagonal, summed by a strided view
            keep = geo["diag_keep"][: seen + s]
            dist[0][:, geo["diag_bins"][: seen + s][keep]] += _diagonal_sums(ph)[:, keep]
        else:
            for head in range(n_heads):
                for row in range(len(ph)):
                    dist[0, head].index_add_(0, geo["didx"][row], ph[row, head].flatten().double())
        at_pos0 = ph[rows, :, geo["row0"]] * geo["at0"][:, :, None]  # [b heads seen]: the query at position 0
        dist[1].index_add_(1, geo["d0"][:, :seen].flatten(), _by_head(at_pos0).double())
        per_pos, dist = per_pos.double().cpu(), dist.double().cpu()
        for name, value in (("entropy", per_pos[0]), ("norm_entropy", per_pos[1]), ("first", per_pos[2])):
            acc[name] += value
        acc["dist"] += dist[0]
        acc["dist_q0"] += dist[1]
        for name, value in geo["counts"].items():
            acc[name] += value

    def _geometry(self, batch: Batch, window: int | None, q0: int, s: int) -> dict[str, Any]:
        """What one batch's mask and positions imply for queries ``q0 : q0 + s``, shared by every head and layer
        with the same window: computed once per block and window for a batch (layers repeat the blocks)."""
        if self._geo_for is not batch:
            self._geo_for, self._geos = batch, {}  # a reference: the identity test is sound
        if (window, q0, s) not in self._geos:
            self._geos[window, q0, s] = self._new_geometry(batch, window, q0, s)
        return self._geos[window, q0, s]

    def _new_geometry(self, batch: Batch, window: int | None, q0: int, s: int) -> dict[str, Any]:
        p = self.p
        keys = batch.attention_mask.bool()
        key_pos = batch.position_ids.long().masked_fill(~keys, 0)
        mask, pos = keys[:, q0 : q0 + s], key_pos[:, q0 : q0 + s]  # the queries of this block
        delta = pos[:, :, None] - key_pos[:, None, :]  # [b s t]
        allowed = mask[:, :, None] & keys[:, None, :]
        if self.source.causal:
            allowed &= delta >= 0
        if window:
            allowed &= delta.abs() < window
        n_keys = allowed.sum(-1)  # [b s]
        log_keys = torch.log(n_keys.clamp(min=1).float())
        norm_ok = mask & (n_keys >= 2)
        maskf = mask.float()
        pos_flat = pos.flatten()
        didx = (delta + p - 1).flatten(1)  # [b s*t]
        is0 = keys & (key_pos == 0)
        has0 = is0.any(-1).float()[:, None]
        col0 = is0.float().argmax(-1)  # [b] the column holding position 0
        rows = torch.arange(len(mask), device=mask.device)
        row0 = (col0 - q0).clamp(0, s - 1)  # the row of the query at position 0, when this block holds it
        at0 = has0 * ((col0 >= q0) & (col0 < q0 + s)).float()[:, None]
        d0 = delta[rows, row0] + p - 1  # [b t] distances seen by the query at position 0
        counts = torch.zeros(5, 2 * p - 1, device=mask.device)
        counts[0, :p].index_add_(0, pos_flat, maskf.flatten())
        counts[1, :p].index_add_(0, pos_flat, norm_ok.float().flatten())
        counts[2, :p].index_add_(0, pos_flat, (log_keys * maskf).flatten())
        counts[3].index_add_(0, didx.flatten(), allowed.float().flatten())
        counts[4].index_add_(0, d0.flatten(), (allowed[rows, row0].float() * at0).flatten())
        counts = counts.double().cpu()
        diagonals = _diagonals(keys, key_pos, q0, s, p)
        return {
            **diagonals,
            "padded": not bool(mask.all()),
            "maskf": maskf,
            "norm_ok": norm_ok,
            "log_keys": log_keys,
            "pos_flat": pos_flat,
            "didx": None if diagonals["aligned"] else didx,  # the scatter's index: only where positions are not columns
            "rows": rows,
            "col0": col0,
            "has0": has0,
            "row0": row0,
            "at0": at0,
            "d0": d0,
            "counts": {
                "n_queries": counts[0, :p],
                "n_norm": counts[1, :p],
                "log_keys": counts[2, :p],
                "pairs": counts[3],
                "pairs_q0": counts[4],
            },
        }
        return self._geo


def _diagonals(keys: Tensor, key_pos: Tensor, q0: int, s: int, p: int) -> dict[str, Any]:
    """Whether a batch's positions are its columns (no padding), and the distance bin of each diagonal sum."""
    t = keys.shape[1]
    aligned = bool(keys.all()) and bool((key_pos == torch.arange(t, device=keys.device)).all())
    diag = q0 + s - torch.arange(t + s, device=keys.device) + p - 1  # Δ + p − 1 of each diagonal
    return {"aligned": aligned, "diag_keep": (diag >= 0) & (diag <= 2 * p - 2), "diag_bins": diag}


def _by_head(x: Tensor) -> Tensor:
    """[b heads ...] → [heads, b·...], rows in the order of a flattened [b ...] (the order of the index)."""
    return x.transpose(0, 1).reshape(x.shape[1], -1)


def _diagonal_sums(x: Tensor, rows: int = 256) -> Tensor:
    """Sums of ``x`` [b heads s t] along each head's diagonals, over the batch, in float64: [heads, t + s],
    entry m the sum of x[:, h, r, m + r − s] over r (the key s − m columns left of the query; 0 off the map).

    Each row is shifted left by its index through a strided view of the zero-padded map, so the
    diagonals become columns: one reduction per head and chunk of ``rows`` rows (the padding costs
    2·rows columns), where an index_add would scatter every value. A chunk sums its ≤ b × ``rows``
    values in the map's dtype (float32: relative error ~1e-7; a float64 reduction of a strided view
    costs 20× more) and chunks accumulate in float64.
    """
    b, h, s, t = x.shape
    out = torch.zeros(h, t + s, dtype=torch.float64, device=x.device)
    for r0 in range(0, s, rows):
        c = min(rows, s - r0)
        width = t + 2 * c
        at = s - r0 - c  # where this chunk's first diagonal lands in ``out``
        padded = x.new_zeros(b, c, width)  # [b c t+2c], contiguous; its margins stay 0 for every head
        for head in range(h):
            padded[..., c : c + t] = x[:, head, r0 : r0 + c]
            shifted = padded.as_strided((b, c, t + c), (c * width, width + 1, 1))
            out[head, at : at + t + c] += shifted.sum(dim=(0, 1))  # ≤ b·rows values in float32, then float64
    return out


def _distance_sums(acc: dict[str, Tensor], include_pos0: bool) -> tuple[Tensor, Tensor, float]:
    """Attention mass [heads 2P−1], pair counts [2P−1] and the number of queries, with or without position 0."""
    if include_pos0:
        return acc["dist"], acc["pairs"], float(acc["n_queries"].sum())
    return acc["dist"] - acc["dist_q0"], acc["pairs"] - acc["pairs_q0"], float(acc["n_queries"][1:].sum())


def _head_table(layer: int, acc: dict[str, Tensor], window: int, include_pos0: bool) -> pd.DataFrame:
    dist, _, nq = _distance_sums(acc, include_pos0)
    sl = slice(0, None) if include_pos0 else slice(1, None)
    p = acc["n_queries"].shape[0]
    delta = torch.arange(-(p - 1), p)
    n_norm = float(acc["n_norm"][sl].sum())
    return pd.DataFrame(
        {
            "layer": layer,
            "head": np.arange(dist.shape[0]),
            "include_pos0": include_pos0,
            "n_queries": int(nq),
            "entropy": (acc["entropy"][:, sl].sum(1) / nq).numpy(),
            "normalized_entropy": (acc["norm_entropy"][:, sl].sum(1) / n_norm).numpy() if n_norm else np.nan,
            "mean_distance": ((dist * delta.abs()).sum(1) / nq).numpy(),
            "first_token_mass": (acc["first"][:, sl].sum(1) / nq).numpy(),
            "previous_token": (dist[:, p] / nq).numpy(),
            "diagonal": (dist[:, p - 1] / nq).numpy(),
            "local_mass": (dist[:, delta.abs() < window].sum(1) / nq).numpy(),
        }
    )


@dataclass(frozen=True)
class AttentionPatterns(DataFrameAlias, Result):
    """One sequence's attention maps (``attention_patterns``), for ``plots.attention.attention_pattern_viewer``.

    ``table``: layer, head, query_pos, key_pos, query_token, key_token, weight — one row per (query,
    key) pair the query can see. ``info``: the run record (one sequence; ``params``: seq, max_tokens).
    Figure kinds: ``"viewer"``. For one release the result also reads like its table, with a
    DeprecationWarning: use ``.table``.
    """

    FIGURES: ClassVar[Mapping[str, str]] = {"viewer": "_viewer_figure"}

    table: pd.DataFrame
    info: RunInfo

    def _viewer_figure(self, title: str | None = None) -> go.Figure:
        """Interactive heatmap of the sequence's attention, a dropdown picks layer and head."""
        from posprobe.plots.attention import attention_pattern_viewer

        seq = self.info.params["seq"]
        return attention_pattern_viewer(self.table, title=title or f"Attention of {self.info.model}, sequence {seq}")


def attention_patterns(
    source: Any,
    tokens: Any = None,
    *,
    seq: int = 0,
    layers: int | Sequence[int] | None = None,
    max_tokens: int = 64,
) -> AttentionPatterns:
    """One sequence's attention maps as a tidy table, to look at with ``.figure()`` (a pattern viewer).

    Rows: layer, head, query_pos, key_pos, query_token, key_token, weight — for the first
    ``max_tokens`` real tokens of row ``seq`` and every (query, key) pair the query can see.
    ``source`` is a model (anything ``load_model`` accepts) with ``tokens`` or a store holding ``pattern``.
    """
    source = as_source(source, tokens)
    n_rows = len(source.position_ids)
    if not 0 <= seq < n_rows:
        raise ValueError(f"seq {seq} out of range; the run has sequences 0..{n_rows - 1}")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be ≥ 1, got {max_tokens}")
    row_source, row, cols = _one_sequence(source, seq, max_tokens)
    layer_list = cast("list[int]", row_source.resolve_layers("pattern", layers))  # pattern has layers
    maps: dict[int, Tensor] = {}

    def grab(layer: int, pattern: Tensor, batch: Batch) -> None:
        local = row - batch.start
        if 0 <= local < pattern.shape[0]:
            idx = cols.to(pattern.device)
            maps[layer] = pattern[local][:, idx][:, :, idx].float().cpu()

    row_source.stream("pattern", layer_list, grab, batch_size=1)
    table = _pattern_table(maps, _token_strings(row_source, row, cols), row_source.causal)
    n = len(cols)
    info = source.run_info(
        "attention_patterns",
        site="pattern",
        layers=layer_list,
        n_sequences=1,
        seq_len=n,
        n_tokens=n,
        params={"seq": seq, "max_tokens": max_tokens},
    )
    return AttentionPatterns(table, info)


def _one_sequence(source: Source, seq: int, max_tokens: int) -> tuple[Source, int, Tensor]:
    """What to read for row ``seq``: (source, its row there, its first ``max_tokens`` real columns).

    A model runs on that row alone, cut to those columns; a store is read as it is.
    """
    keep = torch.nonzero(source.attention_mask[seq].bool()).squeeze(1)
    if source.model is not None:
        full, cols = source.tokens, keep[:max_tokens]
        assert full is not None  # a Source with a model holds its tokens
        strs = None if full.str_tokens is None else [[full.str_tokens[seq][c] for c in cols.tolist()]]
        row = TokenBatch(
            full.tokens[seq : seq + 1, cols],
            full.attention_mask[seq : seq + 1, cols],
            full.prepend_bos,
            full.source,
            strs,
        )
        source = Source(source.model, None, row, source.info, source.prepend_bos)
        seq, keep = 0, torch.arange(len(cols))
    return source, seq, keep[:max_tokens]


def _pattern_table(maps: dict[int, Tensor], words: list[str], causal: bool) -> pd.DataFrame:
    """Rows (layer, head, query, key) of the maps [heads n n], over the pairs a query can see."""
    n = len(words)
    q, k = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    visible = (k <= q) if causal else np.ones_like(q, dtype=bool)
    q, k = q[visible], k[visible]
    frames = []
    for layer, pattern in sorted(maps.items()):
        for head in range(pattern.shape[0]):
            frames.append(
                pd.DataFrame(
                    {
                        "layer": layer,
                        "head": head,
                        "query_pos": q,
                        "key_pos": k,
                        "query_token": [words[i] for i in q],
                        "key_token": [words[j] for j in k],
                        "weight": pattern[head].numpy()[q, k],
                    }
                )
            )
    return pd.concat(frames, ignore_index=True)


def _token_strings(source: Source, seq: int, cols: Tensor) -> list[str]:
    if source.tokens is not None:
        strs = source.tokens.str_tokens
        if strs is not None:
            return [str(strs[seq][c]) for c in cols.tolist()]
        ids = source.tokens.tokens[seq, cols].tolist()
        tok = getattr(source.model, "tokenizer", None)
        return [str(x) for x in (tok.convert_ids_to_tokens(ids) if tok is not None else ids)]
    assert source.store is not None  # a Source without tokens reads a store
    strs = source.store.manifest.get("str_tokens")
    if strs is not None:
        return [str(strs[seq][c]) for c in cols.tolist()]
    return [str(x) for x in source.store.tokens[seq, cols].tolist()]
