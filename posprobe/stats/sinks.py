"""Attention sinks as the literature measures them: the share of heads whose mean attention on token k exceeds ε.

Gu et al., "When attention sink emerges in language models: an empirical view" (ICLR 2025). For head h
of layer l, α^{l,h}_k = (1/(T − k)) Σ_{t ≥ k} A^{l,h}[t, k] is the mean attention that the queries able
to see token k put on it, and Sink^ε_k is the share of heads, over all layers, whose α_k exceeds ε
(ε = 0.3), in percent. Tokens are 0-indexed here: our k = 0 (the first token) is the paper's k = 1.
The paper measures natural text, uniformly random tokens and one token repeated, T = 64;
``attention_sinks`` measures each with and without a prepended BOS, streamed (no attention map is
stored: ``Source.stream`` hands the weights a block of queries at a time, and only float64 sums per
layer, head and k are kept).

posprobe's own sink rule (``HeadRoleRules.sink`` in ``posprobe.stats.attention``) is another measure:
a head is a sink when ≥ 50 % of its attention, averaged over queries without position 0, lands on the
first token. Gu's α_0 keeps the query at position 0 (it can see only itself) and ε = 0.3 is lower.

Beside the rate, two diagnostics:

- massive activations (Sun, Chen, Kolter & Liu 2024, "Massive activations in large language models"):
  per layer, the first token's residual norm (``resid_post``) ÷ the median norm of the other tokens of
  its sequence, averaged over sequences;
- token or position: every input is run again with its first token (the BOS, or the first text token
  without one) moved behind ``first_k`` identical filler tokens — newlines, as in Xiao et al. 2023
  ("Efficient streaming language models with attention sinks"; the first plain token id where a newline
  is not one plain token). Identical tokens at the start of a causal model have identical residual
  streams (each sees only copies of itself), so a sink that stays at the start is shared among the
  fillers: the test compares α on the moved token (now at position ``first_k``) with α on the filler
  block (positions 0 … first_k − 1, summed), both over the queries t ≥ ``first_k``, which see them all.
  A sink head (α_0 > ε in the plain run) *follows the token* when α on the moved token exceeds ε and
  the fillers' α, *stays at the start* when the fillers' α exceeds ε and is at least the token's, and
  has *dissolved* otherwise. α on position 0 alone is reported beside them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from posprobe.data import TokenBatch, as_token_batch, text_windows
from posprobe.models.base import PositionModel
from posprobe.results import Result, RunInfo
from posprobe.stats.attention import capped_batch, pattern_layers, query_block_of
from posprobe.stats.streaming import Batch, Source, as_model, as_source

if TYPE_CHECKING:
    import plotly.graph_objects as go

#: The built-in input kinds (Gu et al. 2025): real text, uniformly random plain tokens, one token repeated.
INPUT_KINDS = ("natural", "random", "repeated")
#: The input kind of the ``tokens`` a caller gives.
GIVEN = "given"
#: What a sink head does when its first token is moved behind fillers (see the module docstring).
MOVED_OUTCOMES = ("follows_token", "stays_at_start", "dissolved")


@dataclass(frozen=True)
class AttentionSinks(Result):
    """Gu et al.'s attention-sink rates, massive activations and the moved-token test (``attention_sinks``).

    Token k is 0-indexed (``k`` column); ``paper_k`` = k + 1 is Gu et al.'s index (their Sink_1 is our k = 0).
    ``table``: one row per (input, bos, layer, head, k): alpha (mean attention on position k over the
    n_queries queries that can see it), is_sink (alpha > ε). ``summary``: per (input, bos, k) the
    sink_rate (percent of heads over every measured layer), n_sink_heads, n_heads (heads with a finite
    alpha). ``by_layer``: the same per layer. ``massive``: per (input, bos, layer) the first token's
    residual norm ÷ the median norm of the others (ratio_mean and ratio_median over sequences),
    first_norm, median_norm, n_sequences. ``moved``: per (input, bos, layer) the sink heads of the plain
    run (α_0 > ε) and how many follow the moved token, stay at the start (on the fillers) or dissolve,
    their shares (NaN without sink heads), and their mean alpha on the moved token, on the fillers
    (summed) and on position 0 (see the module docstring).
    ``info``: the run record (``params``: epsilon, first_k, inputs, bos, filler, query_block).
    Figure kinds: ``"rate"`` (Sink^ε_k per layer), ``"massive"``, ``"moved"``.
    """

    FIGURES: ClassVar[Mapping[str, str]] = {
        "rate": "_rate_figure",
        "massive": "_massive_figure",
        "moved": "_moved_figure",
    }
    TABLES: ClassVar[Sequence[str]] = ("summary", "by_layer", "massive", "moved")

    table: pd.DataFrame
    summary: pd.DataFrame
    by_layer: pd.DataFrame
    massive: pd.DataFrame
    moved: pd.DataFrame
    info: RunInfo

    epsilon = property(lambda self: self.info.params["epsilon"])

    def sink_rate(self, input: str, bos: bool, k: int = 0) -> float:
        """Sink^ε_k in percent for one input kind with or without BOS (NaN when it was not measured)."""
        rows = self.summary[(self.summary["input"] == input) & (self.summary["bos"] == bos) & (self.summary["k"] == k)]
        return float(rows["sink_rate"].iloc[0]) if len(rows) else float("nan")

    def _rate_figure(self, k: int = 0) -> go.Figure:
        """Sink^ε_k per layer, one line per input kind and BOS choice."""
        from posprobe.plots.sinks import sink_rate_by_layer

        title = f"Attention sinks of {self.info.model}: heads with α_{k} > {self.epsilon} (Gu et al. 2025)"
        return sink_rate_by_layer(self.by_layer, k=k, title=title)

    def _massive_figure(self) -> go.Figure:
        """The first token's residual norm ÷ the median token's, per layer (log scale)."""
        from posprobe.plots.sinks import massive_activation_ratio

        return massive_activation_ratio(self.massive, title=f"Massive activations of {self.info.model}")

    def _moved_figure(self) -> go.Figure:
        """Share of sink heads whose sink follows the moved first token, per layer."""
        from posprobe.plots.sinks import moved_sink_shares

        shift = self.info.params["first_k"]
        title = f"{self.info.model}: first token moved to position {shift} — does the sink follow it?"
        return moved_sink_shares(self.moved, title=title)


def attention_sinks(
    source: Any,
    tokens: Any = None,
    *,
    inputs: Sequence[str] = INPUT_KINDS,
    n: int = 32,
    seq_len: int = 64,
    epsilon: float = 0.3,
    first_k: int = 4,
    bos: bool | str = "both",
    layers: int | Sequence[int] | None = None,
    batch_size: int = 8,
    seed: int = 0,
    query_block: int | str | None = "auto",
    progress: bool = False,
) -> AttentionSinks:
    """Measure Sink^ε_k (Gu et al. 2025): the percent of heads whose mean attention on token k exceeds ε.

    ``source``: a model (anything ``load_model`` accepts). ``inputs``: built-in kinds of ``INPUT_KINDS``
    (``n`` sequences of ``seq_len`` tokens, seeded by ``seed``; see ``sink_tokens``); ``tokens`` (a
    TokenBatch, ids [n s] or texts), when given, is one more kind, ``"given"``, measured as it is.
    ``bos``: True, False or ``"both"``: run each built-in kind with and without a prepended BOS (the
    same tokens after it; a model without a BOS token runs without). ``first_k``: tokens k = 0 …
    first_k − 1 are measured (0-indexed: k = 0 is the paper's Sink_1), and the first token is moved
    behind first_k fillers for the token-or-position test. ``query_block``: as in ``attention_stats``.
    """
    _check_settings(inputs, n, seq_len, epsilon, first_k, bos, tokens, batch_size)
    block = query_block_of(query_block, from_model=True)
    model = as_model(source)
    runs, notes = _runs(model, tokens, inputs, n, seq_len, bos, seed)
    first = as_source(model, runs[0][1])
    reading = _Reading(pattern_layers(first, layers), first_k, batch_size, block, progress)
    fillers = _fillers(model)
    measured = [_measure(model, kind, batch, fillers, reading) for kind, batch in runs]
    params = {
        "epsilon": epsilon,
        "first_k": first_k,
        "inputs": list(dict.fromkeys(kind for kind, _ in runs)),
        "bos": bos,
        "n": n,
        "filler": fillers[0],
        "filler_token": _token_string(model, fillers[0]),
        "query_block": block,
    }
    info = _run_info(first, runs, reading.layers, seed, (*notes, *_causal_notes(model)), params)
    return _result(measured, epsilon, info)


def _run_info(
    first: Source,
    runs: list[tuple[str, TokenBatch]],
    layers: list[int],
    seed: int,
    notes: tuple[str, ...],
    params: dict[str, Any],
) -> RunInfo:
    """The run record over every run: sequences and tokens summed, prepend_bos None where runs differ."""
    return first.run_info(
        "attention_sinks",
        site="pattern",
        layers=layers,
        n_sequences=sum(len(batch) for _, batch in runs),
        seq_len=max(batch.shape[1] for _, batch in runs),
        n_tokens=sum(int(batch.attention_mask.sum()) for _, batch in runs),
        seed=seed,
        prepend_bos=None if len({batch.prepend_bos for _, batch in runs}) > 1 else runs[0][1].prepend_bos,
        notes=notes,
        params=params,
    )


def _check_settings(
    inputs: Sequence[str],
    n: int,
    seq_len: int,
    epsilon: float,
    first_k: int,
    bos: bool | str,
    tokens: Any,
    batch_size: int,
) -> None:
    """Refuse bad settings before a model is loaded, naming the value and what is accepted."""
    if isinstance(inputs, str):
        raise ValueError(f"inputs is a sequence of input kinds, got the string {inputs!r}; e.g. inputs=({inputs!r},)")
    unknown = [kind for kind in inputs if kind not in INPUT_KINDS]
    if unknown:
        raise ValueError(f"unknown input kind(s) {unknown}; known kinds: {', '.join(INPUT_KINDS)} (tokens= for yours)")
    if not inputs and tokens is None:
        raise ValueError("no input to measure: give inputs (of natural, random, repeated) or tokens")
    if isinstance(epsilon, bool) or not isinstance(epsilon, int | float) or not 0.0 < epsilon < 1.0:
        raise ValueError(f"epsilon must lie in (0, 1) (Gu et al. use 0.3), got {epsilon!r}")
    for name, value in (("n", n), ("seq_len", seq_len), ("first_k", first_k), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if first_k >= seq_len:
        raise ValueError(
            f"first_k={first_k} must be below seq_len={seq_len}: the first token is moved behind first_k fillers "
            "and the tokens k < first_k are measured"
        )
    if not (isinstance(bos, bool) or bos == "both"):
        raise ValueError(f"bos must be True, False or 'both', got {bos!r}")


def _causal_notes(model: PositionModel) -> tuple[str, ...]:
    if model.info.causal:
        return ()
    return (
        f"{model.info.name} attends bidirectionally: every query sees token k, so alpha averages every query "
        "(Gu et al.'s t ≥ k assumes causal attention) and the first token is not a sink by construction",
    )


def _token_string(model: PositionModel, token_id: int) -> str:
    tokenizer = getattr(model, "tokenizer", None)
    return str(tokenizer.convert_ids_to_tokens([token_id])[0]) if tokenizer is not None else str(token_id)


# -- inputs -----------------------------------------------------------------------------------------------------


def plain_token_ids(model: PositionModel) -> Tensor:
    """Every token id a random or repeated input may use: the tokenizer's ids below the model's vocabulary,
    without special tokens (``all_special_ids`` and added tokens marked special: BOS, EOS, PAD, Gemma's
    ``<unused…>``, BERT's ``[CLS]`` …), sorted."""
    tokenizer = model.tokenizer
    size = min(model.info.d_vocab, len(tokenizer))
    special = set(getattr(tokenizer, "all_special_ids", None) or [])
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    special |= {int(i) for i, token in added.items() if getattr(token, "special", False)}
    keep = torch.ones(size, dtype=torch.bool)
    keep[[i for i in special if 0 <= i < size]] = False
    if not keep.any():
        raise ValueError(f"{model.info.name}'s tokenizer has no plain (non-special) token ids")
    return torch.nonzero(keep).squeeze(1)


def sink_tokens(
    model: PositionModel, kind: str, *, n: int = 32, seq_len: int = 64, seed: int = 0, prepend_bos: bool = False
) -> TokenBatch:
    """The ``n`` × ``seq_len`` tokens of one input kind of Gu et al. 2025, seeded.

    ``"natural"``: windows of held-out State of the Union text (``posprobe.data.text_windows``);
    ``"random"``: token ids drawn uniformly from ``plain_token_ids`` (no special tokens); ``"repeated"``:
    one plain id per sequence, drawn uniformly, repeated ``seq_len`` times (``posprobe.data.repeated_tokens``
    is another input: a random block repeated twice, for induction heads). With ``prepend_bos`` the BOS
    takes position 0 and the same tokens follow, cut to ``seq_len``.
    """
    if kind not in INPUT_KINDS:
        raise ValueError(f"unknown input kind {kind!r}; known kinds: {', '.join(INPUT_KINDS)}")
    if kind == "natural":
        base = text_windows(model, n=n, seq_len=seq_len, seed=seed, prepend_bos=False)
    else:
        plain = plain_token_ids(model)
        gen = torch.Generator().manual_seed(seed)
        shape = (n, seq_len) if kind == "random" else (n, 1)
        ids = plain[torch.randint(len(plain), shape, generator=gen)].expand(n, seq_len).contiguous()
        base = _batch(model, ids, False, kind, {"seed": seed})
    return _with_bos(model, base) if prepend_bos else base


def _batch(model: PositionModel, ids: Tensor, prepend_bos: bool, source: str, meta: dict[str, Any]) -> TokenBatch:
    strs = [model.tokenizer.convert_ids_to_tokens(row.tolist()) for row in ids]
    return TokenBatch(ids, torch.ones_like(ids), prepend_bos, source, strs, meta)


def _with_bos(model: PositionModel, base: TokenBatch) -> TokenBatch:
    """``base`` with the model's BOS at position 0 and its tokens shifted right by one (the last one dropped)."""
    bos = model.info.bos_token_id
    if bos is None:
        raise ValueError(f"bos=True but {model.info.name} has no BOS token; use bos=False")
    ids = torch.cat([torch.full((len(base), 1), bos, dtype=torch.long), base.tokens[:, :-1]], dim=1)
    return _batch(model, ids, True, base.source, dict(base.meta))


def _runs(
    model: PositionModel, tokens: Any, inputs: Sequence[str], n: int, seq_len: int, bos: bool | str, seed: int
) -> tuple[list[tuple[str, TokenBatch]], list[str]]:
    """(input kind, tokens) of every run, BOS variants next to each other, and notes on what was left out."""
    notes = []
    variants = [True, False] if bos == "both" else [bool(bos)]
    if bos == "both" and model.info.bos_token_id is None:
        variants = [False]
        notes.append(f"{model.info.name} has no BOS token: every input runs without one")
    if inputs and seq_len > model.info.n_ctx and not model.extrapolates:
        raise ValueError(f"seq_len {seq_len} exceeds {model.info.name}'s context of {model.info.n_ctx} tokens")
    runs = []
    for kind in dict.fromkeys(inputs):
        base = sink_tokens(model, kind, n=n, seq_len=seq_len, seed=seed)
        runs += [(kind, _with_bos(model, base) if with_bos else base) for with_bos in variants]
    if tokens is not None:
        runs.append((GIVEN, as_token_batch(model, tokens)))
    return runs, notes


def _fillers(model: PositionModel) -> tuple[int, int]:
    """The filler token (the newline when it is one plain token, else the first plain id) and a second one,
    used in the rows whose first token is the filler itself."""
    plain = plain_token_ids(model)
    newline = model.tokenizer("\n", add_special_tokens=False)["input_ids"]
    first = int(newline[0]) if len(newline) == 1 and bool((plain == newline[0]).any()) else int(plain[0])
    second = next(int(i) for i in plain[:2] if int(i) != first) if len(plain) > 1 else first
    return first, second


def moved_first_token(batch: TokenBatch, shift: int, fillers: tuple[int, int]) -> TokenBatch:
    """Each row with ``shift`` filler tokens before its real tokens (cut to the same length and mask), so that its
    first token sits at position ``shift``; a row whose first token is the filler gets the second filler."""
    ids = batch.tokens.clone()
    mask = batch.attention_mask.bool()
    for row in range(len(ids)):
        real = batch.tokens[row, mask[row]]
        filler = fillers[1] if int(real[0]) == fillers[0] else fillers[0]
        padded = torch.cat([torch.full((shift,), filler, dtype=real.dtype), real])[: len(real)]
        ids[row, mask[row]] = padded
    meta = {**batch.meta, "moved_by": shift}
    return TokenBatch(ids, batch.attention_mask.clone(), batch.prepend_bos, f"{batch.source} moved", None, meta)


# -- measuring ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Reading:
    """How every run is read: layers, tokens k < first_k, batch size, query blocks, progress bars."""

    layers: list[int]
    first_k: int
    batch_size: int
    query_block: int | None
    progress: bool


@dataclass(frozen=True)
class _Measured:
    """One run's sums: α [layers heads first_k] with its query counts [layers first_k], the massive-activation
    statistics, and α on positions 0 … first_k [layers heads first_k + 1] of the moved run (fillers, then the
    moved token)."""

    kind: str
    bos: bool
    alpha: np.ndarray
    n_queries: np.ndarray
    massive: pd.DataFrame
    moved: np.ndarray


def _measure(
    model: PositionModel, kind: str, batch: TokenBatch, fillers: tuple[int, int], reading: _Reading
) -> _Measured:
    """Stream one input kind three times: attention (α_k), residual norms, attention with the first token moved."""
    source = as_source(model, batch)
    size = capped_batch(source, reading.batch_size, reading.query_block)
    sums = SinkSums(range(reading.first_k), model.info.causal, source.sliding_window)
    _stream_pattern(source, reading, sums, size, f"sinks: {kind}")
    norms = _MassiveSums()
    source.stream("resid_post", reading.layers, norms.add, reading.batch_size, reading.progress, f"norms: {kind}")
    moved = as_source(model, moved_first_token(batch, reading.first_k, fillers))
    shift = reading.first_k
    moved_sums = SinkSums(range(shift + 1), model.info.causal, source.sliding_window, min_query=shift)
    _stream_pattern(moved, reading, moved_sums, size, f"moved: {kind}")
    alpha = np.stack([sums.alpha(layer) for layer in reading.layers])
    counts = np.stack([sums.counts[layer].numpy() for layer in reading.layers])
    moved_alpha = np.stack([moved_sums.alpha(layer) for layer in reading.layers])
    return _Measured(kind, batch.prepend_bos, alpha, counts, norms.table(reading.layers), moved_alpha)


def _stream_pattern(source: Source, reading: _Reading, sums: SinkSums, size: int, desc: str) -> None:
    """Fold every layer's attention into ``sums``; a model whose weights never reach them is said as such."""
    try:
        source.stream(
            "pattern", reading.layers, sums.add, size, reading.progress, desc, query_block=reading.query_block
        )
    except RuntimeError as err:
        if any(layer not in sums.counts for layer in reading.layers):
            raise ValueError(f"{source.name} does not expose attention weights (site 'pattern'): {err}") from err
        raise


class SinkSums:
    """Running float64 sums per layer: Σ_t A[t, k] [heads K] over the queries t that can see key position k, and
    the number of those queries [K], for the key positions ``keys``.

    A query can see position k when it is a real token at position t ≥ k (causal models; every real query in
    bidirectional ones), t ≥ ``min_query``, and |t − k| < the layer's sliding window, if any. Token k means
    *position* k (``batch.position_ids``), wherever padding puts it. ``alpha(layer)`` = sums ÷ counts.
    """

    def __init__(
        self,
        keys: Sequence[int],
        causal: bool,
        window: Callable[[int], int | None] = lambda layer: None,
        min_query: int = 0,
    ):
        self.keys = torch.as_tensor(list(keys), dtype=torch.long)
        self.causal = causal
        self.window = window
        self.min_query = min_query
        self.sums: dict[int, Tensor] = {}
        self.counts: dict[int, Tensor] = {}

    def add(self, layer: int, weights: Tensor, batch: Batch, q0: int = 0, entropy: Tensor | None = None) -> None:
        """Fold ``weights`` [b heads s seen] of queries ``q0 : q0 + s`` and keys ``0 : seen`` (whole maps: q0 = 0,
        seen = t) into the sums of ``layer``; reads them during the call only."""
        b, n_heads, s, seen = weights.shape
        visible, cols = self._visible(batch, q0, s, self.window(layer))
        visible &= (cols < seen)[:, None, :]  # a key a block left out has weight 0 for every query of the block
        index = cols.clamp(max=seen - 1).to(weights.device)[:, None, None, :].expand(b, n_heads, s, len(self.keys))
        picked = weights.gather(-1, index).double() * visible.to(weights.device)[:, None].double()
        if layer not in self.sums:
            self.sums[layer] = torch.zeros(n_heads, len(self.keys), dtype=torch.float64)
            self.counts[layer] = torch.zeros(len(self.keys), dtype=torch.float64)
        self.sums[layer] += picked.sum(dim=(0, 2)).cpu()
        self.counts[layer] += visible.double().sum(dim=(0, 1)).cpu()

    def _visible(self, batch: Batch, q0: int, s: int, window: int | None) -> tuple[Tensor, Tensor]:
        """[b s K] whether each query of the block can see each key position, and [b K] the column holding it."""
        real = batch.attention_mask.bool().cpu()
        pos = batch.position_ids.long().cpu().masked_fill(~real, -1)
        keys = self.keys
        holds = real[:, :, None] & (pos[:, :, None] == keys)  # [b t K]
        cols = holds.long().argmax(1)  # [b K]; 0 where the row has no such position (masked below)
        q_real, q_pos = real[:, q0 : q0 + s, None], pos[:, q0 : q0 + s, None]  # [b s 1]
        visible = q_real & holds.any(1)[:, None, :] & (q_pos >= self.min_query)
        if self.causal:
            visible &= q_pos >= keys
        if window:
            visible &= (q_pos - keys).abs() < window
        return visible, cols

    def alpha(self, layer: int) -> np.ndarray:
        """α [heads K]: the mean attention on each key position over the queries that see it (NaN: none did)."""
        counts = self.counts[layer]
        return (self.sums[layer] / counts.where(counts > 0, torch.nan)).numpy()


class _MassiveSums:
    """Per layer and sequence: the residual norm of the token at position 0 and the median norm of the others."""

    def __init__(self) -> None:
        self.first: dict[int, list[float]] = {}
        self.median: dict[int, list[float]] = {}

    def add(self, layer: int, resid: Tensor, batch: Batch) -> None:
        """Fold ``resid_post`` [b s d_model] of one batch."""
        norms = resid.float().norm(dim=-1).cpu().double()
        real = batch.attention_mask.bool().cpu()
        pos = batch.position_ids.long().cpu()
        for row in range(len(norms)):
            first = norms[row][real[row] & (pos[row] == 0)]
            others = norms[row][real[row] & (pos[row] > 0)]
            self.first.setdefault(layer, []).append(float(first[0]) if len(first) else np.nan)
            self.median.setdefault(layer, []).append(float(np.median(others.numpy())) if len(others) else np.nan)

    def table(self, layers: Sequence[int]) -> pd.DataFrame:
        rows = []
        for layer in layers:
            first, median = np.asarray(self.first[layer]), np.asarray(self.median[layer])
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = first / median
            finite = ratio[np.isfinite(ratio)]
            rows.append(
                {
                    "layer": layer,
                    "ratio_mean": float(finite.mean()) if len(finite) else np.nan,
                    "ratio_median": float(np.median(finite)) if len(finite) else np.nan,
                    "first_norm": float(np.nanmean(first)) if np.isfinite(first).any() else np.nan,
                    "median_norm": float(np.nanmean(median)) if np.isfinite(median).any() else np.nan,
                    "n_sequences": len(finite),
                }
            )
        return pd.DataFrame(rows)


# -- tables -------------------------------------------------------------------------------------------------------


def _result(measured: list[_Measured], epsilon: float, info: RunInfo) -> AttentionSinks:
    table = pd.concat([_alpha_table(m, info.layers, epsilon) for m in measured], ignore_index=True)
    keys = ["input", "bos", "k", "paper_k"]
    summary = _rates(table, keys)
    by_layer = _rates(table, ["input", "bos", "layer", "k", "paper_k"])
    massive = pd.concat([_labelled(m, m.massive) for m in measured], ignore_index=True)
    moved = pd.concat([_moved_table(m, info.layers, epsilon) for m in measured], ignore_index=True)
    return AttentionSinks(table, summary, by_layer, massive, moved, info)


def _labelled(m: _Measured, frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame.copy()
    frame.insert(0, "input", m.kind)
    frame.insert(1, "bos", m.bos)
    return frame


def _alpha_table(m: _Measured, layers: Sequence[int | None], epsilon: float) -> pd.DataFrame:
    _, n_heads, n_k = m.alpha.shape
    layer, head, k = np.meshgrid(np.asarray(layers), np.arange(n_heads), np.arange(n_k), indexing="ij")
    queries = np.broadcast_to(m.n_queries[:, None, :], m.alpha.shape)
    frame = pd.DataFrame(
        {
            "layer": layer.ravel(),
            "head": head.ravel(),
            "k": k.ravel(),
            "paper_k": k.ravel() + 1,
            "alpha": m.alpha.ravel(),
            "n_queries": queries.ravel().astype(np.int64),
        }
    )
    frame["is_sink"] = frame["alpha"] > epsilon  # NaN compares False
    return _labelled(m, frame)


def _rates(table: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Sink^ε in percent per group of ``keys``: heads with alpha > ε among the heads with a finite alpha."""
    counted = table.assign(finite=table["alpha"].notna())
    grouped = counted.groupby(keys, sort=False)
    rates = grouped.agg(n_sink_heads=("is_sink", "sum"), n_heads=("finite", "sum")).reset_index()
    heads = rates["n_heads"].where(rates["n_heads"] > 0)
    rates.insert(len(keys), "sink_rate", 100.0 * rates["n_sink_heads"] / heads)
    return rates.astype({"n_sink_heads": np.int64, "n_heads": np.int64})


def _moved_table(m: _Measured, layers: Sequence[int | None], epsilon: float) -> pd.DataFrame:
    """Per layer: what the sink heads of the plain run (α_0 > ε) do when the first token is moved."""
    rows = []
    for i, layer in enumerate(layers):
        sinks = m.alpha[i, :, 0] > epsilon
        at_pos0, at_token = m.moved[i, sinks, 0], m.moved[i, sinks, -1]
        at_fillers = m.moved[i, sinks, :-1].sum(-1)
        outcome = classify_moved(at_token, at_fillers, epsilon)
        counts = {name: int((outcome == name).sum()) for name in MOVED_OUTCOMES}
        n_sinks = int(sinks.sum())
        shares = {f"share_{name}": counts[name] / n_sinks if n_sinks else np.nan for name in MOVED_OUTCOMES}
        rows.append(
            {
                "layer": layer,
                "n_sink_heads": n_sinks,
                **{f"n_{name}": value for name, value in counts.items()},
                **shares,
                "alpha_token": float(at_token.mean()) if n_sinks else np.nan,
                "alpha_fillers": float(at_fillers.mean()) if n_sinks else np.nan,
                "alpha_position0": float(at_pos0.mean()) if n_sinks else np.nan,
            }
        )
    return _labelled(m, pd.DataFrame(rows))


def classify_moved(alpha_token: np.ndarray, alpha_fillers: np.ndarray, epsilon: float) -> np.ndarray:
    """Per sink head: ``follows_token`` (α on the moved token > ε and > α on the fillers), ``stays_at_start``
    (α on the fillers > ε and ≥ the token's) or ``dissolved`` (neither above ε); a NaN α counts as no attention."""
    token = np.asarray(alpha_token, dtype=float)
    start = np.asarray(alpha_fillers, dtype=float)
    with np.errstate(invalid="ignore"):
        follows = (token > epsilon) & ~(start >= token)
        stays = (start > epsilon) & ~follows
    return np.where(follows, MOVED_OUTCOMES[0], np.where(stays, MOVED_OUTCOMES[1], MOVED_OUTCOMES[2]))


__all__ = [
    "GIVEN",
    "INPUT_KINDS",
    "MOVED_OUTCOMES",
    "AttentionSinks",
    "SinkSums",
    "attention_sinks",
    "classify_moved",
    "moved_first_token",
    "plain_token_ids",
    "sink_tokens",
]
