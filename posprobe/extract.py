"""``extract``: run a model over a token batch and write the requested sites to an on-disk store.

Only the requested sites are hooked; the forward stops after the last requested layer and
skips the unembedding, so extraction costs at most one forward of the body (DESIGN.md).
Shards are written by a background thread while the next batch runs.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from posprobe.data import TokenBatch, as_token_batch
from posprobe.devices import resolve_device, resolve_dtype
from posprobe.models import PositionModel, load_model
from posprobe.sites import ATTENTION_MAP_SITES, SiteKey, resolve_sites
from posprobe.store import ActivationStore, mark_complete, prepare_store, token_hash, write_shard

log = logging.getLogger(__name__)


class NonFiniteActivationError(ValueError):
    """An activation held NaN or inf; it is reported with its site and layer and never written."""


def extract(
    model: PositionModel | str,
    tokens: TokenBatch | Tensor | Sequence[str],
    sites: str | Sequence[str] = ("resid_post",),
    layers: int | Sequence[int] | None = None,
    *,
    batch_size: int | str = 16,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype | None = None,
    store_dtype: str | torch.dtype = torch.float32,
    out: str | os.PathLike[str] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> ActivationStore:
    """Extract ``sites`` × ``layers`` for every token into the store at ``out``; returns it.

    ``tokens`` is a TokenBatch (``pp.data.text_windows`` …), a [n seq] id tensor or a list of
    texts. ``batch_size="auto"`` sizes batches to free GPU memory. ``dtype`` sets the compute
    dtype of the model (bf16/fp16 on GPU), ``store_dtype`` that of the stored tensors.
    ``resume=True`` continues an interrupted run in ``out``, recomputing only missing or
    corrupt shards. Activations with NaN/inf raise ``NonFiniteActivationError``.
    """
    if isinstance(model, str):
        model = load_model(model)
    batch = as_token_batch(model, tokens)
    keys = resolve_sites(sites, layers, model.info.n_layers)
    for key in keys:
        model.check_site(key.site)
    dev = resolve_device(device)
    compute_dtype = resolve_dtype(dtype) if dtype is not None else model.dtype
    store_dtype = resolve_dtype(store_dtype)
    if model.device != dev or model.dtype != compute_dtype:
        model.to(device=dev, dtype=compute_dtype)
    model.prepare_inputs(batch.tokens[:1], batch.attention_mask[:1], batch.position_ids[:1])  # fail fast on n_ctx
    if batch_size == "auto":
        from posprobe.devices import auto_batch_size

        batch_size = auto_batch_size(model, batch.tokens.shape[1], keys)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int or 'auto', got {batch_size!r}")
    if out is None:
        out = Path(tempfile.mkdtemp(prefix="posprobe-store-"))
    n, s = batch.tokens.shape
    shapes = {k: _site_shape(model, k, s) for k in keys}
    bytes_needed = sum(n * _numel(shape) * store_dtype.itemsize for shape in shapes.values())
    manifest: dict[str, Any] = {
        "model": model.info.as_dict(),
        "keys": [k.name for k in keys],
        "shapes": {k.name: list(v) for k, v in shapes.items()},
        "token_hash": token_hash(batch.tokens, batch.attention_mask),
        "batch_size": batch_size,
        "store_dtype": str(store_dtype).removeprefix("torch."),
        "compute_dtype": str(compute_dtype).removeprefix("torch."),
        "n_seq": n,
        "seq_len": s,
        "prepend_bos": batch.prepend_bos,
        "source": batch.source,
        "str_tokens": batch.str_tokens,
        "versions": _versions(),
    }
    store = prepare_store(
        out,
        manifest,
        batch.tokens,
        batch.attention_mask,
        batch.position_ids,
        resume=resume,
        overwrite=overwrite,
        bytes_needed=bytes_needed,
    )
    todo = store.missing_shards()
    bounds = store.shard_bounds()
    last_layer = max((k.layer for k in keys if k.layer is not None), default=0)
    pin = dev.type == "cuda"
    with ThreadPoolExecutor(max_workers=1) as writer:
        pending: Future[None] | None = None
        for index in tqdm(todo, desc=f"extract {model.info.name}", unit="batch", disable=not progress):
            start, stop = bounds[index]
            acts = model.capture(
                batch.tokens[start:stop],
                keys,
                attention_mask=batch.attention_mask[start:stop],
                position_ids=batch.position_ids[start:stop],
                stop_at_layer=last_layer,
            )
            host = {k: _to_host(acts[k], store_dtype, pin) for k in keys}
            if pin:
                torch.cuda.current_stream().synchronize()
            _check_finite(host, start)
            if pending is not None:
                pending.result()
            pending = writer.submit(write_shard, store, index, host)
        if pending is not None:
            pending.result()
    mark_complete(store)
    return store


def _to_host(x: Tensor, dtype: torch.dtype, pin: bool) -> Tensor:
    if not pin:
        return x.to(dtype=dtype, copy=x.dtype == dtype).contiguous()
    buf = torch.empty(x.shape, dtype=dtype, pin_memory=True)
    buf.copy_(x, non_blocking=True)
    return buf


def _check_finite(acts: dict[SiteKey, Tensor], start: int) -> None:
    for key, value in acts.items():
        bad = torch.isnan(value) | (torch.isinf(value) if key.site not in ATTENTION_MAP_SITES else value == float("inf"))
        if bad.any():
            seq = int(bad.nonzero()[0, 0]) + start
            raise NonFiniteActivationError(
                f"non-finite values in site {key.site!r} layer {key.layer} (first in sequence {seq}); nothing was written "
                "for this batch — check the model's dtype (fp16 overflows) and its weights"
            )


def _site_shape(model: PositionModel, key: SiteKey, seq_len: int) -> tuple[int, ...]:
    i = model.info
    shapes = {
        "mlp_post": (seq_len, i.d_mlp),
        "q": (seq_len, i.n_heads, i.d_head),
        "rot_q": (seq_len, i.n_heads, i.d_head),
        "z": (seq_len, i.n_heads, i.d_head),
        "k": (seq_len, i.n_kv_heads, i.d_head),
        "rot_k": (seq_len, i.n_kv_heads, i.d_head),
        "pattern": (i.n_heads, seq_len, seq_len),
        "attn_scores": (i.n_heads, seq_len, seq_len),
    }
    return shapes.get(key.site, (seq_len, i.d_model))


def _numel(shape: tuple[int, ...]) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


def _versions() -> dict[str, str]:
    import transformers

    import posprobe

    return {"posprobe": posprobe.__version__, "torch": torch.__version__, "transformers": transformers.__version__}
