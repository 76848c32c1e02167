"""The zoo decoder: a small pre-LayerNorm GPT whose variants differ only in the position scheme.

Built on TransformerLens' ``HookedRootModule`` / ``HookPoint``, so every activation carries its
TransformerLens hook name (``blocks.0.attn.hook_pattern``, ``blocks.1.attn.hook_rot_q``, ...) and
``net.hooks(...)``, ``run_with_hooks`` and ``run_with_cache`` work as in TransformerLens.
Parameters follow TransformerLens' shapes (``W_Q`` [heads d_model d_head], ``W_O`` [heads d_head
d_model], ``W_in`` [d_model d_mlp], ...). The unembedding is tied to the token embedding
(``logits = ln_final(x) @ W_E.T + b_U``) unless ``tie_embeddings=False``: it keeps the shipped
checkpoints small and is what GPT-2 does.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformer_lens import HookedRootModule
from transformer_lens.hook_points import HookPoint

from posprobe.models.position_schemes import PositionScheme, build_scheme, check_scheme, rotary_dim_total


@dataclass(frozen=True)
class ZooConfig:
    """Architecture of a zoo model; ``pe`` picks the position scheme (one of ``SCHEMES``).

    ``rotary_fraction`` (0, 1] is the share of each head's dimensions given to RoPE and
    ``p_rope`` [0, 1) the share of its lowest frequencies then dropped (p-RoPE, Barbero et al.
    2024); both are ignored unless ``pe == "rope"``. ``seed`` seeds the initialisation.
    """

    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    d_head: int = 32
    d_mlp: int = 512
    n_ctx: int = 256
    d_vocab: int = 4096
    pe: str = "rope"
    rope_base: float = 10000.0
    rotary_fraction: float = 1.0
    p_rope: float = 0.0
    tie_embeddings: bool = True
    init_std: float = 0.02
    ln_eps: float = 1e-5
    seed: int = 0

    def __post_init__(self) -> None:
        check_scheme(self.pe)
        for name in ("d_model", "n_layers", "n_heads", "d_head", "d_mlp", "n_ctx", "d_vocab"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 0.0 < self.rotary_fraction <= 1.0:
            raise ValueError(f"rotary_fraction must lie in (0, 1], got {self.rotary_fraction}")
        if not 0.0 <= self.p_rope < 1.0:
            raise ValueError(f"p_rope must lie in [0, 1), got {self.p_rope}")
        if self.rope_base <= 1.0:
            raise ValueError(f"rope_base must be > 1, got {self.rope_base}")
        if self.pe == "rope":
            d_rot = rotary_dim_total(self.d_head, self.rotary_fraction)
            if d_rot < 2 or d_rot % 2:
                raise ValueError(
                    f"RoPE rotates pairs of dimensions, but d_head={self.d_head} × rotary_fraction="
                    f"{self.rotary_fraction} gives {d_rot} rotary dimensions; choose an even number ≥ 2"
                )
        if self.pe == "sinusoidal" and self.d_model % 2:
            raise ValueError(f"sinusoidal embeddings need an even d_model, got {self.d_model}")

    def replace(self, **changes: Any) -> ZooConfig:
        """A copy with ``changes`` applied (validated again)."""
        return ZooConfig.from_dict({**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ZooConfig:
        """Build from a dict, refusing keys this version does not know."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ZooConfig field(s) {unknown}; known fields: {', '.join(sorted(known))}")
        return cls(**data)

    def to_json(self, path: str | Path | None = None) -> str:
        """The config as JSON text, also written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> ZooConfig:
        """Read a config from JSON text or a ``config.json`` path."""
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            text = Path(text_or_path).read_text()
        return cls.from_dict(json.loads(text))


class Attention(nn.Module):
    """Multi-head causal self-attention with TransformerLens hook points.

    Shapes: q, k, v, z [b s heads d_head]; attn_scores, pattern [b heads s t]. When nothing hooks
    the scores or the pattern, the fused ``scaled_dot_product_attention`` kernel runs instead.
    """

    def __init__(self, cfg: ZooConfig, scheme: PositionScheme) -> None:
        super().__init__()
        h, d, dh = cfg.n_heads, cfg.d_model, cfg.d_head
        self.W_Q = nn.Parameter(torch.empty(h, d, dh))
        self.W_K = nn.Parameter(torch.empty(h, d, dh))
        self.W_V = nn.Parameter(torch.empty(h, d, dh))
        self.W_O = nn.Parameter(torch.empty(h, dh, d))
        self.b_Q = nn.Parameter(torch.zeros(h, dh))
        self.b_K = nn.Parameter(torch.zeros(h, dh))
        self.b_V = nn.Parameter(torch.zeros(h, dh))
        self.b_O = nn.Parameter(torch.zeros(d))
        self.scale = 1.0 / math.sqrt(dh)
        self._scheme = (scheme,)  # a tuple keeps the shared scheme out of this module's children
        self.hook_q = HookPoint()
        self.hook_k = HookPoint()
        self.hook_v = HookPoint()
        self.hook_rot_q = HookPoint()
        self.hook_rot_k = HookPoint()
        self.hook_attn_scores = HookPoint()
        self.hook_pattern = HookPoint()
        self.hook_z = HookPoint()

    def forward(self, x: Tensor, position_ids: Tensor, logit_bias: Tensor) -> Tensor:
        """``x`` [b s d_model], ``logit_bias`` [b heads|1 s t] (−inf where masked) → [b s d_model]."""
        scheme = self._scheme[0]
        q = self.hook_q(torch.einsum("bsd,hdk->bshk", x, self.W_Q) + self.b_Q)
        k = self.hook_k(torch.einsum("bsd,hdk->bshk", x, self.W_K) + self.b_K)
        v = self.hook_v(torch.einsum("bsd,hdk->bshk", x, self.W_V) + self.b_V)
        if scheme.rotary:
            q, k = scheme.rotate(q, k, position_ids)
            q, k = self.hook_rot_q(q), self.hook_rot_k(k)
        if self.hook_attn_scores._forward_hooks or self.hook_pattern._forward_hooks:
            scores = torch.einsum("bshk,bthk->bhst", q, k) * self.scale + logit_bias
            pattern = self.hook_pattern(torch.softmax(self.hook_attn_scores(scores), dim=-1))
            z = torch.einsum("bhst,bthk->bshk", pattern, v)
        else:
            z = F.scaled_dot_product_attention(
                q.transpose(1, 2),
                k.transpose(1, 2),
                v.transpose(1, 2),
                attn_mask=logit_bias.to(q.dtype),
                scale=self.scale,
            ).transpose(1, 2)
        z = self.hook_z(z)
        return torch.einsum("bshk,hkd->bsd", z, self.W_O) + self.b_O


class MLP(nn.Module):
    """GELU feed-forward block; ``hook_post`` [b s d_mlp] is the hidden activation."""

    def __init__(self, cfg: ZooConfig) -> None:
        super().__init__()
        self.W_in = nn.Parameter(torch.empty(cfg.d_model, cfg.d_mlp))
        self.b_in = nn.Parameter(torch.zeros(cfg.d_mlp))
        self.W_out = nn.Parameter(torch.empty(cfg.d_mlp, cfg.d_model))
        self.b_out = nn.Parameter(torch.zeros(cfg.d_model))
        self.hook_pre = HookPoint()
        self.hook_post = HookPoint()

    def forward(self, x: Tensor) -> Tensor:
        pre = self.hook_pre(x @ self.W_in + self.b_in)
        return self.hook_post(F.gelu(pre)) @ self.W_out + self.b_out


class Block(nn.Module):
    """Pre-LayerNorm block: resid_mid = resid_pre + attn(ln1(resid_pre)); resid_post = resid_mid + mlp(ln2(.))."""

    def __init__(self, cfg: ZooConfig, scheme: PositionScheme) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps)
        self.attn = Attention(cfg, scheme)
        self.ln2 = nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps)
        self.mlp = MLP(cfg)
        self.hook_resid_pre = HookPoint()
        self.hook_attn_out = HookPoint()
        self.hook_resid_mid = HookPoint()
        self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()

    def forward(self, x: Tensor, position_ids: Tensor, logit_bias: Tensor) -> Tensor:
        resid_pre = self.hook_resid_pre(x)
        attn_out = self.hook_attn_out(self.attn(self.ln1(resid_pre), position_ids, logit_bias))
        resid_mid = self.hook_resid_mid(resid_pre + attn_out)
        mlp_out = self.hook_mlp_out(self.mlp(self.ln2(resid_mid)))
        return self.hook_resid_post(resid_mid + mlp_out)


class ZooTransformer(HookedRootModule):
    """A causal pre-LN decoder with TransformerLens hook names; ``cfg.pe`` chooses the position scheme.

    ``forward(tokens [b s], position_ids [b s], attention_mask [b s])`` → logits [b s d_vocab].
    Position ids default to each real token's index among the real tokens of its row, so a
    left-padded batch gives real tokens the activations they have unpadded; padded keys are masked.
    """

    def __init__(self, cfg: ZooConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.W_E = nn.Parameter(torch.empty(cfg.d_vocab, cfg.d_model))
        self.position = build_scheme(cfg)
        self.blocks = nn.ModuleList(Block(cfg, self.position) for _ in range(cfg.n_layers))
        self.ln_final = nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps)
        self.W_U = None if cfg.tie_embeddings else nn.Parameter(torch.empty(cfg.d_model, cfg.d_vocab))
        self.b_U = nn.Parameter(torch.zeros(cfg.d_vocab))
        self.hook_embed = HookPoint()
        self.hook_pos_embed = HookPoint()
        self.reset_parameters(cfg.seed)
        self.setup()

    @torch.no_grad()
    def reset_parameters(self, seed: int) -> None:
        """Seeded GPT-2 initialisation: N(0, init_std), output projections scaled by 1/sqrt(2·n_layers)."""
        gen = torch.Generator().manual_seed(seed)
        std = self.cfg.init_std
        for name, param in self.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf.startswith("b_") or leaf == "bias":
                param.zero_()
            elif leaf == "weight":  # LayerNorm gain
                param.fill_(1.0)
            else:
                scale = 1.0 / math.sqrt(2 * self.cfg.n_layers) if leaf in ("W_O", "W_out") else 1.0
                param.copy_(torch.randn(param.shape, generator=gen) * std * scale)

    def forward(
        self,
        tokens: Tensor,
        position_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        *,
        return_logits: bool = True,
        last_layer: int | None = None,
    ) -> Tensor:
        """Logits [b s d_vocab], or the residual [b s d_model] leaving ``last_layer`` when not ``return_logits``.

        ``last_layer`` (inclusive) skips the later blocks; with it, logits cannot be returned.
        """
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, seq], got shape {tuple(tokens.shape)}")
        if attention_mask is None:
            attention_mask = torch.ones_like(tokens)
        if position_ids is None:
            mask = attention_mask.long()
            position_ids = ((mask.cumsum(-1) - 1) * mask).clamp(min=0)
        if position_ids.shape != tokens.shape or attention_mask.shape != tokens.shape:
            raise ValueError(
                f"position_ids {tuple(position_ids.shape)} and attention_mask {tuple(attention_mask.shape)} "
                f"must match tokens {tuple(tokens.shape)}"
            )
        if position_ids.numel() and int(position_ids.min()) < 0:
            raise ValueError(f"position ids must be non-negative, got minimum {int(position_ids.min())}")
        n_run = self.cfg.n_layers if last_layer is None else last_layer + 1
        if not 1 <= n_run <= self.cfg.n_layers:
            raise ValueError(f"last_layer {last_layer} out of range 0..{self.cfg.n_layers - 1}")
        if return_logits and n_run < self.cfg.n_layers:
            raise ValueError("logits need every layer; pass return_logits=False with last_layer")

        resid = self.hook_embed(F.embedding(tokens, self.W_E))  # indexing's backward is nondeterministic on CPU
        if self.position.absolute:
            resid = resid + self.hook_pos_embed(self.position.embed(position_ids))
        logit_bias = self._logit_bias(position_ids, attention_mask, resid.dtype)
        for block in self.blocks[:n_run]:
            resid = block(resid, position_ids, logit_bias)
        if not return_logits:
            return resid
        W_U = self.W_E.T if self.W_U is None else self.W_U
        return self.ln_final(resid) @ W_U + self.b_U

    def _logit_bias(self, position_ids: Tensor, attention_mask: Tensor, dtype: torch.dtype) -> Tensor:
        """Scheme bias plus the mask, [b heads|1 s t]: −inf above the diagonal and on padded keys.

        Each query may always see itself, so a padded query row is never all −inf (no NaN).
        """
        s = position_ids.shape[1]
        idx = torch.arange(s, device=position_ids.device)
        causal = idx.view(1, s, 1) >= idx.view(1, 1, s)
        allowed = causal & (attention_mask.bool().unsqueeze(1) | torch.eye(s, dtype=torch.bool, device=idx.device))
        if self.position.additive:
            bias = self.position.bias(position_ids, position_ids).to(dtype)
        else:
            bias = torch.zeros(1, 1, s, s, dtype=dtype, device=position_ids.device)
        return bias.masked_fill(~allowed.unsqueeze(1), float("-inf"))

    def positional_parameters(self) -> dict[str, Tensor]:
        """Parameters that belong to the position scheme (empty for NoPE, RoPE, ALiBi, sinusoidal)."""
        return {f"position.{n}": p for n, p in self.position.named_parameters()}
