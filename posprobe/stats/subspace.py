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

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, cast

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from posprobe.data import TokenBatch, as_token_batch
from posprobe.models.base import PositionModel
from posprobe.results import ParamsAlias, Result, RunInfo
from posprobe.sites import SiteKey
from posprobe.stats.patch_runs import (
    CorruptInputs,
    Patch,
    Totals,
    corrupt_inputs,
    metric_as_kind,
    metric_rows,
    model_source,
    run_patches,
    site_width,
)
from posprobe.stats.streaming import Source, batches

if TYPE_CHECKING:
    import plotly.graph_objects as go
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaForCausalLM

    from posprobe.models.hf import HFModel
    from posprobe.models.zoo import ZooModel
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
        return _zoo_read_matrix(model, site, layer, scope)
    if isinstance(model, HFModel) and not model.layout.encoder:
        return _hf_read_matrix(model, site, layer, scope)
    raise ValueError(
        f"downstream_read_matrix knows zoo models and Hugging Face decoders; {model.info.name} is a "
        f"{model.info.architecture}"
    )


def _zoo_read_matrix(model: ZooModel, site: str, layer: int | None, scope: str) -> Tensor:
    net = model.net
    if site == "mlp_post":
        assert layer is not None  # mlp_post has layers (checked by downstream_read_matrix)
        return cast("Block", net.blocks[layer]).mlp.W_out.detach().double().T
    if site == "z":
        assert layer is not None  # z has layers (checked by downstream_read_matrix)
        W_O = cast("Block", net.blocks[layer]).attn.W_O.detach().double()
        return W_O.reshape(-1, W_O.shape[-1]).T
    parts = [_zoo_reader(net, k, i) for k, i in _residual_readers(site, layer, model.info.n_layers, scope)]
    return torch.cat(parts)


def _hf_read_matrix(model: HFModel, site: str, layer: int | None, scope: str) -> Tensor:
    layout = model.layout
    block = cast(nn.ModuleList, model.hf.get_submodule(layout.layers))[layer] if layer is not None else None
    if site == "mlp_post":
        assert block is not None  # mlp_post has layers (checked by downstream_read_matrix)
        return _linear_weight(block.get_submodule(layout.mlp_down))
    if site == "z":
        assert block is not None  # z has layers (checked by downstream_read_matrix)
        return _linear_weight(block.get_submodule(layout.attn_out_proj))
    if layout.family not in LLAMA_LIKE:
        raise ValueError(
            f"downstream_read_matrix reads residual sites of Llama-like / Gemma decoders ({', '.join(LLAMA_LIKE)}) "
            f"and zoo models; {model.info.name} is a {layout.family!r} model (its mlp_post and z work)"
        )
    layers = cast(nn.ModuleList, model.hf.get_submodule(layout.layers))  # discover_layout's block list
    readers = _residual_readers(site, layer, model.info.n_layers, scope)
    return torch.cat([_hf_reader(model.hf, layers, k, i) for k, i in readers])


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
class SubspaceResult(ParamsAlias, Result):
    """What ``subspace_patch`` returns.

    ``table``: one row per (split, patch, metric): split (``fit`` / ``heldout``), patch (``full``,
    ``subspace``, ``row``, ``null``), weight (share of v's squared norm in that part), metric,
    value, clean, corrupt, effect, normalized. ``flags``: one row per split with fraction_of_full,
    row_fraction, null_fraction, null_share and possible_illusion (see ``subspace_patch``).
    ``info``: the run record (``params``: model, site, scope, read_shape, row_weight, shift, mode,
    illusion_threshold, min_fraction). Figure kinds: the metrics ``"kl"`` and ``"logprob"``, each the
    effect of the four patches per split.
    """

    FIGURES: ClassVar[Mapping[str, str]] = {"kl": "_bars_figure", "logprob": "_bars_figure"}
    TABLES: ClassVar[Sequence[str]] = ("flags",)

    table: pd.DataFrame
    flags: pd.DataFrame
    info: RunInfo

    @property
    def possible_illusion(self) -> bool:
        """True when any evaluated split meets the illusion rule of ``subspace_patch``."""
        return bool(self.flags["possible_illusion"].any())

    def figure(self, kind: str | None = None, **options: Any) -> go.Figure:
        """Effect of the full, subspace, row-space and null-space patches per split on the metric ``kind`` (default
        ``"kl"``; ``posprobe.plots.patching``); ``metric=`` is the old spelling of ``kind``, kept one release."""
        return super().figure(metric_as_kind("SubspaceResult", kind, options), **options)

    def _draw(self, kind: str, **options: Any) -> go.Figure:
        return self._bars_figure(kind, **options)

    def _bars_figure(self, metric: str) -> go.Figure:
        from posprobe.plots.patching import subspace_bars

        return subspace_bars(self.table, metric=metric)


def _along(u: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
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


@dataclass(frozen=True)
class _Pairing:
    """Pairs clean tokens with their corrupted twin: given tokens, or the ``shift``-ed twin."""

    model: PositionModel
    shift: int | None
    mode: str
    filler: int | None

    def __call__(self, clean: Any, corrupt: Any, name: str) -> tuple[TokenBatch, CorruptInputs]:
        model, shift = self.model, self.shift
        batch = as_token_batch(model, clean)
        if (corrupt is None) == (shift is None):
            raise ValueError(f"give either {name} corrupt tokens or a shift, not both or neither")
        if shift is not None:
            return batch, corrupt_inputs(model, batch, shift, self.mode, self.filler)
        bad = as_token_batch(model, corrupt)
        if bad.tokens.shape != batch.tokens.shape:
            raise ValueError(
                f"{name} clean tokens have shape {tuple(batch.tokens.shape)} but corrupt tokens "
                f"{tuple(bad.tokens.shape)}; subspace patching pairs each clean token with the corrupt token at the "
                "same index, so they need equal length (use shift= for position-shifted twins)"
            )
        if not torch.equal(bad.attention_mask, batch.attention_mask):
            raise ValueError(f"{name} clean and corrupt tokens must have the same padding (attention masks differ)")
        index = torch.arange(batch.tokens.shape[1])
        return batch, CorruptInputs(bad.tokens, bad.attention_mask, bad.position_ids, index)

    def splits(
        self, batch: TokenBatch, corrupt: Any, heldout: Any, heldout_corrupt: Any
    ) -> dict[str, tuple[TokenBatch, CorruptInputs]]:
        """The ``fit`` split and, with ``heldout`` tokens, the ``heldout`` one (its twin shifted when ``shift`` is)."""
        splits = {"fit": self(batch, corrupt, "fit")}
        if heldout is not None:
            splits["heldout"] = self(heldout, None if self.shift is not None else heldout_corrupt, "heldout")
        elif heldout_corrupt is not None:
            raise ValueError("heldout_corrupt_tokens given without heldout_tokens")
        return splits


def _null_share(
    model: PositionModel, batch: TokenBatch, corrupt: CorruptInputs, key: SiteKey, parts: Tensor, batch_size: int
) -> float:
    """Σ(v_null·Δ)² / (Σ(v_row·Δ)² + Σ(v_null·Δ)²) over real tokens, Δ = corrupt − clean at ``key``; NaN if Δ·v ≡ 0."""
    stop = key.layer
    sums = torch.zeros(2, dtype=torch.float64)
    for start, chunk in batches(batch, batch_size):
        mask = chunk.attention_mask
        clean = model.capture(chunk.tokens, [key], attention_mask=mask, stop_at_layer=stop)[key]
        twin = corrupt.rows(start, start + batch_size)
        bad = model.capture(
            twin.tokens,
            [key],
            attention_mask=twin.attention_mask,
            position_ids=twin.position_ids,
            stop_at_layer=stop,
        )[key][:, twin.index.to(clean.device)]
        delta = (bad - clean).reshape(*mask.shape, -1).double().cpu()[mask.bool()]
        sums += ((delta @ parts.T) ** 2).sum(0)
    total = float(sums.sum())
    return float(sums[1]) / total if total > 0 else float("nan")


def subspace_patch(
    source: Any,
    tokens: TokenBatch | Tensor | Sequence[str] | None = None,
    *,
    corrupt_tokens: TokenBatch | Tensor | Sequence[str] | None = None,
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

    ``source`` is a model (anything ``load_model`` accepts) run on the clean ``tokens`` (a
    TokenBatch, ids [n s] or texts). Corrupted inputs are ``corrupt_tokens`` (same shape as the
    clean ones, paired token by token) or the position-shifted twin (``shift``, ``mode`` as in
    ``patch_positions``). ``direction`` [D] (a vector or a fitted probe's ``coef_``; D =
    ``site_width``, heads·d_head flattened for ``z``) is normalised to unit v. Patches, every
    token at once: ``full`` (the whole activation), ``subspace`` (x + ((c − x)·v) v), ``row`` and
    ``null`` (the same along the unit row-space and null-space parts of v w.r.t.
    ``downstream_read_matrix(model, site, layer, scope)``). Metrics: ``logprob`` and ``kl`` as in
    ``patch_positions``. With ``heldout_tokens`` (and ``heldout_corrupt_tokens`` unless ``shift``
    is used) everything is repeated on held-out prompts.

    Illusion rule, per split, on E = the effect on ``flag_metric`` (KL(clean ‖ patched) for
    ``"kl"``, |Δ log-prob| for ``"logprob"``): the split is flagged a possible illusion when

        E_subspace > 1e-9  and  E_subspace ≥ min_fraction · E_full  and  E_row < illusion_threshold · E_subspace,

    i.e. the subspace patch matters (at least ``min_fraction`` = 0.1 of the full patch), but the
    part of v the downstream weights can read, patched with its own variation, reproduces less
    than ``illusion_threshold`` = 0.5 of it: the effect rides on variation in the null-space part
    (KL grows about quadratically with a small logit shift, so 0.5 in KL ≈ 0.7 of the shift).
    ``null_share`` (the null part's share of Σ(v·Δ)²) is reported beside it as evidence.
    """
    src, model, batch = model_source(source, tokens, "subspace_patch")
    rule = _IllusionRule(flag_metric, illusion_threshold, min_fraction)
    rule.check(site)
    key = SiteKey(site, None if site in ("embed", "pos_embed") else layer)
    model._check_key(key)
    plan = _Plan.of(model, key, direction, scope, rtol)
    pairing = _Pairing(model, shift, mode, filler_token)
    splits = pairing.splits(batch, corrupt_tokens, heldout_tokens, heldout_corrupt_tokens)
    rows, flags = plan.evaluate(model, splits, rule, batch_size, progress)
    table = pd.DataFrame(rows)
    table.insert(0, "model", model.info.name)
    table.insert(1, "site", key.name)
    settings = {"scope": scope, "shift": shift, "mode": mode if shift is not None else "tokens"}
    return SubspaceResult(table, pd.DataFrame(flags), _subspace_info(src, plan, rule, settings))


def _subspace_info(src: Source, plan: _Plan, rule: _IllusionRule, settings: dict[str, Any]) -> RunInfo:
    """The run record; ``params`` as ``SubspaceResult.params`` always was."""
    params = {
        "model": src.name,
        "site": plan.key.name,
        "scope": settings["scope"],
        "read_shape": plan.read_shape,
        "row_weight": plan.weights["row"],
        "shift": settings["shift"],
        "mode": settings["mode"],
        "illusion_threshold": rule.illusion_threshold,
        "min_fraction": rule.min_fraction,
    }
    return src.run_info("subspace_patch", site=plan.key.site, layers=[plan.key.layer], params=params)


@dataclass(frozen=True)
class _Plan:
    """The patches of ``subspace_patch`` at ``key``: v's parts, their weights, the kinds with a non-empty part."""

    key: SiteKey
    read_shape: tuple[int, ...]
    weights: dict[str, float]
    kinds: list[str]
    patches: list[Patch]
    parts: Tensor  # [2 D]: the row-space and null-space parts of v

    @classmethod
    def of(cls, model: PositionModel, key: SiteKey, direction: Any, scope: str, rtol: float) -> _Plan:
        v = _as_direction(direction, site_width(model.info, key.site), f"the width of {key.name} in {model.info.name}")
        read = downstream_read_matrix(model, key.site, key.layer, scope)
        row, null = split_direction(v, read, rtol)
        weights = {"full": float("nan"), "subspace": 1.0, "row": float(row @ row), "null": float(null @ null)}
        units = {"subspace": v, "row": row, "null": null}
        kinds = ["full"] + [k for k in ("subspace", "row", "null") if weights[k] > _NOISE]
        patches = [Patch(key, _full if k == "full" else _along(units[k] / units[k].norm())) for k in kinds]
        return cls(key, tuple(read.shape), weights, kinds, patches, torch.stack([row, null]))

    def evaluate(
        self,
        model: PositionModel,
        splits: dict[str, tuple[TokenBatch, CorruptInputs]],
        rule: _IllusionRule,
        batch_size: int,
        progress: bool,
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The table rows and the flags of every split."""
        rows, flags = [], []
        for split, (clean, corrupt) in splits.items():
            totals = run_patches(model, clean, corrupt, self.patches, None, batch_size, progress)
            split_rows, effects = _split_rows(totals, split, self.kinds, self.weights, rule.flag_metric)
            rows += split_rows
            null_share = _null_share(model, clean, corrupt, self.key, self.parts, batch_size)
            flags.append(rule.flags(split, effects, null_share))
        return rows, flags


@dataclass(frozen=True)
class _IllusionRule:
    """The settings of ``subspace_patch``'s illusion rule, checked, and the flags it gives a split."""

    flag_metric: str
    illusion_threshold: float
    min_fraction: float

    def check(self, site: str) -> None:
        if site not in SUBSPACE_SITES:
            raise ValueError(f"subspace patching supports sites {', '.join(SUBSPACE_SITES)}; got {site!r}")
        if self.flag_metric not in ("kl", "logprob"):
            raise ValueError(f"unknown flag_metric {self.flag_metric!r}; accepted: kl, logprob")
        if not 0 < self.illusion_threshold <= 1 or not 0 <= self.min_fraction <= 1:
            raise ValueError(
                f"illusion_threshold must lie in (0, 1] and min_fraction in [0, 1]; "
                f"got {self.illusion_threshold}, {self.min_fraction}"
            )

    def flags(self, split: str, effects: dict[str, float], null_share: float) -> dict[str, Any]:
        """One row of ``SubspaceResult.flags`` from the |effects| of the four patches on ``flag_metric``."""
        sub, full = effects["subspace"], effects["full"]
        return {
            "split": split,
            "flag_metric": self.flag_metric,
            "fraction_of_full": sub / full if full > _NOISE else float("nan"),
            "row_fraction": effects["row"] / sub if sub > _NOISE else float("nan"),
            "null_fraction": effects["null"] / sub if sub > _NOISE else float("nan"),
            "null_share": null_share,
            "possible_illusion": bool(
                sub > _NOISE and sub >= self.min_fraction * full and effects["row"] < self.illusion_threshold * sub
            ),
        }


def _split_rows(
    totals: Totals, split: str, kinds: list[str], weights: dict[str, float], flag_metric: str
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """The table rows of one split and each patch's |effect| on ``flag_metric``."""
    rows = []
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
    return rows, effects
