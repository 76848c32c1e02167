"""The machinery of position patching: corrupted twins, probe readouts, batched patched runs, metric sums.

``patching.patch_positions`` and ``subspace.subspace_patch`` are thin layers over ``run_patches``:
they describe interventions as ``Patch`` objects (a site and an edit of its activation) and turn
the summed ``Totals`` into tidy rows with ``metric_rows``. Every metric is a mean over tokens,
summed across batches so chunking never changes a number.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from posprobe.data import TokenBatch
from posprobe.models.base import ModelInfo, PositionModel, positions_from_mask
from posprobe.progress import tqdm
from posprobe.results import deprecated_alias
from posprobe.sites import ATTENTION_MAP_SITES, HEAD_SITES, SiteKey
from posprobe.stats.streaming import Source, as_source, batches

MODES = ("offset", "filler")
METRICS = ("logprob", "kl", "probe_position")
#: a normalised effect is NaN where the full clean-vs-corrupt change is below float noise
_NOISE = 1e-6


def model_source(source: Any, tokens: Any, analysis: str) -> tuple[Source, PositionModel, TokenBatch]:
    """``as_source`` for an analysis that runs the model itself: the source, its model and its tokens.

    A store cannot stand in for the model: patched runs need the forward pass.
    """
    found = as_source(source, tokens)
    if found.model is None or found.tokens is None:
        raise ValueError(f"{analysis} runs the model itself; pass a model (or its name) and tokens, not a store")
    return found, found.model, found.tokens


def site_width(info: ModelInfo, site: str) -> int:
    """Features per token of ``site`` once its trailing dims are flattened (d_model, d_mlp, heads × d_head)."""
    if site == "mlp_post":
        return info.d_mlp
    if site in ("k", "rot_k"):
        return info.n_kv_heads * info.d_head
    if site in HEAD_SITES:
        return info.n_heads * info.d_head
    return info.d_model


# -- the probe read in patched runs ----------------------------------------------------------------


@dataclass(frozen=True)
class SiteProbe:
    """A fitted position probe bound to the site and model it was fitted on.

    ``estimator`` has ``predict(X [n_tokens, n_features]) -> positions``; features are the site's
    activation per token, flattened (``z`` [heads d_head] → heads·d_head).
    """

    estimator: Any
    key: SiteKey
    model: str
    n_features: int

    def decode(self, acts: Tensor) -> Tensor:
        """Decoded positions [b s] (float64, CPU) from activations [b s *site dims]."""
        flat = acts.reshape(acts.shape[0], acts.shape[1], -1)
        if flat.shape[-1] != self.n_features:
            raise ValueError(
                f"the probe reads {self.n_features} features ({self.key.name} of {self.model}), "
                f"but got activations with {flat.shape[-1]}"
            )
        pred = self.estimator.predict(flat.reshape(-1, self.n_features).double().cpu().numpy())
        return torch.as_tensor(np.asarray(pred, dtype=np.float64)).view(flat.shape[:2])

    def check(self, model: PositionModel) -> None:
        """Refuse a probe fitted on another model or on a site of another width."""
        if self.model != model.info.name:
            raise ValueError(
                f"the probe was fitted on model {self.model!r} ({self.key.name}); this is {model.info.name!r}"
            )
        model._check_key(self.key)
        width = site_width(model.info, self.key.site)
        if width != self.n_features:
            raise ValueError(
                f"the probe reads {self.n_features} features but {self.key.name} of {model.info.name} has {width}; "
                "was it fitted on another site?"
            )


def fit_site_probe(
    source: Any,
    tokens: TokenBatch | Tensor | Sequence[str] | None = None,
    *,
    site: str = "resid_pre",
    layer: int | None = 0,
    estimator: Any = None,
    batch_size: int = 8,
) -> SiteProbe:
    """Fit a position probe on one site's clean activations and bind it to that site and model.

    ``source`` is a model (anything ``load_model`` accepts) run on ``tokens`` (a TokenBatch, ids
    [n s] or texts). ``estimator`` defaults to ``RidgeProbe`` over its GCV alpha grid (Haviv et
    al. 2022 probe); any scikit-learn regressor works. Targets are the real tokens' position ids.
    """
    from posprobe.stats.probe_estimators import DEFAULT_ALPHAS, RidgeProbe

    _, model, batch = model_source(source, tokens, "fit_site_probe")
    key = _probe_key(model, site, layer)
    feats, targets = [], []
    for _, chunk in batches(batch, batch_size):
        acts = model.capture(chunk.tokens, [key], attention_mask=chunk.attention_mask)[key]
        real = chunk.attention_mask.bool()
        feats.append(acts.reshape(*real.shape, -1)[real.to(acts.device)].double().cpu())
        targets.append(chunk.position_ids[real].double())
    X, y = torch.cat(feats).numpy(), torch.cat(targets).numpy()
    estimator = RidgeProbe(alpha=DEFAULT_ALPHAS) if estimator is None else estimator
    estimator.fit(X, y)
    return SiteProbe(estimator, key, model.info.name, X.shape[1])


def _probe_key(model: PositionModel, site: str | SiteKey, layer: int | None = None) -> SiteKey:
    key = SiteKey.parse(site) if isinstance(site, str) and layer is None else site
    if isinstance(key, str):
        key = SiteKey(key, layer)
    if key.site in ATTENTION_MAP_SITES:
        raise ValueError(f"site {key.site!r} holds attention maps, not per-token vectors; probe e.g. resid_pre or z")
    model._check_key(key)
    return key


def as_site_probe(probe: Any, probe_site: str | SiteKey | None, model: PositionModel) -> SiteProbe | None:
    """A checked ``SiteProbe`` from a SiteProbe or a fitted estimator plus the site it was fitted on."""
    if probe is None:
        return None
    if not isinstance(probe, SiteProbe):
        if probe_site is None:
            raise ValueError(
                "a bare estimator needs probe_site='<site>.<layer>' (e.g. 'resid_pre.0') naming what it was fitted on; "
                "or build it with fit_site_probe"
            )
        if not hasattr(probe, "predict"):
            raise ValueError(f"probe must have a predict method; got {type(probe).__name__}")
        n_features = getattr(probe, "n_features_in_", None)
        if n_features is None and hasattr(probe, "coef_"):
            n_features = np.shape(probe.coef_)[-1]
        if n_features is None:
            raise ValueError(
                f"cannot tell how many features {type(probe).__name__} reads; wrap it as "
                "SiteProbe(estimator, key, model_name, n_features)"
            )
        probe = SiteProbe(probe, _probe_key(model, probe_site), model.info.name, int(n_features))
    elif probe_site is not None and _probe_key(model, probe_site) != probe.key:
        raise ValueError(f"probe_site {probe_site!r} disagrees with the probe's own site {probe.key.name!r}")
    probe.check(model)
    return probe


# -- the corrupted input -----------------------------------------------------------------------------


@dataclass(frozen=True)
class CorruptInputs:
    """The corrupted batch and ``index`` [s]: the corrupted column aligned with each clean column."""

    tokens: Tensor  # [n s_corrupt]
    attention_mask: Tensor  # [n s_corrupt]
    position_ids: Tensor  # [n s_corrupt]
    index: Tensor  # [s]

    def rows(self, start: int, stop: int) -> CorruptInputs:
        """Rows ``start:stop`` (the twin of one batch of clean rows)."""
        sl = slice(start, stop)
        return CorruptInputs(self.tokens[sl], self.attention_mask[sl], self.position_ids[sl], self.index)


def corrupt_inputs(
    model: PositionModel, batch: TokenBatch, shift: int, mode: str = "offset", filler_token: int | None = None
) -> CorruptInputs:
    """The position-shifted twin of ``batch``: ids + ``shift`` (``offset``) or ``shift`` fillers prepended (``filler``).

    In filler mode the fillers go after the BOS when the batch has one, so the BOS stays at
    position 0 and every other token moves ``shift`` positions later. Refuses positions a model
    with an absolute scheme has never seen (beyond ``n_ctx``).
    """
    if mode not in MODES:
        raise ValueError(f"unknown patching mode {mode!r}; accepted: {', '.join(MODES)}")
    if isinstance(shift, bool) or not isinstance(shift, int | np.integer) or shift < 0:
        raise ValueError(f"shift must be a non-negative integer number of positions, got {shift!r}")
    shift = int(shift)
    tokens, mask, pos = batch.tokens, batch.attention_mask, batch.position_ids
    s = tokens.shape[1]
    if mode == "offset":
        corrupt = CorruptInputs(tokens, mask, pos + shift, torch.arange(s))
    else:
        if not bool(mask.all()):
            raise ValueError(
                "filler mode needs unpadded sequences of equal length; use mode='offset' for padded batches"
            )
        filler = _default_filler(model) if filler_token is None else int(filler_token)
        if not 0 <= filler < model.info.d_vocab:
            raise ValueError(
                f"filler_token {filler} is not a token id of {model.info.name} (0..{model.info.d_vocab - 1})"
            )
        head = int(batch.prepend_bos)
        fill = torch.full((tokens.shape[0], shift), filler, dtype=tokens.dtype)
        new = torch.cat([tokens[:, :head], fill, tokens[:, head:]], dim=1)
        index = torch.cat([torch.arange(head), torch.arange(head, s) + shift])
        new_mask = torch.ones_like(new)
        corrupt = CorruptInputs(new, new_mask, positions_from_mask(new_mask), index)
    last = int(corrupt.position_ids.max())
    if last >= model.info.n_ctx and not model.extrapolates:
        raise ValueError(
            f"shift {shift} ({mode}) needs position {last}, beyond {model.info.name}'s context of {model.info.n_ctx} "
            f"positions (scheme {model.info.position_scheme!r} cannot extrapolate); use a shift of at most "
            f"{model.info.n_ctx - 1 - (last - shift)} or shorter sequences"
        )
    return corrupt


def _default_filler(model: PositionModel) -> int:
    """The first id that is not a special token: a plain, content-poor filler."""
    special = set(getattr(model.tokenizer, "all_special_ids", None) or [])
    return next(i for i in range(model.info.d_vocab) if i not in special)


# -- the patching engine -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Patch:
    """One intervention: at ``key``, ``edit(clean [b s ...], corrupt [b s ...]) -> patched [b s ...]``.

    The probe metric is read at token column ``column`` (every real token when None).
    """

    key: SiteKey
    edit: Callable[[Tensor, Tensor], Tensor]
    column: int | None = None


@dataclass
class Totals:
    """Sums over tokens of every metric, for the clean and corrupted references and for each patch."""

    n_patches: int
    n_columns: int
    n_targets: float = 0.0
    n_tokens: float = 0.0
    clean_logprob: float = 0.0
    corrupt_logprob: float = 0.0
    corrupt_kl: float = 0.0
    logprob: np.ndarray = field(init=False)
    kl: np.ndarray = field(init=False)
    probe: np.ndarray = field(init=False)
    probe_count: np.ndarray = field(init=False)  # [columns]
    clean_probe: np.ndarray = field(init=False)  # [columns]
    corrupt_probe: np.ndarray = field(init=False)  # [columns]

    def __post_init__(self) -> None:
        self.logprob, self.kl, self.probe = (np.zeros(self.n_patches) for _ in range(3))
        self.probe_count, self.clean_probe, self.corrupt_probe = (np.zeros(self.n_columns) for _ in range(3))

    def reference(self, metric: str, column: int | None) -> tuple[float, float]:
        """Mean (clean, corrupt) value of ``metric`` over the tokens a patch measures."""
        if metric == "logprob":
            return self.clean_logprob / self.n_targets, self.corrupt_logprob / self.n_targets
        if metric == "kl":
            return 0.0, self.corrupt_kl / self.n_tokens
        cols = slice(None) if column is None else slice(column, column + 1)
        count = self.probe_count[cols].sum()
        if count == 0:  # a column of padding only
            return float("nan"), float("nan")
        return self.clean_probe[cols].sum() / count, self.corrupt_probe[cols].sum() / count

    def value(self, metric: str, i: int, column: int | None) -> float:
        """Mean value of ``metric`` in patched run ``i``."""
        if metric == "logprob":
            return self.logprob[i] / self.n_targets
        if metric == "kl":
            return self.kl[i] / self.n_tokens
        count = self.probe_count.sum() if column is None else self.probe_count[column]
        return self.probe[i] / count if count else float("nan")


def _logprob(logp: Tensor, tokens: Tensor, mask: Tensor) -> Tensor:
    """Summed log-prob of the actual next token over real targets: logp [... b s V], tokens [b s] → [... b]."""
    targets = mask[:, :-1].bool() & mask[:, 1:].bool()
    index = tokens[:, 1:, None].expand(*logp.shape[:-3], -1, -1, 1)
    lp = logp[..., :-1, :].gather(-1, index).squeeze(-1)
    return (lp * targets).sum(-1).double()


def _kl(clean_p: Tensor, clean_logp: Tensor, logp: Tensor, mask: Tensor) -> Tensor:
    """Summed KL(clean ‖ run) over real tokens: clean [b s V], logp [... b s V], mask [b s] → [... b]."""
    kl = (clean_p * (clean_logp - logp)).sum(-1)
    return (kl * mask.bool()).sum(-1).double()


def _group_hook(edits: list[Callable[[Tensor, Tensor], Tensor]], source: Tensor, b: int):
    """One hook applying ``edits[g]`` to the g-th copy of a batch replicated ``len(edits)`` times."""

    def hook(x: Tensor) -> Tensor:
        copies = x.reshape(len(edits), b, *x.shape[1:])
        src = source.to(device=x.device, dtype=x.dtype)
        return torch.stack([edit(copies[g], src) for g, edit in enumerate(edits)]).reshape(x.shape)

    return hook


@dataclass(frozen=True)
class _Reference:
    """One batch's clean run, which its patched runs start from and are compared with.

    ``tokens``, ``mask``, ``positions`` [b s] on the CPU; ``tokens_d``, ``mask_d`` on the logits'
    device; ``logp``, ``p`` [b s V] the clean next-token distribution; ``source`` the corrupted
    activation of every patched site, aligned with the clean columns.
    """

    tokens: Tensor
    mask: Tensor
    positions: Tensor
    tokens_d: Tensor
    mask_d: Tensor
    logp: Tensor
    p: Tensor
    source: dict[SiteKey, Tensor]


def run_patches(
    model: PositionModel,
    batch: TokenBatch,
    corrupt: CorruptInputs,
    patches: Sequence[Patch],
    probe: SiteProbe | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> Totals:
    """Run clean, corrupted and every patched run over ``batch``; return the summed metrics.

    Patched runs of one site are stacked along the batch: one forward carries up to
    ``batch_size // b`` patches of a chunk of b sequences (at least one).
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    n, s = batch.tokens.shape
    totals = Totals(len(patches), s)
    keys = sorted({p.key for p in patches})
    capture = [probe.key] if probe is not None else []
    by_key = {key: [i for i, p in enumerate(patches) if p.key == key] for key in keys}
    with tqdm(total=_n_runs(n, batch_size, by_key), desc="patching", disable=not progress) as bar:
        for start, chunk in batches(batch, batch_size):
            bad = corrupt.rows(start, start + batch_size)
            ref = _reference_runs(model, chunk, bad, keys, capture, probe, totals)
            bar.update(2)
            group_size = max(1, batch_size // len(chunk))
            for key, idx in by_key.items():
                for g0 in range(0, len(idx), group_size):  # groups of patches, not of rows
                    _patched_run(model, ref, key, idx[g0 : g0 + group_size], patches, capture, probe, totals)
                    bar.update()
    if totals.n_targets == 0:
        raise ValueError("no next-token targets: every sequence is shorter than 2 real tokens")
    return totals


def _n_runs(n: int, batch_size: int, by_key: dict[SiteKey, list[int]]) -> int:
    """Forward passes ``run_patches`` makes: per batch of b rows, 2 references and the stacked patched runs."""
    chunk_sizes = [batch_size] * (n // batch_size) + ([n % batch_size] if n % batch_size else [])
    return sum(2 + sum(math.ceil(len(v) / max(1, batch_size // b)) for v in by_key.values()) for b in chunk_sizes)


def _reference_runs(
    model: PositionModel,
    chunk: TokenBatch,
    corrupt: CorruptInputs,
    keys: list[SiteKey],
    capture: list[SiteKey],
    probe: SiteProbe | None,
    totals: Totals,
) -> _Reference:
    """The clean and corrupted runs of one batch: add their sums to ``totals``; keep what the patches need."""
    toks, mask, pos = chunk.tokens, chunk.attention_mask, chunk.position_ids
    clean = model.run(toks, attention_mask=mask, position_ids=pos, capture=capture)
    if clean.logits is None:
        raise ValueError(
            f"patching measures the next-token distribution, but {model.info.name} has no language-model head"
        )
    dev = clean.logits.device
    toks_d, mask_d = toks.to(dev), mask.to(dev)
    clean_logp = torch.log_softmax(clean.logits.float(), dim=-1)
    clean_p = clean_logp.exp()
    totals.clean_logprob += float(_logprob(clean_logp, toks_d, mask_d).sum())
    totals.n_targets += float((mask[:, :-1].bool() & mask[:, 1:].bool()).sum())
    totals.n_tokens += float(mask.sum())
    bad = model.run(
        corrupt.tokens,
        attention_mask=corrupt.attention_mask,
        position_ids=corrupt.position_ids,
        capture=list({*keys, *capture}),
    )
    index = corrupt.index.to(dev)
    assert bad.logits is not None  # the clean run showed the model has a head
    bad_logp = torch.log_softmax(bad.logits[:, index].float(), dim=-1)
    totals.corrupt_logprob += float(_logprob(bad_logp, toks_d, mask_d).sum())
    totals.corrupt_kl += float(_kl(clean_p, clean_logp, bad_logp, mask_d).sum())
    source = {key: bad.acts[key][:, index] for key in keys}
    real = mask.bool()
    if probe is not None:
        clean_dec = probe.decode(clean.acts[probe.key])
        totals.probe_count += real.sum(0).double().numpy()
        totals.clean_probe += (clean_dec * real).sum(0).numpy()
        totals.corrupt_probe += (probe.decode(bad.acts[probe.key][:, index]) * real).sum(0).numpy()
    return _Reference(toks, mask, pos, toks_d, mask_d, clean_logp, clean_p, source)


def _patched_run(
    model: PositionModel,
    ref: _Reference,
    key: SiteKey,
    group: list[int],
    patches: Sequence[Patch],
    capture: list[SiteKey],
    probe: SiteProbe | None,
    totals: Totals,
) -> None:
    """One forward of ``len(group)`` stacked copies of a batch, copy g patched by ``patches[group[g]]``."""
    r = len(group)
    b, s = ref.tokens.shape
    hook = _group_hook([patches[i].edit for i in group], ref.source[key], b)
    out = model.run(
        ref.tokens.repeat(r, 1),
        attention_mask=ref.mask.repeat(r, 1),
        position_ids=ref.positions.repeat(r, 1),
        hooks={key: hook},
        capture=capture,
    )
    assert out.logits is not None  # the clean run showed the model has a head
    logp = torch.log_softmax(out.logits.float(), dim=-1).view(r, b, *out.logits.shape[1:])
    totals.logprob[group] += _logprob(logp, ref.tokens_d, ref.mask_d).sum(-1).cpu().numpy()
    totals.kl[group] += _kl(ref.p, ref.logp, logp, ref.mask_d).sum(-1).cpu().numpy()
    if probe is not None:
        real = ref.mask.bool()
        dec = probe.decode(out.acts[probe.key]).view(r, b, s)
        for g, i in enumerate(group):
            col = patches[i].column
            measured = real if col is None else real & (torch.arange(s) == col)
            totals.probe[i] += float((dec[g] * measured).sum())


def metric_as_kind(result: str, kind: str | None, options: dict[str, Any]) -> str | None:
    """The kind a patching result's ``figure`` draws: ``kind``, or ``metric=`` popped from ``options`` (its old
    spelling, kept one release with a DeprecationWarning)."""
    if "metric" not in options:
        return kind
    deprecated_alias(f"{result}.figure(metric=...)", f"{result}.figure(kind)")
    metric = options.pop("metric")
    if kind is not None:
        raise TypeError(f"figure got both kind {kind!r} and metric {metric!r}; give the metric as kind")
    return metric


def metric_rows(totals: Totals, i: int, column: int | None, metrics: Sequence[str]) -> list[dict[str, Any]]:
    """Rows (metric, value, clean, corrupt, effect, normalized) of patch ``i``.

    ``effect`` = value − clean; ``normalized`` = effect / (corrupt − clean), the fraction of the
    full corrupt-vs-clean change, NaN where that change is below float noise.
    """
    rows = []
    for metric in metrics:
        clean, bad = totals.reference(metric, column)
        value = totals.value(metric, i, column)
        full = bad - clean
        meaningful = abs(full) > _NOISE * (1 + abs(clean))
        rows.append(
            {
                "metric": metric,
                "value": value,
                "clean": clean,
                "corrupt": bad,
                "effect": value - clean,
                "normalized": (value - clean) / full if meaningful else float("nan"),
            }
        )
    return rows
