"""Where each site lives in a Hugging Face model, found from the model itself.

One ``Layout`` per loaded model, discovered from its modules rather than written per family:
the token embedding is ``get_input_embeddings()``, the block list is the ``ModuleList`` with
``num_hidden_layers`` entries, the attention and MLP are the block's children of those kinds,
the MLP's down projection and the attention's output projection are the linear maps back to
``d_model``, and the norms are read by the names transformers gives them (TransformerLens 4's
architecture adapters name the same modules per family: ``ln1``/``ln2``/``ln1_post``…). Only
what really differs is written by hand: BERT-style post-LN encoders, and the three families
whose attention is written inline instead of going through transformers' ``AttentionInterface``
(BLOOM, MPT, Falcon; see ``posprobe.models.inline_attention``).

Position facts are read from modules too: RoPE frequencies from the rotary embedding's
``inv_freq`` buffers (``{layer_type}_inv_freq`` where a model has several), which already hold
llama3 / yarn / linear / dynamic / longrope scaling, and ALiBi slopes from the family's own
``build_alibi_tensor``.
"""

from __future__ import annotations

import inspect
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, cast

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from transformers import PreTrainedModel

#: Families whose attention is inline code (no AttentionInterface): posprobe runs its own eager
#: copy of their attention when an attention site is requested.
INLINE_ATTENTION = ("bloom", "mpt", "falcon")
ENCODERS = ("bert", "roberta", "xlm-roberta", "camembert")

PRE_ATTN_NORMS = ("input_layernorm", "ln_1", "norm_1", "self_attn_layer_norm", "ln_attn", "attention_norm")
PRE_MLP_NORMS = ("pre_feedforward_layernorm", "ln_2", "norm_2", "final_layer_norm", "ln_mlp", "ffn_norm")


@dataclass(frozen=True)
class ModuleSite:
    """Where a site lives relative to a block: a module path and how to read its tensor.

    ``how``: ``out`` (module output), ``out_copy`` (module output, handed on as a copy because the
    model changes it in place), ``out0`` (first element of a tuple output), ``in`` (first input),
    ``heads`` (output [b s h*d] viewed as heads), ``bshd`` (output already [b s h d]), ``bhsd``
    (output [b h s d], read transposed).
    """

    path: str
    how: str


@dataclass(frozen=True)
class Layout:
    """The module layout of one Hugging Face model: paths from the top module and from each block.

    ``sites`` maps block-relative sites (resid_mid, attn_out, mlp_out, mlp_post, and q/k where a
    plain projection gives them) to modules; q/k absent there are read inside the attention
    function (de-rotated on RoPE models). ``missing`` maps a site this model cannot give to the
    reason, said in one line.
    """

    family: str
    body: str
    layers: str
    embed: str
    attn: str
    attn_out_proj: str
    mlp_down: str
    sites: dict[str, ModuleSite]
    pos_embed: str | None = None
    lm_head: str | None = "lm_head"
    parallel: bool = False
    encoder: bool = False
    attention: str = "interface"
    missing: dict[str, str] = field(default_factory=dict)


def text_config(config: Any) -> Any:
    """The text model's config (multimodal configs nest it)."""
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def discover_layout(hf: nn.Module) -> Layout:
    """The ``Layout`` of any transformers decoder or BERT-style encoder, found from its modules.

    Raises a ValueError naming the model type and the ways forward when no block list or no
    attention / MLP can be found (an encoder-decoder, a state-space model, …).
    """
    cfg = text_config(hf.config)
    family = getattr(cfg, "model_type", None) or type(hf).__name__
    if family in ENCODERS:
        return _encoder_layout(hf, family)
    head_dim(cfg)  # a config whose heads do not tile d_model is refused before anything else
    pretrained = cast("PreTrainedModel", hf)  # a transformers model: its embedding getters exist
    names = {id(m): n for n, m in hf.named_modules()}
    layers = find_layers(hf, cfg.num_hidden_layers)
    if layers is None:
        raise UnsupportedModelError(family, f"no list of {cfg.num_hidden_layers} blocks among its modules")
    embed = names.get(id(pretrained.get_input_embeddings()))
    if embed is None:
        raise UnsupportedModelError(family, "no input embedding (get_input_embeddings())")
    block = cast(nn.ModuleList, hf.get_submodule(layers))[0]
    parts = _BlockParts.find(block, family, cfg.hidden_size)
    norms = _BlockNorms.find(block, family, cfg)
    sites, missing = _block_sites(parts, norms, family)
    sites.update(_projection_sites(block.get_submodule(parts.attn), parts.attn, cfg))
    attention, reason = _attention_backend(block.get_submodule(parts.attn), family, cfg)
    if reason:
        missing.update(dict.fromkeys(("rot_q", "rot_k", "attn_scores", "pattern", "z"), reason))
        missing.update({s: reason for s in ("q", "k") if s not in sites})
    head = pretrained.get_output_embeddings()
    return Layout(
        family=family,
        body=_body(hf),
        layers=layers,
        embed=embed,
        attn=parts.attn,
        attn_out_proj=parts.attn_out_proj,
        mlp_down=parts.mlp_down,
        sites=sites,
        pos_embed=_pos_embed(hf, embed, layers),
        lm_head=names.get(id(head)) if head is not None else None,
        parallel=norms.parallel,
        attention=attention,
        missing=missing,
    )


@dataclass(frozen=True)
class _BlockParts:
    """Where a decoder block keeps its attention and MLP (names relative to the block)."""

    attn: str
    mlp: str | None
    mlp_down: str
    attn_out_proj: str

    @classmethod
    def find(cls, block: nn.Module, family: str, d_model: int) -> _BlockParts:
        attn = _child(
            block, ("self_attn", "attn", "attention", "self_attention"), lambda m: "Attention" in type(m).__name__
        )
        if attn is None:
            raise UnsupportedModelError(family, f"no attention module in {type(block).__name__}")
        mlp = _child(block, ("mlp", "ffn", "feed_forward"), lambda m: type(m).__name__.endswith("MLP"))
        mlp_root = block.get_submodule(mlp) if mlp else block
        down = _last_linear_to(mlp_root, d_model, skip=None if mlp else attn)
        o_proj = _last_linear_to(block.get_submodule(attn), d_model)
        if down is None or o_proj is None:
            raise UnsupportedModelError(
                family, f"no MLP down projection or attention output projection to d_model={d_model}"
            )
        return cls(attn, mlp, f"{mlp}.{down}" if mlp else down, f"{attn}.{o_proj}")


@dataclass(frozen=True)
class _BlockNorms:
    """The norms around a block's sub-blocks, and whether attention and MLP run in parallel."""

    attn_post: str | None
    mlp_post_norm: str | None
    pre_mlp: str | None
    parallel: bool

    @classmethod
    def find(cls, block: nn.Module, family: str, cfg: Any) -> _BlockNorms:
        norms = {n for n, m in block.named_children() if "norm" in type(m).__name__.lower()}
        has_pre_attn = any(n in norms for n in PRE_ATTN_NORMS)
        attn_post = pre_mlp = None
        if "pre_feedforward_layernorm" in norms:  # Gemma 2/3: sandwich norms
            pre_mlp = "pre_feedforward_layernorm"
            attn_post = "post_attention_layernorm" if "post_attention_layernorm" in norms else None
        elif not has_pre_attn and "post_attention_layernorm" in norms:  # OLMo 2: post-norm on each sub-block
            attn_post = "post_attention_layernorm"
        else:
            pre_mlp = next((n for n in (*PRE_MLP_NORMS, "post_attention_layernorm") if n in norms), None)
        mlp_post_norm = "post_feedforward_layernorm" if "post_feedforward_layernorm" in norms else None
        parallel = bool(
            getattr(cfg, "use_parallel_residual", False)
            or getattr(cfg, "new_decoder_architecture", False)
            or (family == "falcon" and getattr(cfg, "parallel_attn", False))
            or (pre_mlp is None and attn_post is None)
        )
        return cls(attn_post, mlp_post_norm, pre_mlp, parallel)


def _block_sites(parts: _BlockParts, norms: _BlockNorms, family: str) -> tuple[dict[str, ModuleSite], dict[str, str]]:
    """The residual and sub-block output sites of a block, and the sites it cannot have (with why)."""
    # Falcon's parallel block adds the attention output into the MLP output in place: read a copy
    mlp_how = "out_copy" if norms.parallel and family == "falcon" else "out"
    sites = {
        "attn_out": ModuleSite(norms.attn_post or parts.attn_out_proj, "out"),
        "mlp_out": ModuleSite(norms.mlp_post_norm, "out")
        if norms.mlp_post_norm
        else ModuleSite(parts.mlp_down, mlp_how),
        "mlp_post": ModuleSite(parts.mlp_down, "in"),
    }
    missing: dict[str, str] = {}
    if norms.parallel:
        missing["resid_mid"] = (
            f"{family} runs attention and MLP in parallel from the same residual stream, so there is no residual "
            "between them; use resid_pre / resid_post"
        )
    else:
        sites["resid_mid"] = ModuleSite(norms.pre_mlp or parts.mlp or parts.mlp_down, "in")
    return sites, missing


def _attention_backend(attn: nn.Module, family: str, cfg: Any) -> tuple[str, str | None]:
    """How posprobe reads the attention of ``family`` (its own code, the interface, or not at all) and why not."""
    attention = family if family in INLINE_ATTENTION else "interface"
    if attention == "interface" and not _uses_attention_interface(attn):
        return "none", (
            f"{family}'s attention is inline code that posprobe cannot enter (it does not call transformers' "
            "AttentionInterface); TransformerLens' bridge has these hook points (posprobe.models.bridge.BridgeModel)"
        )
    if family == "falcon" and getattr(cfg, "alibi", False):
        return (
            "none",
            "Falcon with ALiBi folds its bias into the attention mask; posprobe reads only its residual and MLP",
        )
    return attention, None


class UnsupportedModelError(ValueError):
    """A model posprobe cannot map onto its sites; says why and what to do instead."""

    def __init__(self, family: str, why: str, bridge_tried: bool = False):
        self.family, self.why = family, why
        if bridge_tried:
            message = (
                f"posprobe cannot map model_type {family!r} onto its sites ({why}). Two ways forward: describe its "
                "modules with posprobe.models.architecture.Layout and load HFModel(model, tokenizer, layout=...), "
                "or register a TransformerLens architecture adapter for it (pp.load_model then hooks it through the "
                "bridge)"
            )
        else:
            message = f"posprobe has no native map for model_type {family!r} ({why})"
        super().__init__(message)


def _encoder_layout(hf: nn.Module, family: str) -> Layout:
    """BERT / RoBERTa: post-LN blocks whose sub-blocks add their own residual inside."""
    base = _body(hf)
    prefix = f"{base}." if base else ""
    return Layout(
        family=family,
        body=base,
        layers=f"{prefix}encoder.layer",
        embed=f"{prefix}embeddings.word_embeddings",
        pos_embed=f"{prefix}embeddings.position_embeddings",
        lm_head=None,
        attn="attention",
        attn_out_proj="attention.output.dense",
        mlp_down="output.dense",
        encoder=True,
        sites={
            "resid_mid": ModuleSite("attention", "out0"),
            "attn_out": ModuleSite("attention.output.dense", "out"),
            "mlp_out": ModuleSite("output.dense", "out"),
            "mlp_post": ModuleSite("intermediate", "out"),
            "q": ModuleSite("attention.self.query", "heads"),
            "k": ModuleSite("attention.self.key", "heads"),
        },
    )


def get_module(root: nn.Module, path: str) -> Any:
    """The submodule at ``path`` ('' is ``root`` itself)."""
    return root.get_submodule(path) if path else root


def _body(hf: nn.Module) -> str:
    """The path of the base model (``transformer``, ``model``, ``gpt_neox``…) or '' when ``hf`` is it."""
    prefix = getattr(hf, "base_model_prefix", "")
    return prefix if prefix and isinstance(getattr(hf, prefix, None), nn.Module) else ""


def find_layers(hf: nn.Module, n_layers: int) -> str | None:
    """The path of the block list: the first ModuleList of ``n_layers`` blocks that hold an attention module."""
    for name, module in hf.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers and n_layers > 0:
            first = module[0]
            if any("Attention" in type(m).__name__ for m in first.modules()):
                return name
    return None


def _child(block: nn.Module, names: tuple[str, ...], fallback: Callable[[nn.Module], bool]) -> str | None:
    children = dict(block.named_children())
    for name in names:
        if name in children:
            return name
    return next((n for n, m in children.items() if fallback(m)), None)


def linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) features of a linear map (nn.Linear or GPT-2's transposed Conv1D), else None."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return cast("tuple[int, int]", (module.nx, module.nf))  # Conv1D's int attributes
    return None


def _last_linear_to(root: nn.Module, d_model: int, skip: str | None = None) -> str | None:
    """The last-registered linear map under ``root`` (at any depth, outside ``skip``) whose output is d_model wide.

    Nested wrappers are searched too (GPT-Neo's ``attn.attention.out_proj``); a mixture of experts,
    whose down projections are expert tensors rather than one linear map, finds none.
    """
    found = None
    for name, module in root.named_modules():
        if not name or (skip and (name == skip or name.startswith(skip + "."))):
            continue
        shape = linear_shape(module)
        if shape is not None and shape[1] == d_model:
            found = name
    return found


#: Families whose per-head q/k norm sees [b, heads, s, d_head] ("bhsd") or [b, s, heads, d_head] ("bshd"): the
#: shape alone cannot tell them apart when s equals the number of heads. A family not listed here reads q/k
#: inside the attention function instead (un-rotated there), which works the same except through nnsight remote.
QK_NORM_LAYOUT = {"gemma3_text": "bhsd", "gemma3": "bhsd", "qwen3": "bshd", "qwen3_moe": "bshd"}


def _projection_sites(attn: nn.Module, attn_path: str, cfg: Any) -> dict[str, ModuleSite]:
    """q/k at a module boundary: the query/key projections, or the q/k norms after them where there are norms.

    Empty when neither gives them exactly (a fused qkv projection): q/k are then read inside attention.
    """
    children = dict(attn.named_children())
    d_head = head_dim(cfg)
    widths = {"q": cfg.num_attention_heads * d_head, "k": n_kv_heads(cfg) * d_head}
    sites = {}
    for site, projections in (("q", ("q_proj", "query")), ("k", ("k_proj", "key"))):
        norm = children.get(f"{site}_norm")
        if norm is not None:
            width = getattr(norm, "weight", torch.empty(0)).shape[0]
            # a norm per head (Qwen3, Gemma 3) or one over all heads at once (OLMo 2)
            how = QK_NORM_LAYOUT.get(cfg.model_type) if width == d_head else "heads" if width == widths[site] else None
            if how is not None:
                sites[site] = ModuleSite(f"{attn_path}.{site}_norm", how)
            continue
        if any("norm" in n.lower() for n in children):
            continue
        name = next((n for n in projections if n in children), None)
        shape = linear_shape(children[name]) if name else None
        if shape is not None and shape[1] == widths[site]:
            sites[site] = ModuleSite(f"{attn_path}.{name}", "heads")
    return sites if len(sites) == 2 else {}


def _uses_attention_interface(attn: nn.Module) -> bool:
    """Whether the attention's forward dispatches through transformers' AttentionInterface."""
    try:
        source = inspect.getsource(type(attn).forward)
    except (OSError, TypeError):
        source = inspect.getsource(sys.modules[type(attn).__module__])
    return "ALL_ATTENTION_FUNCTIONS" in source or "attention_interface" in source


def _pos_embed(hf: nn.Module, embed: str, layers: str) -> str | None:
    """A learned absolute position table: an Embedding outside the blocks named like ``wpe`` / ``*pos*``."""
    for name, module in hf.named_modules():
        if name == embed or name.startswith(layers + ".") or not isinstance(module, nn.Embedding):
            continue
        if re.search(r"(^|\.)(wpe|[a-z_]*pos[a-z_]*)$", name):
            return name
    return None


# -- numbers from the config, with the checks transformers leaves to the modeling code ---------------


def head_dim(cfg: Any) -> int:
    """The per-head width: ``head_dim`` when the config sets one, else d_model / n_heads (which must divide)."""
    explicit = getattr(cfg, "head_dim", None)
    if explicit:
        return int(explicit)
    d_model, n_heads = cfg.hidden_size, cfg.num_attention_heads
    if d_model % n_heads:
        raise ValueError(
            f"{cfg.model_type}: hidden_size {d_model} is not a multiple of num_attention_heads {n_heads} and the "
            "config sets no head_dim, so the head width is undefined"
        )
    return d_model // n_heads


def n_kv_heads(cfg: Any) -> int:
    """Key/value heads: ``num_key_value_heads``; Falcon's ``num_kv_heads`` (new architecture) or multi-query."""
    if cfg.model_type == "falcon":
        if getattr(cfg, "new_decoder_architecture", False):
            return int(cfg.num_kv_heads)
        return 1 if getattr(cfg, "multi_query", False) else cfg.num_attention_heads
    return int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)


# -- position facts read from modules ----------------------------------------------------------------


class _RopeInit(Protocol):
    """A transformers rotary-embedding class: it carries the initialiser of the default rope type."""

    @staticmethod
    def compute_default_rope_parameters(config: Any, device: Any = None, **kwargs: Any) -> tuple[Tensor, float]: ...


@dataclass(frozen=True)
class Rotary:
    """Where one layer's RoPE frequencies live: a module and the buffer (or GPT-J table) holding them."""

    module: nn.Module
    buffer: str
    scaling_attr: str | None
    table: bool = False

    def inv_freq(self) -> Tensor:
        """The frequencies θ_i the model rotates with now [rotary_dims/2], rad/token, float32."""
        value = getattr(self.module, self.buffer)
        if value.is_meta:  # weights not materialised (an nnsight model for remote runs)
            value = self._initialised()
        if self.table:  # GPT-J: rows are positions, [sin(pos θ) | cos(pos θ)]
            half = value.shape[-1] // 2
            return torch.atan2(value[1, :half].float(), value[1, half:].float())
        return value.float()

    def _initialised(self) -> Tensor:
        """What the rotary module's own initialiser puts in the buffer: transformers' function for its rope type."""
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        layer_type = self.buffer.removesuffix("_inv_freq") if self.buffer != "inv_freq" else None
        rope_type = getattr(self.module, "rope_type", "default")
        rope_type = rope_type.get(layer_type, "default") if isinstance(rope_type, dict) else rope_type
        init = (
            ROPE_INIT_FUNCTIONS.get(rope_type)
            or cast("type[_RopeInit]", type(self.module)).compute_default_rope_parameters
        )
        kwargs = {"layer_type": layer_type} if layer_type else {}
        return init(self.module.config, "cpu", **kwargs)[0]

    def attention_scaling(self) -> float:
        """The factor transformers multiplies cos and sin by (yarn / longrope mscale), 1 otherwise."""
        return float(getattr(self.module, self.scaling_attr, 1.0)) if self.scaling_attr else 1.0


def rotary_per_layer(hf: nn.Module, layers: str, layer_types: tuple[str, ...]) -> list[Rotary | None]:
    """Each layer's ``Rotary``: its own rotary module (under ``layers``.i), else the model's shared one (per type)."""
    found: list[tuple[str, nn.Module]] = [
        (name, m)
        for name, m in hf.named_modules()
        if any(_is_freq_buffer(b) for b, _ in m.named_buffers(recurse=False))
        or (type(m).__name__.endswith("RotaryEmbedding") and hasattr(m, "embed_positions"))
    ]
    if not found:
        return [None] * len(layer_types)
    out: list[Rotary | None] = []
    for layer, layer_type in enumerate(layer_types):
        own = [m for n, m in found if n.startswith(f"{layers}.{layer}.")]
        module = own[0] if own else found[0][1]
        out.append(_rotary_of(module, layer_type))
    return out


def _is_freq_buffer(name: str) -> bool:
    return name.endswith("inv_freq") and "original" not in name


def _rotary_of(module: nn.Module, layer_type: str) -> Rotary | None:
    buffers = {b for b, _ in module.named_buffers(recurse=False)}
    if f"{layer_type}_inv_freq" in buffers:
        return Rotary(module, f"{layer_type}_inv_freq", f"{layer_type}_attention_scaling")
    if "inv_freq" in buffers:
        return Rotary(module, "inv_freq", "attention_scaling")
    if hasattr(module, "embed_positions"):
        return Rotary(module, "embed_positions", None, table=True)
    return None  # this layer type has no RoPE (e.g. a NoPE layer in a mixed model)


def rope_parameters(cfg: Any, layer_type: str) -> dict[str, Any]:
    """The config's RoPE parameters for ``layer_type`` (rope_type, rope_theta, factor, …), checked."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = getattr(cfg, "rope_parameters", None) or {}
    if params and all(isinstance(v, dict) for v in params.values()):
        params = params.get(layer_type) or {}
    params = dict(params)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default" and rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(
            f"{cfg.model_type}: unknown RoPE scaling type {rope_type!r}; transformers knows: default, "
            f"{', '.join(sorted(ROPE_INIT_FUNCTIONS))}"
        )
    params["rope_type"] = rope_type
    return params


def alibi_slopes(hf: nn.Module, n_heads: int) -> tuple[float, ...]:
    """ALiBi slopes per head from the family's own ``build_alibi_tensor`` (BLOOM, Falcon) or MPT's builder."""
    module = sys.modules[type(hf).__module__]
    cfg = text_config(hf.config)
    if hasattr(module, "build_alibi_tensor"):
        bias = module.build_alibi_tensor(torch.ones(1, 2, dtype=torch.long), n_heads, torch.float32)
        bias = bias.reshape(n_heads, 2)
    elif hasattr(module, "build_mpt_alibi_tensor"):
        max_bias = getattr(getattr(cfg, "attn_config", None), "alibi_bias_max", 8)
        bias = module.build_mpt_alibi_tensor(n_heads, 2, max_bias).reshape(n_heads, 2)
    else:
        raise ValueError(f"{cfg.model_type}: no ALiBi builder in {module.__name__}")
    return tuple(float(s) for s in (bias[:, 1] - bias[:, 0]).tolist())


def uses_alibi(cfg: Any) -> bool:
    """BLOOM always; Falcon with ``alibi``; MPT with ``attn_config.alibi``."""
    if cfg.model_type == "bloom":
        return True
    if getattr(cfg, "alibi", False):
        return True
    return bool(getattr(getattr(cfg, "attn_config", None), "alibi", False))


def rope_pairing_of(hf: nn.Module) -> str:
    """'half' when the modeling code rotates dimension i with i + d/2 (rotate_half), 'interleaved' for every-two."""
    module = sys.modules[type(hf).__module__]
    if hasattr(module, "rotate_half"):
        return "half"
    if hasattr(module, "rotate_every_two"):
        return "interleaved"
    raise ValueError(f"cannot tell the RoPE pairing convention of {module.__name__}")
