"""Position probes with controls: where can position be read out, layer by layer.

The core measurement of Haviv et al. 2022 ("Transformer LMs without positional encodings still
learn positional information"), with the hygiene of Hewitt & Liang 2019: every score comes with
a shuffled-label control, a random-init-model control and a token-identity baseline; train and
test are split by sequence (never by token); and every number is reported with and without
position 0 (the BOS / attention-sink token, RESEARCH.md §6).
"""

from __future__ import annotations

import math
import os
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch
from torch import Tensor

from posprobe.devices import resolve_device
from posprobe.finite import check_finite
from posprobe.models.base import positions_from_mask
from posprobe.progress import tqdm
from posprobe.sites import ATTENTION_MAP_SITES, LAYERLESS_SITES, SiteKey, check_site, resolve_stored_layers
from posprobe.stats.probe_cv import FoldPlan, logistic_oof, ridge_oof, sparse_oof, token_baseline_oof
from posprobe.stats.probe_estimators import (
    ALPHA_SELECTIONS,
    DEFAULT_ALPHAS,
    LogisticProbe,
    RidgeProbe,
    SparseProbe,
)
from posprobe.store import ActivationStore

if TYPE_CHECKING:
    import plotly.graph_objects as go

    from posprobe.data import TokenBatch
    from posprobe.models.base import PositionModel

__all__ = [
    "CONTROLS",
    "KINDS",
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

Acts = ActivationStore | str | os.PathLike | Tensor | Mapping[Any, Tensor]


def random_baseline_mad(n_positions: int) -> float:
    """Expected |guess − truth| for uniform guesses over N positions: (N²−1)/(3N) (Haviv et al. 2022)."""
    if n_positions < 1:
        raise ValueError(f"n_positions must be >= 1, got {n_positions}")
    return (n_positions**2 - 1) / (3 * n_positions)


@dataclass(frozen=True)
class ProbeResult:
    """What ``probe_position`` returns: the tidy ``table`` and the grouped-CV ``split`` it used.

    ``split[f]`` lists the sequences (row indices of the store) tested in fold f.
    """

    table: pd.DataFrame
    split: tuple[tuple[int, ...], ...]
    site: str

    def figure(self, kind: str | None = None) -> go.Figure:
        """Score per layer with the controls beside it; ``kind`` is the metric (default ``"r2"``; also
        ``"mae"``, ``"accuracy"``, ``"mad"``, ``"selectivity"`` …, listed in the error for an unknown one)."""
        from posprobe.plots.probes import plot_probe_position

        return plot_probe_position(self.table, metric=kind or "r2")

    def plot(self, metric: str = "r2") -> go.Figure:
        """Deprecated spelling of ``figure(kind=metric)``, kept for one release."""
        warnings.warn("ProbeResult.plot(metric) is now figure(kind=metric)", DeprecationWarning, stacklevel=2)
        return self.figure(metric)


@dataclass
class _Inputs:
    acts: Tensor  # [L n_seq seq D]
    layers: list[int | None]
    mask: Tensor  # [n_seq seq] bool
    positions: Tensor  # [n_seq seq]
    tokens: Tensor | None  # [n_seq seq]
    model: str


def _load(
    source: Acts,
    site: str,
    layers: Sequence[int] | int | None,
    positions: Tensor | None,
    attention_mask: Tensor | None,
    tokens: Tensor | None,
) -> _Inputs:
    check_site(site)
    if site in ATTENTION_MAP_SITES:
        raise ValueError(f"site {site!r} holds attention maps, not per-token vectors; probe e.g. resid_post or z")
    wanted = [layers] if isinstance(layers, int) else None if layers is None else list(layers)
    if site in LAYERLESS_SITES:
        wanted = None  # embed / pos_embed have one "layer"; a layer list meant for other sites does not apply
    if isinstance(source, str | os.PathLike):
        source = ActivationStore(source)
    toks: Tensor | None
    if isinstance(source, ActivationStore):
        stored = source.layers(site)
        chosen: list[int | None] = resolve_stored_layers(site, wanted, stored, source.model_info.get("n_layers"))
        acts = source.stack(site, chosen)
        mask, pos, toks, model = source.attention_mask, source.position_ids, source.tokens, source.model_name
    else:
        if isinstance(source, Tensor):
            if source.ndim < 4:
                raise ValueError(f"activations must be [layers n_seq seq d], got shape {tuple(source.shape)}")
            source = dict(enumerate(source))
        if not isinstance(source, Mapping) or not source:
            raise ValueError(
                "no activations given: pass an ActivationStore, a [L n_seq seq d] tensor or {layer: tensor}"
            )
        keys = [SiteKey.parse(k).layer if isinstance(k, str) else k for k in source]
        chosen = list(keys) if wanted is None else list(wanted)
        missing = [layer for layer in chosen if layer not in keys]
        if missing or not chosen:
            raise ValueError(f"layers {missing or chosen} not among the given activations; given layers: {keys}")
        acts = torch.stack([torch.as_tensor(list(source.values())[keys.index(layer)]) for layer in chosen])
        mask = (
            torch.ones(acts.shape[1:3], dtype=torch.long) if attention_mask is None else torch.as_tensor(attention_mask)
        )
        pos = positions_from_mask(mask) if positions is None else torch.as_tensor(positions)
        toks, model = tokens, "activations"
        for name, t in (("attention_mask", mask), ("positions", pos), ("tokens", toks)):
            if t is not None and tuple(t.shape) != tuple(acts.shape[1:3]):
                raise ValueError(f"{name} shape {tuple(t.shape)} != activations' [n_seq seq] {tuple(acts.shape[1:3])}")
    if acts.ndim < 4 or acts[0].numel() == 0 or not mask.bool().any():
        raise ValueError(f"activations of {site!r} are empty (shape {tuple(acts.shape)})")
    layer_labels = [None if site in LAYERLESS_SITES else layer for layer in chosen]
    return _Inputs(acts.flatten(3).float(), layer_labels, mask.bool(), pos.long(), toks, model)


@dataclass
class _Samples:
    X: Tensor  # [L n d]
    y: Tensor  # [n] the regression target
    cls: Tensor  # [n] what accuracy / MAD compare: positions, buckets or offsets
    at_pos0: Tensor  # [n]
    seq: Tensor  # [n]
    key: Tensor | None  # [n] token identity (pairs: both ids)


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
    if bool(inputs.mask.all()):  # every token is real: rows in row-major order are a view, not a copy
        X = inputs.acts.flatten(1, 2).to(device)
    else:
        X = inputs.acts[:, seq, col].to(device)
    key = None if inputs.tokens is None else inputs.tokens[seq, col].long()
    pos_f = pos.double()
    if target == "absolute":
        return _Samples(X, pos_f, pos_f, pos == 0, seq, key)
    if target == "log":
        return _Samples(X, torch.log1p(pos_f), pos_f, pos == 0, seq, key)
    if target == "bucket":
        bucket = torch.div(pos * n_buckets, int(pos.max()) + 1, rounding_mode="floor").double()
        return _Samples(X, bucket, bucket, pos == 0, seq, key)
    a, b = _sample_pairs(seq, n_pairs, seed)
    feats = X[:, a] - X[:, b] if pair_features == "diff" else torch.cat([X[:, a], X[:, b]], dim=-1)
    offset = (pos[a] - pos[b]).double()
    pair_key = None if key is None else key[a] * (int(key.max()) + 1) + key[b]
    return _Samples(feats, offset, offset, (pos[a] == 0) | (pos[b] == 0), seq[a], pair_key)


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


def _fit(kind: str, X: Tensor, Y: Tensor, plan: FoldPlan, opts: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor | None]:
    if kind == "ridge":
        pred, alpha = ridge_oof(X, Y, plan, opts["alphas"], opts["alpha_selection"], opts["dtype"])
        return pred, alpha, None
    if kind == "sparse":
        return sparse_oof(X, Y, plan, opts["k"], opts["alphas"], opts["alpha_selection"], opts["dtype"])
    pred, C = logistic_oof(X, Y, plan, opts["C"], opts["max_iter"], torch.float32)
    return pred.double(), C, None


def _as_list(value: str | Sequence[str], accepted: tuple[str, ...], what: str) -> list[str]:
    values = [value] if isinstance(value, str) else list(value)
    bad = [v for v in values if v not in accepted]
    if bad or not values:
        raise ValueError(f"unknown {what} {bad[0] if bad else values!r}; accepted: {', '.join(accepted)}")
    return values


def probe_position(
    store_or_acts: Acts,
    site: str = "resid_post",
    target: str | Sequence[str] = "absolute",
    kind: str | Sequence[str] = "ridge",
    layers: Sequence[int] | int | None = None,
    n_splits: int = 5,
    controls: Sequence[str] = CONTROLS,
    random_init_store: Acts | None = None,
    seed: int = 0,
    device: str | torch.device = "auto",
    exclude_bos: bool | str = "both",
    *,
    positions: Tensor | None = None,
    attention_mask: Tensor | None = None,
    tokens: Tensor | None = None,
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
    """Fit position probes with controls at every layer of ``site``: a row per layer × target × kind × with_pos0.

    Haviv et al. 2022 probe each layer for absolute position; controls follow Hewitt & Liang
    2019. ``store_or_acts`` is an ActivationStore (or its path), a tensor [L n_seq seq d] or a
    dict {layer: [n_seq seq d]} (then pass ``attention_mask`` / ``positions`` / ``tokens``
    [n_seq seq] as needed; positions default to the count of real tokens before each token).

    Targets: ``absolute`` position, ``log`` (log1p position), ``bucket`` (``n_buckets`` equal-width
    position bins) and ``relative`` (the offset i − j of a token pair drawn within one sequence,
    ``n_pairs`` per sequence, seeded; features the difference or concatenation of the two vectors).
    Kinds: ``ridge`` (all layers and folds in one batched solve; alpha chosen on each training
    fold from ``alphas`` by ``alpha_selection``: exact leave-one-out ``"loo"`` as scikit-learn's
    RidgeCV (default), or ``"gcv"``, about 1.35× faster but fooled by high-leverage tokens such as
    SmolLM2's massive-activation rows: R² −78 at layer 0 where LOO gives +0.12), ``sparse``
    (top-``k`` neurons by |correlation| with the target, then ridge; ``neurons`` names them) and
    ``logistic`` (multinomial over the target's values, penalty ``C``, LBFGS in float32, so CPU and
    GPU may differ in a few predictions).
    Features are standardised inside every probe.

    Metrics (pooled out-of-fold predictions): ``r2`` and ``mae`` on the target; ``accuracy`` and
    ``mad`` after rounding predictions to the nearest position / bucket / offset (Haviv's mean
    absolute distance; for ``log`` back in positions); ``mad_chance`` is (N²−1)/(3N) for N
    positions (other targets: E|c − c'| over the label distribution). Controls report R²:
    ``control_shuffled`` (labels permuted across tokens), ``control_random_init`` (the same probe
    on ``random_init_store``, activations of ``model.random_init_copy()`` on the same tokens) and
    ``control_token`` (ridge on one-hot token ids). ``selectivity`` = r2 − the largest available
    control R²; ``controls_missing`` names the controls that could not be run (their columns are NaN).

    Splits are by sequence (seeded GroupKFold, recorded in ``result.split``). ``exclude_bos``:
    ``"both"`` (default) reports rows with and without position-0 tokens (the BOS when one was
    prepended); ``True`` only without; ``False`` only with. ``progress`` shows a bar over the fits
    (target × kind, and the random-init twin's).
    """
    targets = _as_list(target, TARGETS, "target")
    kinds = _as_list(kind, KINDS, "kind")
    wanted_controls = set(_as_list(list(controls), CONTROLS, "control")) if controls else set()
    if exclude_bos not in ("both", True, False):
        raise ValueError(f"exclude_bos must be 'both', True or False, got {exclude_bos!r}")
    if alpha_selection not in ALPHA_SELECTIONS:
        raise ValueError(f"unknown alpha_selection {alpha_selection!r}; accepted: {', '.join(ALPHA_SELECTIONS)}")
    if pair_features not in PAIR_FEATURES:
        raise ValueError(f"unknown pair_features {pair_features!r}; accepted: {', '.join(PAIR_FEATURES)}")
    if not isinstance(n_splits, int) or n_splits < 2:
        raise ValueError(f"n_splits must be an integer >= 2, got {n_splits!r}")
    if not isinstance(n_buckets, int) or n_buckets < 2:
        raise ValueError(f"n_buckets must be an integer >= 2, got {n_buckets!r}")
    if n_pairs is not None and (not isinstance(n_pairs, int) or n_pairs < 1):
        raise ValueError(f"n_pairs must be a positive integer or None, got {n_pairs!r}")
    variants = {"both": (True, False), True: (False,), False: (True,)}[exclude_bos]
    dev = resolve_device(device)
    opts = {
        "alphas": alphas,
        "alpha_selection": alpha_selection,
        "k": k,
        "C": C,
        "max_iter": max_iter,
        "dtype": torch.float64,
    }

    inputs = _load(store_or_acts, site, layers, positions, attention_mask, tokens)
    random_inputs = None
    if random_init_store is not None and "random_init" in wanted_controls:
        random_inputs = _load(random_init_store, site, layers, positions, attention_mask, tokens)
        _check_same_tokens(inputs, random_inputs)
    _check_finite(inputs, site, "")
    if random_inputs is not None:
        _check_finite(random_inputs, site, "random-init ")

    rows: list[dict[str, Any]] = []
    split: tuple[tuple[int, ...], ...] = ()
    n_fits = len(targets) * len(kinds) * (2 if random_inputs is not None else 1)
    bar = tqdm(total=n_fits, desc=f"probe {site}", unit="fit", disable=not progress)
    for tgt in targets:
        s = _samples(inputs, tgt, n_buckets, n_pairs, pair_features, seed, dev)
        fold, split = _split(s.seq, n_splits, seed)
        plan = FoldPlan.build(fold, s.at_pos0, n_splits, variants)
        columns = [s.y]
        if "shuffled" in wanted_controls:
            all_rows = torch.arange(s.y.numel())
            columns += [_shuffled(s.y, all_rows, seed + 1), _shuffled(s.y, (~s.at_pos0).nonzero().squeeze(1), seed + 2)]
        Y = torch.stack(columns, 1)
        token_pred = None
        if "token" in wanted_controls and s.key is not None:
            token_pred = token_baseline_oof(s.key, s.y, plan, alphas)
        X_random = None
        if random_inputs is not None:
            X_random = _samples(random_inputs, tgt, n_buckets, n_pairs, pair_features, seed, dev).X
        missing = _missing_controls(wanted_controls, X_random is not None, token_pred is not None)
        for knd in kinds:
            pred, reg, neurons = _fit(knd, s.X, Y.to(dev), plan, opts)
            bar.update()
            random_pred = None if X_random is None else _fit(knd, X_random, Y[:, :1].to(dev), plan, opts)[0]
            bar.update(0 if X_random is None else 1)
            for v, with_pos0 in enumerate(variants):
                keep = torch.ones_like(s.at_pos0) if with_pos0 else ~s.at_pos0
                fits = [i for i, (fv, _, _) in enumerate(plan.fits) if fv == v]
                y, cls, shuffled_col = s.y[keep], s.cls[keep], 1 if with_pos0 else 2
                p = pred[:, v, keep.to(dev)].cpu()
                cls_pred = _to_class(tgt, p[..., 0], float(cls.min()), float(cls.max()))
                metrics = {
                    "r2": _r2(y, p[..., 0]),
                    "mae": (p[..., 0] - y).abs().mean(-1),
                    "accuracy": (cls_pred == cls).double().mean(-1),
                    "mad": (cls_pred - cls).abs().mean(-1),
                    "control_shuffled": _r2(Y[keep, shuffled_col], p[..., shuffled_col]) if Y.shape[1] > 1 else None,
                    "control_random_init": None
                    if random_pred is None
                    else _r2(y, random_pred[:, v, keep.to(dev), 0].cpu()),
                }
                token_r2 = math.nan if token_pred is None else float(_r2(y, token_pred[v, keep]))
                chance = _chance_mad(tgt, cls)
                for li, layer in enumerate(inputs.layers):
                    row: dict[str, Any] = {
                        "model": inputs.model,
                        "site": site,
                        "layer": layer,
                        "target": tgt,
                        "kind": knd,
                        "with_pos0": with_pos0,
                        "n_samples": int(keep.sum()),
                        "n_positions": int(torch.unique(cls).numel()),
                    }
                    row |= {m: math.nan if val is None else float(val[li]) for m, val in metrics.items()}
                    row |= {
                        "mad_chance": chance,
                        "control_token": token_r2,
                        "alpha": float(reg[li, fits, 0].median()),
                        "neurons": None if neurons is None else tuple(neurons[li, v].tolist()),
                        "controls_missing": missing,
                    }
                    rows.append(row)
    table = pd.DataFrame(rows)
    controls_r2 = table[["control_shuffled", "control_random_init", "control_token"]]
    table.insert(table.columns.get_loc("mad_chance") + 1, "selectivity", table["r2"] - controls_r2.max(axis=1))
    table["layer"] = table["layer"].astype("Int64")
    bar.close()
    return ProbeResult(table=table, split=split, site=site)


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
            site, layer, inputs.acts[li], mask=inputs.mask, where=f"of the {which}activations".replace("  ", " ")
        )


def probe_model(
    model: PositionModel,
    tokens: TokenBatch | Tensor | Sequence[str],
    site: str = "resid_post",
    *,
    layers: Sequence[int] | int | None = None,
    batch_size: int = 16,
    seed: int = 0,
    out: str | os.PathLike | None = None,
    **kwargs: Any,
) -> ProbeResult:
    """Extract ``site`` from ``model`` and ``model.random_init_copy(seed)``, then ``probe_position`` with all controls.

    Stores are written under ``out`` (``real/`` and ``random_init/``; a temporary folder when
    None). Other keyword arguments go to ``probe_position``.
    """
    from posprobe.data import as_token_batch
    from posprobe.extract import extract

    batch = as_token_batch(model, tokens)
    with tempfile.TemporaryDirectory(prefix="posprobe-probe-") as tmp:
        root = tmp if out is None else os.fspath(out)
        ext: dict[str, Any] = {"sites": [site], "layers": layers, "batch_size": batch_size}
        real = extract(model, batch, out=os.path.join(root, "real"), **ext)
        random = extract(model.random_init_copy(seed), batch, out=os.path.join(root, "random_init"), **ext)
        return probe_position(real, site, random_init_store=random, seed=seed, **kwargs)
