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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch
from torch import Tensor

from posprobe.data import TokenBatch, as_token_batch
from posprobe.models.base import ModelInfo, PositionModel
from posprobe.sites import ATTENTION_MAP_SITES, HEAD_SITES, SiteKey, resolve_sites
from posprobe.stats.patch_runs import (
    METRICS,
    MODES,
    Patch,
    SiteProbe,
    as_position_model,
    as_site_probe,
    corrupt_inputs,
    fit_site_probe,
    metric_rows,
    run_patches,
)
from posprobe.stats.subspace import subspace_patch

if TYPE_CHECKING:
    import plotly.graph_objects as go

__all__ = [
    "METRICS",
    "MODES",
    "PatchResult",
    "SiteProbe",
    "as_position_model",
    "corrupt_inputs",
    "fit_site_probe",
    "patch_positions",
    "shift_invariance",
    "subspace_patch",
]

# -- position-shift patching ------------------------------------------------------------------------


@dataclass(frozen=True)
class PatchResult:
    """What ``patch_positions`` returns.

    ``table``: one row per (site, layer, head, position, metric) with value, clean, corrupt,
    effect and normalized (see ``patch_positions``); layer, head and position are <NA> where
    the patch spans all of them. ``params`` records the model, shift, mode and probe site.
    """

    table: pd.DataFrame
    params: dict[str, Any]

    def figure(self, metric: str = "logprob", value: str = "normalized") -> go.Figure:
        """Layer × position heatmap of ``value`` for ``metric``, one panel per site (``posprobe.plots.patching``)."""
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


def patch_positions(
    model: Any,
    tokens: TokenBatch | Tensor | Sequence[str],
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
    copies. For every site key in ``sites`` × ``layers`` (``pos_embed`` is layerless), each head
    separately when ``heads`` (head sites: z, q, k, rot_q, rot_k) and each token column separately
    when ``per_position``, the corrupted activation replaces the clean one, and:

    - ``logprob``: mean next-token log-prob of the actual next token over all real targets;
    - ``kl``: mean KL(clean ‖ patched) of the output distribution over all real tokens;
    - ``probe_position`` (with ``probe``): mean position decoded by the probe at the patched
      token (every real token for whole-sequence patches), from the probe's site in the patched run.

    ``effect`` is patched − clean and ``normalized`` divides it by corrupted − clean (NaN where
    the full change is float noise, e.g. for exactly relative schemes): 1 means the site alone
    carries the whole change. Output metrics average over every token, so per-position effects
    of one layer sum to about the whole-sequence effect when the patch acts additively.

    ``tokens`` [n s] (a TokenBatch, ids or texts; per-position patching needs unpadded or
    right-padded rows). ``probe`` is a ``SiteProbe`` (``fit_site_probe``) or a fitted estimator
    plus ``probe_site`` (``'resid_pre.0'``). ``model`` is any PositionModel or a model
    ``posprobe.load_model`` wraps (transformers, nnsight); runs on the model's device.
    """
    model = as_position_model(model)
    batch = as_token_batch(model, tokens)
    keys = resolve_sites(sites, layers, model.info.n_layers)
    for key in keys:
        if key.site in ATTENTION_MAP_SITES:
            raise ValueError(f"site {key.site!r} holds attention maps [b h s t]; patch z, rot_q or rot_k instead")
        model._check_key(key)
    probe = as_site_probe(probe, probe_site, model)
    corrupt = corrupt_inputs(model, batch, shift, mode, filler_token)
    s = batch.tokens.shape[1]
    if per_position and not bool((batch.position_ids == torch.arange(s))[batch.attention_mask.bool()].all()):
        raise ValueError(
            "per-position patching needs unpadded or right-padded rows (column = position); got left padding"
        )
    specs = []
    for key in keys:
        head_list = range(_head_count(model.info, key.site)) if heads and key.site in HEAD_SITES else [None]
        for head in head_list:
            for column in range(s) if per_position else [None]:
                specs.append((key, head, column))
    patches = [Patch(key, _replace(column, head), column) for key, head, column in specs]
    totals = run_patches(model, batch, corrupt, patches, probe, batch_size, progress)
    metrics = ["logprob", "kl"] + (["probe_position"] if probe is not None else [])
    rows = []
    for i, (key, head, column) in enumerate(specs):
        for row in metric_rows(totals, i, column, metrics):
            rows.append({"site": key.site, "layer": key.layer, "head": head, "position": column, **row})
    table = pd.DataFrame(rows).astype({"layer": "Int64", "head": "Int64", "position": "Int64"})
    table.insert(0, "model", model.info.name)
    table.insert(1, "mode", mode)
    table.insert(2, "shift", int(shift))
    params = {
        "model": model.info.name,
        "shift": int(shift),
        "mode": mode,
        "sites": [k.name for k in keys],
        "per_position": per_position,
        "heads": heads,
        "probe_site": probe.key.name if probe is not None else None,
        "n_sequences": len(batch),
        "seq_len": s,
        "prepend_bos": batch.prepend_bos,
        "source": batch.source,
    }
    return PatchResult(table, params)


# -- shift invariance ---------------------------------------------------------------------------------


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
    model: Any,
    tokens: TokenBatch | Tensor | Sequence[str],
    shifts: Sequence[int] = (1, 8, 64),
    with_bos: bool | Sequence[bool] | None = None,
    batch_size: int = 8,
) -> pd.DataFrame:
    """How much the output moves when every position id moves by k: 0 for an exactly relative scheme.

    RoPE (Su et al. 2021) and ALiBi (Press et al. 2022) logits depend only on q_pos − k_pos, and
    NoPE ignores position ids, so their outputs must not change (up to float rounding); learned and
    sinusoidal absolute schemes do change. A BOS token does not break invariance by itself (it
    shifts too) but sink behaviour is what a real model would learn to key on (RESEARCH.md §6).

    Returns one row per (shift, with_bos): model, shift, with_bos, kl (mean KL(original ‖ shifted)
    over real tokens, nats), max_abs_logit_diff, mean_abs_logit_diff, n_tokens, output. ``output``
    says what was compared: ``"logits"``, or for a model without an LM head (an encoder such as
    MiniLM) ``"final_hidden"``, the last block's output, where kl is NaN and the two diff columns
    are the hidden state's. ``with_bos``: None keeps ``tokens`` as given; True / False adds or
    strips a leading BOS; a sequence gives both.
    """
    model = as_position_model(model)
    batch = as_token_batch(model, tokens)
    variants = [batch.prepend_bos] if with_bos is None else [with_bos] if isinstance(with_bos, bool) else list(with_bos)
    if not shifts or not variants:
        raise ValueError("need at least one shift and one with_bos setting")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    final = SiteKey("resid_post", model.info.n_layers - 1)

    def output(tokens: Tensor, mask: Tensor, positions: Tensor) -> tuple[Tensor, bool]:
        out = model.run(tokens, attention_mask=mask, position_ids=positions, capture=[final])
        return (out[final] if out.logits is None else out.logits).float(), out.logits is not None

    rows = []
    for bos in variants:
        data = _with_bos(model, batch, bool(bos))
        for shift in shifts:
            corrupt = corrupt_inputs(model, data, shift, "offset")
            kl_sum = abs_sum = n_tok = 0.0
            max_diff = 0.0
            for start in range(0, len(data), batch_size):
                sl = slice(start, start + batch_size)
                mask = data.attention_mask[sl]
                base, has_logits = output(data.tokens[sl], mask, data.position_ids[sl])
                moved, _ = output(data.tokens[sl], mask, corrupt.position_ids[sl])
                real = mask.bool().to(base.device)
                if has_logits:
                    logp, logq = torch.log_softmax(base, -1), torch.log_softmax(moved, -1)
                    kl_sum += float(((logp.exp() * (logp - logq)).sum(-1) * real).sum())
                diff = (base - moved).abs()[real]
                max_diff = max(max_diff, float(diff.max()))
                abs_sum += float(diff.double().mean(-1).sum())
                n_tok += float(real.sum())
            rows.append(
                {
                    "model": model.info.name,
                    "shift": int(shift),
                    "with_bos": bool(bos),
                    "kl": kl_sum / n_tok if has_logits else math.nan,
                    "max_abs_logit_diff": max_diff,
                    "mean_abs_logit_diff": abs_sum / n_tok,
                    "n_tokens": int(n_tok),
                    "output": "logits" if has_logits else "final_hidden",
                }
            )
    return pd.DataFrame(rows)
