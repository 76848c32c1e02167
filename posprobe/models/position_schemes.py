"""Position schemes for the zoo decoder: one class per scheme, looked up by name in ``SCHEMES``.

A scheme touches the network in up to three places, and implements only the ones it uses:

- ``embed(position_ids)`` → [b s d_model] added to the token embedding (absolute schemes);
- ``rotate(q, k, position_ids)`` → rotated (q, k), each [b s heads d_head] (rotary schemes);
- ``bias(q_pos, k_pos)`` → [b heads s t] added to the scaled attention logits (additive biases).

Adding a scheme (T5 bias, FIRE, CoPE, ...) is one subclass decorated with ``@register("name")``.
Every method takes explicit position ids, so left padding with correct ids is handled by the
caller, never guessed here.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from posprobe.models.zoo_net import ZooConfig

SCHEMES: dict[str, type[PositionScheme]] = {}


def register(name: str):
    """Class decorator adding a scheme to ``SCHEMES`` under ``name``."""

    def wrap(cls: type[PositionScheme]) -> type[PositionScheme]:
        cls.name = name
        SCHEMES[name] = cls
        return cls

    return wrap


def check_scheme(name: str) -> str:
    """Return ``name`` if it is a registered scheme; raise a ValueError listing the known ones."""
    if name not in SCHEMES:
        raise ValueError(f"unknown position scheme {name!r}; known schemes: {', '.join(SCHEMES)}")
    return name


def build_scheme(cfg: ZooConfig) -> PositionScheme:
    """The scheme module named by ``cfg.pe``."""
    return SCHEMES[check_scheme(cfg.pe)](cfg)


class PositionScheme(nn.Module):
    """Base class: a scheme that does nothing (each subclass overrides what it uses)."""

    name: ClassVar[str] = ""
    #: positions beyond ``n_ctx`` are computable (relative schemes and NoPE)
    extrapolates: ClassVar[bool] = True
    #: the scheme adds ``embed`` to the residual stream (and fires ``hook_pos_embed``)
    absolute: ClassVar[bool] = False
    #: the scheme rotates queries and keys (and fires ``hook_rot_q`` / ``hook_rot_k``)
    rotary: ClassVar[bool] = False
    #: the scheme adds ``bias`` to the attention logits
    additive: ClassVar[bool] = False

    def __init__(self, cfg: ZooConfig) -> None:
        super().__init__()
        self.n_ctx = cfg.n_ctx

    def describe(self) -> dict[str, Any]:
        """Scheme facts for ``ModelInfo.extra`` (frequencies, slopes, ...); JSON-ready."""
        return {}

    def embed(self, position_ids: Tensor) -> Tensor:
        """Absolute position vectors [b s d_model] for ``position_ids`` [b s]."""
        raise NotImplementedError(f"position scheme {self.name!r} adds no position embedding")

    def rotate(self, q: Tensor, k: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        """Rotated queries and keys [b s heads d_head] at ``position_ids`` [b s]."""
        raise NotImplementedError(f"position scheme {self.name!r} does not rotate queries and keys")

    def bias(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        """Additive attention-logit bias [b heads s t] for query positions [b s] and key positions [b t]."""
        raise NotImplementedError(f"position scheme {self.name!r} adds no attention bias")

    def _check_in_context(self, position_ids: Tensor) -> None:
        longest = int(position_ids.max()) + 1 if position_ids.numel() else 0
        if longest > self.n_ctx:
            raise ValueError(
                f"position {longest - 1} is beyond the {self.name!r} table of n_ctx={self.n_ctx} positions; "
                f"absolute schemes (learned, sinusoidal) cannot extrapolate, use sequences of at most {self.n_ctx} "
                "tokens or a relative scheme (none, rope, alibi)"
            )


@register("none")
class NoPE(PositionScheme):
    """No positional encoding (NoPE): position reaches the model only through the causal mask.

    Haviv et al. 2022, "Transformer language models without positional encodings still
    learn positional information"; Kazemnejad et al. 2023.
    """


@register("learned")
class LearnedAbsolute(PositionScheme):
    """A learned table ``W_pos`` [n_ctx d_model] added to the token embedding (GPT-2 style)."""

    extrapolates = False
    absolute = True

    def __init__(self, cfg: ZooConfig) -> None:
        super().__init__(cfg)
        self.W_pos = nn.Parameter(torch.zeros(cfg.n_ctx, cfg.d_model))

    def embed(self, position_ids: Tensor) -> Tensor:
        self._check_in_context(position_ids)
        return F.embedding(position_ids, self.W_pos)


def sinusoidal_table(n_ctx: int, d_model: int) -> Tensor:
    """Vaswani et al. 2017 §3.5: PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(p / 10000^(2i/d)).

    Returns [n_ctx d_model] in float32 (``d_model`` must be even).
    """
    pos = torch.arange(n_ctx, dtype=torch.float64).unsqueeze(1)
    inv = 10000.0 ** (-torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)
    table = torch.zeros(n_ctx, d_model, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * inv)
    table[:, 1::2] = torch.cos(pos * inv)
    return table.float()


@register("sinusoidal")
class SinusoidalAbsolute(PositionScheme):
    """Fixed sinusoids added to the token embedding (Vaswani et al. 2017); no parameters.

    The table is multiplied by ``scale = init_std · sqrt(2)`` so that, at initialisation, its
    per-dimension RMS equals the token embedding's (sin/cos have RMS 1/sqrt(2)). Vaswani et al.
    and fairseq get the same balance the other way round, multiplying N(0, 1/d) token embeddings
    by sqrt(d). Unscaled sinusoids swamp N(0, 0.02²) token embeddings ~35-fold after the
    LayerNorm, and a zoo model trained so stayed at the unigram loss. The formula could run past
    ``n_ctx``, but the model never saw those positions, so they are refused like the learned table's.
    """

    extrapolates = False
    absolute = True
    table: Tensor  # buffer [n_ctx d_model]

    def __init__(self, cfg: ZooConfig) -> None:
        super().__init__(cfg)
        self.scale = cfg.init_std * math.sqrt(2.0)
        self.register_buffer("table", sinusoidal_table(cfg.n_ctx, cfg.d_model) * self.scale, persistent=False)

    def describe(self) -> dict[str, Any]:
        return {"sinusoidal_scale": self.scale}

    def embed(self, position_ids: Tensor) -> Tensor:
        self._check_in_context(position_ids)
        return self.table[position_ids]


def rope_inv_freq(d_head: int, base: float, rotary_fraction: float, p_rope: float) -> Tensor:
    """Angular frequencies [n_planes] of the rotating planes, highest first.

    The full spectrum is θ_i = base^(−2i/d_rot) for i < d_rot/2 with d_rot = rotary_fraction · d_head
    (Su et al. 2021); p-RoPE keeps only the highest (1 − p_rope) of it (Barbero et al. 2024,
    "Round and round we go! What makes rotary positional encodings useful?").
    """
    d_rot = rotary_dim_total(d_head, rotary_fraction)
    inv = base ** (-torch.arange(0, d_rot, 2, dtype=torch.float64) / d_rot)
    n_keep = d_rot // 2 - round(p_rope * d_rot / 2)
    return inv[:n_keep].float()


def rotary_dim_total(d_head: int, rotary_fraction: float) -> int:
    """Head dimensions given to RoPE before p-RoPE truncation (must be even)."""
    return round(rotary_fraction * d_head)


@register("rope")
class Rotary(PositionScheme):
    """Rotary position embedding (Su et al. 2021, RoFormer) with partial rotary and p-RoPE.

    Layout (Hugging Face / GPT-NeoX "half" pairing): the first ``rotary_dims`` dimensions of each
    head rotate, dimension i with i + rotary_dims/2 at frequency ``inv_freq[i]``; the remaining
    dimensions pass through unrotated. ``rotary_fraction`` sets the spectrum
    θ_i = base^(−2i/d_rot), d_rot = rotary_fraction · d_head; ``p_rope`` drops its lowest fraction
    (Barbero et al. 2024), which leaves those planes unrotated. Dropping planes only permutes head
    dimensions relative to zeroing their frequencies in place, so ``rotary_dims`` stays the count
    of dimensions that really rotate.
    """

    rotary = True

    def __init__(self, cfg: ZooConfig) -> None:
        super().__init__(cfg)
        self._spectrum = (cfg.d_head, cfg.rope_base, cfg.rotary_fraction, cfg.p_rope)
        self.register_buffer("inv_freq", rope_inv_freq(*self._spectrum), persistent=False)
        self.rotary_dims = 2 * self.inv_freq.numel()

    def _apply(self, fn, recurse=True):
        # ``model.to(torch.float16)`` would round the frequencies (an angle error of ~1 rad at
        # position 1,000); keep them float32, rebuilt from the config on the new device.
        super()._apply(fn, recurse)
        self.inv_freq = rope_inv_freq(*self._spectrum).to(self.inv_freq.device)
        return self

    def describe(self) -> dict[str, Any]:
        *_, fraction, p_rope = self._spectrum
        return {"rope_inv_freq": self.inv_freq.tolist(), "rotary_fraction": fraction, "p_rope": p_rope}

    def rotate(self, q: Tensor, k: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        if self.rotary_dims == 0:
            return q, k
        angles = position_ids.float().unsqueeze(-1) * self.inv_freq  # [b s planes], float32
        angles = torch.cat([angles, angles], dim=-1).unsqueeze(2)  # [b s 1 rotary_dims]
        cos, sin = angles.cos().to(q.dtype), angles.sin().to(q.dtype)
        return self._rotate_pairs(q, cos, sin), self._rotate_pairs(k, cos, sin)

    def _rotate_pairs(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        r = self.rotary_dims
        rot, rest = x[..., :r], x[..., r:]
        first, second = rot[..., : r // 2], rot[..., r // 2 :]
        rotated = rot * cos + torch.cat([-second, first], dim=-1) * sin
        return torch.cat([rotated, rest], dim=-1)


def alibi_slopes(n_heads: int) -> Tensor:
    """ALiBi head slopes m_h (Press et al. 2022, "Train short, test long"), [n_heads].

    For n a power of two, m_h = 2^(−8h/n), h = 1..n; otherwise the paper's recipe: the slopes of
    the closest smaller power of two, then every other slope of the next power of two.
    """

    def power_of_two(n: int) -> list[float]:
        return [2.0 ** (-8.0 * h / n) for h in range(1, n + 1)]

    closest = 2 ** math.floor(math.log2(n_heads))
    slopes = power_of_two(closest)
    if closest < n_heads:
        slopes += power_of_two(2 * closest)[0::2][: n_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)


@register("alibi")
class ALiBi(PositionScheme):
    """Attention with linear biases: logit += −m_h · (q_pos − k_pos) (Press et al. 2022); no parameters."""

    additive = True
    slopes: Tensor  # buffer [n_heads]

    def __init__(self, cfg: ZooConfig) -> None:
        super().__init__(cfg)
        self.register_buffer("slopes", alibi_slopes(cfg.n_heads), persistent=False)

    def describe(self) -> dict[str, Any]:
        return {"alibi_slopes": self.slopes.tolist()}

    def bias(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        distance = (q_pos.unsqueeze(-1) - k_pos.unsqueeze(-2)).to(self.slopes.dtype)  # [b s t]
        return -self.slopes.view(1, -1, 1, 1) * distance.unsqueeze(1)
