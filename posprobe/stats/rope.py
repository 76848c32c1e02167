"""RoPE frequency analyses: which rotation planes each head uses, and what each plane adds to the logit by distance.

Barbero et al. 2024, "Round and round we go! What makes rotary positional encodings useful?":
split each head's queries and keys into the 2-D planes RoPE rotates (plane i turns at
θ_i = base^(−2i/d_rot) rad/token); the mean norm per plane shows which frequencies a head uses.
The highest frequencies build positional heads (diagonal, previous token); the lowest carry most
of the norm and likely semantics. Hong et al. 2024, "On the token distance modeling ability of
higher RoPE attention dimension": the contribution of each plane to the attention logit as a
function of the distance between query and key.

Conventions. A plane is a pair of head dimensions (first, second) rotated together: ``"half"``
pairing (Hugging Face, GPT-NeoX) pairs i with i + d_rot/2, ``"interleaved"`` (GPT-J, RoFormer)
pairs 2i with 2i + 1. Only the first ``rotary_dims`` dimensions rotate (partial rotary, p-RoPE);
the others are paired by the same rule and reported with θ = 0 and ``rotary`` False. In complex
form a plane is z = x_first + i·x_second and RoPE multiplies it by e^{iθ·position}, so the plane's
share of q·k at distance Δ = query position − key position is Re(q_z · conj(k_z) · e^{iθΔ}), and
plane norms are the same before and after the rotation (queries and keys are read pre-rotation).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, cast

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from posprobe.data import TokenBatch
from posprobe.models.base import ModelInfo, PositionModel, positions_from_mask
from posprobe.results import ParamsAlias, Result, RunInfo, deprecated_alias
from posprobe.sites import SiteKey
from posprobe.stats.rope_roles import PatternScores, classify_heads
from posprobe.stats.streaming import UNSET, as_model, as_source, batches, exclude_pos0_choice

if TYPE_CHECKING:
    import plotly.graph_objects as go

PAIRINGS = ("half", "interleaved")


# -- plane geometry (pure functions) ---------------------------------------------------------------


def rope_planes(d_head: int, rotary_dims: int, pairing: str) -> tuple[np.ndarray, np.ndarray]:
    """Dimension indices (first, second) [d_head/2] of each 2-D plane of a head, rotary planes first.

    Plane i < rotary_dims/2 turns at θ_i; ``"half"`` pairs (i, i + rotary_dims/2), ``"interleaved"``
    pairs (2i, 2i + 1). The ``d_head − rotary_dims`` dimensions that do not rotate are paired by the
    same rule within their own block.
    """
    if pairing not in PAIRINGS:
        raise ValueError(f"unknown RoPE pairing {pairing!r}; accepted pairings: {', '.join(PAIRINGS)}")
    if d_head <= 0 or d_head % 2 or rotary_dims % 2 or not 0 <= rotary_dims <= d_head:
        raise ValueError(
            f"need an even d_head > 0 and an even rotary_dims in [0, d_head]; got d_head={d_head}, "
            f"rotary_dims={rotary_dims}"
        )

    def pairs(start: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        if pairing == "half":
            first = start + np.arange(width // 2)
            return first, first + width // 2
        first = start + 2 * np.arange(width // 2)
        return first, first + 1

    f_rot, s_rot = pairs(0, rotary_dims)
    f_rest, s_rest = pairs(rotary_dims, d_head - rotary_dims)
    return np.concatenate([f_rot, f_rest]), np.concatenate([s_rot, s_rest])


def rope_thetas(base: float, rotary_dims: int) -> np.ndarray:
    """Angular frequencies θ_i = base^(−2i/rotary_dims) rad/token [rotary_dims/2], highest first (Su et al. 2021)."""
    if base <= 1:
        raise ValueError(f"RoPE base must be > 1, got {base}")
    return base ** (-np.arange(0, rotary_dims, 2, dtype=np.float64) / rotary_dims)


def dim_thetas(d_head: int, rotary_dims: int, base: float, pairing: str) -> np.ndarray:
    """The angular frequency of every head dimension [d_head] in rad/token (0 where it does not rotate)."""
    first, second = rope_planes(d_head, rotary_dims, pairing)
    n_rot = rotary_dims // 2
    theta = np.zeros(d_head)
    theta[first[:n_rot]] = theta[second[:n_rot]] = rope_thetas(base, rotary_dims)
    return theta


def kv_heads(n_heads: int, n_kv_heads: int) -> np.ndarray:
    """The key/value head each query head reads under grouped-query attention [n_heads]: h // (n_heads / n_kv_heads)."""
    if n_kv_heads <= 0 or n_heads % n_kv_heads:
        raise ValueError(f"n_heads={n_heads} is not a multiple of n_kv_heads={n_kv_heads}")
    return np.arange(n_heads) // (n_heads // n_kv_heads)


def require_rope(info: ModelInfo, what: str) -> None:
    """Raise a ValueError naming the model's position scheme unless it is a RoPE model."""
    if info.position_scheme != "rope":
        raise ValueError(
            f"{what} needs a rotary (RoPE) model, but {info.name} uses position scheme {info.position_scheme!r}; "
            "accepted position scheme: 'rope'"
        )
    if info.rope_pairing not in PAIRINGS:
        raise ValueError(f"{info.name}: unknown RoPE pairing {info.rope_pairing!r}; accepted: {', '.join(PAIRINGS)}")


@dataclass(frozen=True)
class LayerPlanes:
    """The rotation planes of one layer: dimension pairs and frequencies [d_head/2] (θ = 0 off the rotary dims)."""

    layer: int
    layer_type: str
    base: float
    rotary_dims: int
    window: int | None
    first: np.ndarray
    second: np.ndarray
    theta: np.ndarray
    gain: float = 1.0  # (attention scaling)²: yarn / longrope scale cos and sin, so q·k by its square

    @property
    def n_rotary(self) -> int:
        return self.rotary_dims // 2

    def split(self, x: Tensor) -> Tensor:
        """Head vectors [... d_head] as complex planes [... d_head/2]: x_first + i·x_second."""
        first = torch.as_tensor(self.first, device=x.device)
        second = torch.as_tensor(self.second, device=x.device)
        return torch.complex(x[..., first].float(), x[..., second].float())


def layer_planes(info: ModelInfo, layer: int) -> LayerPlanes:
    """The planes of ``layer`` from ``info``: that layer's frequencies, rotary dims, pairing and sliding window.

    Frequencies are the ones the model rotates with, read from it (``info.rope_inv_freq``: the
    ``inv_freq`` buffers of Hugging Face models, with llama3 / yarn / linear / dynamic scaling
    applied; the zoo's own table, whose p-RoPE planes keep θ_i = base^(−2i/d_rot) of the full
    spectrum), never recomputed from the base.
    """
    require_rope(info, "layer_planes")
    base, rot = info.rope_bases[layer], info.rotary_dims[layer]
    freqs = info.rope_inv_freq[layer] if info.rope_inv_freq else None
    if base is None or rot is None or freqs is None:
        raise ValueError(f"{info.name} layer {layer} has no RoPE frequencies (the layer does not rotate)")
    inv_freq = np.asarray(freqs, dtype=np.float64)
    if inv_freq.shape != (rot // 2,):
        raise ValueError(f"{info.name}: layer {layer} has {inv_freq.size} RoPE frequencies, expected {rot // 2}")
    assert info.rope_pairing is not None  # require_rope checked it is one of PAIRINGS
    first, second = rope_planes(info.d_head, rot, info.rope_pairing)
    theta = np.concatenate([inv_freq, np.zeros(info.d_head // 2 - rot // 2)])
    windows = info.sliding_windows or (None,) * info.n_layers
    layer_type = info.layer_types[layer] if info.layer_types else "full_attention"
    scaling = info.rope_attention_scaling[layer] if info.rope_attention_scaling else None
    return LayerPlanes(
        layer, layer_type, float(base), rot, windows[layer], first, second, theta, float(scaling or 1.0) ** 2
    )


def attention_scale(model: PositionModel) -> float:
    """The factor from q·k to the logit: query_pre_attn_scalar^−½ if the config has one (Gemma), else d_head^−½."""
    config = getattr(getattr(model, "hf", None), "config", None)
    scalar = getattr(config, "query_pre_attn_scalar", None)
    return float(scalar) ** -0.5 if scalar else model.info.d_head**-0.5


# -- statistics on tensors (pure) -----------------------------------------------------------------


def delta_cross_products(
    qz: Tensor, kz: Tensor, valid: Tensor, kv_map: Tensor, max_delta: int
) -> tuple[Tensor, Tensor]:
    """Sums over token pairs at each distance of q_z · conj(k_z), and the pair counts.

    ``qz`` [b s heads planes] and ``kz`` [b s kv_heads planes] complex (pre-rotation), ``valid``
    [b s] bool (real tokens with contiguous positions, so index distance = position distance),
    ``kv_map`` [heads] the kv head of each query head. Returns sums [max_delta+1 heads planes]
    (complex128) over pairs (query i, key i − Δ) with both valid, and counts [max_delta+1].
    All distances at once as a cross-correlation along the sequence, by FFT in float64
    (O(s log s) per head and plane, where a loop over Δ is O(s · max_delta)).
    """
    seq = qz.shape[1]
    n_fft = 2 * seq  # zero padding ≥ 2s − 1: no circular wrap-around
    reach = min(max_delta, seq - 1) + 1
    weight = valid.to(torch.float64)
    q_f = torch.fft.fft(qz.to(torch.complex128) * weight[..., None, None], n=n_fft, dim=1)
    k_f = torch.fft.fft(kz.to(torch.complex128) * weight[..., None, None], n=n_fft, dim=1)[:, :, kv_map]
    sums = torch.zeros(max_delta + 1, *qz.shape[2:], dtype=torch.complex128, device=qz.device)
    sums[:reach] = torch.fft.ifft((q_f * k_f.conj()).sum(0), dim=0)[:reach]
    v_f = torch.fft.rfft(weight, n=n_fft, dim=1)
    counts = torch.zeros(max_delta + 1, dtype=torch.float64, device=qz.device)
    counts[:reach] = torch.fft.irfft((v_f * v_f.conj()).sum(0), n=n_fft)[:reach].round()
    return sums, counts


# -- the analysis --------------------------------------------------------------------------------


@dataclass(frozen=True)
class RopeFrequencyUsage(ParamsAlias, Result):
    """What ``rope_frequency_usage`` returns.

    ``table``: one row per (layer, head, plane): layer, layer_type, head, kv_head, plane, dim_first,
    dim_second, rotary, base, theta (rad/token), wavelength (tokens, 2π/θ; inf off the rotary dims),
    window, q_norm, k_norm, share, q_share.
    ``contributions``: one row per (layer, head, plane, delta): contribution (logit units).
    ``pattern_scores`` / ``head_roles``: one row per head (see ``PatternScores``, ``classify_heads``).
    ``info``: the run record; ``info.notes`` (also ``notes``) says what the numbers mean for this model
    (windows, logit scale, excluded tokens); ``info.n_tokens`` counts the tokens the norms were read from;
    ``info.params``: model, layers, batch_size, max_delta, logit_scale, include_position_zero,
    n_sequences, seq_len, n_tokens.
    Figure kinds: ``"heatmap"`` (option ``value``: share, q_share, q_norm, k_norm), ``"spectrum"``
    (``layer``), ``"contribution"`` (``layer``, ``head``, ``top``: needs a head, so ``save`` leaves it
    out), ``"roles"``.
    """

    FIGURES: ClassVar[Mapping[str, str]] = {
        "heatmap": "_heatmap_figure",
        "spectrum": "_spectrum_figure",
        "contribution": "_contribution_figure",
        "roles": "_roles_figure",
    }
    SAVED: ClassVar[Sequence[str]] = ("heatmap", "spectrum", "roles")
    TABLES: ClassVar[Sequence[str]] = ("contributions", "pattern_scores", "head_roles")

    table: pd.DataFrame
    contributions: pd.DataFrame
    pattern_scores: pd.DataFrame
    head_roles: pd.DataFrame
    info: RunInfo

    notes = property(lambda self: self.info.notes)

    def head_logits(self) -> pd.DataFrame:
        """Mean attention logit by distance per head: contributions summed over planes (layer, head, delta, logit)."""
        summed = self.contributions.groupby(["layer", "head", "delta"], as_index=False)["contribution"].sum()
        return summed.rename(columns={"contribution": "logit"})

    def classify(
        self,
        high_fraction: float = 0.25,
        high_threshold: float = 0.25,
        low_threshold: float = 0.5,
        pattern_threshold: float = 0.5,
    ) -> pd.DataFrame:
        """``head_roles`` again with other thresholds (see ``classify_heads``)."""
        return classify_heads(
            self.table, self.pattern_scores, high_fraction, high_threshold, low_threshold, pattern_threshold
        )

    def figure(self, kind: str | None = None, **options: Any) -> go.Figure:
        """Draw the figure ``kind`` (default ``"heatmap"``; the kinds are in the class docstring)."""
        if kind is not None and kind not in self.FIGURES and kind in self.table.columns:  # the old figure(value)
            deprecated_alias(f"RopeFrequencyUsage.figure({kind!r})", f"RopeFrequencyUsage.figure(value={kind!r})")
            return super().figure("heatmap", value=kind, **options)
        return super().figure(kind, **options)

    def _heatmap_figure(self, value: str = "share") -> go.Figure:
        """Heatmap of ``value`` with one row per layer.head and one column per plane."""
        from posprobe.plots.rope import frequency_usage_heatmap

        return frequency_usage_heatmap(self.table, value=value)

    def _spectrum_figure(self, layer: int | None = None) -> go.Figure:
        """Each head's share of norm per plane against wavelength (rotary planes)."""
        from posprobe.plots.rope import frequency_spectra

        return frequency_spectra(self.table, layer=layer)

    def _contribution_figure(self, layer: int, head: int, top: int = 8) -> go.Figure:
        """One head's logit contribution by distance: the ``top`` planes and their sum."""
        from posprobe.plots.rope import distance_contributions

        return distance_contributions(self.contributions, self.table, layer=layer, head=head, top=top)

    def _roles_figure(self) -> go.Figure:
        """High-frequency share against the sharper of previous-token and diagonal attention, by role."""
        from posprobe.plots.rope import head_roles_scatter

        return head_roles_scatter(self.head_roles)

    def spectrum_figure(self, layer: int | None = None) -> go.Figure:
        """Deprecated: ``figure("spectrum", layer=...)``."""
        deprecated_alias("RopeFrequencyUsage.spectrum_figure()", "RopeFrequencyUsage.figure('spectrum')")
        return self.figure("spectrum", layer=layer)

    def contribution_figure(self, layer: int, head: int, top: int = 8) -> go.Figure:
        """Deprecated: ``figure("contribution", layer=..., head=..., top=...)``."""
        deprecated_alias("RopeFrequencyUsage.contribution_figure()", "RopeFrequencyUsage.figure('contribution')")
        return self.figure("contribution", layer=layer, head=head, top=top)

    def roles_figure(self) -> go.Figure:
        """Deprecated: ``figure("roles")``."""
        deprecated_alias("RopeFrequencyUsage.roles_figure()", "RopeFrequencyUsage.figure('roles')")
        return self.figure("roles")


def rope_frequency_usage(
    source: Any,
    tokens: Any = None,
    *,
    layers: int | Sequence[int] | None = None,
    batch_size: int = 8,
    max_delta: int = 64,
    exclude_pos0: bool = False,
    progress: bool = False,
    include_position_zero: Any = UNSET,
) -> RopeFrequencyUsage:
    """Measure which RoPE frequencies every head uses and how each adds to the logit by distance (Barbero et al. 2024).

    ``source``: a RoPE model (anything ``load_model`` accepts), run on ``tokens`` [n s] (a TokenBatch,
    ids or texts; real tokens must be contiguous in each row: left or right padding).
    For each layer (default all), head and plane: the mean over real tokens of the plane's 2-D norm
    of the pre-rotation query (``q_norm``) and of the key of the head's kv head (``k_norm``), read
    with that layer's own base, rotary dims and window. ``share`` = q_norm·k_norm / Σ_planes
    q_norm·k_norm: the plane's share of the head's q·k norm product, a bound on what the plane can
    add to the logit (|q_z·conj(k_z)| ≤ |q_z||k_z|); ``q_share`` is the share of the query norm alone.

    ``contributions`` (Hong et al. 2024): for Δ = 0..max_delta, the mean over token pairs (query i,
    key i − Δ) of scale · Re(q_z[i] conj(k_z[i − Δ]) e^{iθΔ}), where scale is the model's logit scale
    (``attention_scale``); summed over planes it is the mean pre-softmax logit at distance Δ. On
    sliding-window layers only Δ < window is computed (keys further away are masked); the notes say so.

    Padding never counts; with ``exclude_pos0=True`` position 0 (BOS, the attention sink) is dropped
    from norms and pairs (``include_position_zero=False``, its old spelling, works one more release).
    Heads are classified by ``classify_heads``.
    """
    exclude = bool(
        exclude_pos0_choice(exclude_pos0, old="include_position_zero", old_value=include_position_zero, invert=True)
    )
    model = as_model(source)
    info = model.info
    require_rope(info, "rope_frequency_usage")
    if batch_size < 1 or max_delta < 0:
        raise ValueError(f"need batch_size ≥ 1 and max_delta ≥ 0, got batch_size={batch_size}, max_delta={max_delta}")
    run = as_source(model, tokens)
    batch = cast("TokenBatch", run.tokens)  # a source built from a model holds its tokens
    layer_list = cast("list[int]", run.resolve_layers("q", layers))  # q has layers
    seq = batch.tokens.shape[1]
    sums = _UsageSums(model, layer_list, min(max_delta, seq - 1), exclude)
    for _, rows in batches(batch, batch_size, progress=progress, desc="rope frequency usage"):
        sums.add(rows)
    if sums.n_tokens == 0:
        raise ValueError("no tokens to analyse: every token is padding (or position 0 with exclude_pos0=True)")
    scale = attention_scale(model)
    usage, contributions = sums.tables(scale)
    pattern_table = sums.scores.table()
    notes = _notes(model, sums.planes, sums.reach, scale, not exclude)
    params = dict(model=info.name, layers=layer_list, batch_size=batch_size, max_delta=max_delta, logit_scale=scale)
    params.update(include_position_zero=not exclude, n_sequences=len(batch), seq_len=seq, n_tokens=sums.n_tokens)
    fields = dict(layers=layer_list, n_tokens=sums.n_tokens, exclude_pos0=exclude, notes=notes, params=params)
    record = run.run_info("rope_frequency_usage", **fields)
    return RopeFrequencyUsage(usage, contributions, pattern_table, classify_heads(usage, pattern_table), record)


class _UsageSums:
    """The running sums of one run, per layer: plane norms of q [heads planes] and k [kv_heads planes], q_z · conj(k_z)
    by distance [Δ heads planes] with pair counts [Δ], and the attention pattern scores."""

    def __init__(self, model: PositionModel, layers: list[int], max_delta: int, exclude_pos0: bool) -> None:
        """``max_delta``: the largest distance to sum pairs at (a sliding window may stop a layer sooner)."""
        info = model.info
        n_planes = info.d_head // 2
        self.model, self.first_position = model, 1 if exclude_pos0 else 0
        self.planes = planes = {layer: layer_planes(info, layer) for layer in layers}
        self.reach = reach = {L: min(max_delta, (p.window - 1) if p.window else max_delta) for L, p in planes.items()}
        self.kv_map = kv_heads(info.n_heads, info.n_kv_heads)
        self.norms = {L: [np.zeros((info.n_heads, n_planes)), np.zeros((info.n_kv_heads, n_planes))] for L in planes}
        self.cross = {L: np.zeros((reach[L] + 1, info.n_heads, n_planes), dtype=np.complex128) for L in planes}
        self.pairs = {L: np.zeros(reach[L] + 1) for L in planes}
        self.n_tokens = 0
        self.scores = PatternScores(list(planes), info.n_heads)
        self.capture = [SiteKey(site, layer) for layer in planes for site in ("q", "k")]
        self.kv_index = torch.as_tensor(self.kv_map, device=model.device)

    def add(self, rows: TokenBatch) -> None:
        """Run the model on ``rows`` and fold their plane norms, cross products and patterns into the sums."""
        model, mask = self.model, rows.attention_mask
        acts = model.run(
            rows.tokens,
            attention_mask=mask,
            capture=self.capture,
            hooks=self.scores.hooks(mask),
            return_logits=False,
            stop_at_layer=max(self.planes),
        ).acts
        valid = mask.bool() & (positions_from_mask(mask) >= self.first_position)
        valid = valid.to(model.device)
        self.n_tokens += int(valid.sum())
        for layer, planes in self.planes.items():
            qz = planes.split(acts[SiteKey("q", layer)])
            kz = planes.split(acts[SiteKey("k", layer)])
            self.norms[layer][0] += (qz.abs() * valid[..., None, None]).sum((0, 1)).double().cpu().numpy()
            self.norms[layer][1] += (kz.abs() * valid[..., None, None]).sum((0, 1)).double().cpu().numpy()
            sums, counts = delta_cross_products(qz, kz, valid, self.kv_index, self.reach[layer])
            self.cross[layer] += sums.cpu().numpy()
            self.pairs[layer] += counts.cpu().numpy()

    def tables(self, scale: float) -> tuple[pd.DataFrame, pd.DataFrame]:
        """The usage table (mean norms over the tokens counted) and the contributions table (``scale``: logit scale)."""
        n = self.n_tokens
        usage = pd.concat(
            [_usage_rows(p, self.norms[L][0] / n, self.norms[L][1] / n, self.kv_map) for L, p in self.planes.items()],
            ignore_index=True,
        )
        contributions = pd.concat(
            [_contribution_rows(p, self.cross[L], self.pairs[L], scale) for L, p in self.planes.items()],
            ignore_index=True,
        )
        return usage, contributions


def _usage_rows(planes: LayerPlanes, q_norm: np.ndarray, k_norm: np.ndarray, kv_map: np.ndarray) -> pd.DataFrame:
    """Tidy rows for one layer from mean plane norms q [heads planes] and k [kv_heads planes]."""
    n_heads, n_planes = q_norm.shape
    k_per_head = k_norm[kv_map]
    product = q_norm * k_per_head
    with np.errstate(invalid="ignore", divide="ignore"):
        share = product / product.sum(1, keepdims=True)
        q_share = q_norm / q_norm.sum(1, keepdims=True)
        wavelength = np.where(planes.theta > 0, 2 * np.pi / planes.theta, np.inf)
    tile = lambda a: np.tile(a, n_heads)  # noqa: E731
    return pd.DataFrame(
        {
            "layer": planes.layer,
            "layer_type": planes.layer_type,
            "head": np.repeat(np.arange(n_heads), n_planes),
            "kv_head": np.repeat(kv_map, n_planes),
            "plane": tile(np.arange(n_planes)),
            "dim_first": tile(planes.first),
            "dim_second": tile(planes.second),
            "rotary": tile(np.arange(n_planes) < planes.n_rotary),
            "base": planes.base,
            "theta": tile(planes.theta),
            "wavelength": tile(wavelength),
            "window": pd.array([planes.window] * n_heads * n_planes, dtype="Int64"),
            "q_norm": q_norm.ravel(),
            "k_norm": k_per_head.ravel(),
            "share": share.ravel(),
            "q_share": q_share.ravel(),
        }
    )


def _contribution_rows(planes: LayerPlanes, cross: np.ndarray, pairs: np.ndarray, scale: float) -> pd.DataFrame:
    """Tidy rows (layer, head, plane, delta, contribution) from cross-product sums [Δ heads planes]."""
    seen = pairs > 0
    deltas = np.arange(len(pairs))[seen]
    mean = cross[seen] / pairs[seen, None, None]
    phase = np.exp(1j * deltas[:, None] * planes.theta[None, :])  # [Δ planes]
    value = scale * planes.gain * (mean * phase[:, None, :]).real  # [Δ heads planes]
    d, h, p = np.meshgrid(deltas, np.arange(value.shape[1]), np.arange(value.shape[2]), indexing="ij")
    table = pd.DataFrame({"layer": planes.layer, "head": h.ravel(), "plane": p.ravel(), "delta": d.ravel()})
    table["contribution"] = value.ravel()
    return table.sort_values(["head", "plane", "delta"], ignore_index=True)


def _notes(
    model: PositionModel, planes: dict[int, LayerPlanes], reach: dict[int, int], scale: float, include_zero: bool
) -> tuple[str, ...]:
    info = model.info
    notes = [
        f"{info.name}: {info.rope_pairing} pairing; contributions in logit units (q·k × {scale:.4g})",
        "norms and pairs over real tokens" + ("" if include_zero else ", excluding position 0"),
    ]
    windowed: dict[tuple[int, int], list[int]] = {}
    partial: dict[int, list[int]] = {}
    for layer, p in planes.items():
        if p.window is not None:
            windowed.setdefault((p.window, reach[layer]), []).append(layer)
        if p.rotary_dims < info.d_head:
            partial.setdefault(p.rotary_dims, []).append(layer)
    for rot, layers in partial.items():
        notes.append(f"layers {layers}: partial rotary, {rot} of {info.d_head} dims rotate; the rest have θ = 0")
    for (window, last), layers in windowed.items():
        limit = "it limits contributions to" if last == window - 1 else "wider than the distances computed,"
        notes.append(f"layers {layers}: sliding window of {window} tokens applies; {limit} Δ ≤ {last}")
    softcap = getattr(getattr(getattr(model, "hf", None), "config", None), "attn_logit_softcapping", None)
    if softcap:
        notes.append(f"attention logits are soft-capped at {softcap}; contributions are before the cap")
    return tuple(notes)
