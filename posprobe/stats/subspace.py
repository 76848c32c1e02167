"""Subspace activation patching along a probe direction, with the interpretability-illusion checks built in.

Makelov, Lange & Nanda 2023 ("Is this the subspace you are looking for? An interpretability
illusion for subspace activation patching") show that patching only the projection of an
activation on a direction v can change the output even when v is not what the model uses: if
v = (a direction the downstream weights ignore, which varies with the feature) + (a direction
they read, which is dormant, i.e. never varies), the patch takes its size from the first part
and writes it along the second, waking a pathway the model never uses. ``subspace_patch``
therefore reports, side by side (RESEARCH.md §2):

- the full-component patch (the whole activation copied) and the subspace patch along v;
- v split into its part in the row space of the downstream reading weights and its part in
  their null space (``downstream_read_matrix``, ``split_direction``), each patched on its own;
- how much of the patched coordinate's variation comes from the null-space part;
- all of it on held-out prompts as well as on the prompts the direction came from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from posprobe.data import TokenBatch, as_token_batch
from posprobe.models.base import PositionModel
from posprobe.sites import SiteKey
from posprobe.stats.patch_runs import (
    CorruptInputs,
    Patch,
    as_position_model,
    corrupt_inputs,
    metric_rows,
    run_patches,
    site_width,
)

if TYPE_CHECKING:
    import plotly.graph_objects as go
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaForCausalLM

    from posprobe.models.zoo_net import Block, ZooTransformer

__all__ = [
    "PATCH_KINDS",
    "SCOPES",
    "SUBSPACE_SITES",
    "SubspaceResult",
    "downstream_read_matrix",
    "split_direction",
    "subspace_patch",
]

RESIDUAL_WRITERS = ("embed", "pos_embed", "resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
SUBSPACE_SITES = (*RESIDUAL_WRITERS, "mlp_post", "z")
SCOPES = ("next_block", "all")
PATCH_KINDS = ("full", "subspace", "row", "null")
_NOISE = 1e-9


# -- what reads a site ---------------------------------------------------------------------------


def _residual_readers(site: str, layer: int | None, n_layers: int, scope: str) -> list[tuple[str, int | None]]:
    """The sub-blocks reading a residual-stream site, in order: ("attn", l), ("mlp", l), ..., ("unembed", None)."""
    if site in ("embed", "pos_embed"):
        first = 0
    else:
        assert layer is not None  # the other residual sites have layers (downstream_read_matrix checked the key)
        if site == "resid_pre":
            first = 2 * layer
        elif site in ("resid_mid", "attn_out"):
            first = 2 * layer + 1
        else:  # resid_post, mlp_out
            first = 2 * layer + 2
    stream: list[tuple[str, int | None]] = [
        ("attn" if i % 2 == 0 else "mlp", i // 2) for i in range(first, 2 * n_layers)
    ] + [("unembed", None)]
    return stream[:2] if scope == "next_block" else stream


def _norm_read(norm: nn.Module, weight: Tensor, centred: bool) -> Tensor:
    """``weight`` [m d] composed with a norm's gain (and LayerNorm's mean removal): the linear part of W·norm(x)."""
    gain = cast(Tensor, norm.weight).detach().double()  # LayerNorm / RMSNorm gain
    if type(norm).__name__.startswith("Gemma"):  # Gemma's RMSNorm scales by (1 + weight)
        gain = gain + 1
    read = weight.detach().double() * gain
    if centred:
        read = read - read.mean(-1, keepdim=True)  # W diag(γ) (I − 11ᵀ/d)
    return read


def _zoo_reader(net: ZooTransformer, kind: str, layer: int | None) -> Tensor:
    if kind == "unembed":
        W_U = net.W_E if net.W_U is None else net.W_U.T  # [vocab d]
        return _norm_read(net.ln_final, W_U, centred=True)
    assert layer is not None  # attention and MLP readers belong to a layer
    block = cast("Block", net.blocks[layer])
    if kind == "attn":
        a = block.attn
        w = torch.cat([W.permute(0, 2, 1).reshape(-1, W.shape[1]) for W in (a.W_Q, a.W_K, a.W_V)])
        return _norm_read(block.ln1, w, centred=True)
    return _norm_read(block.ln2, block.mlp.W_in.T, centred=True)


#: Hugging Face families whose residual readers are q/k/v_proj after input_layernorm and gate/up_proj
#: after a pre-MLP RMSNorm.
LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "gemma3")


def _hf_reader(hf: nn.Module, layers: nn.ModuleList, kind: str, layer: int | None) -> Tensor:
    if kind == "unembed":
        lm = cast("LlamaForCausalLM", hf)  # a LLAMA_LIKE model: Llama's module names and types
        return _norm_read(lm.model.norm, lm.lm_head.weight, centred=False)
    assert layer is not None  # attention and MLP readers belong to a layer
    block = cast("LlamaDecoderLayer", layers[layer])  # a LLAMA_LIKE block: Llama's module names and types
    if kind == "attn":
        a = block.self_attn
        w = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])
        return _norm_read(block.input_layernorm, w, centred=False)
    norm = getattr(block, "pre_feedforward_layernorm", None) or block.post_attention_layernorm
    return _norm_read(norm, torch.cat([block.mlp.gate_proj.weight, block.mlp.up_proj.weight]), centred=False)


def downstream_read_matrix(
    model: PositionModel, site: str, layer: int | None = None, scope: str = "next_block"
) -> Tensor:
    """The linear map [m D] through which later components read ``site`` (D = its flattened width), float64.

    Row space = what downstream weights can see; null space = what they ignore (Makelov et al. 2023).

    - ``mlp_post`` L: the MLP's output projection (zoo ``W_out``ᵀ, HF ``down_proj``), [d_model d_mlp].
    - ``z`` L: the attention output projection over all heads (zoo ``W_O``, HF ``o_proj``), [d_model heads·d_head].
    - residual sites (``embed``, ``pos_embed``, ``resid_*``, ``attn_out``, ``mlp_out``): the stacked
      reading weights of the sub-blocks after it: W_Q, W_K, W_V of an attention block and W_in
      (HF: q/k/v_proj; gate/up_proj) of an MLP, and the unembedding at the end of the stream,
      each composed with the gain of the norm in front of it (LayerNorm in the zoo, also with its
      mean removal; RMSNorm in Llama-like models, 1 + weight in Gemma). ``scope="next_block"``
      takes the next two reading sub-blocks (e.g. attention L and MLP L for resid_pre L);
      ``"all"`` every later one through the unembedding.

    The norms' 1/rms scale depends on the whole vector, so a null-space change is invisible to
    these linear reads but can still rescale them; biases are left out (they do not read the site).
    Zoo models and Llama-like / Gemma 3 Hugging Face decoders are supported.
    """
    from posprobe.models.hf import HFModel
    from posprobe.models.zoo import ZooModel

    if site not in SUBSPACE_SITES:
        raise ValueError(f"no downstream read matrix for site {site!r}; supported sites: {', '.join(SUBSPACE_SITES)}")
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; accepted: {', '.join(SCOPES)}")
    key = SiteKey(site, None if site in ("embed", "pos_embed") else layer)
    model._check_key(key)
    if isinstance(model, ZooModel):
        net = model.net
        if site == "mlp_post":
            assert layer is not None  # mlp_post has layers (checked above)
            return cast("Block", net.blocks[layer]).mlp.W_out.detach().double().T
        if site == "z":
            assert layer is not None  # z has layers (checked above)
            W_O = cast("Block", net.blocks[layer]).attn.W_O.detach().double()
            return W_O.reshape(-1, W_O.shape[-1]).T
        parts = [_zoo_reader(net, k, i) for k, i in _residual_readers(site, layer, model.info.n_layers, scope)]
        return torch.cat(parts)
    if isinstance(model, HFModel) and not model.layout.encoder:
        layout = model.layout
        block = cast(nn.ModuleList, model.hf.get_submodule(layout.layers))[layer] if layer is not None else None
        if site == "mlp_post":
            assert block is not None  # mlp_post has layers (checked above)
            return _linear_weight(block.get_submodule(layout.mlp_down))
        if site == "z":
            assert block is not None  # z has layers (checked above)
            return _linear_weight(block.get_submodule(layout.attn_out_proj))
        if layout.family not in LLAMA_LIKE:
            raise ValueError(
                f"downstream_read_matrix reads residual sites of Llama-like / Gemma decoders ({', '.join(LLAMA_LIKE)}) "
                f"and zoo models; {model.info.name} is a {layout.family!r} model (its mlp_post and z work)"
            )
        layers = cast(nn.ModuleList, model.hf.get_submodule(layout.layers))  # discover_layout's block list
        readers = _residual_readers(site, layer, model.info.n_layers, scope)
        return torch.cat([_hf_reader(model.hf, layers, k, i) for k, i in readers])
    raise ValueError(
        f"downstream_read_matrix knows zoo models and Hugging Face decoders; {model.info.name} is a "
        f"{model.info.architecture}"
    )


def _linear_weight(module: nn.Module) -> Tensor:
    """A linear map's weight as [out, in] float64 (GPT-2's Conv1D stores it transposed)."""
    weight = cast(Tensor, module.weight).detach().double()
    return weight.T if type(module).__name__ == "Conv1D" else weight


def split_direction(direction: Tensor, read: Tensor, rtol: float = 1e-6) -> tuple[Tensor, Tensor]:
    """``direction`` [D] = row-space part + null-space part of ``read`` [m D]; both float64 [D].

    The row space is spanned by the eigenvectors of readᵀread whose singular value exceeds
    ``rtol`` × the largest (numerical rank).
    """
    v = torch.as_tensor(direction, dtype=torch.float64).cpu()
    R = read.double().cpu()
    if R.ndim != 2 or v.ndim != 1 or R.shape[1] != v.numel():
        raise ValueError(f"direction [{v.numel()}] does not match read matrix {tuple(R.shape)} (expected [m, D], [D])")
    eig, vecs = torch.linalg.eigh(R.T @ R)
    basis = vecs[:, eig > (rtol**2) * eig.max().clamp(min=1e-300)]
    row = basis @ (basis.T @ v)
    return row, v - row


# -- subspace patching ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SubspaceResult:
    """What ``subspace_patch`` returns.

    ``table``: one row per (split, patch, metric): split (``fit`` / ``heldout``), patch (``full``,
    ``subspace``, ``row``, ``null``), weight (share of v's squared norm in that part), metric,
    value, clean, corrupt, effect, normalized. ``flags``: one row per split with fraction_of_full,
    row_fraction, null_fraction, null_share and possible_illusion (see ``subspace_patch``).
    """

    table: pd.DataFrame
    flags: pd.DataFrame
    params: dict[str, Any]

    @property
    def possible_illusion(self) -> bool:
        """True when any evaluated split meets the illusion rule of ``subspace_patch``."""
        return bool(self.flags["possible_illusion"].any())

    def figure(self, metric: str = "kl") -> go.Figure:
        """Effect of the full, subspace, row-space and null-space patches per split (``posprobe.plots.patching``)."""
        from posprobe.plots.patching import subspace_bars

        return subspace_bars(self.table, metric=metric)


def _along(u: Tensor):
    """Edit replacing the component along unit ``u`` [D] (flattened trailing dims) with the corrupted one."""

    def edit(x: Tensor, corrupt: Tensor) -> Tensor:
        flat, bad = x.reshape(*x.shape[:2], -1), corrupt.reshape(*x.shape[:2], -1)
        uu = u.to(device=x.device, dtype=x.dtype)
        return (flat + ((bad - flat) @ uu)[..., None] * uu).reshape(x.shape)

    return edit


def _full(x: Tensor, corrupt: Tensor) -> Tensor:
    return corrupt


def _as_direction(direction: Any, width: int, what: str) -> Tensor:
    raw = getattr(direction, "coef_", direction)
    v = torch.as_tensor(np.asarray(raw.detach().cpu() if isinstance(raw, Tensor) else raw, dtype=np.float64))
    v = v.squeeze(0) if v.ndim == 2 and v.shape[0] == 1 else v
    if v.ndim != 1 or v.numel() != width:
        raise ValueError(f"direction must be a vector of {width} values ({what}), got shape {tuple(v.shape)}")
    if not torch.isfinite(v).all() or float(v.norm()) == 0:
        raise ValueError("direction must be finite and non-zero")
    return v / v.norm()


def _paired(
    model: PositionModel, clean: Any, corrupt: Any, shift: int | None, mode: str, filler: int | None, name: str
):
    batch = as_token_batch(model, clean)
    if (corrupt is None) == (shift is None):
        raise ValueError(f"give either {name} corrupt tokens or a shift, not both or neither")
    if shift is not None:
        return batch, corrupt_inputs(model, batch, shift, mode, filler)
    bad = as_token_batch(model, corrupt)
    if bad.tokens.shape != batch.tokens.shape:
        raise ValueError(
            f"{name} clean tokens have shape {tuple(batch.tokens.shape)} but corrupt tokens {tuple(bad.tokens.shape)}; "
            "subspace patching pairs each clean token with the corrupt token at the same index, so they need equal "
            "length (use shift= for position-shifted twins)"
        )
    if not torch.equal(bad.attention_mask, batch.attention_mask):
        raise ValueError(f"{name} clean and corrupt tokens must have the same padding (attention masks differ)")
    return batch, CorruptInputs(bad.tokens, bad.attention_mask, bad.position_ids, torch.arange(batch.tokens.shape[1]))


def _null_share(
    model: PositionModel, batch: TokenBatch, corrupt: CorruptInputs, key: SiteKey, parts: Tensor, batch_size: int
) -> float:
    """Σ(v_null·Δ)² / (Σ(v_row·Δ)² + Σ(v_null·Δ)²) over real tokens, Δ = corrupt − clean at ``key``; NaN if Δ·v ≡ 0."""
    stop = key.layer
    sums = torch.zeros(2, dtype=torch.float64)
    for start in range(0, len(batch), batch_size):
        sl = slice(start, start + batch_size)
        mask = batch.attention_mask[sl]
        clean = model.capture(batch.tokens[sl], [key], attention_mask=mask, stop_at_layer=stop)[key]
        bad = model.capture(
            corrupt.tokens[sl],
            [key],
            attention_mask=corrupt.attention_mask[sl],
            position_ids=corrupt.position_ids[sl],
            stop_at_layer=stop,
        )[key][:, corrupt.index.to(clean.device)]
        delta = (bad - clean).reshape(*mask.shape, -1).double().cpu()[mask.bool()]
        sums += ((delta @ parts.T) ** 2).sum(0)
    total = float(sums.sum())
    return float(sums[1]) / total if total > 0 else float("nan")


def subspace_patch(
    model: Any,
    clean_tokens: TokenBatch | Tensor | Sequence[str],
    corrupt_tokens: TokenBatch | Tensor | Sequence[str] | None = None,
    *,
    site: str,
    layer: int | None = None,
    direction: Any,
    shift: int | None = None,
    mode: str = "offset",
    heldout_tokens: TokenBatch | Tensor | Sequence[str] | None = None,
    heldout_corrupt_tokens: TokenBatch | Tensor | Sequence[str] | None = None,
    scope: str = "next_block",
    rtol: float = 1e-6,
    flag_metric: str = "kl",
    illusion_threshold: float = 0.5,
    min_fraction: float = 0.1,
    filler_token: int | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> SubspaceResult:
    """Patch only the component of ``site`` along ``direction``; flag Makelov et al.'s (2023) illusion.

    Corrupted inputs are ``corrupt_tokens`` (same shape as the clean ones, paired token by token)
    or the position-shifted twin (``shift``, ``mode`` as in ``patch_positions``). ``direction``
    [D] (a vector or a fitted probe's ``coef_``; D = ``site_width``, heads·d_head flattened for
    ``z``) is normalised to unit v. Patches, every token at once: ``full`` (the whole activation),
    ``subspace`` (x + ((c − x)·v) v), ``row`` and ``null`` (the same along the unit row-space and
    null-space parts of v w.r.t. ``downstream_read_matrix(model, site, layer, scope)``).
    Metrics: ``logprob`` and ``kl`` as in ``patch_positions``. With ``heldout_tokens`` (and
    ``heldout_corrupt_tokens`` unless ``shift`` is used) everything is repeated on held-out prompts.

    Illusion rule, per split, on E = the effect on ``flag_metric`` (KL(clean ‖ patched) for
    ``"kl"``, |Δ log-prob| for ``"logprob"``): the split is flagged a possible illusion when

        E_subspace > 1e-9  and  E_subspace ≥ min_fraction · E_full  and  E_row < illusion_threshold · E_subspace,

    i.e. the subspace patch matters (at least ``min_fraction`` = 0.1 of the full patch), but the
    part of v the downstream weights can read, patched with its own variation, reproduces less
    than ``illusion_threshold`` = 0.5 of it: the effect rides on variation in the null-space part
    (KL grows about quadratically with a small logit shift, so 0.5 in KL ≈ 0.7 of the shift).
    ``null_share`` (the null part's share of Σ(v·Δ)²) is reported beside it as evidence.
    """
    model = as_position_model(model)
    if site not in SUBSPACE_SITES:
        raise ValueError(f"subspace patching supports sites {', '.join(SUBSPACE_SITES)}; got {site!r}")
    if flag_metric not in ("kl", "logprob"):
        raise ValueError(f"unknown flag_metric {flag_metric!r}; accepted: kl, logprob")
    if not 0 < illusion_threshold <= 1 or not 0 <= min_fraction <= 1:
        raise ValueError(
            f"illusion_threshold must lie in (0, 1] and min_fraction in [0, 1]; "
            f"got {illusion_threshold}, {min_fraction}"
        )
    key = SiteKey(site, None if site in ("embed", "pos_embed") else layer)
    model._check_key(key)
    width = site_width(model.info, site)
    v = _as_direction(direction, width, f"the width of {key.name} in {model.info.name}")
    read = downstream_read_matrix(model, site, layer, scope)
    row, null = split_direction(v, read, rtol)
    splits = {"fit": _paired(model, clean_tokens, corrupt_tokens, shift, mode, filler_token, "fit")}
    if heldout_tokens is not None:
        heldout_bad = None if shift is not None else heldout_corrupt_tokens
        splits["heldout"] = _paired(model, heldout_tokens, heldout_bad, shift, mode, filler_token, "heldout")
    elif heldout_corrupt_tokens is not None:
        raise ValueError("heldout_corrupt_tokens given without heldout_tokens")
    weights = {"full": float("nan"), "subspace": 1.0, "row": float(row @ row), "null": float(null @ null)}
    units = {"subspace": v, "row": row, "null": null}
    kinds = ["full"] + [k for k in ("subspace", "row", "null") if weights[k] > _NOISE]
    patches = [Patch(key, _full if k == "full" else _along(units[k] / units[k].norm())) for k in kinds]
    rows, flags = [], []
    for split, (batch, corrupt) in splits.items():
        totals = run_patches(model, batch, corrupt, patches, None, batch_size, progress)
        effects = dict.fromkeys(PATCH_KINDS, 0.0)
        for kind in PATCH_KINDS:
            if kind in kinds:
                metric_list = metric_rows(totals, kinds.index(kind), None, ("logprob", "kl"))
            else:  # an empty part: patching along nothing changes nothing
                metric_list = [
                    {**r, "value": r["clean"], "effect": 0.0, "normalized": 0.0}
                    for r in metric_rows(totals, 0, None, ("logprob", "kl"))
                ]
            for r in metric_list:
                rows.append({"split": split, "patch": kind, "weight": weights[kind], **r})
                if r["metric"] == flag_metric:
                    effects[kind] = abs(r["effect"])
        sub, full = effects["subspace"], effects["full"]
        parts = torch.stack([row, null])
        flags.append(
            {
                "split": split,
                "flag_metric": flag_metric,
                "fraction_of_full": sub / full if full > _NOISE else float("nan"),
                "row_fraction": effects["row"] / sub if sub > _NOISE else float("nan"),
                "null_fraction": effects["null"] / sub if sub > _NOISE else float("nan"),
                "null_share": _null_share(model, batch, corrupt, key, parts, batch_size),
                "possible_illusion": bool(
                    sub > _NOISE and sub >= min_fraction * full and effects["row"] < illusion_threshold * sub
                ),
            }
        )
    params = {
        "model": model.info.name,
        "site": key.name,
        "scope": scope,
        "read_shape": tuple(read.shape),
        "row_weight": weights["row"],
        "shift": shift,
        "mode": mode if shift is not None else "tokens",
        "illusion_threshold": illusion_threshold,
        "min_fraction": min_fraction,
    }
    table = pd.DataFrame(rows)
    table.insert(0, "model", model.info.name)
    table.insert(1, "site", key.name)
    return SubspaceResult(table, pd.DataFrame(flags), params)
