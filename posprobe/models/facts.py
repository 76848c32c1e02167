"""Facts about a Hugging Face model, read from its modules and config: sizes, and every position fact.

RoPE frequencies are the model's own ``inv_freq`` buffers, ALiBi slopes come from the family's own
bias builder, the learned table's offset from its module: nothing is recomputed from a formula that
is right for one family only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from torch import Tensor, nn

from posprobe.models.architecture import (
    Layout,
    Rotary,
    alibi_slopes,
    discover_layout,
    get_module,
    head_dim,
    linear_shape,
    n_kv_heads,
    rope_pairing_of,
    rope_parameters,
    rotary_per_layer,
    text_config,
    uses_alibi,
)
from posprobe.models.base import ModelInfo

if TYPE_CHECKING:
    from transformers import PreTrainedModel

NCTX_NAMES = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length")


def read_info(hf: nn.Module, tokenizer: Any, name: str, layout: Layout | None = None) -> ModelInfo:
    """ModelInfo read from the model: sizes from its config and modules, position facts from its modules."""
    layout = layout or discover_layout(hf)
    cfg = text_config(hf.config)
    block = get_module(hf, layout.layers)[0]
    d_mlp = linear_shape(block.get_submodule(layout.mlp_down))
    facts = position_facts(hf, layout.layers, layout.pos_embed, layout.encoder)
    n_ctx = context_length(cfg, tokenizer)
    if layout.pos_embed is not None:  # RoBERTa's table has 514 rows for 512 positions (rows 0, 1 are padding)
        n_ctx = min(n_ctx, get_module(hf, layout.pos_embed).num_embeddings - facts["position_offset"])
    return ModelInfo(
        name=name,
        architecture=(getattr(hf.config, "architectures", None) or [type(hf).__name__])[0],
        n_layers=cfg.num_hidden_layers,
        n_heads=cfg.num_attention_heads,
        n_kv_heads=n_kv_heads(cfg),
        d_model=cfg.hidden_size,
        d_head=head_dim(cfg),
        d_mlp=d_mlp[0] if d_mlp else cfg.intermediate_size,
        n_ctx=n_ctx,
        d_vocab=cast(Tensor, cast("PreTrainedModel", hf).get_input_embeddings().weight).shape[0],
        causal=not layout.encoder,
        parallel_residual=layout.parallel,
        act_fn=act_fn_name(cfg),
        **bos_facts(tokenizer),
        **facts,
        extra={"model_type": layout.family, "attention": layout.attention},
    )


def position_facts(hf: nn.Module, layers: str, pos_embed: str | None, encoder: bool = False) -> dict[str, Any]:
    """ModelInfo's position fields, read from the model's modules and config.

    RoPE frequencies are the model's own ``inv_freq`` buffers (so llama3 / yarn / linear / dynamic /
    longrope scaling are as the model applies them), per layer type where it has several; the
    config gives each layer type's ``rope_type`` and parameters. ALiBi slopes come from the
    family's own bias builder, the learned table's offset from its module (OPT) or padding index
    (RoBERTa). TransformerLens' ``cfg.rotary_base`` is wrong for SmolLM2 and Gemma 3 (DESIGN.md).
    """
    cfg = text_config(hf.config)
    n_layers = cfg.num_hidden_layers
    layer_types = tuple(getattr(cfg, "layer_types", None) or ["full_attention"] * n_layers)
    rotary = [] if encoder else rotary_per_layer(hf, layers, layer_types)
    slopes: tuple[float, ...] = ()
    if encoder:
        scheme = "learned" if getattr(cfg, "position_embedding_type", "absolute") == "absolute" else "relative"
    elif uses_alibi(cfg):
        scheme, slopes = "alibi", alibi_slopes(hf, cfg.num_attention_heads)
    elif any(r is not None for r in rotary):
        scheme = "rope"
    elif pos_embed is not None:
        scheme = "learned"
    else:
        scheme = "none"
    nothing = (None,) * n_layers
    rope = dict(
        rope_bases=nothing, rotary_dims=nothing, rope_inv_freq=nothing, rope_types=nothing,
        rope_attention_scaling=nothing, rope_parameters={}, rope_pairing=None,
    )  # fmt: skip
    if scheme == "rope":
        rope = _rope_facts(cfg, rotary, layer_types, rope_pairing_of(hf))
    window = getattr(cfg, "sliding_window", None)
    return dict(
        position_scheme=scheme,
        alibi_slopes=slopes,
        position_offset=_position_offset(hf, pos_embed),
        attn_softcap=getattr(cfg, "attn_logit_softcapping", None),
        final_softcap=getattr(cfg, "final_logit_softcapping", None),
        sliding_windows=tuple(window if t == "sliding_attention" else None for t in layer_types),
        layer_types=layer_types,
        **rope,
    )


def bos_facts(tokenizer: Any) -> dict[str, Any]:
    """The tokenizer's BOS id and whether it prepends it."""
    bos = getattr(tokenizer, "bos_token_id", None)
    prepends = bool(bos is not None and tokenizer("a")["input_ids"][:1] == [bos])
    return {"bos_token_id": bos, "prepends_bos": prepends}


def act_fn_name(cfg: Any) -> str:
    for name in ("hidden_act", "hidden_activation", "activation_function"):
        value = getattr(cfg, name, None)
        if value:
            return str(value)
    return ""


def _rope_facts(cfg: Any, rotary: list[Rotary | None], layer_types: tuple[str, ...], pairing: str) -> dict[str, Any]:
    freqs: list[tuple[float, ...] | None] = []
    dims: list[int | None] = []
    bases: list[float | None] = []
    types: list[str | None] = []
    scaling: list[float | None] = []
    params_by_type: dict[str, dict[str, Any]] = {}
    for r, layer_type in zip(rotary, layer_types, strict=True):
        if r is None:
            for values in (freqs, dims, bases, types, scaling):
                values.append(None)
            continue
        theta = r.inv_freq().double().cpu()
        params = params_by_type.setdefault(layer_type, rope_parameters(cfg, layer_type))
        base = params.get("rope_theta") or getattr(cfg, "rope_theta", None)
        if base is None:  # no base in the config (GPT-J): the one the model's frequencies imply
            base = float(theta[1] ** (-theta.numel())) if theta.numel() > 1 else float("nan")
        freqs.append(tuple(theta.tolist()))
        dims.append(2 * theta.numel())
        bases.append(float(base))
        types.append(params["rope_type"])
        scaling.append(r.attention_scaling())
    return dict(
        rope_inv_freq=tuple(freqs),
        rotary_dims=tuple(dims),
        rope_bases=tuple(bases),
        rope_types=tuple(types),
        rope_attention_scaling=tuple(scaling),
        rope_parameters=params_by_type,
        rope_pairing=pairing,
    )


def context_length(cfg: Any, tokenizer: Any) -> int:
    for name in NCTX_NAMES:
        value = getattr(cfg, name, None)
        if value:
            return int(value)
    limit = getattr(tokenizer, "model_max_length", None)  # BLOOM's config names no context length
    return int(limit) if limit and limit < 1_000_000 else 2048


def _position_offset(hf: nn.Module, pos_embed: str | None) -> int:
    """The learned-table row of position 0: OPT's ``offset``, RoBERTa's padding_idx + 1, else 0."""
    if pos_embed is None:
        return 0
    table = get_module(hf, pos_embed)
    if hasattr(table, "offset"):
        return int(table.offset)
    padding = getattr(get_module(hf, pos_embed.rpartition(".")[0]), "padding_idx", None)
    return int(padding) + 1 if padding is not None else 0
