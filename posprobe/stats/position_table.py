"""Geometry of an absolute position table W_pos: principal components, periods, helix, smoothness.

Learned absolute position embeddings of trained models are not arbitrary vectors: GPT-2's W_pos
lies close to a low-dimensional helix whose top principal components are smooth, cosine-like
functions of position (RESEARCH.md §6; Wang & Chen 2020, "What do position embeddings learn?";
Yamamoto & Matsuzaki 2023), and neighbouring rows are similar while a randomly initialised table
has no such structure. ``position_embedding_geometry`` measures that on any model with a
``pos_embed`` site (learned or sinusoidal) or on a matrix:

- PCA of the centred rows: explained variance per component; each component's dominant period
  over positions, N / k* for the peak k* ≥ 1 of its power spectrum, and ``period_power``, the share
  of the spectral power in bins k*−1..k*+1 (1 for a pure sinusoid); its Spearman ρ with position;
- the helix test: whether the PC1–PC2 angle turns at a constant rate (linear fit of the unwrapped
  angle against position: ``pc12_turn_period``, ``pc12_angle_linear_r2``);
- mean cosine similarity of rows at distance Δ = 1..N/2, beside the random-init twin's table.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pandas as pd
import torch

from posprobe.finite import check_finite
from posprobe.models.base import PositionModel
from posprobe.results import Result, RunInfo
from posprobe.sites import SiteKey
from posprobe.stats.streaming import as_model

if TYPE_CHECKING:
    import plotly.graph_objects as go

#: principal components reported by default
N_COMPONENTS = 6


@dataclass(frozen=True)
class PositionTableGeometry(Result):
    """PCA, periods, helix fit and neighbour similarity of one position table (``position_embedding_geometry``).

    ``table`` (also ``components``): component, explained_variance, period (positions), period_power,
    spearman_with_position. ``coords``: position, pc1..pcK (each row of W_pos projected on the top K
    components). ``neighbours``: distance, cos_sim (mean cosine similarity of rows that far apart)
    and, when a random-init twin was built, cos_sim_random_init. ``helix``: pc12_turn_period,
    pc12_angle_linear_r2. ``info``: the run record (``seed``: the twin's, when one was built;
    ``params``: n_components, random_init_control, n_positions, d_model). Figure kinds: ``"helix"``
    (rows on PC1–3 in 3-D coloured by position), ``"components"`` (PC scores vs position),
    ``"neighbours"`` (cosine similarity vs distance).
    """

    FIGURES: ClassVar[Mapping[str, str]] = {
        "helix": "_helix_figure",
        "components": "_components_figure",
        "neighbours": "_neighbours_figure",
    }
    TABLES: ClassVar[Sequence[str]] = ("coords", "neighbours")

    table: pd.DataFrame
    coords: pd.DataFrame
    neighbours: pd.DataFrame
    helix: dict[str, float]
    info: RunInfo

    components = property(lambda self: self.table)
    n_positions = property(lambda self: self.info.params["n_positions"])
    d_model = property(lambda self: self.info.params["d_model"])
    model_name = property(lambda self: self.info.model)

    @property
    def summary(self) -> dict[str, Any]:
        """The headline numbers: top-3 explained variance and periods, helix fit, neighbour similarity at Δ = 1."""
        top = self.components.head(3)
        first = self.neighbours.iloc[0]
        out = {
            "shape": [self.n_positions, self.d_model],
            "explained_variance_pc1_3": [round(float(v), 4) for v in top["explained_variance"]],
            "period_pc1_3": [round(float(v), 2) for v in top["period"]],
            "period_power_pc1_3": [round(float(v), 3) for v in top["period_power"]],
            **{k: round(v, 4) for k, v in self.helix.items()},
            "neighbour_cos_d1": round(float(first["cos_sim"]), 4),
        }
        if "cos_sim_random_init" in self.neighbours:
            out["random_init_neighbour_cos_d1"] = round(float(first["cos_sim_random_init"]), 4)
        return out

    def _helix_figure(self) -> go.Figure:
        """Rows of W_pos on PC1–3 in 3-D, coloured by position."""
        from posprobe.plots.positions import helix_3d

        return helix_3d(self.coords.assign(model=self.model_name))

    def _components_figure(self) -> go.Figure:
        """The top principal-component scores against position."""
        from posprobe.plots.positions import components_by_position

        return components_by_position(self.coords.assign(model=self.model_name))

    def _neighbours_figure(self) -> go.Figure:
        """Mean cosine similarity of rows Δ apart, the random-init twin's dotted."""
        from posprobe.plots.positions import neighbour_similarity

        return neighbour_similarity(self.neighbours.assign(model=self.model_name))


#: what ``PositionTableGeometry.figure`` draws
FIGURE_KINDS = tuple(PositionTableGeometry.FIGURES)


def position_table(model: PositionModel) -> np.ndarray:
    """W_pos [n_ctx d_model] in float64: what the ``pos_embed`` site adds at positions 0..n_ctx−1.

    Read through the model's own hook on one sequence of n_ctx tokens, so it is the table the
    forward pass uses (learned or sinusoidal, any scaling included), whatever the backend.
    """
    if "pos_embed" not in model.available_sites():
        raise ValueError(
            f"a position table needs absolute positions (learned or sinusoidal; site 'pos_embed'), but "
            f"{model.info.name} uses position scheme {model.info.position_scheme!r}"
        )
    n_ctx = model.info.n_ctx
    filler = model.info.bos_token_id if model.info.bos_token_id is not None else 0
    tokens = torch.full((1, n_ctx), int(filler), dtype=torch.long, device=model.device)
    key = SiteKey("pos_embed", None)
    return model.capture(tokens, [key])[key][0].double().cpu().numpy()


def position_embedding_geometry(
    source: Any,
    *,
    n_components: int = N_COMPONENTS,
    random_init_control: bool = True,
    seed: int = 0,
    model_name: str | None = None,
) -> PositionTableGeometry:
    """Principal components, periods, helix fit and neighbour similarity of a position table.

    ``source``: a model with a ``pos_embed`` site (learned / sinusoidal absolute positions; anything
    ``load_model`` accepts) or a table [positions d_model] (an array or a tensor). For a model,
    ``random_init_control`` adds the same neighbour similarity for its random-init twin (``seed``),
    the baseline a trained table must beat. ``model_name`` labels the result.
    """
    twin = None
    if isinstance(source, PositionModel | str | os.PathLike) or hasattr(source, "parameters"):
        model = as_model(source)
        name = model_name or model.info.name
        w_pos = _as_table(position_table(model))
        if random_init_control:
            twin = _as_table(position_table(model.random_init_copy(seed)))
    else:
        name = model_name or "position table"
        w_pos = _as_table(source)
    if n_components < 1:
        raise ValueError(f"n_components must be ≥ 1, got {n_components}")
    coords, components = _pca(w_pos, min(n_components, *w_pos.shape))
    neighbours = _neighbour_similarity(w_pos)
    if twin is not None:
        neighbours["cos_sim_random_init"] = _neighbour_similarity(twin)["cos_sim"].to_numpy()
    helix = _helix_turn(coords) if "pc2" in coords else {"pc12_turn_period": np.nan, "pc12_angle_linear_r2": np.nan}
    params = {"n_components": n_components, "random_init_control": twin is not None}
    params.update(n_positions=w_pos.shape[0], d_model=w_pos.shape[1])
    info = RunInfo("position_embedding_geometry", name, seed=seed if twin is not None else None, params=params)
    return PositionTableGeometry(components, coords, neighbours, helix, info)


def _as_table(table: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(table, torch.Tensor):
        table = table.detach().cpu().double().numpy()
    table = np.asarray(table, dtype=np.float64)
    if table.ndim != 2:
        raise ValueError(f"a position table is [positions d_model]; got shape {tuple(table.shape)}")
    if table.shape[0] < 4 or table.shape[1] < 1:
        raise ValueError(f"a position table needs at least 4 positions and 1 dimension; got shape {table.shape}")
    check_finite("pos_embed", None, torch.from_numpy(table), where="of the position table", unit="position")
    return table


def _pca(w_pos: np.ndarray, k: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    n = w_pos.shape[0]
    u, s, _ = np.linalg.svd(w_pos - w_pos.mean(0), full_matrices=False)
    scores = u[:, :k] * s[:k]
    total = (s**2).sum()
    explained = s**2 / total if total > 0 else np.zeros_like(s)
    t = np.arange(n)
    rows = []
    for c in range(k):
        power = np.abs(np.fft.rfft(scores[:, c] - scores[:, c].mean())) ** 2
        power[0] = 0.0
        peak = int(power.argmax())
        rows.append(
            {
                "component": c + 1,
                "explained_variance": float(explained[c]),
                "period": n / peak if peak else np.nan,
                "period_power": float(power[max(peak - 1, 1) : peak + 2].sum() / power.sum())
                if power.sum()
                else np.nan,
                "spearman_with_position": float(pd.Series(scores[:, c]).corr(pd.Series(t), method="spearman")),
            }
        )
    coords = pd.DataFrame(scores, columns=[f"pc{c + 1}" for c in range(k)])
    coords.insert(0, "position", t)
    return coords, pd.DataFrame(rows)


def _helix_turn(coords: pd.DataFrame) -> dict[str, float]:
    """Linear fit of the unwrapped PC1–PC2 angle against position: a helix turns at a constant rate."""
    angle = np.unwrap(np.arctan2(coords["pc2"].to_numpy(), coords["pc1"].to_numpy()))
    t = coords["position"].to_numpy(dtype=float)
    slope, intercept = np.polyfit(t, angle, 1)
    resid = angle - (slope * t + intercept)
    spread = ((angle - angle.mean()) ** 2).sum()
    return {
        "pc12_turn_period": float(2 * np.pi / abs(slope)) if slope else float("inf"),
        "pc12_angle_linear_r2": float(1 - (resid**2).sum() / spread) if spread else float("nan"),
    }


def _neighbour_similarity(w_pos: np.ndarray) -> pd.DataFrame:
    unit = w_pos / np.linalg.norm(w_pos, axis=1, keepdims=True).clip(1e-12)
    cos = unit @ unit.T
    n = len(unit)
    return pd.DataFrame([{"distance": d, "cos_sim": float(np.diagonal(cos, d).mean())} for d in range(1, n // 2 + 1)])
