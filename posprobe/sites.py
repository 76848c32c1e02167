"""The site vocabulary: TransformerLens hook names, one meaning for every backend.

Every backend (Hugging Face models, the zoo) maps these names onto its own modules, so
``extract``, patching and the analyses speak one language.

Shapes (``b`` batch, ``s`` query positions, ``t`` key positions):

=============  ====================================  =========================================
site           shape                                 meaning
=============  ====================================  =========================================
embed          b s d_model                           token embedding (``hook_embed``)
pos_embed      b s d_model                           absolute position embedding (learned / sinusoidal)
resid_pre      b s d_model                           residual stream entering block L
resid_mid      b s d_model                           residual after the attention sub-block
resid_post     b s d_model                           residual leaving block L
attn_out       b s d_model                           attention sub-block output added to the residual
mlp_out        b s d_model                           MLP sub-block output added to the residual
mlp_post       b s d_mlp                             MLP hidden activation (input of the down projection)
q, k           b s n_heads|n_kv_heads d_head         queries / keys before the rotation
rot_q, rot_k   b s n_heads|n_kv_heads d_head         queries / keys after the rotation (RoPE models)
z              b s n_heads d_head                    per-head attention output before the output projection
attn_scores    b n_heads s t                         pre-softmax attention logits (masked entries -inf)
pattern        b n_heads s t                         attention probabilities
=============  ====================================  =========================================
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass

RESIDUAL_SITES = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
HEAD_SITES = ("q", "k", "rot_q", "rot_k", "z")
ATTENTION_MAP_SITES = ("attn_scores", "pattern")
ROTARY_SITES = ("rot_q", "rot_k")
LAYERLESS_SITES = ("embed", "pos_embed")
SITES = (
    "embed",
    "pos_embed",
    *RESIDUAL_SITES,
    "mlp_post",
    *HEAD_SITES,
    *ATTENTION_MAP_SITES,
)

TL_HOOK_NAMES = {
    "embed": "hook_embed",
    "pos_embed": "hook_pos_embed",
    "resid_pre": "blocks.{L}.hook_resid_pre",
    "resid_mid": "blocks.{L}.hook_resid_mid",
    "resid_post": "blocks.{L}.hook_resid_post",
    "attn_out": "blocks.{L}.hook_attn_out",
    "mlp_out": "blocks.{L}.hook_mlp_out",
    "mlp_post": "blocks.{L}.mlp.hook_post",
    "q": "blocks.{L}.attn.hook_q",
    "k": "blocks.{L}.attn.hook_k",
    "rot_q": "blocks.{L}.attn.hook_rot_q",
    "rot_k": "blocks.{L}.attn.hook_rot_k",
    "z": "blocks.{L}.attn.hook_z",
    "attn_scores": "blocks.{L}.attn.hook_attn_scores",
    "pattern": "blocks.{L}.attn.hook_pattern",
}


@dataclass(frozen=True, order=True)
class SiteKey:
    """One requested activation: a site name and a layer (``None`` for layerless sites)."""

    site: str
    layer: int | None

    @property
    def name(self) -> str:
        """Key used in stores and result tables, e.g. ``resid_post.3`` or ``pos_embed``."""
        return self.site if self.layer is None else f"{self.site}.{self.layer}"

    @property
    def hook_name(self) -> str:
        """The TransformerLens hook name of this site."""
        return TL_HOOK_NAMES[self.site].format(L=self.layer)

    @classmethod
    def parse(cls, name: str) -> SiteKey:
        site, _, layer = name.partition(".")
        return cls(site, int(layer) if layer else None)


def check_site(site: str) -> str:
    """Return ``site`` if posprobe knows it; raise a ValueError listing the known sites."""
    if site not in SITES:
        raise ValueError(f"unknown site {site!r}; known sites: {', '.join(SITES)}")
    return site


class LayerOutOfRange(ValueError):
    """A requested layer the model or store does not have (said before anything else is checked)."""


def as_layer_list(layers: int | Sequence[int] | None) -> list[int] | None:
    """``layers`` as a list (None stays None: every layer)."""
    return None if layers is None else [layers] if isinstance(layers, int) else list(layers)


def check_layer_range(layers: Sequence[int], n_layers: int) -> list[int]:
    """Each layer in ``-n_layers..n_layers-1`` (negative counts from the end), resolved to ``0..n_layers-1``."""
    out = []
    for layer in layers:
        try:
            index = operator.index(layer)  # ints, numpy ints; not floats or bools' look-alikes
        except TypeError:
            raise LayerOutOfRange(f"layer {layer!r} is not an integer") from None
        if not -n_layers <= index < n_layers:
            raise LayerOutOfRange(f"layer {layer} out of range; this model has layers 0..{n_layers - 1}")
        out.append(index % n_layers)
    return out


def resolve_stored_layers(
    site: str, layers: int | Sequence[int] | None, stored: Sequence[int | None], n_layers: int | None
) -> list[int | None]:
    """The stored layers of ``site`` that ``layers`` asks for (None: all), negative layers counting from the end.

    ``n_layers`` is the model's layer count (negative layers count from it; without it, from the
    largest stored layer + 1). One message for every reader of a store.
    """
    wanted = as_layer_list(layers)
    if wanted is None:
        return list(stored)
    ints = [layer for layer in stored if layer is not None]
    n = n_layers or (max(ints) + 1 if ints else 0)
    resolved = [layer % n if n and isinstance(layer, int) and -n <= layer < 0 else layer for layer in wanted]
    missing = [layer for layer, r in zip(wanted, resolved, strict=True) if r not in stored]
    if missing or not resolved:
        shown = missing or wanted
        raise LayerOutOfRange(f"layers {shown} of {site!r} are not in the store; stored layers: {list(stored)}")
    return list(dict.fromkeys(resolved))


def resolve_sites(
    sites: str | Sequence[str],
    layers: int | Sequence[int] | None,
    n_layers: int,
) -> list[SiteKey]:
    """Expand site names × layers into SiteKeys, validating both.

    ``layers=None`` means every layer. Layerless sites (``embed``, ``pos_embed``) ignore
    ``layers``. Negative layers count from the end, as in Python indexing.
    """
    if isinstance(sites, str):
        sites = [sites]
    if not sites:
        raise ValueError(f"no sites requested; known sites: {', '.join(SITES)}")
    if layers is None:
        layer_list = list(range(n_layers))
    elif isinstance(layers, int):
        layer_list = [layers]
    else:
        layer_list = list(layers)
    resolved = []
    layer_list = sorted(set(check_layer_range(layer_list, n_layers)))
    for site in sites:
        check_site(site)
        if site in LAYERLESS_SITES:
            resolved.append(SiteKey(site, None))
        else:
            resolved.extend(SiteKey(site, layer) for layer in layer_list)
    return resolved
