"""Length generalisation: held-out next-token loss per position bucket, out to 4× the training context.

Press et al. 2022 ("Train short, test long") and Kazemnejad et al. 2023 compare position schemes
this way: a scheme that generalises keeps its loss flat past ``n_ctx``, or at least no worse than
a sliding window of ``n_ctx`` tokens over the same text (``window_loss``). Absolute schemes
(learned, sinusoidal) cannot run there; their rows beyond ``n_ctx`` are kept, marked
``available=False`` with NaN loss, so every model shares one table and one x-axis.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pandas as pd
import torch

from posprobe.data import TokenBatch, corpus_ids, corpus_text
from posprobe.models.base import PositionModel
from posprobe.results import DataFrameAlias, Result, RunInfo
from posprobe.stats.streaming import as_model

if TYPE_CHECKING:
    import plotly.graph_objects as go

#: held-out windows ``length_generalization`` draws when no tokens are given
DEFAULT_WINDOWS = 16

COLUMNS = [
    "model",
    "position_bucket",
    "bucket_start",
    "bucket_end",
    "loss",
    "window_loss",
    "gap",
    "n_tokens",
    "available",
    "beyond_context",
    "n_ctx",
]


@dataclass(frozen=True)
class LengthGeneralization(DataFrameAlias, Result):
    """Held-out loss per position bucket and model (``length_generalization``).

    ``table``: one row per (model, position bucket); columns in ``COLUMNS`` (see ``length_generalization``).
    ``info``: the run record (``model``: the model names joined; ``params``: models, bucket, max_len,
    batch_size, sliding_window). Figure kinds: ``"loss"``. For one release the result also reads like
    its table (``result["loss"]``, ``len(result)``), with a DeprecationWarning: use ``.table``.
    """

    FIGURES: ClassVar[Mapping[str, str]] = {"loss": "_loss_figure"}

    table: pd.DataFrame
    info: RunInfo

    def _loss_figure(self, title: str | None = None) -> go.Figure:
        """Loss against position, one line per model, the sliding-window baseline dotted, n_ctx marked."""
        from posprobe.plots.length import length_generalization_figure

        return length_generalization_figure(self.table, title=title)


def heldout_long_windows(model: PositionModel, n: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """``n`` windows [n seq_len] of held-out sotu text, BOS first when the model prepends one.

    Unlike ``posprobe.data.text_windows`` the length may exceed the model's context: this is
    the input a length-generalisation test needs. At most ``ceil(n / 4)`` windows per address.
    """
    bos = model.info.bos_token_id if model.info.prepends_bos else None
    body = seq_len - int(bos is not None)
    per_doc = max(1, math.ceil(n / 4))
    rng = np.random.default_rng(seed)
    rows: list[list[int]] = []
    for doc in rng.permutation(corpus_ids("heldout")):
        ids = list(model.tokenizer(corpus_text(str(doc)), add_special_tokens=False)["input_ids"])
        starts = range(0, len(ids) - body + 1, body)
        rows.extend(([bos] if bos is not None else []) + ids[s : s + body] for s in list(starts)[:per_doc])
        if len(rows) >= n:
            break
    if len(rows) < n:
        raise ValueError(f"the held-out split yields only {len(rows)} windows of {seq_len} tokens; ask for fewer")
    return torch.tensor(rows[:n], dtype=torch.long)


def length_generalization(
    source: Any,
    tokens: TokenBatch | torch.Tensor | int | None = None,
    *,
    max_len: int | None = None,
    bucket: int | None = None,
    batch_size: int = 4,
    seed: int = 0,
    sliding_window: bool = True,
) -> LengthGeneralization:
    """Held-out loss per position bucket for one or several models (Press et al. 2022, Kazemnejad et al. 2023).

    ``source``: a model (anything ``load_model`` accepts), a list of them, or a mapping name → model.
    ``tokens`` is a token batch [n seq] or a count of held-out windows to draw (default
    ``DEFAULT_WINDOWS``; ``max_len`` tokens each, default 4 × the largest ``n_ctx``; ``seed`` picks them).
    ``bucket`` (default n_ctx / 4) groups positions; a loss sits at the position of the token predicting
    the next one.

    Buckets hold different text, so their losses differ by content as well as by position. With
    ``sliding_window`` each bucket is also scored with the model seeing only the ``n_ctx`` tokens
    that end at the bucket (BOS first when the batch has one): the same targets, within the
    training context. ``gap = loss − window_loss`` is then the price of the longer context alone
    (zero inside the context; NaN where the model cannot run).

    ``table`` columns: model, position_bucket ("0-63"), bucket_start, bucket_end (exclusive), loss (mean
    nats), window_loss, gap, n_tokens, available (the model could run there), beyond_context
    (bucket_start ≥ n_ctx), n_ctx.
    """
    models = _as_named(source)
    n_ctx = max(m.info.n_ctx for m in models.values())
    bucket = bucket or max(1, n_ctx // 4)
    wanted = DEFAULT_WINDOWS if tokens is None else tokens
    frames, ids = [], torch.empty(0, 0)
    for name, m in models.items():
        ids = _model_tokens(m, wanted, max_len, n_ctx, seed)
        if sliding_window and bucket > m.info.n_ctx // 2:
            raise ValueError(
                f"bucket {bucket} > n_ctx/2 = {m.info.n_ctx // 2} leaves no context for the sliding window"
            )
        frames.append(_one_model(name, m, ids, bucket, batch_size, sliding_window))
    params = {"bucket": bucket, "max_len": max_len, "batch_size": batch_size, "sliding_window": sliding_window}
    info = RunInfo(
        "length_generalization",
        ", ".join(map(str, models)),
        n_sequences=int(ids.shape[0]),
        seq_len=int(ids.shape[1]),
        n_tokens=int(ids.numel()),
        seed=seed if isinstance(wanted, int) else None,
        causal=all(m.info.causal for m in models.values()),
        params={"models": list(map(str, models)), **params},
    )
    return LengthGeneralization(pd.concat(frames, ignore_index=True)[COLUMNS], info)


def _model_tokens(
    model: PositionModel, wanted: TokenBatch | torch.Tensor | int, max_len: int | None, n_ctx: int, seed: int
) -> torch.Tensor:
    """The ids [n seq] ``model`` reads: ``wanted`` windows of held-out text, or the given tokens cut to ``max_len``."""
    if isinstance(wanted, int):
        return heldout_long_windows(model, wanted, max_len or 4 * n_ctx, seed)
    ids = wanted.tokens if isinstance(wanted, TokenBatch) else torch.as_tensor(wanted)
    return ids[:, :max_len] if max_len else ids


def _losses(model: PositionModel, tokens: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Per-token next-token loss [n seq-1] in float64 on the CPU."""
    return torch.cat([model.loss(chunk).cpu() for chunk in tokens.split(batch_size)]).double()


def _one_model(
    name: str, model: PositionModel, tokens: torch.Tensor, bucket: int, batch_size: int, sliding_window: bool
) -> pd.DataFrame:
    seq_len, n_ctx = tokens.shape[1], model.info.n_ctx
    usable = seq_len if model.extrapolates else min(seq_len, n_ctx)
    full = _losses(model, tokens[:, :usable], batch_size)  # [n usable-1]
    bos = model.info.bos_token_id
    has_bos = bos is not None and bool((tokens[:, 0] == bos).all())
    rows = []
    for start in range(0, seq_len - 1, bucket):
        end = min(start + bucket, seq_len - 1)
        part = full[:, start:end]
        count = int(part.numel())
        loss = part.mean().item() if count else float("nan")
        window = float("nan")
        if sliding_window:
            window = loss if end < n_ctx else _window_loss(model, tokens, start, end, has_bos, batch_size)
        rows.append(
            {
                "model": name,
                "position_bucket": f"{start}-{end - 1}",
                "bucket_start": start,
                "bucket_end": end,
                "loss": loss,
                "window_loss": window,
                "gap": loss - window,
                "n_tokens": count,
                "available": count > 0,
                "beyond_context": start >= n_ctx,
                "n_ctx": n_ctx,
            }
        )
    return pd.DataFrame(rows)


def _window_loss(
    model: PositionModel, tokens: torch.Tensor, start: int, end: int, has_bos: bool, batch_size: int
) -> float:
    """Mean loss of predictions made at positions [start, end) seeing only the n_ctx tokens ending at ``end``."""
    lo = end + 1 - (model.info.n_ctx - int(has_bos))
    window = tokens[:, lo : end + 1]
    if has_bos:
        window = torch.cat([tokens[:, :1], window], dim=1)
    offset = int(has_bos) - lo  # original position t sits at t + offset in the window
    return _losses(model, window, batch_size)[:, start + offset : end + offset].mean().item()


def _as_named(source: Any) -> dict[Any, PositionModel]:
    """Models by name: one model (anything ``load_model`` accepts), several in a list, or a mapping name → model."""
    if isinstance(source, Mapping):
        return {name: as_model(m) for name, m in source.items()}
    if isinstance(source, PositionModel | str | os.PathLike) or hasattr(source, "parameters"):
        model = as_model(source)
        return {model.info.name: model}
    models = [as_model(m) for m in source]
    if not models:
        raise ValueError("length_generalization needs at least one model")
    return {m.info.name: m for m in models}
