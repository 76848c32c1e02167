"""Training curves of zoo models (``posprobe.training.TrainResult.figure``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd
import plotly.graph_objects as go

from posprobe.plots._common import require_columns

__all__ = ["loss_curve"]


def loss_curve(
    table: pd.DataFrame, evaluation: Mapping[str, Any] | None = None, title: str = "Training loss"
) -> go.Figure:
    """Training loss per step; the held-out loss and the unigram baseline as dashed lines once measured."""
    require_columns(table, ["step", "loss"], "loss_curve")
    fig = go.Figure(go.Scatter(x=table["step"], y=table["loss"], mode="lines", name="training batch"))
    marks = {"heldout_loss": "held-out", "unigram_loss": "unigram baseline"}
    for key, label in marks.items():
        if evaluation and key in evaluation:
            fig.add_hline(y=evaluation[key], line_dash="dash", annotation_text=f"{label} {evaluation[key]:.3f}")
    fig.update_layout(title=title, xaxis_title="step", yaxis_title="loss (nats per token)", template="plotly_white")
    return fig
