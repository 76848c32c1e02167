"""The input layer of every analysis: models, stores, tokens, layers and batches, resolved one way.

``as_model`` coerces anything ``load_model`` accepts; ``as_source`` wraps a model with its
tokens, or a store; ``Source.resolve_layers`` resolves a site's layers (negative layers count from
the end, one error message for a layer out of range); ``batches`` is the one loop over rows of
tokens (``Source.stream`` and every analysis that runs a model go through it); ``Source.run_info``
fills the run record every result carries (``posprobe.results.RunInfo``).

Feed activations batch by batch to per-layer observers, from a model run or from a store.

The attention diagnostics (``attention.py``, ``variance.py``, ``similarity.py``) never keep
more than one batch of one layer in memory: with a model, each requested site gets a hook
that calls the observer and returns None (the forward goes on unchanged, and an attention
map is freed as soon as its layer is done); with an ``ActivationStore``, shards are read one
site and layer at a time.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import numpy as np
from torch import Tensor

from posprobe.data import TokenBatch, as_token_batch
from posprobe.distributed import Ranks, current_ranks
from posprobe.finite import check_finite, nonfinite_flag, raise_nonfinite
from posprobe.models.base import PositionModel
from posprobe.progress import tqdm
from posprobe.results import RunInfo, deprecated_alias
from posprobe.sites import (
    LAYERLESS_SITES,
    LayerOutOfRange,
    SiteKey,
    as_layer_list,
    check_layer_range,
    check_site,
    resolve_stored_layers,
)
from posprobe.store import MANIFEST, ActivationStore


@dataclass(frozen=True)
class Batch:
    """Rows ``start:start+b`` of a run; mask and position ids [b s] live on the activations' device."""

    start: int
    attention_mask: Tensor
    position_ids: Tensor


#: ``observer(layer, activation, batch)``: the activation is in its canonical shape (``posprobe.sites``).
Observer = Callable[[int | None, Tensor, Batch], None]
#: The layer type a stream hands its observer: int for the layers of a site that has them, None for a layerless one.
_Layer = TypeVar("_Layer", bound=int | None)


@dataclass(frozen=True)
class Source:
    """What an analysis reads: a model with its tokens, or a store; plus the facts analyses report."""

    model: PositionModel | None
    store: ActivationStore | None
    tokens: TokenBatch | None
    info: dict[str, Any]
    prepend_bos: bool
    #: the ranks that share the reading of a store under torch.distributed (each reads its own shards)
    ranks: Ranks = field(default_factory=Ranks)

    @property
    def name(self) -> str:
        return str(self.info.get("name", "model"))

    @property
    def causal(self) -> bool:
        return bool(self.info.get("causal", True))

    @property
    def position_ids(self) -> Tensor:
        """Position ids of every row [n s] (0 on padding)."""
        if self.tokens is not None:
            return self.tokens.position_ids
        assert self.store is not None  # a Source holds tokens or a store
        return self.store.position_ids

    @property
    def attention_mask(self) -> Tensor:
        if self.tokens is not None:
            return self.tokens.attention_mask
        assert self.store is not None  # a Source holds tokens or a store
        return self.store.attention_mask

    @property
    def n_positions(self) -> int:
        """One more than the largest position id of a real token."""
        pos = self.position_ids[self.attention_mask.bool()]
        return int(pos.max()) + 1

    @property
    def n_tokens(self) -> int:
        """Real (non-padding) tokens of the run."""
        return int(self.attention_mask.bool().sum())

    def run_info(self, analysis: str, **fields: Any) -> RunInfo:
        """The run record of ``analysis`` on this source: model, tokens, causal and prepend_bos filled in."""
        mask = self.attention_mask
        facts: dict[str, Any] = dict(
            model=self.name,
            n_sequences=int(mask.shape[0]),
            seq_len=int(mask.shape[1]),
            n_tokens=self.n_tokens,
            causal=self.causal,
            prepend_bos=self.prepend_bos,
        )
        facts.update(fields)
        if "layers" in facts:
            facts["layers"] = tuple(facts["layers"])
        return RunInfo(analysis, **facts)

    def reduce(self, tensors: Iterable[Tensor]) -> None:
        """Sum statistics over the ranks that read a store together (nothing to do otherwise), in place."""
        if self.store is not None:
            self.ranks.all_reduce(tensors)

    def sliding_window(self, layer: int | None) -> int | None:
        windows = self.info.get("sliding_windows") or ()
        return windows[layer] if layer is not None and layer < len(windows) else None

    def resolve_layers(self, site: str, layers: int | Sequence[int] | None) -> list[int | None]:
        """The layers of ``site`` to read: all stored / all of the model's when ``layers`` is None.

        Negative layers count from the end; a layer out of range is said before anything else.
        """
        check_site(site)
        if site in LAYERLESS_SITES:
            return [None]
        if self.model is not None:
            n = self.model.info.n_layers
            wanted = as_layer_list(layers)
            resolved = list(range(n)) if wanted is None else check_layer_range(wanted, n)
            self.model.check_site(site)
            return list[int | None](sorted(set(resolved)))
        assert self.store is not None  # a Source without a model reads a store
        found = resolve_stored_layers(site, layers, self.store.layers(site), self.info.get("n_layers"))
        return sorted(found, key=lambda layer: -1 if layer is None else layer)

    def stream(
        self,
        site: str,
        layers: Sequence[_Layer],
        observe: Callable[[_Layer, Tensor, Batch], None],
        batch_size: int,
        progress: bool = False,
        desc: str = "",
        query_block: int | None = None,
    ) -> None:
        """Call ``observe(layer, activation, batch)`` for every batch and layer of ``site``.

        ``query_block`` (site ``pattern``): ``observe(layer, weights, batch, q0, entropy)`` receives the map a
        block of queries at a time, [b heads query_block seen] for queries ``q0 : q0 + query_block`` and the
        keys they may see, with each query's entropy [b heads query_block] (read it, do not keep it: the next
        block reuses the memory), where the model's attention runs through posprobe's attention function;
        whole maps (``q0`` 0, ``entropy`` None) elsewhere and from a store.
        """
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if query_block is not None and (site != "pattern" or not isinstance(query_block, int) or query_block < 1):
            raise ValueError(f"query_block is a positive int for site 'pattern', got {query_block!r} for {site!r}")
        if self.model is None:
            whole = observe if query_block is None else partial(_whole_map, observe)
            self._stream_store(site, layers, whole, progress, desc)
        else:
            self._stream_model(site, layers, observe, batch_size, progress, desc, query_block)

    def _stream_store(
        self,
        site: str,
        layers: Sequence[_Layer],
        observe: Callable[[_Layer, Tensor, Batch], None],
        progress: bool,
        desc: str,
    ) -> None:
        assert self.store is not None  # a Source without a model reads a store
        mine = (
            self.ranks.shards(len(self.store.shard_bounds()), f"the store {self.store.path}")
            if self.ranks.active
            else None
        )
        bar = tqdm(layers, desc=desc or f"read {site}", unit="layer", disable=not progress or not self.ranks.is_main)
        for layer in bar:
            for shard in self.store.iter_shards([SiteKey(site, layer)], indices=mine):
                act = shard.acts[SiteKey(site, layer)]
                batch = Batch(shard.start, shard.attention_mask.to(act.device), shard.position_ids.to(act.device))
                observe(layer, act, batch)

    def _stream_model(
        self,
        site: str,
        layers: Sequence[_Layer],
        observe: Callable[[_Layer, Tensor, Batch], None],
        batch_size: int,
        progress: bool,
        desc: str,
        query_block: int | None = None,
    ) -> None:
        model, tokens = self.model, self.tokens
        assert model is not None and tokens is not None  # a Source with a model holds its tokens
        last = max((x for x in layers if x is not None), default=None)
        for start, chunk in batches(tokens, batch_size, progress=progress, desc=desc or f"run {self.name}"):
            batch = Batch(start, chunk.attention_mask.to(model.device), chunk.position_ids.to(model.device))
            fired: set[int | None] = set()
            where = f"of {self.name}"
            hooks: dict[SiteKey, Any] = {
                SiteKey(site, layer): partial(_observe_once, observe, site, layer, batch, fired, where)
                for layer in layers
            }
            if query_block is not None:
                hooks = {key: _BlockObserver(hook, query_block) for key, hook in hooks.items()}
            model.run(
                chunk.tokens,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
                hooks=hooks,
                return_logits=False,
                stop_at_layer=last,
            )
            silent = [layer for layer in layers if layer not in fired]
            if silent:
                raise RuntimeError(
                    f"the {site!r} hook of layer(s) {silent} never fired: {self.name} does not expose this site "
                    "through its hooks (for 'pattern': its attention does not go through posprobe's attention "
                    "function, so its weights cannot be read). Use a model whose backend implements the site, "
                    "or a store that holds it"
                )


def _observe_once(
    observe: Callable[..., None],
    site: str,
    layer: _Layer,
    batch: Batch,
    fired: set[int | None],
    where: str,
    x: Tensor,
    q0: int | None = None,
    entropy: Tensor | None = None,
) -> None:
    fired.add(layer)
    # before the observer folds it into a statistic. A block's entropies are NaN/inf wherever its weights are
    # (or where a score overflowed to -inf): one value per query to read; the weights are counted only then
    if entropy is None:
        check_finite(site, layer, x, start=batch.start, where=where)
    elif bool(nonfinite_flag(site, entropy)):
        raise_nonfinite(site, layer, x, start=batch.start, where=where)
        raise_nonfinite(site, layer, entropy, start=batch.start, where=where)
    if q0 is None:
        observe(layer, x.detach(), batch)
    else:
        observe(layer, x.detach(), batch, q0, entropy)


@dataclass(frozen=True)
class _BlockObserver:
    """A ``pattern`` hook posprobe's attention function calls a block of queries at a time (``query_block``
    read by ``posprobe.models.hf.posprobe_attention``); other attention code calls it with the whole map."""

    observe: Callable[..., None]
    query_block: int

    def __call__(self, x: Tensor, q0: int = 0, entropy: Tensor | None = None) -> None:
        self.observe(x, q0, entropy)


def _whole_map(observe: Callable[..., None], layer: Any, x: Tensor, batch: Batch) -> None:
    observe(layer, x, batch, 0)


def batches(
    tokens: TokenBatch, batch_size: int, *, progress: bool = False, desc: str = ""
) -> Iterator[tuple[int, TokenBatch]]:
    """``(start, rows start:start+batch_size)`` over ``tokens``: the one loop over rows every analysis uses.

    ``progress`` shows a bar over the batches (``desc`` names it).
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    starts = range(0, len(tokens), batch_size)
    for start in tqdm(starts, desc=desc or "batches", unit="batch", disable=not progress):
        yield start, tokens[start : start + batch_size]


def as_model(model: Any, **load: Any) -> PositionModel:
    """A PositionModel as is; anything else ``load_model`` accepts (a name, a path, a transformers, nnsight
    or TransformerLens model) loaded or wrapped, on the device and dtype of its own weights when it has them."""
    if isinstance(model, PositionModel):
        return model
    from posprobe.models import load_model

    param = next(model.parameters(), None) if hasattr(model, "parameters") else None
    if param is not None:
        load = {"device": param.device, "dtype": param.dtype, **load}
    return load_model(model, **load)


def as_source(source: Any, tokens: Any = None) -> Source:
    """Wrap a model (with ``tokens``: a TokenBatch, an id tensor [n s] or texts) or a store (no tokens).

    ``source`` is an ActivationStore, a store's folder, or anything ``load_model`` accepts.
    """
    if isinstance(source, str | os.PathLike) and os.path.isfile(os.path.join(source, MANIFEST)):
        source = ActivationStore(source)
    if isinstance(source, ActivationStore):
        if tokens is not None:
            raise ValueError("a store already holds its tokens; pass tokens=None with a store")
        return Source(None, source, None, dict(source.model_info), source.prepend_bos, current_ranks("cpu"))
    if source is None or isinstance(source, (int, float, bool)):
        raise TypeError(
            f"expected a model (pp.load_model or anything it accepts) or an ActivationStore (pp.extract / "
            f"pp.open_store), got {type(source).__name__}"
        )
    model = as_model(source)
    if tokens is None:
        raise ValueError(f"running {model.info.name} needs tokens (a TokenBatch, an id tensor or texts)")
    batch = as_token_batch(model, tokens)
    return Source(model, None, batch, model.info.as_dict(), batch.prepend_bos)


#: default of a deprecated keyword: tells "not given" from any value
UNSET: Any = type("Unset", (), {"__repr__": lambda self: "UNSET"})()


def exclude_pos0_choice(
    exclude_pos0: bool | str,
    *,
    both: bool = False,
    old: str | None = None,
    old_value: Any = UNSET,
    invert: bool = False,
) -> bool | str:
    """Check ``exclude_pos0`` (True, False, or ``"both"`` where ``both``); ``old=old_value`` is the keyword it
    replaced (``invert`` where the old one said *include*), accepted for one release with a DeprecationWarning."""
    if old is not None and old_value is not UNSET:
        deprecated_alias(f"{old}=", "exclude_pos0=")
        exclude_pos0 = old_value if isinstance(old_value, str) else (not old_value if invert else old_value)
    allowed: tuple[bool | str, ...] = (True, False, "both") if both else (True, False)
    if isinstance(exclude_pos0, str):
        ok = both and exclude_pos0 == "both"
    else:
        ok = isinstance(exclude_pos0, bool | np.bool_)
    if not ok:
        raise ValueError(f"exclude_pos0 must be {' or '.join(map(repr, allowed))}, got {exclude_pos0!r}")
    return exclude_pos0 if isinstance(exclude_pos0, str) else bool(exclude_pos0)


def spearman_rows(x: Tensor, y: Tensor) -> Tensor:
    """Spearman correlation of each column pair of ``x`` and ``y`` [n k] over their n rows → [k] (no ties assumed)."""
    rx = x.argsort(0).argsort(0).double()
    ry = y.argsort(0).argsort(0).double()
    rx = rx - rx.mean(0)
    ry = ry - ry.mean(0)
    return (rx * ry).sum(0) / ((rx.square().sum(0) * ry.square().sum(0)).sqrt() + 1e-300)


def sem(values: Tensor) -> float:
    """Standard error of the mean of a 1-D tensor (NaN for fewer than two values)."""
    if values.numel() < 2:
        return float("nan")
    return float(values.double().std() / values.numel() ** 0.5)


__all__ = [
    "UNSET",
    "Batch",
    "LayerOutOfRange",
    "Observer",
    "Source",
    "as_model",
    "as_source",
    "batches",
    "exclude_pos0_choice",
    "sem",
    "spearman_rows",
]
