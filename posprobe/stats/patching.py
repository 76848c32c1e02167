"""Activation patching for position: which sites carry the position a model actually uses.

A clean run and a corrupted run differ only in positions, either by offsetting every position
id by ``k`` (``mode="offset"``) or by prepending ``k`` filler tokens (``mode="filler"``; the
clean tokens then sit ``k`` positions later). One site (a layer's residual stream, attention or
MLP output, one head's output, the position embedding, the rotated queries / keys) is copied
from the corrupted run into the clean run, at every position or one position at a time, and
the change is measured on the output (next-token log-prob, KL to the clean distribution) and on
the position a fitted probe decodes. This is activation patching (Vig et al. 2020; Meng et al.
2022, "Locating and editing factual associations in GPT") applied to position; probes say where
position is readable, patching says where it is used (Makelov et al. 2023, RESEARCH.md §2).

``shift_invariance`` asks the simpler question first: does the output change at all when every
position moves by ``k``? For an exactly relative scheme (RoPE, ALiBi) or NoPE it must not.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import pandas as pd
import torch
from torch import Tensor

from posprobe.data import TokenBatch
from posprobe.models.base import ModelInfo, PositionModel
from posprobe.results import DataFrameAlias, ParamsAlias, Result, RunInfo
from posprobe.sites import ATTENTION_MAP_SITES, HEAD_SITES, SiteKey, resolve_sites
from posprobe.stats.patch_runs import (
    METRICS,
    MODES,
    CorruptInputs,
    Patch,
    SiteProbe,
    Totals,
    as_site_probe,
    corrupt_inputs,
    fit_site_probe,
    metric_as_kind,
    metric_rows,
    model_source,
    run_patches,
)
from posprobe.stats.streaming import Source, batches
from posprobe.stats.subspace import SubspaceResult, subspace_patch

if TYPE_CHECKING:
    import plotly.graph_objects as go

__all__ = [
    "METRICS",
    "MODES",
    "PatchResult",
    "ShiftInvariance",
    "SiteProbe",
    "SubspaceResult",
    "corrupt_inputs",
    "fit_site_probe",
    "patch_positions",
    "shift_invariance",
    "subspace_patch",
]

# -- position-shift patching ------------------------------------------------------------------------


@dataclass(frozen=True)
class PatchResult(ParamsAlias, Result):
    """What ``patch_positions`` returns.

    ``table``: one row per (site, layer, head, position, metric) with value, clean, corrupt,
    effect and normalized (see ``patch_positions``); layer, head and position are <NA> where
    the patch spans all of them. ``info``: the run record (``params``: model, shift, mode, the
    patched site keys, per_position, heads, probe_site, n_sequences, seq_len, prepend_bos,
    source). Figure kinds: the metrics of the table (``"logprob"``, ``"kl"``, and
    ``"probe_position"`` with a probe), each a layer × position heatmap (option ``value``:
    ``"normalized"``, ``"effect"`` or ``"value"``).
    """

    FIGURES: ClassVar[Mapping[str, str]] = dict.fromkeys(METRICS, "_heatmap_figure")

    table: pd.DataFrame
    info: RunInfo

    def figure_kinds(self) -> list[str]:
        """The metrics of the table, ``"logprob"`` first."""
        present = set(self.table["metric"])
        return [metric for metric in self.FIGURES if metric in present]

    def figure(self, kind: str | None = None, **options: Any) -> go.Figure:
        """Layer × position heatmap of ``value`` (default ``"normalized"``) for the metric ``kind``, one panel per
        site (``posprobe.plots.patching``); ``metric=`` is the old spelling of ``kind``, kept one release."""
        return super().figure(metric_as_kind("PatchResult", kind, options), **options)

    def _draw(self, kind: str, **options: Any) -> go.Figure:
        return self._heatmap_figure(kind, **options)

    def _heatmap_figure(self, metric: str, value: str = "normalized") -> go.Figure:
        from posprobe.plots.patching import patching_heatmap

        return patching_heatmap(self.table, metric=metric, value=value)


def _replace(position: int | None, head: int | None) -> Callable[[Tensor, Tensor], Tensor]:
    index = (slice(None), slice(None) if position is None else position, *(() if head is None else (head,)))

    def edit(x: Tensor, corrupt: Tensor) -> Tensor:
        out = x.clone()
        out[index] = corrupt[index]
        return out

    return edit


def _head_count(info: ModelInfo, site: str) -> int:
    return info.n_kv_heads if site in ("k", "rot_k") else info.n_heads


#: one patch of ``patch_positions``: the site key, the head (None: all) and the token column (None: all)
_Spec = tuple[SiteKey, int | None, int | None]


def patch_positions(
    source: Any,
    tokens: TokenBatch | Tensor | Sequence[str] | None = None,
    *,
    shift: int = 1,
    mode: str = "offset",
    sites: str | Sequence[str] = ("resid_pre",),
    layers: int | Sequence[int] | None = None,
    per_position: bool = True,
    heads: bool = False,
    probe: Any = None,
    probe_site: str | SiteKey | None = None,
    filler_token: int | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> PatchResult:
    """Patch each site from a position-shifted run into the clean run; measure output and decoded-position change.

    Activation patching (Meng et al. 2022) with a position-only corruption (RESEARCH.md §2):
    ``mode="offset"`` runs the same tokens at position ids + ``shift``; ``mode="filler"`` prepends
    ``shift`` filler tokens (after the BOS, if any) and aligns the clean tokens with their shifted
    copies. For every site key in ``sites`` × ``layers`` (``pos_embed`` is layerless; negative
    layers count from the end), each head separately when ``heads`` (head sites: z, q, k, rot_q,
    rot_k) and each token column separately when ``per_position``, the corrupted activation
    replaces the clean one, and:

    - ``logprob``: mean next-token log-prob of the actual next token over all real targets;
    - ``kl``: mean KL(clean ‖ patched) of the output distribution over all real tokens;
    - ``probe_position`` (with ``probe``): mean position decoded by the probe at the patched
      token (every real token for whole-sequence patches), from the probe's site in the patched run.

    ``effect`` is patched − clean and ``normalized`` divides it by corrupted − clean (NaN where
    the full change is float noise, e.g. for exactly relative schemes): 1 means the site alone
    carries the whole change. Output metrics average over every token, so per-position effects
    of one layer sum to about the whole-sequence effect when the patch acts additively.

    ``source`` is a model (anything ``load_model`` accepts: a PositionModel, a name, a
    transformers or nnsight model; runs on the model's device) and ``tokens`` [n s] a TokenBatch,
    ids or texts (per-position patching needs unpadded or right-padded rows). ``probe`` is a
    ``SiteProbe`` (``fit_site_probe``) or a fitted estimator plus ``probe_site`` (``'resid_pre.0'``).
    """
    src, model, batch = model_source(source, tokens, "patch_positions")
    keys = resolve_sites(sites, layers, model.info.n_layers)
    _check_patch_sites(model, keys)
    site_probe = as_site_probe(probe, probe_site, model)
    corrupt = corrupt_inputs(model, batch, shift, mode, filler_token)
    s = batch.tokens.shape[1]
    if per_position and not bool((batch.position_ids == torch.arange(s))[batch.attention_mask.bool()].all()):
        raise ValueError(
            "per-position patching needs unpadded or right-padded rows (column = position); got left padding"
        )
    specs = _patch_specs(model.info, keys, heads, per_position, s)
    patches = [Patch(key, _replace(column, head), column) for key, head, column in specs]
    totals = run_patches(model, batch, corrupt, patches, site_probe, batch_size, progress)
    metrics = ["logprob", "kl"] + (["probe_position"] if site_probe is not None else [])
    table = _patch_table(totals, specs, metrics, model.info.name, mode, shift)
    settings = {"shift": int(shift), "mode": mode, "per_position": per_position, "heads": heads}
    return PatchResult(table, _patch_info(src, batch, keys, site_probe, settings))


def _patch_info(
    src: Source, batch: TokenBatch, keys: list[SiteKey], probe: SiteProbe | None, settings: dict[str, Any]
) -> RunInfo:
    """The run record; ``params`` as ``PatchResult.params`` always was."""
    params = {
        "model": src.name,
        "shift": settings["shift"],
        "mode": settings["mode"],
        "sites": [k.name for k in keys],
        "per_position": settings["per_position"],
        "heads": settings["heads"],
        "probe_site": probe.key.name if probe is not None else None,
        "n_sequences": len(batch),
        "seq_len": batch.tokens.shape[1],
        "prepend_bos": batch.prepend_bos,
        "source": batch.source,
    }
    site = ",".join(dict.fromkeys(key.site for key in keys))
    layers = sorted({key.layer for key in keys if key.layer is not None})
    return src.run_info("patch_positions", site=site, layers=layers, params=params)


def _check_patch_sites(model: PositionModel, keys: list[SiteKey]) -> None:
    for key in keys:
        if key.site in ATTENTION_MAP_SITES:
            raise ValueError(f"site {key.site!r} holds attention maps [b h s t]; patch z, rot_q or rot_k instead")
        model._check_key(key)


def _patch_specs(info: ModelInfo, keys: list[SiteKey], heads: bool, per_position: bool, s: int) -> list[_Spec]:
    """Every (site key, head, column) to patch, in table order."""
    specs: list[_Spec] = []
    for key in keys:
        head_list = range(_head_count(info, key.site)) if heads and key.site in HEAD_SITES else [None]
        for head in head_list:
            for column in range(s) if per_position else [None]:
                specs.append((key, head, column))
    return specs


def _patch_table(
    totals: Totals, specs: list[_Spec], metrics: list[str], model: str, mode: str, shift: int
) -> pd.DataFrame:
    rows = []
    for i, (key, head, column) in enumerate(specs):
        for row in metric_rows(totals, i, column, metrics):
            rows.append({"site": key.site, "layer": key.layer, "head": head, "position": column, **row})
    table = pd.DataFrame(rows).astype({"layer": "Int64", "head": "Int64", "position": "Int64"})
    table.insert(0, "model", model)
    table.insert(1, "mode", mode)
    table.insert(2, "shift", int(shift))
    return table


# -- shift invariance ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShiftInvariance(DataFrameAlias, Result):
    """What ``shift_invariance`` returns.

    ``table``: one row per (shift, with_bos): model, shift, with_bos, kl, max_abs_logit_diff,
    mean_abs_logit_diff, n_tokens, output (see ``shift_invariance``). ``info``: the run record
    (``params``: shifts, with_bos). Figure kinds: ``"curves"`` (output change against the shift).

    For one release the result still reads as the DataFrame ``shift_invariance`` used to return
    (``result["kl"]``, ``len(result)``, ``result.itertuples()``, ``pd.concat([result, ...])``), with a
    DeprecationWarning: read ``result.table`` instead.
    """

    FIGURES: ClassVar[Mapping[str, str]] = {"curves": "_curves_figure"}

    table: pd.DataFrame
    info: RunInfo

    def _curves_figure(self, value: str | None = None) -> go.Figure:
        """KL (or, without an LM head, the mean |Δ| of the last hidden state) against the shift, log-log."""
        from posprobe.plots.patching import shift_invariance_curves

        return shift_invariance_curves(self.table, value=value)

    # -- one release: the DataFrame this used to be ----------------------------------------------------


def _with_bos(model: PositionModel, batch: TokenBatch, bos: bool) -> TokenBatch:
    if bos == batch.prepend_bos:
        return batch
    if bos:
        if model.info.bos_token_id is None:
            raise ValueError(f"with_bos=True but {model.info.name} has no BOS token")
        col = torch.full((len(batch), 1), model.info.bos_token_id, dtype=batch.tokens.dtype)
        return TokenBatch(
            torch.cat([col, batch.tokens], 1),
            torch.cat([torch.ones_like(col), batch.attention_mask], 1),
            True,
            batch.source,
        )
    if batch.tokens.shape[1] < 3:
        raise ValueError("dropping the BOS leaves fewer than 2 tokens per sequence")
    return TokenBatch(batch.tokens[:, 1:], batch.attention_mask[:, 1:], False, batch.source)


def shift_invariance(
    source: Any,
    tokens: TokenBatch | Tensor | Sequence[str] | None = None,
    *,
    shifts: Sequence[int] = (1, 8, 64),
    with_bos: bool | Sequence[bool] | None = None,
    batch_size: int = 8,
) -> ShiftInvariance:
    """How much the output moves when every position id moves by k: 0 for an exactly relative scheme.

    RoPE (Su et al. 2021) and ALiBi (Press et al. 2022) logits depend only on q_pos − k_pos, and
    NoPE ignores position ids, so their outputs must not change (up to float rounding); learned and
    sinusoidal absolute schemes do change. A BOS token does not break invariance by itself (it
    shifts too) but sink behaviour is what a real model would learn to key on (RESEARCH.md §6).

    ``source`` is a model (anything ``load_model`` accepts) run on ``tokens`` (a TokenBatch, ids
    [n s] or texts). The table has one row per (shift, with_bos): model, shift, with_bos, kl (mean
    KL(original ‖ shifted) over real tokens, nats), max_abs_logit_diff, mean_abs_logit_diff,
    n_tokens, output. ``output`` says what was compared: ``"logits"``, or for a model without an
    LM head (an encoder such as MiniLM) ``"final_hidden"``, the last block's output, where kl is
    NaN and the two diff columns are the hidden state's. ``with_bos``: None keeps ``tokens`` as
    given; True / False adds or strips a leading BOS; a sequence gives both.
    """
    src, model, batch = model_source(source, tokens, "shift_invariance")
    variants = [batch.prepend_bos] if with_bos is None else [with_bos] if isinstance(with_bos, bool) else list(with_bos)
    if not shifts or not variants:
        raise ValueError("need at least one shift and one with_bos setting")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    rows = []
    for bos in variants:
        data = _with_bos(model, batch, bool(bos))
        for shift in shifts:
            moved = _ShiftSums.of(model, data, corrupt_inputs(model, data, shift, "offset"), batch_size)
            rows.append({"model": model.info.name, "shift": int(shift), "with_bos": bool(bos), **moved.row()})
    table = pd.DataFrame(rows)
    notes = (
        ()
        if (table["output"] == "logits").all()
        else (f"{model.info.name} has no language-model head: the last block's output is compared, kl is NaN",)
    )
    params = {"shifts": [int(k) for k in shifts], "with_bos": [bool(b) for b in variants]}
    return ShiftInvariance(table, src.run_info("shift_invariance", notes=notes, params=params))


@dataclass(frozen=True)
class _ShiftSums:
    """Sums over the real tokens of one (with_bos, shift) comparison of the original and the shifted run."""

    kl_sum: float
    abs_sum: float
    n_tok: float
    max_diff: float
    has_logits: bool

    @classmethod
    def of(cls, model: PositionModel, data: TokenBatch, corrupt: CorruptInputs, batch_size: int) -> _ShiftSums:
        final = SiteKey("resid_post", model.info.n_layers - 1)

        def output(tokens: Tensor, mask: Tensor, positions: Tensor) -> tuple[Tensor, bool]:
            out = model.run(tokens, attention_mask=mask, position_ids=positions, capture=[final])
            return (out[final] if out.logits is None else out.logits).float(), out.logits is not None

        kl_sum = abs_sum = n_tok = 0.0
        max_diff = 0.0
        has_logits = False
        for start, chunk in batches(data, batch_size):
            mask = chunk.attention_mask
            base, has_logits = output(chunk.tokens, mask, chunk.position_ids)
            moved, _ = output(chunk.tokens, mask, corrupt.rows(start, start + batch_size).position_ids)
            real = mask.bool().to(base.device)
            if has_logits:
                logp, logq = torch.log_softmax(base, -1), torch.log_softmax(moved, -1)
                kl_sum += float(((logp.exp() * (logp - logq)).sum(-1) * real).sum())
            diff = (base - moved).abs()[real]
            max_diff = max(max_diff, float(diff.max()))
            abs_sum += float(diff.double().mean(-1).sum())
            n_tok += float(real.sum())
        return cls(kl_sum, abs_sum, n_tok, max_diff, has_logits)

    def row(self) -> dict[str, Any]:
        return {
            "kl": self.kl_sum / self.n_tok if self.has_logits else math.nan,
            "max_abs_logit_diff": self.max_diff,
            "mean_abs_logit_diff": self.abs_sum / self.n_tok,
            "n_tokens": int(self.n_tok),
            "output": "logits" if self.has_logits else "final_hidden",
        }
