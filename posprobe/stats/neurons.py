"""Positional neurons: find MLP neurons whose firing depends on position (Voita et al. 2023).

Voita, Ferrando & Nalmpantis, "Neurons in Large Language Models: Dead, N-gram, Positional"
(2023) call a ReLU neuron *active* when its activation is > 0, score it by the mutual
information between "active" and position from per-position firing frequencies, and call it
positional when I > 0.05. posprobe adds η² (share of the activation's variance explained by
position: the threshold-free score to read for GELU / SwiGLU MLPs, RESEARCH.md §3), the
dominant period of the mean activation over position, categories, and dead / always-on counts.

Everything comes from running sums per (layer, position, neuron) — token counts, firing
counts, sums and sums of squares, in float64 — gathered in one pass over a store, shard by
shard, so memory is O(layers × positions × neurons) whatever the token count. Sequences are
added one at a time in a fixed order, so a store read in shards and the same activations
passed in memory give bit-identical statistics.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

from posprobe.devices import resolve_device
from posprobe.distributed import Ranks, current_ranks
from posprobe.finite import FiniteGuard, undetermined
from posprobe.labels import CATEGORIES, NOT_POSITIONAL, UNDETERMINED
from posprobe.models.base import PositionModel, positions_from_mask
from posprobe.results import ParamsAlias, Result, RunInfo, deprecated_alias
from posprobe.sites import SiteKey, check_site, resolve_stored_layers
from posprobe.stats.streaming import UNSET, Source, as_source, exclude_pos0_choice
from posprobe.store import ActivationStore

if TYPE_CHECKING:
    import plotly.graph_objects as go

#: Categories of positional neurons, in the order plots stack them.

# Default "active" threshold per activation function: f(0), so that "active" means "the
# pre-activation is positive" whatever f is (GELU(x) > 0 and SiLU(x) > 0 exactly when x > 0).
# For gated MLPs (SwiGLU, GeGLU) mlp_post = f(gate) * up and f(0) = 0, so "active" means the
# neuron writes along +W_out; read eta2 there too.
ACTIVE_THRESHOLDS: dict[str, float] = {
    **dict.fromkeys(("relu", "relu2", "gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "quick_gelu"), 0.0),
    **dict.fromkeys(("silu", "swish", "swiglu", "geglu", "tanh"), 0.0),
    "sigmoid": 0.5,
    "softplus": math.log(2.0),
}

_ROW_CHUNK = 16  # rows moved to the device at once for in-memory inputs


def active_threshold(act_fn: str | None) -> float:
    """The default "active" threshold for an MLP activation function: f(0) (0 for ReLU, GELU, SiLU).

    ``None`` or ``""`` (unknown, e.g. a synthetic store) gives 0, Voita et al.'s ReLU rule.
    """
    if not act_fn:
        return 0.0
    if act_fn not in ACTIVE_THRESHOLDS:
        raise ValueError(
            f"no default active threshold for act_fn {act_fn!r}; pass threshold= explicitly, or use one of "
            f"{', '.join(ACTIVE_THRESHOLDS)}"
        )
    return ACTIVE_THRESHOLDS[act_fn]


@dataclass(frozen=True)
class NeuronPositionStats:
    """Per-position running sums for every neuron of some layers of one site.

    ``n_tokens`` [P] counts analysed tokens per position id (0 for padding-only and excluded
    positions); ``n_active``, ``act_sum``, ``act_sumsq`` [L P N] (float64, on the CPU) are the
    firing counts, sums and sums of squares of the activations at each position.
    """

    site: str
    layers: tuple[int | None, ...]
    threshold: float
    exclude_pos0: bool
    n_tokens: Tensor
    n_active: Tensor
    act_sum: Tensor
    act_sumsq: Tensor

    def __post_init__(self) -> None:
        shape = (len(self.layers), self.n_tokens.shape[0])
        for name in ("n_active", "act_sum", "act_sumsq"):
            value = getattr(self, name)
            if value.ndim != 3 or tuple(value.shape[:2]) != shape:
                raise ValueError(f"{name} must be [L P N] with L, P = {shape}; got {tuple(value.shape)}")

    @property
    def exclude_bos(self) -> bool:
        """Deprecated: ``exclude_pos0``."""
        deprecated_alias("NeuronPositionStats.exclude_bos", "NeuronPositionStats.exclude_pos0")
        return self.exclude_pos0

    @property
    def n_neurons(self) -> int:
        return int(self.act_sum.shape[2])

    @property
    def positions(self) -> Tensor:
        """The position ids that hold at least one analysed token [K]."""
        return torch.nonzero(self.n_tokens > 0).squeeze(1)

    def layer_index(self, layer: int | None) -> int:
        if layer not in self.layers:
            raise ValueError(f"layer {layer} was not analysed; analysed layers: {list(self.layers)}")
        return self.layers.index(layer)

    def profiles(self, neurons: Sequence[tuple[int | None, int]]) -> pd.DataFrame:
        """Tidy per-position profiles of ``(layer, neuron)`` pairs.

        One row per neuron and analysed position: layer, neuron, position, n_tokens,
        firing_rate, mean, std, and mean_z (mean standardised over positions, for heatmaps).
        """
        pos = self.positions
        n = self.n_tokens[pos]
        frames = []
        for layer, neuron in neurons:
            li = self.layer_index(layer)
            if not 0 <= neuron < self.n_neurons:
                raise ValueError(f"neuron {neuron} out of range 0..{self.n_neurons - 1}")
            mean = self.act_sum[li, pos, neuron] / n
            var = (self.act_sumsq[li, pos, neuron] / n - mean**2).clamp(min=0)
            spread = mean.std()  # at least two positions (checked when the sums were gathered)
            mean_z = (mean - mean.mean()) / spread if spread > 0 else torch.zeros_like(mean)
            columns = {"position": pos, "n_tokens": n.long(), "firing_rate": self.n_active[li, pos, neuron] / n}
            columns.update(mean=mean, std=var.sqrt(), mean_z=mean_z)
            arrays = {k: v.numpy() for k, v in columns.items()}
            frames.append(pd.DataFrame({"layer": layer, "neuron": neuron, **arrays}))
        if not frames:
            raise ValueError("no neurons requested")
        return pd.concat(frames, ignore_index=True)


@dataclass(frozen=True)
class PositionalNeurons(ParamsAlias, Result):
    """What ``positional_neurons`` returns: one row per neuron, a per-layer summary, and the sums.

    ``table``: layer, neuron, mi (bits), mi_bias, mi_norm, eta2, period, period_power,
    firing_rate, mean, std, peak_position, dead, always_on, is_positional, category, note (why a
    neuron got no category: ``"undetermined"`` when its score is NaN). Scores: see ``positional_neurons``.

    Category of a positional neuron, first rule that holds (others get ``"none"``):

    1. ``oscillatory``: k* ≥ 2 (two or more cycles fit) and ``period_power ≥ oscillation_power``.
    2. Smooth the firing-rate profile (moving average over max(1, K // 32) positions, rounded
       up to odd) and mark positions at or above its mid-range (max + min) / 2 as high.
       ``one-extreme``: the high positions form one run that touches exactly one end
       (a step or ramp: fires only early, or only late). ``both-extremes``: two runs, one at
       each end (fires at the start and the end, not in the middle).
    3. ``other-strong`` when ``mi_norm ≥ 0.5`` (position explains half the firing entropy),
       else ``other-weak``.

    ``layer_summary``: layer, n_neurons, dead, always_on, positional, and one count per category.
    ``info``: the run record (``n_tokens``: the tokens analysed; ``params``: site, threshold, exclude_bos,
    mi_threshold, always_on_rate, oscillation_power). Figure kinds: ``"counts"`` per layer and category,
    ``"heatmap"`` of the ``top`` positional neurons, ``"profile"`` of one ``neuron`` (and ``layer``).
    """

    FIGURES: ClassVar[Mapping[str, str]] = {
        "counts": "_counts_figure",
        "heatmap": "_heatmap_figure",
        "profile": "_profile_figure",
    }
    SAVED: ClassVar[Sequence[str]] = ("counts",)
    TABLES: ClassVar[Sequence[str]] = ("layer_summary",)

    table: pd.DataFrame
    layer_summary: pd.DataFrame
    stats: NeuronPositionStats
    info: RunInfo

    def saved_kinds(self) -> list[str]:
        """``counts``, and the ``heatmap`` of the top positional neurons when there are any."""
        return ["counts", "heatmap"] if self.table["is_positional"].any() else ["counts"]

    def top(self, n: int = 20, by: str = "mi") -> pd.DataFrame:
        """The ``n`` positional neurons with the highest ``by`` score."""
        positional = self.table[self.table["is_positional"]]
        return positional.sort_values(by, ascending=False).head(n)

    def profile(self, layer: int | None, neuron: int) -> pd.DataFrame:
        """One neuron's mean activation, spread and firing rate per position."""
        return self.stats.profiles([(layer, neuron)])

    def _counts_figure(self) -> go.Figure:
        """Stacked bars: positional neurons per layer by category."""
        from posprobe.plots.neurons import positional_neuron_counts

        return positional_neuron_counts(self.layer_summary)

    def _heatmap_figure(self, top: int = 20) -> go.Figure:
        """Neuron × position heatmap of the ``top`` positional neurons by mi."""
        from posprobe.plots.neurons import positional_neuron_heatmap

        chosen = self.top(top)
        if chosen.empty:
            raise ValueError(f"no positional neurons (mi > {self.info.params['mi_threshold']}) to draw")
        pairs = list(zip(chosen["layer"], chosen["neuron"], strict=True))
        return positional_neuron_heatmap(self.stats.profiles(pairs))

    def _profile_figure(self, layer: int | None = None, neuron: int | None = None) -> go.Figure:
        """One neuron's mean activation ± 1 std and firing rate over position."""
        from posprobe.plots.neurons import neuron_position_profile

        if neuron is None:
            raise ValueError("kind='profile' needs neuron= (and layer=)")
        return neuron_position_profile(self.profile(layer, neuron))


# -- accumulation ------------------------------------------------------------------------------


class _Accumulator:
    """Running float64 sums, updated one sequence at a time (a fixed order, hence exact replay)."""

    def __init__(self, site: str, layers: tuple, threshold: float, exclude_pos0: bool, size: int, device) -> None:
        self.site, self.layers, self.threshold, self.exclude_pos0 = site, layers, threshold, exclude_pos0
        self.device, self.size = device, size  # size: number of position ids (max id + 1)
        self.sums: Tensor | None = None  # [3 L P N]: firing counts, sums, sums of squares
        self.n_tokens = torch.zeros(size, dtype=torch.float64, device=device)

    def update(self, acts: Sequence[Tensor], attention_mask: Tensor, position_ids: Tensor, start: int) -> None:
        """Add a batch: ``acts`` one [b s N] tensor per layer, mask and position ids [b s]; ``start``: its first row."""
        for layer, a in zip(self.layers, acts, strict=True):
            if a.ndim != 3 or a.shape[:2] != attention_mask.shape:
                raise ValueError(
                    f"{self.site} layer {layer}: expected activations [n seq neurons] matching the mask "
                    f"{tuple(attention_mask.shape)}, got {tuple(a.shape)}"
                )
        if self.sums is None:
            shape = (3, len(self.layers), self.size, acts[0].shape[2])
            self.sums = torch.zeros(shape, dtype=torch.float64, device=self.device)
        if any(a.shape[2] != self.sums.shape[3] for a in acts):
            counts = [a.shape[2] for a in acts]
            raise ValueError(f"{self.site}: neuron counts {counts} differ from the first batch's {self.sums.shape[3]}")
        keep = attention_mask.bool()
        if self.exclude_pos0:
            keep &= position_ids > 0
        acts = [a.to(self.device) for a in acts]
        guard = FiniteGuard(start)
        for layer, a in zip(self.layers, acts, strict=True):
            guard.add(self.site, layer, a, mask=keep)
        fire, total, squares = self.sums
        for i in range(keep.shape[0]):
            cols = torch.nonzero(keep[i]).squeeze(1)
            k = cols.numel()
            if k == 0:
                continue
            pos = position_ids[i, cols]
            c0, p0 = int(cols[0]), int(pos[0])
            if int(cols[-1]) - c0 == k - 1 and torch.equal(pos, torch.arange(p0, p0 + k)):
                at: slice | Tensor = slice(p0, p0 + k)  # the usual case: no gather, no scatter
                rows_x = [a[i, c0 : c0 + k] for a in acts]
            else:
                at, cols = pos.to(self.device), cols.to(self.device)
                rows_x = [a[i, cols] for a in acts]
            _add(self.n_tokens, at, torch.ones(k, dtype=torch.float64, device=self.device))
            for li, x in enumerate(rows_x):
                x = x.to(torch.float64)  # [k N]
                _add(fire[li], at, x.gt(self.threshold).to(torch.float64))
                _add(total[li], at, x)
                _add(squares[li], at, x * x)
        guard.check()

    def result(self) -> NeuronPositionStats:
        if float(self.n_tokens.sum()) == 0:
            what = "excluding position 0 " if self.exclude_pos0 else ""
            raise ValueError(f"no tokens to analyse in {self.site} ({what}and padding); the input is empty")
        if int((self.n_tokens > 0).sum()) < 2:
            raise ValueError(f"{self.site}: tokens at only one position; position scores need at least two positions")
        assert self.sums is not None  # set by the first batch, and there were tokens
        cpu = self.sums.cpu()
        return NeuronPositionStats(
            self.site, self.layers, self.threshold, self.exclude_pos0, self.n_tokens.cpu(), cpu[0], cpu[1], cpu[2]
        )


def _add(target: Tensor, at: slice | Tensor, value: Tensor) -> None:
    """target[at] += value, elementwise in float64: the same bits whichever branch adds them."""
    if isinstance(at, slice):
        target[at].add_(value)
    else:
        target.index_add_(0, at, value)


def _check_threshold(threshold: float) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number (or None for the act_fn rule), got {threshold!r}")
    return float(threshold)


def _in_memory_batches(source: Tensor, site: str, layers, attention_mask: Tensor | None, position_ids: Tensor | None):
    source = torch.as_tensor(source)
    if source.ndim == 3:
        source = source.unsqueeze(0)
        layers = 0 if layers is None else layers
    if source.ndim != 4:
        raise ValueError(f"activations must be [n seq neurons] or [L n seq neurons], got {tuple(source.shape)}")
    names = tuple(range(source.shape[0]) if layers is None else [layers] if isinstance(layers, int) else layers)
    if len(names) != source.shape[0]:
        raise ValueError(f"{len(names)} layer labels {list(names)} for {source.shape[0]} layers of activations")
    if source.numel() == 0:
        raise ValueError("no tokens to analyse: the activations are empty")
    n, s = source.shape[1:3]
    mask = torch.ones(n, s, dtype=torch.long) if attention_mask is None else torch.as_tensor(attention_mask).long()
    pos = positions_from_mask(mask) if position_ids is None else torch.as_tensor(position_ids).long()
    if mask.shape != (n, s) or pos.shape != (n, s):
        raise ValueError(f"attention_mask {tuple(mask.shape)} / position_ids {tuple(pos.shape)} must be {(n, s)}")
    chunks = [slice(i, min(i + _ROW_CHUNK, n)) for i in range(0, n, _ROW_CHUNK)]
    return names, pos, (([t[c] for t in source], mask[c], pos[c], c.start) for c in chunks)


def _store_batches(store: ActivationStore, site: str, layers, ranks: Ranks):
    names = tuple(resolve_stored_layers(site, layers, store.layers(site), store.model_info.get("n_layers")))
    if store.n_seq == 0:
        raise ValueError(f"store {store.path} is empty (0 sequences)")
    keys = [SiteKey(site, layer) for layer in names]
    batches = (
        ([shard.acts[k] for k in keys], shard.attention_mask, shard.position_ids, shard.start)
        for shard in store.iter_shards(
            keys, ranks.shards(len(store.shard_bounds()), f"the store {store.path}") if ranks.active else None
        )
    )
    return names, store.position_ids, batches


def neuron_position_stats(
    source: Any,
    tokens: Any = None,
    *,
    site: str = "mlp_post",
    layers: int | Sequence[int] | None = None,
    threshold: float | None = None,
    exclude_pos0: bool = True,
    device: str | torch.device = "auto",
    attention_mask: Tensor | None = None,
    position_ids: Tensor | None = None,
    progress: bool = False,
    exclude_bos: Any = UNSET,
) -> NeuronPositionStats:
    """Gather per-position firing counts, sums and sums of squares per neuron in one streaming pass.

    ``source`` is a store or its folder (read shard by shard), a tensor [n seq N] (one layer, labelled
    ``layers`` or 0) or [L n seq N] (labelled ``layers`` or 0..L-1), or a model (anything ``load_model``
    accepts) run on ``tokens``, whose ``site`` is extracted into a temporary store first (``progress``
    shows that extraction); ``attention_mask`` / ``position_ids`` [n seq] apply to tensors (stores
    carry their own). Padding is skipped, and position 0 (the BOS, or the first token — an attention
    sink either way) when ``exclude_pos0`` (``exclude_bos``: its old name, deprecated).
    ``threshold=None`` takes ``active_threshold(store.model_info["act_fn"])`` (0 for tensors).
    """
    exclude_pos0 = bool(exclude_pos0_choice(exclude_pos0, old="exclude_bos", old_value=exclude_bos))
    masks = {"attention_mask": attention_mask, "position_ids": position_ids}
    return _gather(source, tokens, site, layers, threshold, exclude_pos0, device, progress=progress, **masks)[0]


def _gather(
    source: Any,
    tokens: Any,
    site: str,
    layers: int | Sequence[int] | None,
    threshold: float | None,
    exclude_pos0: bool,
    device: str | torch.device,
    *,
    progress: bool,
    attention_mask: Tensor | None = None,
    position_ids: Tensor | None = None,
) -> tuple[NeuronPositionStats, dict[str, Any]]:
    """The sums of ``neuron_position_stats`` and what ``RunInfo`` says of their input (model, rows, causal, BOS)."""
    check_site(site)
    dev = resolve_device(device)
    src: Source | None = None  # a store read by the ranks of a run sums over them; activations in memory do not
    if _is_activations(source):
        if tokens is not None:
            raise ValueError("activations carry no tokens; pass attention_mask= / position_ids= with them instead")
        names, all_pos, batches = _in_memory_batches(source, site, layers, attention_mask, position_ids)
        act_fn, facts = None, {"model": "activations", "n_sequences": all_pos.shape[0], "seq_len": all_pos.shape[1]}
    else:
        src = as_source(source, tokens)
        if src.store is None and current_ranks().active:
            raise ValueError(
                "under torch.distributed, positional neurons are read from a store the ranks share: extract it "
                "first (pp.extract(..., out=<shared folder>) on every rank), then pass the store"
            )
        if src.store is None:  # a model: extract the site into a temporary store, then read that
            with _extracted(src.model, src.tokens, site, layers, progress) as store:
                return _gather(store, None, site, layers, threshold, exclude_pos0, device, progress=progress)
        names, all_pos, batches = _store_batches(src.store, site, layers, src.ranks)
        act_fn = src.store.model_info.get("act_fn")
        facts = {"model": src.name, "n_sequences": src.store.n_seq, "seq_len": all_pos.shape[1]}
        facts.update(causal=src.causal, prepend_bos=src.prepend_bos)
    threshold = active_threshold(act_fn) if threshold is None else _check_threshold(threshold)
    size = max(int(all_pos.max()) + 1, all_pos.shape[1])
    acc = _Accumulator(site, names, threshold, exclude_pos0, size, dev)
    for acts, mask, pos, start in batches:
        acc.update(acts, mask, pos, start)
    if src is not None:
        src.reduce([acc.n_tokens, *([] if acc.sums is None else [acc.sums])])  # over ranks reading one store
    return acc.result(), facts


def _is_activations(source: Any) -> bool:
    """Activations in memory (a tensor or anything ``torch.as_tensor`` reads), not a store, a folder or a model."""
    model_or_store = isinstance(source, ActivationStore | PositionModel | str | os.PathLike)
    return not model_or_store and not hasattr(source, "parameters")


@contextmanager
def _extracted(
    model: Any, tokens: Any, site: str, layers: int | Sequence[int] | None, progress: bool
) -> Iterator[ActivationStore]:
    """``site`` × ``layers`` of ``model`` on ``tokens`` in a temporary store, removed on exit."""
    from posprobe.extraction import extract

    with tempfile.TemporaryDirectory(prefix="posprobe-neurons-") as tmp:
        yield extract(model, tokens, sites=site, layers=layers, out=tmp, progress=progress)


# -- scores --------------------------------------------------------------------------------------


def _binary_entropy(p: Tensor) -> Tensor:
    """H(p) in bits, 0 at p in {0, 1}."""
    return -(torch.special.xlogy(p, p) + torch.special.xlogy(1 - p, 1 - p)) / math.log(2.0)


def _spectrum(profile: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Peak frequency bin, period and peak power share of profiles [K N] (mean removed, DC excluded)."""
    power = torch.fft.rfft(profile - profile.mean(0), dim=0).abs().square()
    power[0] = 0  # the constant; a zero row after the last bin lets the peak's neighbours be gathered
    power = torch.cat([power, torch.zeros_like(power[:1])])
    total = power.sum(0)
    peak = power[1:-1].argmax(0) + 1  # [N] frequency bin, 1..K//2
    bins = torch.stack([peak - 1, peak, peak + 1])  # [3 N]
    near = power.gather(0, bins)
    has_power = total > 0
    share = torch.where(has_power, near.sum(0) / total.clamp(min=1e-300), torch.zeros_like(total))
    centroid = (bins * near).sum(0) / near.sum(0)
    period = torch.where(has_power, profile.shape[0] / centroid, torch.full_like(total, math.nan))
    return peak, period, share


def _shape_categories(rate: Tensor) -> list[str]:
    """one-extreme / both-extremes / other for firing-rate profiles [K M] (smoothed, split at mid-range)."""
    k_len = rate.shape[0]
    width = max(1, k_len // 32) | 1  # odd moving-average window
    smooth = F.avg_pool1d(F.pad(rate.T.unsqueeze(1), (width // 2, width // 2), mode="replicate"), width, stride=1)
    smooth = smooth.squeeze(1).T  # [K M]
    high = smooth >= (smooth.amax(0) + smooth.amin(0)) / 2
    runs = high[0].long() + (high[1:] & ~high[:-1]).sum(0)
    one = ((runs == 1) & (high[0] != high[-1])).tolist()
    both = ((runs == 2) & high[0] & high[-1]).tolist()
    return ["one-extreme" if o else "both-extremes" if b else "other" for o, b in zip(one, both, strict=True)]


def _score_layer(stats: NeuronPositionStats, li: int, mi_threshold, always_on_rate, oscillation_power) -> pd.DataFrame:
    pos = stats.positions
    lo, hi = int(pos.min()), int(pos.max())
    n = stats.n_tokens[lo : hi + 1]  # [K], zeros at holes
    fire, s, ss = (t[li, lo : hi + 1] for t in (stats.n_active, stats.act_sum, stats.act_sumsq))
    total_n = n.sum()
    present = n > 0
    n_safe = n.clamp(min=1).unsqueeze(1)
    rate_p, mean_p = fire / n_safe, s / n_safe  # [K N]
    rate = fire.sum(0) / total_n
    mean = s.sum(0) / total_n
    h = _binary_entropy(rate)
    mi = (h - ((n / total_n).unsqueeze(1) * _binary_entropy(rate_p)).sum(0)).clamp(min=0)
    mi_norm = torch.where(h > 0, mi / h.clamp(min=1e-300), torch.zeros_like(mi))
    between = (n.unsqueeze(1) * (mean_p - mean) ** 2).sum(0)
    within = (ss - s * mean_p).clamp(min=0).sum(0)
    total_ss = between + within
    constant = total_ss <= 1e-12 * ss.sum(0).clamp(min=1e-300)
    eta2 = torch.where(constant, torch.full_like(mi, math.nan), between / total_ss.clamp(min=1e-300))
    # Holes (positions without tokens) take the neuron's overall value, so they add no power.
    mean_filled = torch.where(present.unsqueeze(1), mean_p, mean)
    rate_filled = torch.where(present.unsqueeze(1), rate_p, rate)
    peak_bin, period, share = _spectrum(mean_filled)
    # Miller-Madow: a plug-in MI over K positions from N tokens is biased up by (K-1)/(2N ln 2)
    # bits; with few tokens per position that bias alone exceeds 0.05 and every neuron would pass.
    bias = (int(present.sum()) - 1) / (2 * float(total_n) * math.log(2.0))
    positional = (mi - bias) > mi_threshold
    category = np.full(len(mi), NOT_POSITIONAL, dtype=object)
    idx = torch.nonzero(positional).squeeze(1)
    if len(idx):
        shape = np.array(_shape_categories(rate_filled[:, idx]), dtype=object)
        shape = np.where(shape == "other", np.where(mi_norm[idx] >= 0.5, "other-strong", "other-weak"), shape)
        oscillatory = ((peak_bin >= 2) & (share >= oscillation_power))[idx].numpy()
        category[idx.numpy()] = np.where(oscillatory, "oscillatory", shape)
    n_total = float(total_n)
    columns = {"mi": mi, "mi_norm": mi_norm, "eta2": eta2, "period": period, "period_power": share}
    std, peak = (total_ss / n_total).sqrt(), mean_filled.argmax(0) + lo
    columns.update(firing_rate=rate, mean=mean, std=std, peak_position=peak)
    columns.update(dead=fire.sum(0) == 0, always_on=rate >= always_on_rate, is_positional=positional)
    nan_mi = mi.isnan().numpy()
    category[nan_mi] = UNDETERMINED  # no category from a NaN score
    table = pd.DataFrame({"layer": stats.layers[li], "neuron": range(stats.n_neurons)})
    table = table.assign(**{k: v.numpy() for k, v in columns.items()}, category=category)
    table["note"] = np.where(nan_mi, undetermined({"mi": math.nan}), "")
    table.insert(3, "mi_bias", bias)
    return table


def _layer_summary(table: pd.DataFrame) -> pd.DataFrame:
    grouped = table.groupby("layer", sort=False, dropna=False)
    summary = grouped.agg(
        n_neurons=("neuron", "size"),
        dead=("dead", "sum"),
        always_on=("always_on", "sum"),
        positional=("is_positional", "sum"),
    )
    counts = pd.crosstab(table["layer"], table["category"]).reindex(columns=list(CATEGORIES), fill_value=0)
    return summary.join(counts).fillna(0).astype(int).reset_index()


def positional_neurons(
    source: Any,
    tokens: Any = None,
    *,
    site: str = "mlp_post",
    layers: int | Sequence[int] | None = None,
    threshold: float | None = None,
    mi_threshold: float = 0.05,
    exclude_pos0: bool = True,
    device: str | torch.device = "auto",
    always_on_rate: float = 0.99,
    oscillation_power: float = 0.5,
    attention_mask: Tensor | None = None,
    position_ids: Tensor | None = None,
    progress: bool = False,
    exclude_bos: Any = UNSET,
) -> PositionalNeurons:
    """Score every neuron of ``site`` for position dependence and sort positional ones into categories.

    Method of Voita et al. 2023 ("Neurons in LLMs: dead, n-gram, positional"). Inputs as in
    ``neuron_position_stats``: a store (streamed shard by shard), tensors [n seq N] or [L n seq N]
    with an optional ``attention_mask``, or a model run on ``tokens``. A neuron is active on a token
    when its activation > ``threshold`` (default f(0) of the store's ``act_fn``: 0 for ReLU / GELU /
    SiLU, see ``active_threshold``). Scores, over analysed tokens (padding and, if ``exclude_pos0``,
    position 0 removed; ``exclude_bos`` is its old name, deprecated):

    - ``mi`` = I(active; position) in bits = H(p) − Σ_t P(t) H(p_t), p_t the firing rate at
      position t; ``mi_bias`` = (K − 1) / (2 N ln 2), its expected value for a neuron that ignores
      position (K positions, N tokens); ``mi_norm`` = mi / H(p).
    - ``eta2`` = Σ_t n_t (m_t − m)² / Σ (x − m)² (NaN for a constant neuron).
    - ``period``, ``period_power``: from the FFT of the mean activation m_t over positions
      (K of them, mean removed), the peak frequency bin k*; ``period_power`` is the share of
      the spectral power in bins k*−1..k*+1, ``period`` = K / their power-weighted mean bin.

    Positional: ``mi - mi_bias > mi_threshold`` (bias-corrected, so a short run cannot call every
    neuron positional; with Voita's 5M tokens the correction is negligible). Categories of positional
    neurons: see ``PositionalNeurons`` (``oscillation_power`` sets the oscillatory one); others get
    ``"none"``. ``dead``: never active on the analysed tokens; ``always_on``: firing rate ≥ ``always_on_rate``.
    """
    rates = {"mi_threshold": mi_threshold, "always_on_rate": always_on_rate, "oscillation_power": oscillation_power}
    for name, value in rates.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    exclude_pos0 = bool(exclude_pos0_choice(exclude_pos0, old="exclude_bos", old_value=exclude_bos))
    masks = {"attention_mask": attention_mask, "position_ids": position_ids}
    stats, facts = _gather(source, tokens, site, layers, threshold, exclude_pos0, device, progress=progress, **masks)
    table = pd.concat(
        [_score_layer(stats, li, mi_threshold, always_on_rate, oscillation_power) for li in range(len(stats.layers))],
        ignore_index=True,
    )
    params = {"site": site, "threshold": stats.threshold, "exclude_bos": exclude_pos0, **rates}
    n_tokens = int(stats.n_tokens.sum())
    info = RunInfo(
        "positional_neurons", site=site, layers=stats.layers, n_tokens=n_tokens, exclude_pos0=exclude_pos0, **facts
    )
    return PositionalNeurons(table, _layer_summary(table), stats, replace(info, params=params))
