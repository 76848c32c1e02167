"""``extract``: run a model over a token batch and write the requested sites to an on-disk store.

Only the requested sites are hooked; the forward stops after the last requested layer and
skips the unembedding, so extraction costs at most one forward of the body (DESIGN.md).
Shards are written by background threads while the next batch runs; on a GPU, activations go
to pinned host memory with non-blocking copies and are checked for NaN/inf on the GPU.
``extract_remote`` fills the same store from nnsight traces, for models run on a remote server.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from posprobe.data import TokenBatch, as_token_batch
from posprobe.devices import (
    auto_batch_size,
    resolve_device,
    resolve_dtype,
    shard_bytes_per_sequence,
    site_shape,
)
from posprobe.distributed import Ranks, current_ranks
from posprobe.finite import NonFiniteError, count_nonfinite, nonfinite_flag, raise_nonfinite
from posprobe.models import ModelInfo, PositionModel, load_model
from posprobe.models.base import Hook
from posprobe.progress import tqdm
from posprobe.sites import SiteKey, resolve_sites
from posprobe.store import (
    ActivationStore,
    StreamedShard,
    mark_complete,
    prepare_store,
    token_hash,
    write_shard,
)

if TYPE_CHECKING:
    from posprobe.models.hf import HFModel

log = logging.getLogger(__name__)


#: An activation held NaN or inf; it is reported with its site and layer and never written.
NonFiniteActivationError = NonFiniteError


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

    ``tokens``: a TokenBatch (``pp.data.text_windows`` …), a [n seq] id tensor or texts. ``device="auto"``:
    CUDA when present. ``batch_size="auto"`` fits batches to the device's free memory, a shard under 1 GiB
    (``posprobe.devices``). ``dtype``: the model's compute dtype; ``store_dtype``: the stored tensors'. A
    model split by a device map (``load_model(id, device_map="auto")``) stays where it is. ``resume=True``
    recomputes only missing or corrupt shards of ``out``; NaN/inf raise ``NonFiniteActivationError``.
    Under torch.distributed (``torchrun --nproc-per-node N -m posprobe extract …``) each rank writes
    batches ``i % N == rank`` into the one store at ``out``, the store one process writes (``posprobe.distributed``).
    """
    ranks = current_ranks(device)
    model = load_model(model) if isinstance(model, str) else model
    device = ranks.device(device) if model.device_map is None else device  # a device map places itself
    progress = progress and ranks.is_main
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
        size = auto_batch_size(model, batch.tokens.shape[1], keys, store_dtype=store_dtype)
        batch_size = min(ranks.gather(size))  # every rank writes shards of one size: the smallest device's
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int or 'auto', got {batch_size!r}")
    forward, on_cpu = _Forward(model, batch, keys), dev.type == "cpu" and model.device_map is None
    return _write_run(
        model.info,
        batch,
        keys,
        forward.capture,
        batch_size,
        store_dtype,
        compute_dtype,
        out,
        resume,
        overwrite,
        progress,
        writers=_writer_count(dev),
        stream=forward.stream if on_cpu else None,
        ranks=ranks,
    )


@dataclass(frozen=True)
class _Forward:
    """The two ways ``extract`` runs rows ``start:stop`` of ``batch``: capture every key, or call hooks as it goes."""

    model: PositionModel
    batch: TokenBatch
    keys: list[SiteKey]

    @property
    def last_layer(self) -> int:
        return max((k.layer for k in self.keys if k.layer is not None), default=0)

    def capture(self, start: int, stop: int) -> dict[SiteKey, Tensor]:
        return self.model.capture(
            self.batch.tokens[start:stop],
            self.keys,
            attention_mask=self.batch.attention_mask[start:stop],
            position_ids=self.batch.position_ids[start:stop],
            stop_at_layer=self.last_layer,
            check_finite=False,  # _to_host checks them where they live, before the copy
        )

    def stream(self, start: int, stop: int, hooks: dict[SiteKey, Hook]) -> None:
        self.model.run(
            self.batch.tokens[start:stop],
            attention_mask=self.batch.attention_mask[start:stop],
            position_ids=self.batch.position_ids[start:stop],
            hooks=hooks,
            return_logits=False,
            stop_at_layer=self.last_layer,
        )


def _write_run(
    info: ModelInfo,
    batch: TokenBatch,
    keys: list[SiteKey],
    capture: Callable[[int, int], dict[SiteKey, Tensor]],
    batch_size: int,
    store_dtype: torch.dtype,
    compute_dtype: torch.dtype,
    out: str | os.PathLike[str] | None,
    resume: bool,
    overwrite: bool,
    progress: bool,
    writers: int = 1,
    stream: Callable[[int, int, dict[SiteKey, Hook]], None] | None = None,
    ranks: Ranks | None = None,
) -> ActivationStore:
    """Create the store, then for each missing shard: ``capture(start, stop)``, check, copy to host, write.

    ``writers`` threads write shards while the next batch is captured; at most ``writers``
    shards wait in host memory, so memory does not grow with the number of tokens. With
    ``stream`` (a forward that calls the given hooks; used on CPU), each activation is instead
    checked and written by a writer thread as soon as the forward produces it (``StreamedShard``).
    With ``ranks`` of a distributed run, rank 0 prepares the store and writes its manifest, and each
    rank writes its own shards (``Ranks.mine``).
    """
    ranks = ranks or Ranks()
    n, s = batch.tokens.shape
    shapes = {k: site_shape(info, k.site, s) for k in keys}
    manifest = _manifest(info, batch, keys, shapes, batch_size, store_dtype, compute_dtype)
    if ranks.active:
        _check_ranks(ranks, out, manifest, -(-n // batch_size))
    elif out is None:
        out = Path(tempfile.mkdtemp(prefix="posprobe-store-"))
    assert out is not None  # a distributed run was refused without one
    error: Exception | None = None
    if ranks.is_main:
        try:
            store = prepare_store(
                out,
                manifest,
                batch.tokens,
                batch.attention_mask,
                batch.position_ids,
                resume=resume,
                overwrite=overwrite,
                bytes_needed=n * shard_bytes_per_sequence(info, s, keys, store_dtype.itemsize),
            )
        except Exception as err:  # every rank must hear of it, or they wait for ever
            error = err
    ranks.settle(error, "preparing the store")
    store = ActivationStore(out) if not ranks.is_main else store
    try:
        _write_shards(store, info, shapes, capture, store_dtype, writers, stream, ranks, progress)
    except Exception as err:
        error = err
    ranks.settle(error, "extracting")
    if ranks.is_main:
        mark_complete(store)
    ranks.barrier()
    return ActivationStore(out) if ranks.active else store


def _check_ranks(ranks: Ranks, out: str | os.PathLike[str] | None, manifest: dict[str, Any], n_batches: int) -> None:
    """What a distributed extraction needs of its ranks: one folder, the same run, a batch for each."""
    if out is None:
        raise ValueError(
            "a distributed extraction needs out= a folder every rank can reach (a shared filesystem); a temporary "
            "folder would differ per rank"
        )
    same_tokens = "every rank must extract the same token batch (same texts, n, seq_len and seed)"
    ranks.agree("tokens", manifest["token_hash"], same_tokens)
    if ranks.world > n_batches:
        raise ValueError(
            f"{ranks.world} ranks but only {n_batches} batch(es) of this run: every rank needs at least one; "
            "use fewer processes or a smaller batch_size (--batch-size)"
        )
    identity = {k: manifest[k] for k in ("model", "keys", "batch_size", "store_dtype", "n_seq", "seq_len")}
    ranks.agree("settings", identity, "every rank must run the same model, sites, layers, batch size and dtype")
    ranks.agree("store folder", os.path.abspath(out), "pass every rank the same out= folder")


def _write_shards(
    store: ActivationStore,
    info: ModelInfo,
    shapes: dict[SiteKey, tuple[int, ...]],
    capture: Callable[[int, int], dict[SiteKey, Tensor]],
    store_dtype: torch.dtype,
    writers: int,
    stream: Callable[[int, int, dict[SiteKey, Hook]], None] | None,
    ranks: Ranks,
    progress: bool,
) -> None:
    """Capture and write this rank's missing shards, ``writers`` threads writing while the next batch runs."""
    bounds = store.shard_bounds()
    pending: deque[Future[None]] = deque()
    todo = ranks.mine(store.missing_shards())
    with ThreadPoolExecutor(max_workers=writers, thread_name_prefix="posprobe-writer") as pool:
        for index in tqdm(todo, desc=f"extract {info.name}", unit="batch", disable=not progress):
            start, stop = bounds[index]
            if stream is not None:
                rows = {k: (stop - start, *shape) for k, shape in shapes.items()}
                _stream_shard(store, index, start, stop, rows, store_dtype, stream, pool)
                continue
            host = _to_host(capture(start, stop), store_dtype, start, info.name)
            while len(pending) >= writers:
                pending.popleft().result()
            pending.append(pool.submit(write_shard, store, index, host))
        while pending:
            pending.popleft().result()


def _manifest(
    info: ModelInfo,
    batch: TokenBatch,
    keys: list[SiteKey],
    shapes: dict[SiteKey, tuple[int, ...]],
    batch_size: int,
    store_dtype: torch.dtype,
    compute_dtype: torch.dtype,
) -> dict[str, Any]:
    """What a store records of its run: model, keys and shapes, tokens' hash, dtypes, versions."""
    n, s = batch.tokens.shape
    return {
        "model": info.as_dict(),
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
        "versions": versions(),
    }


def _stream_shard(
    store: ActivationStore,
    index: int,
    start: int,
    stop: int,
    shapes: dict[SiteKey, tuple[int, ...]],
    dtype: torch.dtype,
    stream: Callable[[int, int, dict[SiteKey, Hook]], None],
    pool: ThreadPoolExecutor,
) -> None:
    """One shard, each activation checked and written by ``pool`` while the forward goes on; all or nothing."""
    shard = StreamedShard(store.shard_path(index), {k.name: shape for k, shape in shapes.items()}, dtype)
    futures: list[Future[tuple[SiteKey, Tensor] | None]] = []

    def store_one(key: SiteKey, x: Tensor) -> tuple[SiteKey, Tensor] | None:
        if bool(nonfinite_flag(key.site, x)) and count_nonfinite(key.site, x):
            return key, x
        shard.write(key.name, x)
        return None

    def handoff(key: SiteKey) -> Hook:
        def hook(x: Tensor) -> None:
            futures.append(pool.submit(store_one, key, x.detach()))

        return hook

    try:
        stream(start, stop, {key: handoff(key) for key in shapes})
        bad = [f.result() for f in futures]
    except BaseException:
        for f in futures:
            f.cancel()
        _wait_all(futures)
        shard.abort()
        raise
    failed = next((b for b in bad if b is not None), None)
    if failed is not None:
        shard.abort()
        _raise_nonfinite(*failed, start, store.model_name)
    commit_shard(shard)


def _wait_all(futures: Sequence[Future[Any]]) -> None:
    """Wait for every future that was not cancelled (their errors are not raised: one is being already)."""
    for f in futures:
        if not f.cancelled():
            f.exception()


def commit_shard(shard: StreamedShard) -> None:
    """Move a finished shard into place (one step of its own, as ``write_shard`` is)."""
    shard.commit()


#: Sites read at module boundaries, in the order a block computes them (nnsight reads them in that order).
BOUNDARY_SITES = ("resid_pre", "q", "k", "attn_out", "resid_mid", "mlp_post", "mlp_out", "resid_post")


def extract_remote(
    model: Any,
    tokens: TokenBatch | Tensor | Sequence[str],
    sites: str | Sequence[str] = ("resid_post",),
    layers: int | Sequence[int] | None = None,
    *,
    remote: bool | str = True,
    batch_size: int = 8,
    store_dtype: str | torch.dtype = torch.float32,
    out: str | os.PathLike[str] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> ActivationStore:
    """Extract a model no local machine holds through nnsight's remote execution (NDIF) into a local store.

    ``model`` is an nnsight ``TransformersModel`` (or the older ``LanguageModel``):
    ``TransformersModel("meta-llama/Llama-3.1-405B", task="text-generation")`` reads only the config
    and tokenizer (weights stay on the meta device). Each batch runs as one
    ``model.trace(..., remote=remote)``: ``True`` sends it to NDIF (needs ``NDIF_API_KEY``), a URL
    to another host, ``"local"`` runs the same serialised request in this process (nnsight's dry
    run), ``False`` a plain local trace. Sites are those at module boundaries: embed, pos_embed,
    resid_pre, q, k, attn_out, resid_mid, mlp_post, mlp_out, resid_post; sites inside attention
    (rot_q, rot_k, attn_scores, pattern, z) need posprobe's attention function, which a remote
    server does not run. The store, shards and resume behave as ``extract``'s.
    """
    from posprobe.models.hf import HFModel

    wrapper = HFModel(model._module, model.tokenizer, source="nnsight")
    batch = as_token_batch(wrapper, tokens)
    keys = resolve_sites(sites, layers, wrapper.info.n_layers)
    plan = _boundary_plan(wrapper, keys)
    store_dtype = resolve_dtype(store_dtype)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    wrapper.prepare_inputs(batch.tokens[:1], batch.attention_mask[:1], batch.position_ids[:1])  # fail fast on n_ctx

    def capture(start: int, stop: int) -> dict[SiteKey, Tensor]:
        rows = slice(start, stop)
        kwargs = wrapper.forward_kwargs(batch.tokens[rows], batch.attention_mask[rows], batch.position_ids[rows])
        inputs = {name: kwargs.pop(name) for name in ("input_ids", "attention_mask")}
        saved: dict[str, Any] = {}
        with model.trace(inputs, remote=remote, **kwargs):
            for name, path, attr in plan:  # plain Python over strings: this block is what the server runs
                envoy = model
                for part in path.split("."):
                    envoy = envoy[int(part)] if part.isdigit() else getattr(envoy, part)
                saved[name] = getattr(envoy, attr).save()
        return {key: _canonical(saved[key.name], how, wrapper.info.d_head) for key, how in _hows(wrapper, keys).items()}

    return _write_run(
        wrapper.info, batch, keys, capture, batch_size, store_dtype, wrapper.dtype, out, resume, overwrite, progress
    )


def _hows(model: HFModel, keys: list[SiteKey]) -> dict[SiteKey, str]:
    return {key: model.site_path(key)[1] for key in keys}


def _boundary_plan(model: HFModel, keys: list[SiteKey]) -> list[tuple[str, str, str]]:
    """(key name, module path, ``input``/``output``) for every key, in the order the forward reaches them."""
    supported = ("embed", "pos_embed", *BOUNDARY_SITES)
    for key in keys:
        model.check_site(key.site)
        if key.site not in supported:
            raise ValueError(
                f"site {key.site!r} lies inside attention and needs posprobe's attention function, which a remote "
                f"trace cannot run; extract_remote supports: {', '.join(supported)}"
            )
    order = sorted(keys, key=lambda k: (k.layer is not None, k.layer or 0, supported.index(k.site)))
    plan = []
    for key in order:
        path, how = model.site_path(key)
        plan.append((key.name, path, "input" if how == "in" else "output"))
    return plan


def _canonical(value: Any, how: str, d_head: int) -> Tensor:
    """A saved module input/output in the site's canonical shape (``posprobe.sites``)."""
    if isinstance(value, tuple):
        value = value[0]
    if how == "heads":
        b, s, _ = value.shape
        return value.reshape(b, s, -1, d_head)
    if how == "bhsd":
        return value.transpose(1, 2)
    return value


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


def _to_host(acts: dict[SiteKey, Tensor], dtype: torch.dtype, start: int, name: str) -> dict[SiteKey, Tensor]:
    """Check ``acts`` for NaN/inf where they live and copy them to host memory in ``dtype``.

    GPU tensors go to pinned buffers with non-blocking copies, all queued before one wait, so
    the copies of one batch overlap each other and the finiteness reductions run on the GPU.
    Host tensors are taken out of ``acts`` as they are converted, so a view (rot_q) stops holding
    its base tensor alive once its contiguous copy exists.
    """
    flags = {k: nonfinite_flag(k.site, v) for k, v in acts.items()}
    host: dict[SiteKey, Tensor] = {}
    storages: set[int] = set()
    for key in list(acts):
        if acts[key].device.type == "cuda":
            buf = torch.empty(acts[key].shape, dtype=dtype, pin_memory=True)
            buf.copy_(acts[key], non_blocking=True)
            host[key] = buf
            continue
        x = acts.pop(key)
        # no copy when the dtype matches: captured tensors are fresh outputs that the forward never modifies
        # afterwards (``run(capture=...)`` relies on that too); but one tensor seen at two sites (resid_post.L is
        # resid_pre.L+1) is copied, as a shard may not hold two tensors sharing memory
        y = x.to(dtype=dtype).contiguous()
        if y.untyped_storage().data_ptr() in storages:
            y = y.clone()
        storages.add(y.untyped_storage().data_ptr())
        host[key] = y
    for cuda_device in {x.device for x in acts.values() if x.device.type == "cuda"}:
        torch.cuda.current_stream(cuda_device).synchronize()
    for key, flag in flags.items():
        if bool(flag):
            _raise_nonfinite(key, acts.get(key, host[key]), start, name)
    return host


def _raise_nonfinite(key: SiteKey, x: Tensor, start: int, name: str) -> None:
    raise_nonfinite(key.site, key.layer, x, start=start, where=f"of {name} (nothing was written for this batch)")


def versions() -> dict[str, str]:
    """The versions a run records (a store's manifest, a report, the CLI's settings.json)."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import transformers

    import posprobe

    try:
        plotly = version("plotly")
    except PackageNotFoundError:  # figures are optional for a store
        plotly = "not installed"
    return {
        "posprobe": posprobe.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "plotly": plotly,
        "python": platform.python_version(),
    }
