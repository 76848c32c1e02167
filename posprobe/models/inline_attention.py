"""posprobe's eager copies of the attention of the families that do not call transformers' AttentionInterface.

BLOOM, MPT and Falcon compute attention inline in their modules' ``forward`` (ALiBi biases in
BLOOM / MPT, a fused query-key-value projection in all three), so no registered attention
function ever sees their queries and keys. While a hooked run asks for an attention site of such
a layer, that layer's ``forward`` is replaced by the function below for its family: the same
projections, splits, rotary and bias as the transformers code, with posprobe's hooks (q, k,
rot_q, rot_k, attn_scores, pattern, z) in between, and the same output. Other layers keep the
model's own code. Checked in the tests against transformers' eager ``output_attentions`` and logits.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from transformers.models.bloom.modeling_bloom import BloomAttention
    from transformers.models.falcon.modeling_falcon import FalconAttention
    from transformers.models.mpt.modeling_mpt import MptAttention


@contextlib.contextmanager
def inline_attention(module: nn.Module, family: str) -> Iterator[None]:
    """Run ``module`` (one attention layer of ``family``) through posprobe's eager copy inside the block."""
    forward = FORWARDS[family]
    module.forward = types.MethodType(forward, module)
    try:
        yield
    finally:
        del module.forward  # back to the class's own forward


def _hooked(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, allowed: Tensor | None, scale: float,
            bias: Tensor | None = None) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Hooks around attention on [b h s d] queries / [b kv t d] keys and values; out [b s h*d], weights [b h s t]."""
    from posprobe.models.hf import _active, _apply, explicit_attention, qk_hooks

    layer = _active(module)
    hooks = layer.hooks if layer is not None else {}
    if layer is not None:
        query, key = qk_hooks(layer, query, key)
    out, weights = explicit_attention(query, key, value, allowed, scale, hooks, bias=bias)
    out = _apply(hooks.get("z"), out)
    return out.reshape(out.shape[0], out.shape[1], -1), weights


def _bloom(self: BloomAttention, hidden_states: Tensor, residual: Tensor, alibi: Tensor, attention_mask: Tensor | None,
           layer_past: Any = None, use_cache: bool = False, output_attentions: bool = False,
           **kwargs: Any) -> tuple[Tensor, Tensor]:  # fmt: skip
    from transformers.models.bloom.modeling_bloom import dropout_add

    b = hidden_states.shape[0]
    query, key, value = self._reshape(self.query_key_value(hidden_states))  # [b h s d] each
    bias = alibi.view(b, self.num_heads, 1, -1) * self.beta
    allowed = _allowed_from(attention_mask, masked_when_true=False)
    out, weights = _hooked(self, query, key, value, allowed, self.inv_norm_factor, bias)
    return dropout_add(self.dense(out), residual, self.hidden_dropout, self.training), weights


def _mpt(self: MptAttention, hidden_states: Tensor, position_bias: Tensor, cache: Any = None,
         attention_mask: Tensor | None = None, **kwargs: Any) -> tuple[Tensor, Tensor]:  # fmt: skip
    b, s = hidden_states.shape[:2]
    qkv = self.Wqkv(hidden_states)
    if self.clip_qkv:
        qkv = qkv.clamp(min=-self.clip_qkv, max=self.clip_qkv)
    query, key, value = (x.reshape(b, s, self.n_heads, self.head_dim).transpose(1, 2) for x in qkv.chunk(3, dim=2))
    bias = None
    if position_bias is not None:
        t = key.shape[-2]
        bias = position_bias[:, max(0, position_bias.size(1) - s) :, max(0, position_bias.size(2) - t) :]
    allowed = _allowed_from(attention_mask, masked_when_true=True)
    scale = cast(float, self.softmax_scale)  # MptAttention.__init__ replaces a None scale by 1/sqrt(head_dim)
    out, weights = _hooked(self, query, key, value, allowed, scale, bias)
    return self.out_proj(out), weights


def _falcon(self: FalconAttention, hidden_states: Tensor, alibi: Tensor | None, attention_mask: Tensor | None,
            position_ids: Tensor | None = None, layer_past: Any = None, use_cache: bool = False,
            output_attentions: bool = False, position_embeddings: tuple[Tensor, Tensor] | None = None,
            **kwargs: Any) -> tuple[Tensor, Tensor]:  # fmt: skip
    from transformers.models.falcon.modeling_falcon import apply_rotary_pos_emb

    query, key, value = self._split_heads(self.query_key_value(hidden_states))  # [b s heads d]
    kv = self.num_heads if self.new_decoder_architecture else cast(int, self.num_kv_heads)  # config fills None
    b, s = query.shape[:2]
    query = query.transpose(1, 2).reshape(b, self.num_heads, s, self.head_dim)
    key = key.transpose(1, 2).reshape(b, kv, s, self.head_dim)
    value = value.transpose(1, 2).reshape(b, kv, s, self.head_dim)
    if position_embeddings is not None:
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
    allowed = _allowed_from(attention_mask, masked_when_true=False)
    out, weights = _hooked(self, query, key, value, allowed, self.head_dim**-0.5)
    return self.dense(out), weights


def _allowed_from(mask: Tensor | None, masked_when_true: bool) -> Tensor | None:
    """A boolean mask of allowed keys from a family's mask: boolean (either sense) or additive float."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return ~mask if masked_when_true else mask
    return mask > torch.finfo(mask.dtype).min / 2


FORWARDS: dict[str, Callable[..., tuple[Tensor, Tensor]]] = {"bloom": _bloom, "mpt": _mpt, "falcon": _falcon}
