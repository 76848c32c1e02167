"""``extract``: run a model over a token batch and write the requested sites to an on-disk store.

Only the requested sites are hooked; the forward stops after the last requested layer and
skips the unembedding, so extraction costs at most one forward of the body (DESIGN.md).
Shards are written by a background thread while the next batch runs.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from posprobe.data import TokenBatch, as_token_batch
from posprobe.devices import (
    auto_batch_size,
    resolve_device,
    resolve_dtype,
    shard_bytes_per_sequence,
    site_shape,
)
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
    dev, compute_dtype = _placement(model, device, dtype)
    store_dtype = resolve_dtype(store_dtype)
    if model.device_map is None and (model.device != dev or model.dtype != compute_dtype):
        model.to(device=dev, dtype=compute_dtype)
    model.prepare_inputs(batch.tokens[:1], batch.attention_mask[:1], batch.position_ids[:1])  # fail fast on n_ctx
    if batch_size == "auto":
        batch_size = auto_batch_size(model, batch.tokens.shape[1], keys, store_dtype=store_dtype)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int or 'auto', got {batch_size!r}")
    if out is None:
        out = Path(tempfile.mkdtemp(prefix="posprobe-store-"))
    n, s = batch.tokens.shape
    shapes = {k: site_shape(model.info, k.site, s) for k in keys}
    bytes_needed = n * shard_bytes_per_sequence(model.info, s, keys, store_dtype.itemsize)
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
    writers = _writer_count(dev)
    pending: deque[Future[None]] = deque()
    with ThreadPoolExecutor(max_workers=writers, thread_name_prefix="posprobe-writer") as pool:
        for index in tqdm(todo, desc=f"extract {model.info.name}", unit="batch", disable=not progress):
            start, stop = bounds[index]
            acts = model.capture(
                batch.tokens[start:stop],
                keys,
                attention_mask=batch.attention_mask[start:stop],
                position_ids=batch.position_ids[start:stop],
                stop_at_layer=last_layer,
            )
            host = _to_host(acts, store_dtype, start)
            del acts
            while len(pending) >= writers:
                pending.popleft().result()
            pending.append(pool.submit(write_shard, store, index, host))
        while pending:
            pending.popleft().result()
    mark_complete(store)
    return store


def _placement(
    model: PositionModel, device: str | torch.device | None, dtype: str | torch.dtype | None
) -> tuple[torch.device, torch.dtype]:
    """The device and compute dtype of the run; a model split by a device map stays where it is."""
    if model.device_map is None:
        return resolve_device(device), resolve_dtype(dtype) if dtype is not None else model.dtype
    if device not in (None, "auto"):
        raise ValueError(
            f"{model.info.name} is split across devices by a device map, so device={device!r} cannot apply; "
            "pass device='auto' (inputs go to the device of its embedding)"
        )
    if dtype is not None and resolve_dtype(dtype) != model.dtype:
        raise ValueError(
            f"{model.info.name} is split across devices by a device map and holds {model.dtype}; it cannot be cast "
            f"to {dtype!r} here: load it with dtype={dtype!r} instead"
        )
    return model.device, model.dtype


def _writer_count(device: torch.device) -> int:
    """Shard-writing threads: one on CPU (the forward needs the cores), more when a GPU outpaces one writer."""
    if device.type == "cpu":
        return 1
    return min(4, max(1, (os.cpu_count() or 1) // 4))


def _to_host(acts: dict[SiteKey, Tensor], dtype: torch.dtype, start: int) -> dict[SiteKey, Tensor]:
    """Check ``acts`` for NaN/inf where they live and copy them to host memory in ``dtype``.

    GPU tensors go to pinned buffers with non-blocking copies, all queued before one wait, so
    the copies of one batch overlap each other and the finiteness reductions run on the GPU.
    """
    flags = {k: _nonfinite(k, v) for k, v in acts.items()}
    host: dict[SiteKey, Tensor] = {}
    for key, x in acts.items():
        if x.device.type == "cuda":
            buf = torch.empty(x.shape, dtype=dtype, pin_memory=True)
            buf.copy_(x, non_blocking=True)
            host[key] = buf
        else:
            # a copy even when the dtype matches: the writer thread must not share memory with the model
            host[key] = x.to(dtype=dtype, copy=x.dtype == dtype).contiguous()
    for cuda_device in {x.device for x in acts.values() if x.device.type == "cuda"}:
        torch.cuda.current_stream(cuda_device).synchronize()
    for key, flag in flags.items():
        if bool(flag):
            _raise_nonfinite(key, acts[key], start)
    return host


def _raise_nonfinite(key: SiteKey, x: Tensor, start: int) -> None:
    bad = x.isnan() | (x == float("inf") if key.site in ATTENTION_MAP_SITES else x.isinf())
    seq = int(bad.nonzero()[0, 0]) + start
    raise NonFiniteActivationError(
        f"non-finite values in site {key.site!r} layer {key.layer} (first in sequence {seq}); nothing was written "
        "for this batch — check the model's dtype (fp16 overflows) and its weights"
    )


def _nonfinite(key: SiteKey, x: Tensor) -> Tensor:
    """A 0-d bool tensor on ``x``'s device: any NaN or inf (attention maps: NaN or +inf; -inf marks masked keys)."""
    if key.site in ATTENTION_MAP_SITES:
        return ~(x < float("inf")).all()
    return ~torch.isfinite(x).all()


def _versions() -> dict[str, str]:
    import transformers

    import posprobe

    return {"posprobe": posprobe.__version__, "torch": torch.__version__, "transformers": transformers.__version__}
