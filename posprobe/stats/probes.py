"""Position probes with controls: where can position be read out, layer by layer.

The core measurement of Haviv et al. 2022 ("Transformer LMs without positional encodings still
learn positional information"), with the hygiene of Hewitt & Liang 2019: every score comes with
a shuffled-label control, a random-init-model control and a token-identity baseline; train and
test are split by sequence (never by token); and every number is reported with and without
position 0 (the BOS / attention-sink token, RESEARCH.md §6).

Kinds of probe: ``ridge`` fits all layers and folds in one batched solve, alpha chosen on each
training fold by exact leave-one-out (``"loo"``, as scikit-learn's RidgeCV; the default) or by
``"gcv"``, about 1.35× faster but fooled by high-leverage tokens such as SmolLM2's
massive-activation rows (R² −78 at layer 0 where LOO gives +0.12); ``sparse`` takes the top-``k``
neurons by |correlation| with the target, then ridge (``neurons`` names them); ``logistic`` is
multinomial over the target's values, penalty ``C``, LBFGS in float32 (so CPU and GPU may differ
in a few predictions). Features are standardised inside every probe.

``probe_position`` runs in named steps: check the settings (``_Settings``), load the
activations (``_load``), then per target build the samples, folds and label columns
(``_prepare_target``), fit every kind (``_fit_kind``) and score each position-0 variant
(``_variant_rows``).
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar

import pandas as pd
import torch
from torch import Tensor

from posprobe.devices import resolve_device
from posprobe.distributed import current_ranks
from posprobe.finite import check_finite
from posprobe.models.base import positions_from_mask
from posprobe.progress import tqdm
from posprobe.results import Result, RunInfo, deprecated_alias
from posprobe.sites import ATTENTION_MAP_SITES, LAYERLESS_SITES, SiteKey, check_site, resolve_stored_layers
from posprobe.stats.probe_cv import (
    FoldPlan,
    RowShare,
    index_in,
    logistic_oof,
    ridge_oof,
    sparse_oof,
    token_baseline_oof,
)
from posprobe.stats.probe_estimators import (
    ALPHA_SELECTIONS,
    DEFAULT_ALPHAS,
    LogisticProbe,
    RidgeProbe,
    SparseProbe,
)
from posprobe.stats.streaming import UNSET, Source, as_source, exclude_pos0_choice
from posprobe.store import ActivationStore

if TYPE_CHECKING:
    import plotly.graph_objects as go

__all__ = [
    "CONTROLS",
    "KINDS",
    "METRICS",
    "TARGETS",
    "LogisticProbe",
    "ProbeResult",
    "RidgeProbe",
    "SparseProbe",
    "probe_model",
    "probe_position",
    "random_baseline_mad",
]

TARGETS = ("absolute", "log", "bucket", "relative")
KINDS = ("ridge", "sparse", "logistic")
CONTROLS = ("shuffled", "random_init", "token")
PAIR_FEATURES = ("diff", "concat")
#: the score columns ``ProbeResult.figure`` draws per layer (its figure kinds), the default first
METRICS = ("r2", "mae", "accuracy", "mad", "selectivity")

Acts = ActivationStore | str | os.PathLike | Tensor | Mapping[Any, Tensor]


def random_baseline_mad(n_positions: int) -> float:
    """Expected |guess − truth| for uniform guesses over N positions: (N²−1)/(3N) (Haviv et al. 2022)."""
    if n_positions < 1:
        raise ValueError(f"n_positions must be >= 1, got {n_positions}")
    return (n_positions**2 - 1) / (3 * n_positions)


@dataclass(frozen=True)
class ProbeResult(Result):
    """What ``probe_position`` returns: the tidy ``table``, the grouped-CV ``split`` it used and the run ``info``.

    ``table``: a row per layer × target × kind × ``include_pos0`` (rows with position-0 tokens, or
    without). Metrics (pooled out-of-fold predictions): ``r2`` and ``mae`` on the target;
    ``accuracy`` and ``mad`` after rounding predictions to the nearest position / bucket / offset
    (Haviv's mean absolute distance; for ``log`` back in positions); ``mad_chance`` is (N²−1)/(3N)
    for N positions (other targets: E|c − c'| over the label distribution). Controls report R²:
    ``control_shuffled`` (labels permuted across tokens), ``control_random_init`` (the same probe
    on the random-init twin's activations of the same tokens) and ``control_token`` (ridge on
    one-hot token ids). ``selectivity`` = r2 − the largest available control R²;
    ``controls_missing`` names the controls that could not be run (their columns are NaN). Also:
    model, site, layer, target, kind, n_samples, n_positions, alpha (the median over the folds of
    the chosen ridge alpha; C for logistic), neurons (the sparse probe's, chosen on all rows).
    ``split[f]`` lists the sequences (row indices of the store) tested in fold f.
    ``info``: the run record (``params``: targets, kinds, n_splits, controls, random_init_control,
    alphas, alpha_selection, k, C, max_iter, n_buckets, n_pairs, pair_features, device).
    Figure kinds: the metrics of ``METRICS`` present in the table (default ``"r2"``), each per layer
    with its controls.
    """

    SAVED: ClassVar[Sequence[str]] = ("r2",)

    table: pd.DataFrame
    split: tuple[tuple[int, ...], ...]
    info: RunInfo

    site = property(lambda self: self.info.site)

    def figure_kinds(self) -> list[str]:
        """The metrics this table holds, ``"r2"`` first."""
        return [metric for metric in METRICS if metric in self.table.columns]

    def _draw(self, kind: str, **options: Any) -> go.Figure:
        from posprobe.plots.probes import plot_probe_position

        return plot_probe_position(self.table, metric=kind, **options)

    def plot(self, metric: str = "r2") -> go.Figure:
        """Deprecated spelling of ``figure(kind=metric)``, kept for one release."""
        deprecated_alias("ProbeResult.plot(metric)", "ProbeResult.figure(kind=metric)")
        return self.figure(metric)


# -- inputs -----------------------------------------------------------------------------------------


@dataclass
class _Inputs:
    acts: Tensor  # [L n_seq seq D]
    layers: list[int | None]
    mask: Tensor  # [n_seq seq] bool
    positions: Tensor  # [n_seq seq]
    tokens: Tensor | None  # [n_seq seq]
    source: Source | None  # the store's, through the input layer; None for activations given in memory
    seqs: Tensor | None = None  # the sequences ``acts`` holds (a rank's share of a distributed run); None: all

    @property
    def held_mask(self) -> Tensor:
        """The attention mask of the sequences ``acts`` holds."""
        return self.mask if self.seqs is None else self.mask[self.seqs]

    @property
    def model(self) -> str:
        return "activations" if self.source is None else self.source.name


def _load(
    source: Acts,
    site: str,
    layers: Sequence[int] | int | None,
    positions: Tensor | None,
    attention_mask: Tensor | None,
    tokens: Tensor | None,
    seqs: Tensor | None = None,
) -> _Inputs:
    """The activations to probe with their masks, positions and tokens; ``seqs``: only those sequences (the
    random-init twin of a rank's share); a store read under torch.distributed: this rank's shards."""
    check_site(site)
    if site in ATTENTION_MAP_SITES:
        raise ValueError(f"site {site!r} holds attention maps, not per-token vectors; probe e.g. resid_post or z")
    wanted = [layers] if isinstance(layers, int) else None if layers is None else list(layers)
    if site in LAYERLESS_SITES:
        wanted = None  # embed / pos_embed have one "layer"; a layer list meant for other sites does not apply
    if isinstance(source, str | os.PathLike):
        source = ActivationStore(source)  # a folder that is not a store is said here
    if isinstance(source, ActivationStore):
        inputs = _load_store(as_source(source, tokens), site, wanted, seqs)
    else:
        inputs = _load_in_memory(source, wanted, positions, attention_mask, tokens)
        if seqs is not None:
            inputs = replace(inputs, acts=inputs.acts[:, seqs], seqs=seqs)
    if inputs.acts.ndim < 4 or inputs.acts[0].numel() == 0 or not inputs.mask.bool().any():
        raise ValueError(f"activations of {site!r} are empty (shape {tuple(inputs.acts.shape)})")
    layer_labels = [None if site in LAYERLESS_SITES else layer for layer in inputs.layers]
    return _Inputs(
        inputs.acts.flatten(3).float(),
        layer_labels,
        inputs.mask.bool(),
        inputs.positions.long(),
        inputs.tokens,
        inputs.source,
        inputs.seqs,
    )


def _load_store(source: Source, site: str, wanted: list[int] | None, seqs: Tensor | None) -> _Inputs:
    store = source.store
    assert store is not None  # _load hands over stores only
    chosen = resolve_stored_layers(site, wanted, store.layers(site), source.info.get("n_layers"))
    if seqs is None and source.ranks.active:  # torch.distributed: this rank reads its own shards
        bounds = store.shard_bounds()
        mine = source.ranks.shards(len(bounds), f"the store {store.path}")
        seqs = torch.cat([torch.arange(*bounds[i]) for i in mine])
    acts = store.stack(site, chosen, sequences=None if seqs is None else seqs.tolist())
    return _Inputs(acts, chosen, store.attention_mask, store.position_ids, store.tokens, source, seqs)


def _load_in_memory(
    source: Tensor | Mapping[Any, Tensor],
    wanted: list[int] | None,
    positions: Tensor | None,
    attention_mask: Tensor | None,
    tokens: Tensor | None,
) -> _Inputs:
    if isinstance(source, Tensor):
        if source.ndim < 4:
            raise ValueError(f"activations must be [layers n_seq seq d], got shape {tuple(source.shape)}")
        source = dict(enumerate(source))
    if not isinstance(source, Mapping) or not source:
        raise ValueError("no activations given: pass an ActivationStore, a [L n_seq seq d] tensor or {layer: tensor}")
    keys = [SiteKey.parse(k).layer if isinstance(k, str) else k for k in source]
    chosen: list[int | None] = list(keys) if wanted is None else list(wanted)
    missing = [layer for layer in chosen if layer not in keys]
    if missing or not chosen:
        raise ValueError(f"layers {missing or chosen} not among the given activations; given layers: {keys}")
    acts = torch.stack([torch.as_tensor(list(source.values())[keys.index(layer)]) for layer in chosen])
    mask = torch.ones(acts.shape[1:3], dtype=torch.long) if attention_mask is None else torch.as_tensor(attention_mask)
    pos = positions_from_mask(mask) if positions is None else torch.as_tensor(positions)
    for name, t in (("attention_mask", mask), ("positions", pos), ("tokens", tokens)):
        if t is not None and tuple(t.shape) != tuple(acts.shape[1:3]):
            raise ValueError(f"{name} shape {tuple(t.shape)} != activations' [n_seq seq] {tuple(acts.shape[1:3])}")
    return _Inputs(acts, chosen, mask, pos, tokens, None)


# -- samples, folds, scores -------------------------------------------------------------------------


@dataclass
class _Samples:
    X: Tensor  # [L n d]
    y: Tensor  # [n] the regression target
    cls: Tensor  # [n] what accuracy / MAD compare: positions, buckets or offsets
    at_pos0: Tensor  # [n]
    seq: Tensor  # [n]
    key: Tensor | None  # [n] token identity (pairs: both ids)
    local: Tensor | None = None  # X's rows among the n (a rank's share of a distributed run); None: X has all n


def _tokens_of(inputs: _Inputs) -> tuple[Tensor, Tensor, Tensor]:
    seq, col = inputs.mask.nonzero(as_tuple=True)
    return seq, col, inputs.positions[seq, col]


def _samples(
    inputs: _Inputs,
    target: str,
    n_buckets: int,
    n_pairs: int | None,
    pair_features: str,
    seed: int,
    device: torch.device,
) -> _Samples:
    seq, col, pos = _tokens_of(inputs)
    X, local = _features(inputs, seq, col, device)
    key = None if inputs.tokens is None else inputs.tokens[seq, col].long()
    pos_f = pos.double()
    if target == "absolute":
        return _Samples(X, pos_f, pos_f, pos == 0, seq, key, local)
    if target == "log":
        return _Samples(X, torch.log1p(pos_f), pos_f, pos == 0, seq, key, local)
    if target == "bucket":
        bucket = torch.div(pos * n_buckets, int(pos.max()) + 1, rounding_mode="floor").double()
        return _Samples(X, bucket, bucket, pos == 0, seq, key, local)
    a, b = _sample_pairs(seq, n_pairs, seed)
    pairs, (ia, ib) = None, (a, b)
    if local is not None:  # the pairs of the sequences held here (a pair never spans two sequences)
        row_in_X = index_in(local, seq.numel())
        pairs = (row_in_X[a] >= 0).nonzero().squeeze(1)
        ia, ib = row_in_X[a[pairs]], row_in_X[b[pairs]]
    feats = X[:, ia] - X[:, ib] if pair_features == "diff" else torch.cat([X[:, ia], X[:, ib]], dim=-1)
    offset = (pos[a] - pos[b]).double()
    pair_key = None if key is None else key[a] * (int(key.max()) + 1) + key[b]
    return _Samples(feats, offset, offset, (pos[a] == 0) | (pos[b] == 0), seq[a], pair_key, pairs)


def _features(inputs: _Inputs, seq: Tensor, col: Tensor, device: torch.device) -> tuple[Tensor, Tensor | None]:
    """The feature rows [L n d] of the real tokens ``(seq, col)`` held here, and which of them they are
    (None: all; a rank of a distributed run holds its own sequences only)."""
    if inputs.seqs is not None:
        in_acts = index_in(inputs.seqs, inputs.mask.shape[0])
        local = (in_acts[seq] >= 0).nonzero().squeeze(1)
        return inputs.acts[:, in_acts[seq[local]], col[local]].to(device), local
    if bool(inputs.mask.all()):  # every token is real: rows in row-major order are a view, not a copy
        return inputs.acts.flatten(1, 2).to(device), None
    return inputs.acts[:, seq, col].to(device), None


def _sample_pairs(seq: Tensor, n_pairs: int | None, seed: int) -> tuple[Tensor, Tensor]:
    """Token pairs (i, j), i ≠ j, drawn uniformly within each sequence; ``n_pairs`` each (default: its length)."""
    counts = torch.bincount(seq)
    starts = torch.cumsum(counts, 0) - counts
    usable = (counts >= 2).nonzero().squeeze(1)
    if not usable.numel():
        raise ValueError("target 'relative' needs sequences of at least 2 tokens")
    per_seq = counts[usable] if n_pairs is None else torch.full_like(usable, n_pairs)
    owner = usable.repeat_interleave(per_seq)
    gen = torch.Generator().manual_seed(seed)
    m = counts[owner]
    i = (torch.rand(owner.numel(), generator=gen, dtype=torch.float64) * m).long()
    j = (torch.rand(owner.numel(), generator=gen, dtype=torch.float64) * (m - 1)).long()
    j = j + (j >= i).long()
    return starts[owner] + i, starts[owner] + j


def _split(seq: Tensor, n_splits: int, seed: int) -> tuple[Tensor, tuple[tuple[int, ...], ...]]:
    """Assign whole sequences to folds (a seeded GroupKFold): fold per row, and the sequences per fold."""
    present = torch.unique(seq)
    if present.numel() < n_splits:
        raise ValueError(f"{present.numel()} sequences cannot make {n_splits} folds split by sequence; lower n_splits")
    order = present[torch.randperm(present.numel(), generator=torch.Generator().manual_seed(seed))]
    fold_of_seq = torch.full((int(seq.max()) + 1,), -1, dtype=torch.long)
    fold_of_seq[order] = torch.arange(order.numel()) % n_splits
    split = tuple(tuple(sorted(order[f::n_splits].tolist())) for f in range(n_splits))
    return fold_of_seq[seq], split


def _shuffled(y: Tensor, rows: Tensor, seed: int) -> Tensor:
    """``y`` with the values at ``rows`` permuted among themselves (the shuffled-label control)."""
    out = y.clone()
    perm = rows[torch.randperm(rows.numel(), generator=torch.Generator().manual_seed(seed))]
    out[rows] = y[perm]
    return out


def _to_class(target: str, pred: Tensor, lo: float, hi: float) -> Tensor:
    if target == "log":
        pred = torch.expm1(pred)
    return pred.clamp(lo, hi).round()


def _r2(y: Tensor, pred: Tensor) -> Tensor:
    ss_tot = ((y - y.mean()) ** 2).sum()
    return 1 - ((pred - y) ** 2).sum(-1) / ss_tot


def _chance_mad(target: str, cls: Tensor) -> float:
    """Random-guess MAD: the (N²−1)/(3N) formula for positions; else E|c − c'| for independent draws of the labels."""
    if target in ("absolute", "log"):
        return random_baseline_mad(int(torch.unique(cls).numel()))
    c = cls.sort().values
    n = c.numel()
    return float(2 * (c * (2 * torch.arange(n, dtype=c.dtype) - n + 1)).sum() / n**2)


def _fit(
    kind: str, X: Tensor, Y: Tensor, plan: FoldPlan, opts: dict[str, Any], share: RowShare | None = None
) -> tuple[Tensor, Tensor, Tensor | None]:
    if kind == "ridge":
        pred, alpha = ridge_oof(X, Y, plan, opts["alphas"], opts["alpha_selection"], opts["dtype"], share)
        return pred, alpha, None
    if kind == "sparse":
        return sparse_oof(X, Y, plan, opts["k"], opts["alphas"], opts["alpha_selection"], opts["dtype"], share)
    pred, C = logistic_oof(X, Y, plan, opts["C"], opts["max_iter"], torch.float32)
    return pred.double(), C, None


def _as_list(value: str | Sequence[str], accepted: tuple[str, ...], what: str) -> list[str]:
    values = [value] if isinstance(value, str) else list(value)
    bad = [v for v in values if v not in accepted]
    if bad or not values:
        raise ValueError(f"unknown {what} {bad[0] if bad else values!r}; accepted: {', '.join(accepted)}")
    return values


# -- probe_position, step by step -------------------------------------------------------------------


@dataclass(frozen=True)
class _Settings:
    """``probe_position``'s checked settings: what to fit, on which rows, where."""

    targets: list[str]
    kinds: list[str]
    controls: set[str]
    exclude_pos0: bool | str
    variants: tuple[bool, ...]  # include position 0?, one per reported variant
    n_splits: int
    n_buckets: int
    n_pairs: int | None
    pair_features: str
    seed: int
    device: torch.device
    opts: dict[str, Any]  # what the fitters take: alphas, alpha_selection, k, C, max_iter, dtype

    @classmethod
    def check(
        cls,
        target: str | Sequence[str],
        kind: str | Sequence[str],
        controls: Sequence[str],
        exclude_pos0: bool | str,
        exclude_bos: Any,
        device: str | torch.device,
        seed: int,
        fit: dict[str, Any],
        samples: dict[str, Any],
    ) -> _Settings:
        """Check every setting, in the order ``probe_position`` always said what was wrong."""
        targets = _as_list(target, TARGETS, "target")
        kinds = _as_list(kind, KINDS, "kind")
        wanted_controls = set(_as_list(list(controls), CONTROLS, "control")) if controls else set()
        choice = exclude_pos0_choice(exclude_pos0, both=True, old="exclude_bos", old_value=exclude_bos)
        if fit["alpha_selection"] not in ALPHA_SELECTIONS:
            accepted = ", ".join(ALPHA_SELECTIONS)
            raise ValueError(f"unknown alpha_selection {fit['alpha_selection']!r}; accepted: {accepted}")
        n_splits, n_buckets, n_pairs, pair_features = (
            samples[name] for name in ("n_splits", "n_buckets", "n_pairs", "pair_features")
        )
        if pair_features not in PAIR_FEATURES:
            raise ValueError(f"unknown pair_features {pair_features!r}; accepted: {', '.join(PAIR_FEATURES)}")
        if not isinstance(n_splits, int) or n_splits < 2:
            raise ValueError(f"n_splits must be an integer >= 2, got {n_splits!r}")
        if not isinstance(n_buckets, int) or n_buckets < 2:
            raise ValueError(f"n_buckets must be an integer >= 2, got {n_buckets!r}")
        if n_pairs is not None and (not isinstance(n_pairs, int) or n_pairs < 1):
            raise ValueError(f"n_pairs must be a positive integer or None, got {n_pairs!r}")
        variants = {"both": (True, False), True: (False,), False: (True,)}[choice]
        opts = {**fit, "dtype": torch.float64}
        dev = resolve_device(device)
        return cls(
            targets,
            kinds,
            wanted_controls,
            choice,
            variants,
            n_splits,
            n_buckets,
            n_pairs,
            pair_features,
            seed,
            dev,
            opts,
        )

    def samples(self, inputs: _Inputs, target: str) -> _Samples:
        return _samples(inputs, target, self.n_buckets, self.n_pairs, self.pair_features, self.seed, self.device)

    def params(self, random_init: bool) -> dict[str, Any]:
        """The settings ``info.params`` records (the rest of the run record has its own fields)."""
        return {
            "targets": list(self.targets),
            "kinds": list(self.kinds),
            "n_splits": self.n_splits,
            "controls": [c for c in CONTROLS if c in self.controls],
            "random_init_control": random_init,
            "alphas": [float(a) for a in self.opts["alphas"]],
            "alpha_selection": self.opts["alpha_selection"],
            "k": self.opts["k"],
            "C": self.opts["C"],
            "max_iter": self.opts["max_iter"],
            "n_buckets": self.n_buckets,
            "n_pairs": self.n_pairs,
            "pair_features": self.pair_features,
            "device": str(self.device),
        }


@dataclass(frozen=True)
class _TargetData:
    """One target's samples, folds and label columns (the target, then its shuffled controls), shared by every kind."""

    target: str
    samples: _Samples
    plan: FoldPlan
    Y: Tensor  # [n T]
    token_pred: Tensor | None  # [V n] the token-identity baseline
    X_random: Tensor | None  # [L n d] the random-init twin's features
    missing: str  # controls_missing
    share: RowShare | None = None  # the rows this rank holds, in a distributed run


@dataclass(frozen=True)
class _KindFit:
    """One kind's out-of-fold predictions [L V n T], regularisation [L n_fits T], neurons and the twin's predictions."""

    kind: str
    pred: Tensor
    reg: Tensor
    neurons: Tensor | None
    random_pred: Tensor | None


def _prepare_target(
    inputs: _Inputs, random_inputs: _Inputs | None, target: str, cfg: _Settings
) -> tuple[_TargetData, tuple[tuple[int, ...], ...]]:
    """Samples, folds (and the split they record), label columns and the token baseline of one target."""
    s = cfg.samples(inputs, target)
    fold, split = _split(s.seq, cfg.n_splits, cfg.seed)
    plan = FoldPlan.build(fold, s.at_pos0, cfg.n_splits, cfg.variants)
    columns = [s.y]
    if "shuffled" in cfg.controls:
        all_rows = torch.arange(s.y.numel())
        not_pos0 = (~s.at_pos0).nonzero().squeeze(1)
        columns += [_shuffled(s.y, all_rows, cfg.seed + 1), _shuffled(s.y, not_pos0, cfg.seed + 2)]
    Y = torch.stack(columns, 1)
    token_pred = None
    if "token" in cfg.controls and s.key is not None:
        token_pred = token_baseline_oof(s.key, s.y, plan, cfg.opts["alphas"])
    X_random = None if random_inputs is None else cfg.samples(random_inputs, target).X
    missing = _missing_controls(cfg.controls, X_random is not None, token_pred is not None)
    share = None
    if s.local is not None:
        assert inputs.source is not None  # only a store is read in shares
        share = RowShare.build(s.local, s.y.numel(), inputs.source.ranks)
    return _TargetData(target, s, plan, Y, token_pred, X_random, missing, share), split


def _fit_kind(t: _TargetData, kind: str, cfg: _Settings, bar: Any) -> _KindFit:
    """Fit ``kind`` on the target and its shuffled columns, then on the random-init twin's features."""
    dev = cfg.device
    pred, reg, neurons = _fit(kind, t.samples.X, t.Y.to(dev), t.plan, cfg.opts, t.share)
    bar.update()
    random_pred = (
        None if t.X_random is None else _fit(kind, t.X_random, t.Y[:, :1].to(dev), t.plan, cfg.opts, t.share)[0]
    )
    bar.update(0 if t.X_random is None else 1)
    return _KindFit(kind, pred, reg, neurons, random_pred)


def _variant_metrics(
    t: _TargetData, fit: _KindFit, v: int, include_pos0: bool, keep: Tensor, dev: torch.device
) -> dict[str, Tensor | None]:
    """Per-layer scores [L] of variant ``v`` on the rows ``keep`` (None: a control not run), pooled over the folds."""
    s, Y = t.samples, t.Y
    y, cls, shuffled_col = s.y[keep], s.cls[keep], 1 if include_pos0 else 2
    p = fit.pred[:, v, keep.to(dev)].cpu()
    cls_pred = _to_class(t.target, p[..., 0], float(cls.min()), float(cls.max()))
    random_pred = fit.random_pred
    return {
        "r2": _r2(y, p[..., 0]),
        "mae": (p[..., 0] - y).abs().mean(-1),
        "accuracy": (cls_pred == cls).double().mean(-1),
        "mad": (cls_pred - cls).abs().mean(-1),
        "control_shuffled": _r2(Y[keep, shuffled_col], p[..., shuffled_col]) if Y.shape[1] > 1 else None,
        "control_random_init": None if random_pred is None else _r2(y, random_pred[:, v, keep.to(dev), 0].cpu()),
    }


def _variant_rows(
    inputs: _Inputs, site: str, t: _TargetData, fit: _KindFit, v: int, include_pos0: bool, dev: torch.device
) -> list[dict[str, Any]]:
    """The table's rows of one target × kind × position-0 variant: one per layer."""
    s = t.samples
    keep = torch.ones_like(s.at_pos0) if include_pos0 else ~s.at_pos0
    fits = [i for i, (fv, _, _) in enumerate(t.plan.fits) if fv == v]
    y, cls = s.y[keep], s.cls[keep]
    metrics = _variant_metrics(t, fit, v, include_pos0, keep, dev)
    token_r2 = math.nan if t.token_pred is None else float(_r2(y, t.token_pred[v, keep]))
    chance = _chance_mad(t.target, cls)
    rows = []
    for li, layer in enumerate(inputs.layers):
        row: dict[str, Any] = {
            "model": inputs.model,
            "site": site,
            "layer": layer,
            "target": t.target,
            "kind": fit.kind,
            "include_pos0": include_pos0,
            "n_samples": int(keep.sum()),
            "n_positions": int(torch.unique(cls).numel()),
        }
        row |= {m: math.nan if val is None else float(val[li]) for m, val in metrics.items()}
        row |= {
            "mad_chance": chance,
            "control_token": token_r2,
            "alpha": float(fit.reg[li, fits, 0].median()),
            "neurons": None if fit.neurons is None else tuple(fit.neurons[li, v].tolist()),
            "controls_missing": t.missing,
        }
        rows.append(row)
    return rows


def _probe_table(
    inputs: _Inputs, random_inputs: _Inputs | None, site: str, cfg: _Settings, progress: bool
) -> tuple[pd.DataFrame, tuple[tuple[int, ...], ...]]:
    """Every target × kind × variant × layer, with selectivity; and the split of the last target."""
    rows: list[dict[str, Any]] = []
    split: tuple[tuple[int, ...], ...] = ()
    n_fits = len(cfg.targets) * len(cfg.kinds) * (2 if random_inputs is not None else 1)
    bar = tqdm(total=n_fits, desc=f"probe {site}", unit="fit", disable=not progress)
    for target in cfg.targets:
        t, split = _prepare_target(inputs, random_inputs, target, cfg)
        for kind in cfg.kinds:
            fit = _fit_kind(t, kind, cfg, bar)
            for v, include_pos0 in enumerate(cfg.variants):
                rows += _variant_rows(inputs, site, t, fit, v, include_pos0, cfg.device)
    table = pd.DataFrame(rows)
    controls_r2 = table[["control_shuffled", "control_random_init", "control_token"]]
    table.insert(table.columns.get_loc("mad_chance") + 1, "selectivity", table["r2"] - controls_r2.max(axis=1))
    table["layer"] = table["layer"].astype("Int64")
    bar.close()
    return table, split


def probe_position(
    source: Acts,
    tokens: Tensor | None = None,
    *,
    site: str = "resid_post",
    target: str | Sequence[str] = "absolute",
    kind: str | Sequence[str] = "ridge",
    layers: Sequence[int] | int | None = None,
    n_splits: int = 5,
    controls: Sequence[str] = CONTROLS,
    random_init_store: Acts | None = None,
    seed: int = 0,
    device: str | torch.device = "auto",
    exclude_pos0: bool | str = "both",
    exclude_bos: Any = UNSET,
    positions: Tensor | None = None,
    attention_mask: Tensor | None = None,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    alpha_selection: str = "loo",
    k: int = 8,
    C: float = 1.0,
    max_iter: int = 100,
    n_buckets: int = 8,
    n_pairs: int | None = None,
    pair_features: str = "diff",
    progress: bool = False,
) -> ProbeResult:
    """Fit position probes with controls at every layer of ``site``: a row per layer × target × kind × include_pos0.

    ``source``: an ActivationStore (or its folder), a tensor [L n_seq seq d] or a dict {layer: [n_seq
    seq d]}, with ``tokens`` (ids), ``attention_mask`` and ``positions`` [n_seq seq] as needed (positions
    default to the count of real tokens before each); ``probe_model`` probes a model. ``target``:
    ``absolute``, ``log`` (log1p), ``bucket`` (``n_buckets`` equal-width bins) or ``relative`` (the offset
    i − j of ``n_pairs`` seeded token pairs per sequence, ``pair_features`` ``"diff"`` or ``"concat"``).
    ``kind``: ``ridge``, ``sparse`` (top ``k`` neurons) or ``logistic`` (penalty ``C``), each on
    standardised features, ridge's alpha picked from ``alphas`` by ``alpha_selection`` (``"loo"`` or
    ``"gcv"``; the module docstring compares them). ``random_init_store``: the same tokens through
    ``model.random_init_copy()``. Splits are by sequence (``n_splits`` folds, seeded; ``result.split``).
    ``exclude_pos0``: ``"both"`` (default) reports rows with and without position-0 tokens (the BOS when
    one was prepended), True only without, False only with (``exclude_bos``: its old name, one release).
    ``progress`` shows a bar over the fits. ``ProbeResult`` lists the metrics and controls of the table.
    """
    cfg = _Settings.check(
        target,
        kind,
        controls,
        exclude_pos0,
        exclude_bos,
        device,
        seed,
        fit={"alphas": alphas, "alpha_selection": alpha_selection, "k": k, "C": C, "max_iter": max_iter},
        samples={"n_splits": n_splits, "n_buckets": n_buckets, "n_pairs": n_pairs, "pair_features": pair_features},
    )
    inputs, random_inputs = _load_both(source, random_init_store, cfg, site, layers, positions, attention_mask, tokens)
    table, split = _probe_table(inputs, random_inputs, site, cfg, progress)
    return ProbeResult(table, split, _run_info(inputs, site, cfg, random_inputs is not None))


def _load_both(
    source: Acts,
    random_init_store: Acts | None,
    cfg: _Settings,
    site: str,
    layers: Sequence[int] | int | None,
    positions: Tensor | None,
    attention_mask: Tensor | None,
    tokens: Tensor | None,
) -> tuple[_Inputs, _Inputs | None]:
    """The probed activations and, when its control is wanted, the random-init twin's: same tokens, all finite."""
    if isinstance(tokens, str):
        raise TypeError(
            f"probe_position's second argument is token ids [n_seq seq], got the string {tokens!r}; "
            f"pass the site by name: site={tokens!r}"
        )
    inputs = _load(source, site, layers, positions, attention_mask, tokens)
    if inputs.seqs is not None and "logistic" in cfg.kinds:
        raise ValueError(
            "kind 'logistic' is fitted in one process (its LBFGS iterations are not sums over tokens); under "
            "torch.distributed probe with kind='ridge' or 'sparse', or run the logistic probes without torchrun"
        )
    random_inputs = None
    if random_init_store is not None and "random_init" in cfg.controls:
        random_inputs = _load(random_init_store, site, layers, positions, attention_mask, tokens, inputs.seqs)
        _check_same_tokens(inputs, random_inputs)
    _check_finite(inputs, site, "")
    if random_inputs is not None:
        _check_finite(random_inputs, site, "random-init ")
    return inputs, random_inputs


def _run_info(inputs: _Inputs, site: str, cfg: _Settings, random_init: bool) -> RunInfo:
    fields: dict[str, Any] = dict(
        site=site, layers=inputs.layers, seed=cfg.seed, exclude_pos0=cfg.exclude_pos0, params=cfg.params(random_init)
    )
    if inputs.source is not None:
        return inputs.source.run_info("probe_position", **fields)
    n_sequences, seq_len = inputs.mask.shape
    n_tokens = int(inputs.mask.sum())
    fields["layers"] = tuple(fields["layers"])
    return RunInfo(
        "probe_position", inputs.model, n_sequences=n_sequences, seq_len=seq_len, n_tokens=n_tokens, **fields
    )


def _missing_controls(wanted: set[str], have_random: bool, have_tokens: bool) -> str:
    """Why each absent control column is NaN, e.g. ``random_init: no random_init_store given``."""
    why = {c: "not requested" for c in CONTROLS if c not in wanted}
    if "random_init" in wanted and not have_random:
        why["random_init"] = "no random_init_store given"
    if "token" in wanted and not have_tokens:
        why["token"] = "no token ids given"
    return "; ".join(f"{c}: {reason}" for c, reason in why.items())


def _check_same_tokens(real: _Inputs, random: _Inputs) -> None:
    if real.mask.shape != random.mask.shape or not torch.equal(real.mask, random.mask):
        raise ValueError("random_init_store must hold the same token batch as the probed store (masks differ)")
    if real.tokens is not None and random.tokens is not None and not torch.equal(real.tokens, random.tokens):
        raise ValueError("random_init_store must hold the same token batch as the probed store (token ids differ)")
    if real.layers != random.layers:
        raise ValueError(f"random_init_store has layers {random.layers}, the probed store {real.layers}")


def _check_finite(inputs: _Inputs, site: str, which: str) -> None:
    for li, layer in enumerate(inputs.layers):
        check_finite(
            site, layer, inputs.acts[li], mask=inputs.held_mask, where=f"of the {which}activations".replace("  ", " ")
        )


def probe_model(
    source: Any,
    tokens: Any = None,
    *,
    site: str = "resid_post",
    layers: Sequence[int] | int | None = None,
    batch_size: int = 16,
    seed: int = 0,
    out: str | os.PathLike | None = None,
    **kwargs: Any,
) -> ProbeResult:
    """Extract ``site`` from a model and its ``random_init_copy(seed)``, then ``probe_position`` with all controls.

    ``source``: a model (anything ``load_model`` accepts) run on ``tokens`` (a TokenBatch, ids
    [n s] or texts). Stores are written under ``out`` (``real/`` and ``random_init/``; a temporary
    folder when None). Other keyword arguments go to ``probe_position``; ``info.params`` adds
    ``batch_size``.
    """
    from posprobe.extraction import extract

    run = as_source(source, tokens)
    if run.model is None or run.tokens is None:
        raise TypeError("probe_model runs a model; to probe a store use probe_position(store)")
    model, batch = run.model, run.tokens
    if out is None and current_ranks().active:
        raise ValueError(
            "probe_model under torch.distributed writes its stores where every rank reaches them: pass out= a "
            "folder on a shared filesystem (each rank would otherwise get a temporary folder of its own)"
        )
    with tempfile.TemporaryDirectory(prefix="posprobe-probe-") as tmp:
        root = tmp if out is None else os.fspath(out)
        ext: dict[str, Any] = {"sites": [site], "layers": layers, "batch_size": batch_size}
        real = extract(model, batch, out=os.path.join(root, "real"), **ext)
        random = extract(model.random_init_copy(seed), batch, out=os.path.join(root, "random_init"), **ext)
        result = probe_position(real, site=site, random_init_store=random, seed=seed, **kwargs)
    info = replace(result.info, analysis="probe_model", params={**result.info.params, "batch_size": batch_size})
    return replace(result, info=info)
