"""Hugging Face models behind the posprobe site vocabulary.

Hooks are plain torch hooks on exactly the modules a request needs, added inside one
``with`` block that removes exactly what it added. Sites inside attention (``rot_q``,
``rot_k``, ``attn_scores``, ``pattern``, ``z``) come from a posprobe attention function
registered in transformers' ``AttentionInterface``: it receives the rotated queries and
keys, and computes attention weights explicitly only on layers whose weights were asked
for; every other layer runs the fused SDPA kernel.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from posprobe.models.architecture import (
    Layout,
    Rotary,
    alibi_slopes,
    discover_layout,
    head_dim,
    linear_shape,
    n_kv_heads,
    rope_pairing_of,
    rope_parameters,
    rotary_per_layer,
    text_config,
    uses_alibi,
)
from posprobe.models.base import Hook, ModelInfo, PositionModel
from posprobe.sites import SiteKey

ATTN_IMPL = "posprobe"
ATTENTION_SITES = ("rot_q", "rot_k", "attn_scores", "pattern", "z")


# -- the attention function ------------------------------------------------------------------

_state = threading.local()


@dataclass
class _LayerHooks:
    """What the attention function needs for one layer during one hooked run."""

    hooks: dict[str, Hook]
    rotary: Rotary | None
    pairing: str | None
    position_ids: Tensor


def _active(module: nn.Module) -> _LayerHooks | None:
    table = getattr(_state, "attn_hooks", None)
    return None if table is None else table.get(id(module))


def _apply(hook: Hook | None, x: Tensor) -> Tensor:
    if hook is None:
        return x
    out = hook(x)
    if out is None:
        return x
    if out.shape != x.shape:
        raise ValueError(f"a hook returned shape {tuple(out.shape)} for an activation of shape {tuple(x.shape)}")
    return out.to(x.dtype)


def posprobe_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """Attention with posprobe's hook sites; SDPA unless this layer's weights were requested (or soft-capped).

    ``query`` [b h s d] and ``key``/``value`` [b kv t d] arrive already rotated.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    layer = _active(module)
    hooks = layer.hooks if layer is not None else {}
    softcap = kwargs.get("softcap")
    if not hooks and not softcap:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    if layer is not None:
        query, key = qk_hooks(layer, query, key)
    if "pattern" in hooks or "attn_scores" in hooks or softcap:
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        out, weights = explicit_attention(
            query, key, value, _allowed(attention_mask, module, query, key), scale, hooks, softcap=softcap
        )
    else:
        out, weights = sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    return _apply(hooks.get("z"), out), weights


def qk_hooks(layer: _LayerHooks, query: Tensor, key: Tensor) -> tuple[Tensor, Tensor]:
    """Apply q/k hooks (on the un-rotated vectors) then rot_q/rot_k hooks to [b h s d] queries and keys.

    On RoPE models the un-rotated q/k are the rotated ones turned back by the model's own
    frequencies and attention scaling; an edit of q/k is rotated forward again. Edits of nothing
    leave the tensors untouched, bit for bit.
    """
    hooks = layer.hooks
    out = []
    for x, plain, rotated in ((query, "q", "rot_q"), (key, "k", "rot_k")):
        if plain in hooks:
            bshd = x.transpose(1, 2)
            unrotated = rotate(bshd, layer, inverse=True) if layer.rotary is not None else bshd
            edited = _apply(hooks[plain], unrotated)
            if edited is not unrotated:
                x = (rotate(edited, layer) if layer.rotary is not None else edited).transpose(1, 2).to(x.dtype)
        if rotated in hooks:
            x = _apply(hooks[rotated], x.transpose(1, 2)).transpose(1, 2)
        out.append(x)
    return out[0], out[1]


def rotate(x: Tensor, layer: _LayerHooks, inverse: bool = False) -> Tensor:
    """RoPE as the model applies it (its θ, pairing and attention scaling) to [b s h d], or its inverse."""
    assert layer.rotary is not None
    theta = layer.rotary.inv_freq().to(x.device)
    scale = layer.rotary.attention_scaling()
    angle = layer.position_ids.to(x.device)[:, :, None, None].float() * theta  # [b s 1 r/2]
    cos, sin = angle.cos(), angle.sin()
    r = 2 * theta.numel()
    xr = x[..., :r].float()
    if layer.pairing == "interleaved":
        cos, sin = cos.repeat_interleave(2, -1), sin.repeat_interleave(2, -1)
        turned = torch.stack((-xr[..., 1::2], xr[..., ::2]), dim=-1).flatten(-2)
    else:
        cos, sin = torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)
        turned = torch.cat((-xr[..., r // 2 :], xr[..., : r // 2]), dim=-1)
    rotated = (xr * cos - turned * sin) / scale if inverse else (xr * cos + turned * sin) * scale
    return torch.cat((rotated.to(x.dtype), x[..., r:]), dim=-1)


def explicit_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    allowed: Tensor | None,
    scale: float,
    hooks: Mapping[str, Hook],
    bias: Tensor | None = None,
    softcap: float | None = None,
) -> tuple[Tensor, Tensor]:
    """softmax(q·k × scale (+ bias), masked) · v with the attn_scores and pattern hooks; out [b s h d], weights.

    ``query`` [b h s d], ``key``/``value`` [b kv t d] (grouped-query heads are repeated),
    ``allowed`` a boolean mask broadcastable to [b h s t], ``bias`` an additive position bias (ALiBi).
    """
    groups = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(groups, dim=1)
    v = value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, k.transpose(2, 3)) * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    if bias is not None:
        scores = scores + bias
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    scores = _apply(hooks.get("attn_scores"), scores)
    weights = torch.softmax(scores.float(), dim=-1).nan_to_num(0.0).to(query.dtype)
    weights = _apply(hooks.get("pattern"), weights)
    return torch.matmul(weights, v).transpose(1, 2).contiguous(), weights


def _allowed(mask: Tensor | None, module: nn.Module, query: Tensor, key: Tensor) -> Tensor | None:
    """A boolean [b|1, 1|h, s, t] mask of allowed key positions."""
    s, t = query.shape[-2], key.shape[-2]
    if mask is None:
        if not getattr(module, "is_causal", False) or s == 1:
            return None
        return torch.ones(s, t, dtype=torch.bool, device=query.device).tril(t - s)
    if mask.dtype == torch.bool:
        return mask[..., :t]
    return mask[..., :t] > torch.finfo(mask.dtype).min / 2


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    if ATTN_IMPL not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTN_IMPL, posprobe_attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPL, sdpa_mask)


# -- the model ---------------------------------------------------------------------------------


class _Stop(Exception):
    """Raised by a hook after the last requested layer to skip the rest of the forward."""


class HFModel(PositionModel):
    """A Hugging Face model (causal LM or encoder) with posprobe's hook sites.

    ``hf`` is used as is (its attention implementation is switched to posprobe's only
    inside ``run``); ``trust_remote_code`` is never implied. Where each site lives is found
    from the model's modules (``posprobe.models.architecture.discover_layout``).
    """

    def __init__(
        self,
        hf: nn.Module,
        tokenizer: Any,
        name: str | None = None,
        source: str = "object",
        layout: Layout | None = None,
    ):
        _register_attention()
        self.hf = hf.eval()
        self.tokenizer = tokenizer
        self.layout = layout or discover_layout(hf)
        self.source = source
        cfg = text_config(hf.config)
        self.info = read_info(
            hf, tokenizer, name or getattr(cfg, "_name_or_path", "") or type(hf).__name__, self.layout
        )
        self.rotary = (
            rotary_per_layer(hf, self.layout.layers, self.info.layer_types)
            if self.info.is_rotary
            else [None] * self.info.n_layers
        )
        body = _get(hf, self.layout.body)
        self._accepts = set(inspect.signature(body.forward).parameters)
        pos = _get(hf, self.layout.pos_embed) if self.layout.pos_embed else None
        # OPT's table adds its offset itself; RoBERTa's uses the ids it is given as rows
        self._row_offset = 0 if pos is None or hasattr(pos, "offset") else self.info.position_offset

    # -- PositionModel --------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Where inputs go: the device the token embedding runs on (its execution device under a device map)."""
        if self.device_map is None:
            return next(self.hf.parameters()).device
        return _execution_device(self.hf, self.layout.embed)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf.parameters()).dtype

    @property
    def device_map(self) -> dict[str, Any] | None:
        """accelerate's module → device map when the model spans several devices or offloads to disk, else None."""
        mapping = getattr(self.hf, "hf_device_map", None) or {}
        places = {str(v) for v in mapping.values()}
        return dict(mapping) if len(places) > 1 or "disk" in places else None

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> HFModel:
        if self.device_map is not None:
            moves = device is not None and torch.device(device) != self.device
            if moves or (dtype is not None and dtype != self.dtype):
                raise ValueError(
                    f"{self.info.name} is split across devices by a device map "
                    f"({', '.join(sorted({str(v) for v in self.device_map.values()}))}); it cannot be moved or cast "
                    "after loading: load it again with the device_map and dtype you want"
                )
            return self
        self.hf.to(device=device, dtype=dtype)
        return self

    def available_sites(self) -> tuple[str, ...]:
        return tuple(s for s in super().available_sites() if s not in self.layout.missing)

    def check_site(self, site: str) -> str:
        """Validate ``site`` for this model; a site this family cannot give says why."""
        if site in self.layout.missing:
            raise ValueError(f"site {site!r} is not available in {self.info.name}: {self.layout.missing[site]}")
        return super().check_site(site)

    def random_init_copy(self, seed: int = 0) -> HFModel:
        config = copy.deepcopy(self.hf.config)
        with _seeded(seed):
            fresh = type(self.hf)(config)
        fresh.to(dtype=self.dtype)
        name = f"{self.info.name}[random-init seed={seed}]"
        clone = HFModel(fresh, self.tokenizer, name, source="random-init", layout=self.layout)
        return clone

    def forward_kwargs(self, tokens: Tensor, attention_mask: Tensor, position_ids: Tensor) -> dict[str, Any]:
        """The keyword arguments of one forward: ids, mask, and position ids / token types / cache where accepted."""
        kwargs: dict[str, Any] = {"input_ids": tokens, "attention_mask": attention_mask}
        if "position_ids" in self._accepts:
            kwargs["position_ids"] = position_ids + self._row_offset
        if self.layout.encoder and "token_type_ids" in self._accepts:
            kwargs["token_type_ids"] = torch.zeros_like(tokens)
        if "use_cache" in self._accepts and not self.layout.encoder:
            kwargs["use_cache"] = False
        return kwargs

    def _run(
        self,
        tokens: Tensor,
        attention_mask: Tensor,
        position_ids: Tensor,
        hooks: Mapping[SiteKey, Hook],
        return_logits: bool,
        stop_at_layer: int | None,
    ) -> Tensor | None:
        if "resid_mid" in {k.site for k in hooks}:
            hooks = {k: (_read_only(k, h) if k.site == "resid_mid" else h) for k, h in hooks.items()}
        stop = stop_at_layer if not return_logits else None
        kwargs = self.forward_kwargs(tokens, attention_mask, position_ids)
        with self._hooked(hooks, stop, position_ids):
            try:
                if return_logits and self.layout.lm_head is not None:
                    return self.hf(**kwargs).logits
                _get(self.hf, self.layout.body)(**kwargs)
            except _Stop:
                pass
        return None

    @contextlib.contextmanager
    def _hooked(self, hooks: Mapping[SiteKey, Hook], stop_at_layer: int | None, position_ids: Tensor) -> Iterator[None]:
        layout = self.layout
        handles: list[torch.utils.hooks.RemovableHandle] = []
        layers = _get(self.hf, layout.layers)
        shape = (position_ids.shape[0], position_ids.shape[1])
        attn_hooks: dict[int, dict[str, Hook]] = {}
        for key, hook in hooks.items():
            if key.site in ATTENTION_SITES or (key.site in ("q", "k") and key.site not in layout.sites):
                attn_hooks.setdefault(key.layer, {})[key.site] = hook
            elif key.site == "embed":
                handles.append(_hook_module(_get(self.hf, layout.embed), "out", hook, self.info.d_head, shape))
            elif key.site == "pos_embed":
                handles.append(_hook_module(_get(self.hf, layout.pos_embed), "out", hook, self.info.d_head, shape))
            elif key.site == "resid_pre":
                handles.append(_hook_module(layers[key.layer], "in", hook, self.info.d_head, shape))
            elif key.site == "resid_post":
                handles.append(_hook_module(layers[key.layer], "out", hook, self.info.d_head, shape))
            else:
                where = layout.sites[key.site]
                handles.append(
                    _hook_module(_get(layers[key.layer], where.path), where.how, hook, self.info.d_head, shape)
                )
        if stop_at_layer is not None:
            handles.append(layers[stop_at_layer].register_forward_hook(_raise_stop))
        table: dict[int, _LayerHooks] = {}
        for layer, layer_hooks in attn_hooks.items():
            entry = _LayerHooks(layer_hooks, self.rotary[layer], self.info.rope_pairing, position_ids)
            for m in layers[layer].get_submodule(layout.attn).modules():
                table[id(m)] = entry
        with contextlib.ExitStack() as stack:
            if layout.attention == "interface":
                stack.enter_context(_attention_implementation(self.hf))
            elif attn_hooks:
                from posprobe.models.inline_attention import inline_attention

                for layer in attn_hooks:
                    stack.enter_context(inline_attention(layers[layer].get_submodule(layout.attn), layout.family))
            _state.attn_hooks = table
            try:
                yield
            finally:
                _state.attn_hooks = None
                for h in handles:
                    h.remove()

    @property
    def extrapolates(self) -> bool:
        return False


@contextlib.contextmanager
def _attention_implementation(hf: nn.Module) -> Iterator[None]:
    """Route every attention layer of ``hf`` through posprobe's attention function, and back afterwards."""
    configs = _configs(hf)
    previous = [c._attn_implementation for c in configs]
    try:
        for c in configs:
            c._attn_implementation_internal = ATTN_IMPL
        yield
    finally:
        for c, impl in zip(configs, previous, strict=True):
            c._attn_implementation_internal = impl


def _read_only(key: SiteKey, hook: Hook) -> Hook:
    def wrapped(x: Tensor) -> None:
        if hook(x) is not None:
            raise NotImplementedError(
                f"{key.name}: editing resid_mid is not supported on Hugging Face models (the block keeps its own "
                "residual); edit attn_out of the same layer or resid_pre of the next instead"
            )

    return wrapped


def _raise_stop(module: nn.Module, args: Any, output: Any) -> None:
    raise _Stop


def _hook_module(
    module: nn.Module, how: str, hook: Hook, d_head: int, shape: tuple[int, int]
) -> torch.utils.hooks.RemovableHandle:
    """Attach ``hook`` to ``module`` reading the tensor as ``how`` says; returns the handle.

    ``shape`` is the run's (batch, seq): a module that sees tokens flattened to [b*s, d] (OPT's MLP)
    is shown to the hook as [b s d] and given back flattened.
    """

    def call(x: Tensor) -> Tensor:
        if x.ndim == 2 and x.shape[0] == shape[0] * shape[1]:
            return _apply(hook, x.view(*shape, -1)).reshape(x.shape)
        return _apply(hook, x)

    if how == "in":

        def pre(mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            if args:
                new = call(args[0])
                return ((new, *args[1:]), kwargs) if new is not args[0] else None
            new = call(kwargs["hidden_states"])
            return (args, {**kwargs, "hidden_states": new}) if new is not kwargs["hidden_states"] else None

        return module.register_forward_pre_hook(pre, with_kwargs=True)

    def post(mod: nn.Module, args: Any, output: Any) -> Any:
        if how == "out0" or isinstance(output, tuple):
            new = call(output[0])
            return None if new is output[0] else (new, *output[1:])
        if how == "heads":
            b, s, _ = output.shape
            new = _apply(hook, output.view(b, s, -1, d_head))
            return None if new is None else new.reshape(b, s, -1)
        new = call(output)
        if how == "out_copy" and new is output:
            return output.clone()
        return None if new is output else new

    return module.register_forward_hook(post)


def _execution_device(hf: nn.Module, path: str) -> torch.device:
    """The device accelerate runs the module at ``path`` on: its own hook's or its closest hooked parent's."""
    parts = path.split(".") if path else []
    for depth in range(len(parts), -1, -1):
        hook = getattr(_get(hf, ".".join(parts[:depth])), "_hf_hook", None)
        device = getattr(hook, "execution_device", None)
        if device is not None:
            return torch.device(device)
    return _get(hf, path).weight.device


def _get(root: nn.Module, path: str) -> Any:
    return root.get_submodule(path) if path else root


def _configs(hf: nn.Module) -> list[Any]:
    seen: dict[int, Any] = {}
    for m in hf.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation_internal"):
            seen.setdefault(id(cfg), cfg)
    return list(seen.values())


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(state)


# -- facts from the model -------------------------------------------------------------------

NCTX_NAMES = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length")


def read_info(hf: nn.Module, tokenizer: Any, name: str, layout: Layout | None = None) -> ModelInfo:
    """ModelInfo read from the model: sizes from its config and modules, position facts from its modules."""
    layout = layout or discover_layout(hf)
    cfg = text_config(hf.config)
    block = _get(hf, layout.layers)[0]
    d_mlp = linear_shape(block.get_submodule(layout.mlp_down))
    return ModelInfo(
        name=name,
        architecture=(getattr(hf.config, "architectures", None) or [type(hf).__name__])[0],
        n_layers=cfg.num_hidden_layers,
        n_heads=cfg.num_attention_heads,
        n_kv_heads=n_kv_heads(cfg),
        d_model=cfg.hidden_size,
        d_head=head_dim(cfg),
        d_mlp=d_mlp[0] if d_mlp else cfg.intermediate_size,
        n_ctx=_n_ctx(cfg, tokenizer),
        d_vocab=hf.get_input_embeddings().weight.shape[0],
        causal=not layout.encoder,
        parallel_residual=layout.parallel,
        act_fn=_act_fn(cfg),
        **bos_facts(tokenizer),
        **position_facts(hf, layout.layers, layout.pos_embed, layout.encoder),
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


def _act_fn(cfg: Any) -> str:
    for name in ("hidden_act", "hidden_activation", "activation_function"):
        value = getattr(cfg, name, None)
        if value:
            return str(value)
    return ""


def _rope_facts(cfg: Any, rotary: list[Rotary | None], layer_types: tuple[str, ...], pairing: str) -> dict[str, Any]:
    freqs, dims, bases, types, scaling = [], [], [], [], []
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


def _n_ctx(cfg: Any, tokenizer: Any) -> int:
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
    table = _get(hf, pos_embed)
    if hasattr(table, "offset"):
        return int(table.offset)
    padding = getattr(_get(hf, pos_embed.rpartition(".")[0]), "padding_idx", None)
    return int(padding) + 1 if padding is not None else 0
