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
import sys
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from posprobe.models.base import Hook, ModelInfo, PositionModel
from posprobe.sites import SiteKey

ATTN_IMPL = "posprobe"
ATTENTION_SITES = ("rot_q", "rot_k", "attn_scores", "pattern", "z")


@dataclass(frozen=True)
class ModuleSite:
    """Where a site lives relative to a block: a module path and how to read its tensor.

    ``how``: ``out`` (module output), ``out0`` (first element of a tuple output), ``in``
    (first input), ``heads`` (output [b s h*d] viewed as heads), ``bhsd`` (output [b h s d]).
    """

    path: str
    how: str


@dataclass(frozen=True)
class ArchSpec:
    """The module layout of one family of Hugging Face models."""

    body: str
    layers: str
    embed: str
    sites: dict[str, ModuleSite]
    pos_embed: str | None = None
    lm_head: str | None = "lm_head"
    resid_mid_editable: bool = False


LLAMA = ArchSpec(
    body="model",
    layers="model.layers",
    embed="model.embed_tokens",
    sites={
        "resid_mid": ModuleSite("post_attention_layernorm", "in"),
        "attn_out": ModuleSite("self_attn", "out0"),
        "mlp_out": ModuleSite("mlp", "out"),
        "mlp_post": ModuleSite("mlp.down_proj", "in"),
        "q": ModuleSite("self_attn.q_proj", "heads"),
        "k": ModuleSite("self_attn.k_proj", "heads"),
    },
)
GEMMA3 = ArchSpec(
    body="model",
    layers="model.layers",
    embed="model.embed_tokens",
    sites={
        "resid_mid": ModuleSite("pre_feedforward_layernorm", "in"),
        "attn_out": ModuleSite("post_attention_layernorm", "out"),
        "mlp_out": ModuleSite("post_feedforward_layernorm", "out"),
        "mlp_post": ModuleSite("mlp.down_proj", "in"),
        "q": ModuleSite("self_attn.q_norm", "bhsd"),
        "k": ModuleSite("self_attn.k_norm", "bhsd"),
    },
)
BERT = ArchSpec(
    body="",
    layers="encoder.layer",
    embed="embeddings.word_embeddings",
    pos_embed="embeddings.position_embeddings",
    lm_head=None,
    sites={
        "resid_mid": ModuleSite("attention", "out0"),
        "attn_out": ModuleSite("attention.output.dense", "out"),
        "mlp_out": ModuleSite("output.dense", "out"),
        "mlp_post": ModuleSite("intermediate", "out"),
        "q": ModuleSite("attention.self.query", "heads"),
        "k": ModuleSite("attention.self.key", "heads"),
    },
)
ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": LLAMA,
    "mistral": LLAMA,
    "qwen2": LLAMA,
    "gemma3_text": GEMMA3,
    "bert": BERT,
}


def arch_spec(hf: nn.Module) -> ArchSpec:
    model_type = getattr(hf.config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"posprobe has no module map for model_type {model_type!r}; supported: {', '.join(sorted(ARCHITECTURES))}. "
            "Wrap it with nnsight or add an ArchSpec in posprobe/models/hf.py"
        )
    return ARCHITECTURES[model_type]


# -- the attention function ------------------------------------------------------------------

_state = threading.local()


def _active_hooks(module: nn.Module) -> dict[str, Hook]:
    table = getattr(_state, "attn_hooks", None)
    return {} if table is None else table.get(module.layer_idx, {})


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
    """Attention with posprobe's hook sites; SDPA unless this layer's weights were requested.

    ``query`` [b h s d] and ``key``/``value`` [b kv t d] arrive already rotated.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    hooks = _active_hooks(module)
    if not hooks:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    if "rot_q" in hooks:
        query = _apply(hooks["rot_q"], query.transpose(1, 2)).transpose(1, 2)
    if "rot_k" in hooks:
        key = _apply(hooks["rot_k"], key.transpose(1, 2)).transpose(1, 2)
    weights = None
    if "pattern" in hooks or "attn_scores" in hooks:
        groups = query.shape[1] // key.shape[1]
        k = key.repeat_interleave(groups, dim=1)
        v = value.repeat_interleave(groups, dim=1)
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        scores = torch.matmul(query, k.transpose(2, 3)) * scale
        softcap = kwargs.get("softcap")
        if softcap:
            scores = torch.tanh(scores / softcap) * softcap
        allowed = _allowed(attention_mask, module, scores)
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
        scores = _apply(hooks.get("attn_scores"), scores)
        weights = torch.softmax(scores.float(), dim=-1).nan_to_num(0.0).to(query.dtype)
        weights = _apply(hooks.get("pattern"), weights)
        out = torch.matmul(weights, v).transpose(1, 2).contiguous()
    else:
        out, _ = sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    out = _apply(hooks.get("z"), out)
    return out, weights


def _allowed(mask: Tensor | None, module: nn.Module, scores: Tensor) -> Tensor | None:
    """A boolean [b|1, 1|h, s, t] mask of allowed key positions."""
    s, t = scores.shape[-2:]
    if mask is None:
        if not getattr(module, "is_causal", False) or s == 1:
            return None
        return torch.ones(s, t, dtype=torch.bool, device=scores.device).tril(t - s)
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
    inside ``run``); ``trust_remote_code`` is never implied.
    """

    def __init__(self, hf: nn.Module, tokenizer: Any, name: str | None = None, source: str = "object"):
        _register_attention()
        self.hf = hf.eval()
        self.tokenizer = tokenizer
        self.spec = arch_spec(hf)
        self.source = source
        self.info = read_info(hf, tokenizer, name or getattr(hf.config, "_name_or_path", "") or type(hf).__name__)

    # -- PositionModel --------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Where inputs go: the device the token embedding runs on (its execution device under a device map)."""
        if self.device_map is None:
            return next(self.hf.parameters()).device
        return _execution_device(self.hf, self.spec.embed)

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

    def random_init_copy(self, seed: int = 0) -> HFModel:
        config = copy.deepcopy(self.hf.config)
        with _seeded(seed):
            fresh = type(self.hf)(config)
        fresh.to(dtype=self.dtype)
        clone = HFModel(fresh, self.tokenizer, f"{self.info.name}[random-init seed={seed}]", source="random-init")
        return clone

    def _run(
        self,
        tokens: Tensor,
        attention_mask: Tensor,
        position_ids: Tensor,
        hooks: Mapping[SiteKey, Hook],
        return_logits: bool,
        stop_at_layer: int | None,
    ) -> Tensor | None:
        if "resid_mid" in {k.site for k in hooks} and not self.spec.resid_mid_editable:
            hooks = {k: (_read_only(k, h) if k.site == "resid_mid" else h) for k, h in hooks.items()}
        stop = stop_at_layer if not return_logits else None
        kwargs: dict[str, Any] = {"input_ids": tokens, "attention_mask": attention_mask, "position_ids": position_ids}
        if self.spec is BERT:
            kwargs["token_type_ids"] = torch.zeros_like(tokens)
        else:
            kwargs["use_cache"] = False
        with self._hooked(hooks, stop):
            try:
                if return_logits and self.spec.lm_head is not None:
                    return self.hf(**kwargs).logits
                _get(self.hf, self.spec.body)(**kwargs)
            except _Stop:
                pass
        return None

    @contextlib.contextmanager
    def _hooked(self, hooks: Mapping[SiteKey, Hook], stop_at_layer: int | None) -> Iterator[None]:
        handles: list[torch.utils.hooks.RemovableHandle] = []
        layers = _get(self.hf, self.spec.layers)
        attn_hooks: dict[int, dict[str, Hook]] = {}
        for key, hook in hooks.items():
            if key.site in ATTENTION_SITES:
                attn_hooks.setdefault(key.layer, {})[key.site] = hook
            elif key.site == "embed":
                handles.append(_hook_module(_get(self.hf, self.spec.embed), "out", hook, self.info.d_head))
            elif key.site == "pos_embed":
                handles.append(_hook_module(_get(self.hf, self.spec.pos_embed), "out", hook, self.info.d_head))
            elif key.site == "resid_pre":
                handles.append(_hook_module(layers[key.layer], "in", hook, self.info.d_head))
            elif key.site == "resid_post":
                handles.append(_hook_module(layers[key.layer], "out", hook, self.info.d_head))
            else:
                where = self.spec.sites[key.site]
                handles.append(_hook_module(_get(layers[key.layer], where.path), where.how, hook, self.info.d_head))
        if stop_at_layer is not None:
            handles.append(layers[stop_at_layer].register_forward_hook(_raise_stop))
        configs = _configs(self.hf)
        previous = [c._attn_implementation for c in configs]
        _state.attn_hooks = attn_hooks
        try:
            for c in configs:
                c._attn_implementation_internal = ATTN_IMPL
            yield
        finally:
            _state.attn_hooks = None
            for c, impl in zip(configs, previous, strict=True):
                c._attn_implementation_internal = impl
            for h in handles:
                h.remove()

    @property
    def extrapolates(self) -> bool:
        return False


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


def _hook_module(module: nn.Module, how: str, hook: Hook, d_head: int) -> torch.utils.hooks.RemovableHandle:
    """Attach ``hook`` to ``module`` reading the tensor as ``how`` says; returns the handle."""
    if how == "in":

        def pre(mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            if args:
                new = _apply(hook, args[0])
                return ((new, *args[1:]), kwargs) if new is not args[0] else None
            new = _apply(hook, kwargs["hidden_states"])
            return (args, {**kwargs, "hidden_states": new}) if new is not kwargs["hidden_states"] else None

        return module.register_forward_pre_hook(pre, with_kwargs=True)

    def post(mod: nn.Module, args: Any, output: Any) -> Any:
        if how == "out0" or isinstance(output, tuple):
            new = _apply(hook, output[0])
            return None if new is output[0] else (new, *output[1:])
        if how == "heads":
            b, s, _ = output.shape
            new = _apply(hook, output.view(b, s, -1, d_head))
            return None if new is None else new.reshape(b, s, -1)
        if how == "bhsd":
            new = _apply(hook, output.transpose(1, 2))
            return new.transpose(1, 2)
        return _apply(hook, output)

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


# -- facts from the config -----------------------------------------------------------------


def read_info(hf: nn.Module, tokenizer: Any, name: str) -> ModelInfo:
    """ModelInfo from a Hugging Face config: per-layer RoPE bases, rotary dims and windows.

    TransformerLens' ``cfg.rotary_base`` is wrong for SmolLM2 and Gemma 3 (DESIGN.md), so
    bases come from ``config.rope_parameters`` keyed by ``config.layer_types`` when present.
    """
    cfg = hf.config
    n_layers = cfg.num_hidden_layers
    n_heads = cfg.num_attention_heads
    d_model = cfg.hidden_size
    d_head = getattr(cfg, "head_dim", None) or d_model // n_heads
    model_type = cfg.model_type
    is_bert = arch_spec(hf) is BERT
    layer_types = tuple(getattr(cfg, "layer_types", None) or ["full_attention"] * n_layers)
    if is_bert:
        scheme = "learned" if getattr(cfg, "position_embedding_type", "absolute") == "absolute" else "relative"
        bases: tuple[float | None, ...] = (None,) * n_layers
        rot_dims: tuple[int | None, ...] = (None,) * n_layers
        pairing = None
    else:
        scheme = "rope"
        params = getattr(cfg, "rope_parameters", None) or {"rope_theta": getattr(cfg, "rope_theta", 10000.0)}
        per_type = params if all(isinstance(v, dict) for v in params.values()) else None
        bases = tuple(float((per_type[t] if per_type else params)["rope_theta"]) for t in layer_types)
        factor = lambda t: (per_type[t] if per_type else params).get(  # noqa: E731
            "partial_rotary_factor", getattr(cfg, "partial_rotary_factor", 1.0)
        )
        rot_dims = tuple(int(d_head * factor(t)) for t in layer_types)
        pairing = rope_pairing(hf)
    window = getattr(cfg, "sliding_window", None)
    windows = tuple(window if t == "sliding_attention" else None for t in layer_types)
    bos = getattr(tokenizer, "bos_token_id", None)
    prepends = bool(bos is not None and tokenizer("a")["input_ids"][:1] == [bos])
    return ModelInfo(
        name=name,
        architecture=(getattr(cfg, "architectures", None) or [type(hf).__name__])[0],
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=getattr(cfg, "num_key_value_heads", None) or n_heads,
        d_model=d_model,
        d_head=d_head,
        d_mlp=cfg.intermediate_size,
        n_ctx=cfg.max_position_embeddings,
        d_vocab=cfg.vocab_size,
        position_scheme=scheme,
        causal=not is_bert,
        rope_bases=bases,
        rotary_dims=rot_dims,
        rope_pairing=pairing,
        sliding_windows=windows,
        layer_types=layer_types,
        act_fn=str(getattr(cfg, "hidden_act", None) or getattr(cfg, "hidden_activation", "")),
        bos_token_id=bos if (prepends or is_bert) else getattr(tokenizer, "bos_token_id", None),
        prepends_bos=prepends,
        extra={"model_type": model_type},
    )


def rope_pairing(hf: nn.Module) -> str:
    """'half' if the modeling code rotates dimension i with i + d/2 (rotate_half), else 'interleaved'."""
    layers = _get(hf, arch_spec(hf).layers)
    module = sys.modules[type(layers[0].self_attn).__module__]
    if hasattr(module, "rotate_half"):
        return "half"
    if hasattr(module, "rotate_every_two"):
        return "interleaved"
    raise ValueError(f"cannot tell the RoPE pairing convention of {module.__name__}")
