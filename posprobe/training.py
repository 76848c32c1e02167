"""Train a zoo model: next-token loss on BOS-prepended windows of real text, one document per window.

``train(ZooConfig(pe="rope"), "runs/rope", steps=400)`` writes a resumable checkpoint folder:
``model.safetensors`` + ``config.json`` (what ``posprobe.models.zoo.load_checkpoint`` reads),
``optimizer.pt`` (tensors only, ``torch.load(weights_only=True)``) and ``train_state.json``
(hyperparameters, loss curve, and the held-out evaluation beside a unigram baseline).
Batches are a pure function of (seed, step) and every CPU kernel used is deterministic, so CPU
training is reproducible bit for bit (any thread count) and a resumed run matches one trained
straight through; on CUDA it matched too where checked (H200), but cuBLAS promises less.

The data (``data=``): ``"sotu"``, the State of the Union train split (the zoo v1's, unchanged), or
``"mix"`` (zoo v2): windows of the sotu train split and of the CPython standard library's own source
(``posprobe.data.stdlib_ids``) in a fixed share, ``sotu_share`` of every batch's windows from sotu
(default ½). Why a fixed half rather than a share proportional to tokens: the zoo tokenizer, trained
on prose, spends one token per space of indentation (35 % of the stdlib's 5.4M tokens on
CPython 3.11), so a token-proportional share (⅓ sotu) would give code two thirds of the batches and
much of that to predictable whitespace; without the single-space tokens the stdlib's train split
(~3.3M) is near sotu's 2.6M, and a half keeps every batch half in the v1 domain, whose held-out
loss stays comparable. A mix run evaluates each source's held-out windows separately.

``add_train_arguments`` / ``run_train`` are ``posprobe train``'s flags and body (``python -m
posprobe.training`` runs the same command); ``posprobe/zoo_checkpoints/README.md`` has the zoo's recipe.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from posprobe.devices import resolve_device
from posprobe.models.zoo import CONFIG_FILE, STATE_FILE, WEIGHTS_FILE
from posprobe.models.zoo_net import ZooConfig, ZooTransformer
from posprobe.models.zoo_tokenizer import TOKENIZER_PATH, load_zoo_tokenizer
from posprobe.progress import tqdm
from posprobe.results import Result, RunInfo, deprecated_alias

if TYPE_CHECKING:
    import plotly.graph_objects as go

log = logging.getLogger(__name__)

OPTIMIZER_FILE = "optimizer.pt"
#: hyperparameters a resumed run must share with the checkpoint
RESUME_KEYS = (
    "steps", "batch_size", "lr", "seed", "warmup", "min_lr_ratio", "weight_decay", "grad_clip", "data", "sotu_share",
    "stdlib_python",
)  # fmt: skip
#: what a checkpoint written before a key existed trained with
RESUME_DEFAULTS: Mapping[str, Any] = {"data": "sotu"}
#: the training data choices and the sources each draws windows from
DATA_SOURCES: Mapping[str, tuple[str, ...]] = {"sotu": ("sotu",), "mix": ("sotu", "stdlib")}
#: the share of a mix batch's windows taken from sotu (the rest from the stdlib); the module docstring says why
MIX_SOTU_SHARE = 0.5


def corpus_tokens(split: str, source: str = "sotu") -> tuple[np.ndarray, ...]:
    """Zoo-tokenizer ids of every document of ``source`` (``posprobe.data.CORPORA``) in ``split``, one int32 array each.

    Cached in ``$XDG_CACHE_HOME/posprobe`` under the tokenizer's hash (tokenising takes seconds); the
    stdlib's cache is also keyed by the interpreter (``stdlib_version``), whose files it read.
    """
    from posprobe.data import CORPORA

    if source not in CORPORA:
        raise ValueError(f"unknown source {source!r}; known sources: {', '.join(CORPORA)}")
    return _corpus_tokens(split, source)


def _corpus_cache(split: str, source: str) -> tuple[Path, str | None]:
    """The cache file of (split, source) and the interpreter it records (None for sotu)."""
    from posprobe.data import stdlib_version

    digest = hashlib.sha256(TOKENIZER_PATH.read_bytes()).hexdigest()[:16]
    python = stdlib_version() if source == "stdlib" else None
    tag = split if python is None else f"stdlib-{re.sub(r'[^A-Za-z0-9.]+', '-', python).lower()}_{split}"
    folder = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "posprobe"
    return folder / f"zoo_{digest}_{tag}.npz", python


@functools.lru_cache(maxsize=4)
def _corpus_tokens(split: str, source: str) -> tuple[np.ndarray, ...]:
    from posprobe.data import CORPORA

    list_ids, read_texts = CORPORA[source]
    ids = list_ids(split)
    cache, python = _corpus_cache(split, source)
    if cache.exists():
        with np.load(cache) as saved:
            same_python = python is None or str(saved["python"]) == python
            if same_python and list(saved["ids"]) == ids:
                return tuple(np.split(saved["flat"], saved["ends"][:-1]))
    encodings = load_zoo_tokenizer().backend_tokenizer.encode_batch(read_texts(split), add_special_tokens=False)
    docs = tuple(np.asarray(e.ids, dtype=np.int32) for e in encodings)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".{os.getpid()}.tmp.npz")
    arrays: dict[str, Any] = {
        "flat": np.concatenate(docs),
        "ends": np.cumsum([len(d) for d in docs]),
        "ids": np.array(ids),
    }
    if python is not None:
        arrays["python"] = np.array(python)
    np.savez(tmp, **arrays)
    os.replace(tmp, cache)
    return docs


def corpus_summary(source: str) -> dict[str, Any]:
    """Files and zoo-tokenizer tokens of ``source`` per split (and, for the stdlib, the interpreter read)."""
    from posprobe.data import stdlib_version

    summary: dict[str, Any] = {
        "files": {split: len(corpus_tokens(split, source)) for split in ("train", "heldout")},
        "tokens": {split: int(sum(len(d) for d in corpus_tokens(split, source))) for split in ("train", "heldout")},
    }
    if source == "stdlib":
        summary["python"] = stdlib_version()
    return summary


class WindowSampler:
    """Random windows ``[BOS] + text[s : s + seq_len - 1]`` inside single documents; batch = f(seed, step)."""

    def __init__(self, docs: Sequence[np.ndarray], seq_len: int, bos_id: int):
        body = seq_len - 1
        docs = [d for d in docs if len(d) >= body]
        if not docs:
            raise ValueError(f"no document has the {body} tokens a window of {seq_len} needs")
        self.flat = np.concatenate(docs)
        offsets = np.cumsum([0] + [len(d) for d in docs[:-1]])
        self.starts = np.concatenate([o + np.arange(len(d) - body + 1) for o, d in zip(offsets, docs, strict=True)])
        self.body, self.bos_id = body, bos_id

    def rows(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """``n`` window bodies [n seq_len-1], their starts drawn uniformly from every in-document offset."""
        starts = self.starts[rng.integers(0, len(self.starts), n)]
        return self.flat[starts[:, None] + np.arange(self.body)]

    def batch(self, batch_size: int, seed: int, step: int) -> torch.Tensor:
        """Token ids [batch_size seq_len], the same for the same (seed, step)."""
        return _with_bos(self.rows(np.random.default_rng([seed, step]), batch_size), self.bos_id)


class MixSampler:
    """Windows of several sources in fixed shares; batch = f(seed, step), each window inside one document.

    Step t takes ``⌊(t+1)·B·c⌋ − ⌊t·B·c⌋`` windows below each cumulative share c, so over any T
    steps every source gets its share of the T·B windows to within one window. Rows come source by
    source, in the order of ``samplers``.
    """

    def __init__(self, samplers: Mapping[str, WindowSampler], shares: Mapping[str, float]):
        if list(samplers) != list(shares) or not math.isclose(sum(shares.values()), 1.0):
            raise ValueError(f"need one share per source, summing to 1; got {dict(shares)} for {list(samplers)}")
        if any(share <= 0 for share in shares.values()):
            raise ValueError(f"every share must be positive, got {dict(shares)}")
        self.samplers = dict(samplers)
        cumulative = np.cumsum([Fraction(s).limit_denominator(1_000_000) for s in shares.values()])
        self.cumulative = [*cumulative[:-1], Fraction(1)]
        self.bos_id = next(iter(samplers.values())).bos_id

    def counts(self, batch_size: int, step: int) -> dict[str, int]:
        """Windows each source gives to the batch of ``step``."""
        edges = [[math.floor(t * batch_size * c) for c in self.cumulative] for t in (step, step + 1)]
        below = [after - before for before, after in zip(*edges, strict=True)]
        return {name: n - prev for name, n, prev in zip(self.samplers, below, [0, *below[:-1]], strict=True)}

    def batch(self, batch_size: int, seed: int, step: int) -> torch.Tensor:
        """Token ids [batch_size seq_len]: each source's windows in turn, the same for the same (seed, step)."""
        rng = np.random.default_rng([seed, step])
        counts = self.counts(batch_size, step)
        rows = [sampler.rows(rng, counts[name]) for name, sampler in self.samplers.items()]
        return _with_bos(np.concatenate(rows), self.bos_id)


def _with_bos(rows: np.ndarray, bos_id: int) -> torch.Tensor:
    bos = np.full((len(rows), 1), bos_id, dtype=rows.dtype)
    return torch.from_numpy(np.concatenate([bos, rows], axis=1).astype(np.int64))


def training_sampler(
    data: str, seq_len: int, bos_id: int, sotu_share: float = MIX_SOTU_SHARE
) -> WindowSampler | MixSampler:
    """The batches of ``data`` (``"sotu"`` or ``"mix"``) from the train splits."""
    if data not in DATA_SOURCES:
        raise ValueError(f"unknown data {data!r}; known: {', '.join(DATA_SOURCES)}")
    if data == "sotu":
        return WindowSampler(corpus_tokens("train"), seq_len, bos_id)
    samplers = {source: WindowSampler(corpus_tokens("train", source), seq_len, bos_id) for source in DATA_SOURCES[data]}
    return MixSampler(samplers, {"sotu": sotu_share, "stdlib": 1.0 - sotu_share})


def heldout_windows(n: int, seq_len: int, bos_id: int, source: str = "sotu") -> torch.Tensor:
    """The fixed evaluation set [n seq_len]: BOS + non-overlapping windows from each held-out document in turn."""
    body = seq_len - 1
    per_doc = [[d[s : s + body] for s in range(0, len(d) - body + 1, body)] for d in corpus_tokens("heldout", source)]
    rows: list[np.ndarray] = []
    for i in range(max(len(w) for w in per_doc)):
        rows.extend(w[i] for w in per_doc if i < len(w))
    if len(rows) < n:
        raise ValueError(f"the {source} held-out split has only {len(rows)} windows of {seq_len} tokens; asked for {n}")
    body_ids = torch.from_numpy(np.stack(rows[:n]).astype(np.int64))
    return torch.cat([torch.full((n, 1), bos_id, dtype=torch.long), body_ids], dim=1)


def unigram_logprobs(d_vocab: int, source: str = "sotu") -> torch.Tensor:
    """Add-one-smoothed unigram log-probabilities [d_vocab] estimated on ``source``'s train split."""
    counts = np.bincount(np.concatenate(corpus_tokens("train", source)), minlength=d_vocab).astype(np.float64) + 1.0
    return torch.from_numpy(np.log(counts / counts.sum()))


@torch.no_grad()
def evaluate(
    net: ZooTransformer, windows: torch.Tensor, batch_size: int = 16, source: str = "sotu"
) -> dict[str, float]:
    """Mean next-token loss (nats) of ``net`` on ``windows`` [n seq] and of ``source``'s unigram baseline on them."""
    was_training = net.training
    net.eval()
    device = net.W_E.device
    total, count = 0.0, 0
    for chunk in windows.split(batch_size):
        chunk = chunk.to(device)
        logits = net(chunk)
        total += F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), chunk[:, 1:].flatten(), reduction="sum").item()
        count += chunk[:, 1:].numel()
    net.train(was_training)
    unigram = -unigram_logprobs(net.cfg.d_vocab, source)[windows[:, 1:].cpu()].mean().item()
    return {"heldout_loss": total / count, "unigram_loss": unigram, "n_windows": len(windows), "n_tokens": count}


def heldout_evaluation(net: ZooTransformer, windows: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """``evaluate`` on each source's held-out windows; sotu's numbers at the top (the v1 zoo's record).

    With more than one source the record also holds ``by_source``: source → ``evaluate``'s dict.
    """
    by_source = {source: evaluate(net, w, source=source) for source, w in windows.items()}
    if list(by_source) == ["sotu"]:
        return by_source["sotu"]
    return {**by_source["sotu"], "by_source": by_source}


def lr_at(step: int, steps: int, lr: float, warmup: int, min_lr_ratio: float) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay to ``min_lr_ratio · lr`` at ``steps``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


@dataclass(frozen=True)
class TrainResult(Result):
    """What ``train`` returns: the training loss per step and the run's record.

    ``table``: step, loss (training loss of that step's batch). ``state``: the ``train_state.json``
    dict (config, hyperparameters, step reached, loss history, ``eval`` once ``steps`` are done:
    held-out loss and the unigram baseline in nats per token, sotu's; a mix run adds ``by_source``;
    ``eval_history`` with ``eval_every``: one {step, <source>: held-out loss} per evaluation; a mix
    run's ``sources``: files and tokens per source). ``path``: the checkpoint folder.
    ``info``: the run record (model ``zoo:<path>``, seed; ``params``: hyperparameters and config).
    Figure kinds: ``"loss"``.
    """

    FIGURES: ClassVar[Mapping[str, str]] = {"loss": "_loss_figure"}

    table: pd.DataFrame
    info: RunInfo
    state: Mapping[str, Any]
    path: Path

    @property
    def step(self) -> int:
        return int(self.state["step"])

    @property
    def eval(self) -> dict[str, Any] | None:
        """Held-out loss and unigram baseline, once the run reached ``steps`` (else None)."""
        return self.state.get("eval")

    def _loss_figure(self) -> go.Figure:
        from posprobe.plots.training import loss_curve

        return loss_curve(self.table, self.eval, title=f"Training loss of {self.info.model}")

    def __getitem__(self, key: str) -> Any:
        """Deprecated: ``train`` returned the state dict; read ``result.state[key]``."""
        deprecated_alias("train(...)[key]", "train(...).state[key]")
        return self.state[key]

    def __contains__(self, key: str) -> bool:
        deprecated_alias("key in train(...)", "key in train(...).state")
        return key in self.state


def train(
    config: ZooConfig,
    out_dir: str | Path,
    steps: int = 400,
    batch_size: int = 16,
    lr: float = 3e-3,
    seed: int = 0,
    device: str = "auto",
    resume: bool = False,
    *,
    warmup: int | None = None,
    min_lr_ratio: float = 0.1,
    weight_decay: float = 0.1,
    grad_clip: float = 1.0,
    checkpoint_every: int = 100,
    stop_at: int | None = None,
    eval_windows: int = 64,
    eval_every: int | None = None,
    data: str = "sotu",
    sotu_share: float = MIX_SOTU_SHARE,
    progress: bool = True,
) -> TrainResult:
    """Train ``config`` for ``steps`` AdamW steps of ``batch_size`` windows of ``config.n_ctx`` tokens.

    Checkpoints go to ``out_dir`` every ``checkpoint_every`` steps and at the end; ``resume=True``
    continues from the last one (refusing a checkpoint of another config or other
    hyperparameters). ``seed`` seeds the initialisation (it replaces ``config.seed``) and the
    batch order. ``stop_at`` ends this call early at that step, leaving a resumable
    checkpoint. ``device="auto"`` picks CUDA when present. ``data``: ``"sotu"`` or ``"mix"``
    (``sotu_share`` of each batch from sotu, the rest from the stdlib; see the module docstring).
    ``eval_every``: also measure the held-out loss of each source every that many steps, into
    ``state["eval_history"]`` (training itself is unchanged). Returns a ``TrainResult`` whose
    ``state`` is the ``train_state.json`` dict; ``state["eval"]`` holds the held-out loss and the
    unigram baseline (nats per token).
    """
    out = Path(out_dir)
    config = config.replace(seed=seed)
    hparams = _hyperparameters(steps, batch_size, lr, seed, warmup, min_lr_ratio, weight_decay, grad_clip, data,
                               sotu_share)  # fmt: skip
    if eval_every is not None and (isinstance(eval_every, bool) or not isinstance(eval_every, int) or eval_every < 1):
        raise ValueError(f"eval_every must be a positive int or None, got {eval_every!r}")
    dev = resolve_device(device)
    tokenizer = load_zoo_tokenizer()
    if len(tokenizer) != config.d_vocab:
        raise ValueError(f"config.d_vocab={config.d_vocab} but the zoo tokenizer has {len(tokenizer)} ids")
    net, opt = _network(config, dev, lr, weight_decay)
    state = _start_state(out, config, hparams, net, opt, dev, resume)
    sampler = training_sampler(data, config.n_ctx, tokenizer.bos_token_id, sotu_share)
    run = _Run(net, opt, sampler, state, hparams, out, dev, checkpoint_every, eval_every, eval_windows, progress)
    _run_steps(run, steps if stop_at is None else min(stop_at, steps))
    state["device"] = str(dev)
    if state["step"] == steps:
        state["eval"] = scores = heldout_evaluation(net, run.heldout)
        log.info("zoo:%s held-out loss %.3f (unigram %.3f)", config.pe, scores["heldout_loss"], scores["unigram_loss"])
    _save(out, net, opt, state)
    return _result(out, state, hparams)


def _hyperparameters(
    steps: int, batch_size: int, lr: float, seed: int, warmup: int | None, min_lr_ratio: float,
    weight_decay: float, grad_clip: float, data: str, sotu_share: float,
) -> dict[str, Any]:  # fmt: skip
    """The run's hyperparameters as ``train_state.json`` records them (a mix run's share and interpreter too)."""
    from posprobe.data import stdlib_version

    if steps <= 0 or batch_size <= 0 or lr <= 0:
        raise ValueError(f"steps, batch_size and lr must be positive; got {steps}, {batch_size}, {lr}")
    if data not in DATA_SOURCES:
        raise ValueError(f"unknown data {data!r}; known: {', '.join(DATA_SOURCES)}")
    hparams: dict[str, Any] = {
        "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
        "warmup": warmup if warmup is not None else max(1, min(100, steps // 10)),
        "min_lr_ratio": min_lr_ratio, "weight_decay": weight_decay, "grad_clip": grad_clip, "data": data,
    }  # fmt: skip
    if data == "mix":
        if not 0.0 < sotu_share < 1.0:
            raise ValueError(f"sotu_share must lie strictly between 0 and 1 for a mix, got {sotu_share!r}")
        hparams.update(sotu_share=sotu_share, stdlib_python=stdlib_version())
    return hparams


def _network(config: ZooConfig, dev: torch.device, lr: float, weight_decay: float):
    """The network on ``dev`` and its AdamW (weight decay on matrices only)."""
    net = ZooTransformer(config).to(dev)
    decay = [p for n, p in net.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in net.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.95),
    )  # fmt: skip
    return net, opt


def _start_state(
    out: Path,
    config: ZooConfig,
    hparams: dict[str, Any],
    net: ZooTransformer,
    opt: torch.optim.Optimizer,
    dev: torch.device,
    resume: bool,
) -> dict[str, Any]:
    """A fresh state, or the checkpoint's when resuming; refuses to train over a checkpoint otherwise."""
    state: dict[str, Any] = {"config": config.to_dict(), **hparams, "step": 0, "loss_history": [], "elapsed_s": 0.0}
    if resume:
        state = _restore(out, config, hparams, net, opt, dev)
    elif (out / STATE_FILE).exists():
        raise FileExistsError(
            f"{out} already holds a checkpoint; pass resume=True to continue it or pick another out_dir"
        )
    elif hparams["data"] != "sotu":  # what a mix was made of: files and tokens per source
        state["sources"] = {source: corpus_summary(source) for source in DATA_SOURCES[hparams["data"]]}
    out.mkdir(parents=True, exist_ok=True)
    return state


@dataclass
class _Run:
    """One ``train`` call's loop: the network, its optimiser and batches, the state it advances, where it saves."""

    net: ZooTransformer
    opt: torch.optim.Optimizer
    sampler: WindowSampler | MixSampler
    state: dict[str, Any]
    hparams: dict[str, Any]
    out: Path
    dev: torch.device
    checkpoint_every: int
    eval_every: int | None
    eval_windows: int
    progress: bool

    @functools.cached_property
    def heldout(self) -> dict[str, torch.Tensor]:
        """Each source's fixed held-out windows, on the run's device (built once, when first needed)."""
        n_ctx, bos = self.net.cfg.n_ctx, self.sampler.bos_id
        sources = DATA_SOURCES[self.hparams["data"]]
        return {source: heldout_windows(self.eval_windows, n_ctx, bos, source).to(self.dev) for source in sources}

    def record_heldout(self) -> None:
        """Append {step, <source>: held-out loss} to ``state["eval_history"]``."""
        losses = {source: evaluate(self.net, w, source=source)["heldout_loss"] for source, w in self.heldout.items()}
        self.state.setdefault("eval_history", []).append({"step": self.state["step"], **losses})


def _run_steps(run: _Run, end: int) -> None:
    """Steps ``state["step"]`` to ``end``, appending to the loss history and checkpointing on the way."""
    state, hparams, net = run.state, run.hparams, run.net
    steps, lr, batch_size, seed = hparams["steps"], hparams["lr"], hparams["batch_size"], hparams["seed"]
    if run.eval_every is not None:
        state["eval_every"] = run.eval_every
    net.train()
    started = time.perf_counter() - state["elapsed_s"]
    bar = tqdm(
        range(state["step"], end),
        initial=state["step"],
        total=steps,
        desc=f"zoo:{net.cfg.pe}",
        disable=not run.progress,
    )
    for step in bar:
        step_lr = lr_at(step, steps, lr, hparams["warmup"], hparams["min_lr_ratio"])
        loss = train_step(net, run.opt, run.sampler.batch(batch_size, seed, step).to(run.dev), step_lr,
                          hparams["grad_clip"])  # fmt: skip
        state["loss_history"].append([step, round(loss, 5)])
        bar.set_postfix(loss=f"{loss:.3f}")
        state["step"] = step + 1
        if run.eval_every is not None and state["step"] % run.eval_every == 0:
            run.record_heldout()
        if state["step"] % run.checkpoint_every == 0 and state["step"] < end:
            state["elapsed_s"] = time.perf_counter() - started
            _save(run.out, net, run.opt, state)
    state["elapsed_s"] = time.perf_counter() - started


def train_step(
    net: ZooTransformer, opt: torch.optim.Optimizer, tokens: torch.Tensor, lr: float, grad_clip: float
) -> float:
    """One AdamW step on the next-token loss of ``tokens`` [b s] at learning rate ``lr``; returns the loss."""
    for group in opt.param_groups:
        group["lr"] = lr
    logits = net(tokens)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
    opt.step()
    return loss.item()


def step_seconds(
    config: ZooConfig, batch_size: int = 16, steps: int = 3, data: str = "sotu", device: str = "cpu"
) -> float:
    """Median wall seconds of one training step of ``config`` (a throwaway network, after one warm-up step)."""
    dev = resolve_device(device)
    net, opt = _network(config, dev, 1e-3, 0.1)
    sampler = training_sampler(data, config.n_ctx, load_zoo_tokenizer().bos_token_id)
    times = []
    for step in range(steps + 1):
        tokens = sampler.batch(batch_size, config.seed, step).to(dev)
        started = time.perf_counter()
        train_step(net, opt, tokens, 1e-3, 1.0)
        times.append(time.perf_counter() - started)
    return float(np.median(times[1:]))


def _result(out: Path, state: dict[str, Any], hparams: dict[str, Any]) -> TrainResult:
    history = pd.DataFrame(state["loss_history"], columns=["step", "loss"])
    info = RunInfo(
        "train",
        f"zoo:{out}",
        n_sequences=hparams["batch_size"] * state["step"],
        seq_len=state["config"]["n_ctx"],
        seed=hparams["seed"],
        causal=True,
        prepend_bos=True,
        params={**hparams, "config": state["config"], "step": state["step"], "device": state.get("device")},
    )
    return TrainResult(history, info, state, out)


def _save(out: Path, net: ZooTransformer, opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Write every file under a temporary name, then move it into place (no torn checkpoint)."""
    from safetensors.torch import save_file

    weights = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
    writes = {
        WEIGHTS_FILE: lambda p: save_file(weights, str(p), metadata={"format": "pt"}),
        OPTIMIZER_FILE: lambda p: torch.save(opt.state_dict(), p),
        CONFIG_FILE: lambda p: p.write_text(json.dumps(state["config"], indent=2, sort_keys=True) + "\n"),
        STATE_FILE: lambda p: p.write_text(json.dumps(state, indent=1) + "\n"),
    }
    for name, write in writes.items():
        tmp = out / f".{name}.tmp"
        write(tmp)
        os.replace(tmp, out / name)


def _restore(
    out: Path,
    config: ZooConfig,
    hparams: dict[str, Any],
    net: ZooTransformer,
    opt: torch.optim.Optimizer,
    dev: torch.device,
) -> dict[str, Any]:
    from safetensors.torch import load_file

    missing = [f for f in (CONFIG_FILE, WEIGHTS_FILE, OPTIMIZER_FILE, STATE_FILE) if not (out / f).exists()]
    if missing:
        raise FileNotFoundError(f"cannot resume from {out}: missing {', '.join(missing)}")
    saved = ZooConfig.from_json(out / CONFIG_FILE).to_dict()
    state = json.loads((out / STATE_FILE).read_text())
    diff = [
        f"{k}: checkpoint {saved[k]!r} vs requested {v!r}" for k, v in config.to_dict().items() if saved.get(k) != v
    ]
    diff += [
        f"{k}: checkpoint {saved_value!r} vs requested {hparams.get(k)!r}"
        for k in RESUME_KEYS
        if (saved_value := state.get(k, RESUME_DEFAULTS.get(k))) != hparams.get(k)
    ]
    if diff:
        raise ValueError(f"the checkpoint in {out} belongs to another run; differences: " + "; ".join(diff))
    net.load_state_dict({k: v.to(dev) for k, v in load_file(out / WEIGHTS_FILE).items()})
    opt.load_state_dict(torch.load(out / OPTIMIZER_FILE, map_location=dev, weights_only=True))
    return state


def add_train_arguments(p: argparse.ArgumentParser, positive: Any, non_negative: Any, fraction: Any) -> None:
    """The flags of ``posprobe train`` (``positive`` / ``non_negative`` / ``fraction``: the CLI's argparse types)."""
    from posprobe.models.base import POSITION_SCHEMES

    defaults = ZooConfig()
    p.add_argument("--pe", default=defaults.pe, choices=POSITION_SCHEMES, help="position scheme")
    p.add_argument("--out", required=True, help="checkpoint folder (zoo:<this folder> loads it)")
    p.add_argument("--steps", type=positive(int), default=400, help="AdamW steps")
    p.add_argument("--batch-size", type=positive(int), default=16, help="windows per step")
    p.add_argument("--lr", type=positive(float), default=3e-3, help="peak learning rate")
    p.add_argument("--warmup", type=non_negative(int), default=None, help="warmup steps (default: steps / 10, ≤ 100)")
    p.add_argument("--checkpoint-every", type=positive(int), default=100, help="steps between checkpoints")
    p.add_argument("--eval-windows", type=positive(int), default=64, help="held-out windows per source for a loss")
    p.add_argument("--eval-every", type=positive(int), default=None, help="held-out loss every N steps (a curve)")
    p.add_argument("--data", default="sotu", choices=list(DATA_SOURCES), help="sotu (zoo v1) or mix (sotu + stdlib)")
    p.add_argument(
        "--sotu-share", type=fraction, default=MIX_SOTU_SHARE, help="with --data mix: share of windows from sotu"
    )
    p.add_argument("--resume", action="store_true", help="continue the checkpoint in --out")
    helps = {
        "d_model": "residual width", "n_layers": "blocks", "n_heads": "attention heads", "d_head": "head width",
        "d_mlp": "MLP width", "n_ctx": "context (training window)", "rope_base": "RoPE base θ",
    }  # fmt: skip
    for field, help_ in helps.items():
        value = getattr(defaults, field)
        p.add_argument(f"--{field.replace('_', '-')}", type=positive(type(value)), default=value, help=help_)
    p.add_argument("--rotary-fraction", type=fraction, default=defaults.rotary_fraction, help="share of rotated dims")
    p.add_argument(
        "--p-rope", type=fraction, default=defaults.p_rope, help="p-RoPE: share of lowest frequencies unrotated"
    )
    p.add_argument("--untied", action="store_true", help="separate unembedding matrix")


def run_train(args: argparse.Namespace) -> TrainResult:
    """Train from parsed ``posprobe train`` flags; returns ``train``'s result."""
    config = ZooConfig(
        d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads, d_head=args.d_head, d_mlp=args.d_mlp,
        n_ctx=args.n_ctx, pe=args.pe, rope_base=args.rope_base, rotary_fraction=args.rotary_fraction,
        p_rope=args.p_rope, tie_embeddings=not args.untied, seed=args.seed,
    )  # fmt: skip
    return train(
        config, args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
        device=args.device, resume=args.resume, warmup=args.warmup, checkpoint_every=args.checkpoint_every,
        eval_windows=args.eval_windows, eval_every=args.eval_every, data=args.data, sotu_share=args.sotu_share,
    )  # fmt: skip


def main_train(argv: Sequence[str] | None = None) -> int:
    """``python -m posprobe.training …``: the same command, flags and errors as ``posprobe train …``."""
    from posprobe.cli import main

    return main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main_train())
