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
    discover_layout,
    get_module,
    rotary_per_layer,
    text_config,
)
from posprobe.models.base import Hook, PositionModel
from posprobe.models.facts import read_info
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
    weights: Tensor | None
    block = getattr(hooks.get("pattern"), "query_block", None)
    if block and "attn_scores" not in hooks and not softcap:  # an observer that reads the map a block at a time
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        causal = attention_mask is None and getattr(module, "is_causal", False) and query.shape[-2] > 1
        allowed = None if causal else _allowed(attention_mask, module, query, key)
        out = blocked_attention(query, key, value, allowed, scale, hooks["pattern"], block, causal=causal)
        return _apply(hooks.get("z"), out), None
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
    weights = torch.softmax(scores.float(), dim=-1)
    if allowed is not None:  # a query that may see no key (padding) attends nowhere; a NaN from the model stays NaN
        weights = weights.masked_fill(~allowed.any(-1, keepdim=True), 0.0)
    weights = weights.to(query.dtype)
    weights = _apply(hooks.get("pattern"), weights)
    return torch.matmul(weights, v).transpose(1, 2).contiguous(), weights


def blocked_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    allowed: Tensor | None,
    scale: float,
    observer: Any,
    block: int,
    causal: bool = False,
) -> Tensor:
    """``explicit_attention`` a block of ``block`` queries at a time, never the whole [b h s t] map: each
    block's weights go to ``observer(weights, q0, entropy)``, then · v. The observer reads them during the
    call; it cannot edit or keep them (the next block reuses their memory).

    A block multiplies only the keys up to the last one any of its queries may see (causal attention
    never looks ahead), so causal models pay about half the product: the observer gets [b h block seen],
    the weights of keys ``0 : seen`` (every later key has weight 0), and ``entropy`` [b h block], each
    query's −Σ p log p in nats (0 for a query that may see no key). ``allowed`` None with ``causal``: the
    plain causal mask, never built whole. Out [b s h d].

    The softmax is written out so that its pieces give the entropy without a pass of logarithms: with
    x = scores − max and z = Σ exp x, H = log z − Σ exp(x)·x / z (two non-negative terms: no cancellation).
    Masked keys get a large finite negative score, so exp x = 0 and exp(x)·x = 0. The block's scores and
    weights live in two buffers reused by every block: a fresh CPU allocation of that size costs as much
    as the softmax (page faults).
    """
    groups = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(groups, dim=1).transpose(2, 3)
    v = value.repeat_interleave(groups, dim=1)
    b, h, s, _ = query.shape
    t = k.shape[-1]
    size = b * h * min(block, s) * t
    raw, exp = query.new_empty(size), torch.empty(size, device=query.device)
    outs = []
    for q0 in range(0, s, block):
        c = min(block, s - q0)
        seen, masked, silent = _block_mask(allowed, causal, q0, c, s, t, query.device)
        shape, n = (b, h, c, seen), b * h * c * seen
        x = torch.matmul(query[:, :, q0 : q0 + c] * scale, k[..., :seen], out=raw[:n].view(shape)).float()
        if masked is not None:
            x[..., seen - masked.shape[-1] :].masked_fill_(masked, _MASKED)
        x.sub_(x.amax(-1, keepdim=True))
        e = torch.exp(x, out=exp[:n].view(shape))
        z = e.sum(-1)
        entropy = z.log() - torch.einsum("bhqk,bhqk->bhq", e, x) / z
        weights = e.div_(z[..., None])
        if silent is not None:  # a query that may see no key attends nowhere
            weights.masked_fill_(silent[..., None], 0.0)
            entropy.masked_fill_(silent, 0.0)
        outs.append(torch.matmul(weights.to(query.dtype), v[:, :, :seen]))
        observer(weights, q0, entropy)  # [b h block seen]: the keys after ``seen`` hold 0
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous()


#: the score of a masked key in ``blocked_attention``: exp(it − max) is 0, and 0 · it is 0 (−inf would give NaN)
_MASKED = -1e30


def _block_mask(
    allowed: Tensor | None, causal: bool, q0: int, c: int, s: int, t: int, device: torch.device
) -> tuple[int, Tensor | None, Tensor | None]:
    """For queries ``q0 : q0 + c``: how many keys they may see (``seen``), the mask of keys they may not see
    among the last columns of ``0 : seen`` (None: all visible) and which queries see no key (None: none)."""
    if allowed is None:
        if not causal:
            return t, None, None
        seen = q0 + c + t - s  # the keys before the first query (t − s) and up to the block's last query
        return seen, torch.ones(c, c, dtype=torch.bool, device=device).triu(1), None
    seen = _last_key(allowed[..., q0 : q0 + c, :]) + 1
    rows = allowed[..., q0 : q0 + c, :seen]
    silent = ~rows.any(-1)
    return seen, ~rows, silent if bool(silent.any()) else None


def _last_key(rows: Tensor) -> int:
    """The last key column any of these query rows may see (0 when none may)."""
    cols = rows.reshape(-1, rows.shape[-1]).any(0)
    found = torch.nonzero(cols)
    return int(found[-1]) if len(found) else 0


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
        body = get_module(hf, self.layout.body)
        self._accepts = set(inspect.signature(body.forward).parameters)
        pos = get_module(hf, self.layout.pos_embed) if self.layout.pos_embed else None
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
        name = f"{self.info.name}[random-init seed={seed}]"
        return HFModel(fresh_like(self.hf, seed), self.tokenizer, name, source="random-init", layout=self.layout)

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
                get_module(self.hf, self.layout.body)(**kwargs)
            except _Stop:
                pass
        return None

    def site_path(self, key: SiteKey) -> tuple[str, str]:
        """(module path, how to read it) of a site outside attention (see ``ModuleSite``)."""
        layout = self.layout
        if key.site in ("embed", "pos_embed"):
            path = layout.embed if key.site == "embed" else layout.pos_embed
            assert path is not None  # pos_embed is a site only of models with a position table
            return path, "out"
        block = f"{layout.layers}.{key.layer}"
        if key.site in ("resid_pre", "resid_post"):
            return block, "in" if key.site == "resid_pre" else "out"
        if key.site not in layout.sites:
            raise ValueError(f"site {key.site!r} of {self.info.name} is computed inside its attention, not by a module")
        where = layout.sites[key.site]
        return f"{block}.{where.path}", where.how

    @contextlib.contextmanager
    def _hooked(self, hooks: Mapping[SiteKey, Hook], stop_at_layer: int | None, position_ids: Tensor) -> Iterator[None]:
        layout = self.layout
        handles: list[torch.utils.hooks.RemovableHandle] = []
        layers = get_module(self.hf, layout.layers)
        shape = (position_ids.shape[0], position_ids.shape[1])
        attn_hooks: dict[int, dict[str, Hook]] = {}
        for key, hook in hooks.items():
            if key.site in ATTENTION_SITES or (key.site in ("q", "k") and key.site not in layout.sites):
                assert key.layer is not None  # attention sites have layers (checked by run)
                attn_hooks.setdefault(key.layer, {})[key.site] = hook
                continue
            path, how = self.site_path(key)
            handles.append(_hook_module(get_module(self.hf, path), how, hook, self.info.d_head, shape))
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
        if how == "bhsd":
            new = _apply(hook, output.transpose(1, 2))
            return new.transpose(1, 2)
        new = call(output)
        if how == "out_copy" and new is output:
            return output.clone()
        return None if new is output else new

    return module.register_forward_hook(post)


def _execution_device(hf: nn.Module, path: str) -> torch.device:
    """The device accelerate runs the module at ``path`` on: its own hook's or its closest hooked parent's."""
    parts = path.split(".") if path else []
    for depth in range(len(parts), -1, -1):
        hook = getattr(get_module(hf, ".".join(parts[:depth])), "_hf_hook", None)
        device = getattr(hook, "execution_device", None)
        if device is not None:
            return torch.device(device)
    return get_module(hf, path).weight.device


def _configs(hf: nn.Module) -> list[Any]:
    seen: dict[int, Any] = {}
    for m in hf.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation_internal"):
            seen.setdefault(id(cfg), cfg)
    return list(seen.values())


def fresh_like(hf: nn.Module, seed: int) -> nn.Module:
    """The same class and config as ``hf`` with freshly initialised weights (seeded), in its dtype, eval mode."""
    with _seeded(seed):
        fresh = type(hf)(copy.deepcopy(hf.config))
    return fresh.to(dtype=next(hf.parameters()).dtype).eval()


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(state)
