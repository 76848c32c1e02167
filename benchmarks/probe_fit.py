"""Benchmark: all-layer ridge position probes with grouped CV, posprobe's batched solve vs a scikit-learn loop.

Both sides get the same in-memory activations [L n_seq seq d], the same sequence folds and the
same alpha grid, with features standardised inside each fold. The baseline is what one writes
by hand: for each layer and each fold, ``make_pipeline(StandardScaler(), RidgeCV(alphas))``
(exact leave-one-out alpha choice). posprobe runs with exact leave-one-out like RidgeCV (its
default, ``posprobe_loo``: same R² to 1e-3 is the bar), with GCV (``posprobe_gcv``), each from
one eigendecomposition per layer and fold, and with its default controls (shuffled labels, token
identity) and with/without position 0. R² is pooled over the held-out folds.

Uses SmolLM2-135M residual streams (64 × 256 tokens of real text, 30 layers, d=576) when
``posprobe.load_model`` and ``posprobe.extract`` can provide them; otherwise, or with
``--synthetic``, synthetic activations of the same shape (``"synthetic": true`` in the JSON).

    python benchmarks/probe_fit.py [--synthetic] [--device cpu|cuda] [--n-seq 64] [--seq-len 256] [--out FILE]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from typing import Any

import numpy as np
import torch
from _common import default_threads, emit, envelope, synchronize
from sklearn.linear_model import RidgeCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from posprobe.stats.probe_estimators import DEFAULT_ALPHAS
from posprobe.stats.probes import probe_position

log = logging.getLogger("probe_fit")


def smollm2_acts(n_seq: int, seq_len: int) -> tuple[torch.Tensor, str]:
    """SmolLM2 resid_post at every layer on real text: [30 n_seq seq_len 576]."""
    import posprobe as pp
    from posprobe.extraction import extract

    model = pp.load_model("smollm2-135m")
    tokens = pp.data.text_windows(model, n=n_seq, seq_len=seq_len, seed=0)
    with tempfile.TemporaryDirectory(prefix="probe-fit-") as tmp:
        store = extract(model, tokens, sites=["resid_post"], out=tmp, progress=False)
        return store.stack("resid_post"), model.info.name


def synthetic_acts(n_layers: int, n_seq: int, seq_len: int, d: int, seed: int = 0) -> torch.Tensor:
    """Random features in which position is mixed with a strength that rises, then falls, over layers."""
    gen = torch.Generator().manual_seed(seed)
    pos = torch.arange(seq_len, dtype=torch.float32)
    freqs = 1000.0 ** (-torch.arange(8, dtype=torch.float32) / 8)
    code = torch.cat([torch.sin(pos[:, None] * freqs), torch.cos(pos[:, None] * freqs), pos[:, None] / seq_len], -1)
    acts = torch.randn(n_layers, n_seq, seq_len, d, generator=gen)
    for layer in range(n_layers):
        mix = torch.randn(code.shape[1], d, generator=gen) * np.sin(np.pi * (layer + 1) / (n_layers + 1))
        acts[layer] += code @ mix
    acts[..., 0] += 50.0  # a massive-activation dimension, as real residual streams have
    return acts


def sklearn_loop(acts: torch.Tensor, split: tuple[tuple[int, ...], ...]) -> np.ndarray:
    """Pooled held-out R² per layer from a per-layer, per-fold StandardScaler + RidgeCV loop."""
    L, n_seq, seq_len, d = acts.shape
    y = np.tile(np.arange(seq_len, dtype=np.float64), n_seq)
    seq = np.repeat(np.arange(n_seq), seq_len)
    r2 = np.empty(L)
    for layer in range(L):
        X = acts[layer].reshape(-1, d).numpy()
        pred = np.empty_like(y)
        for test_seqs in split:
            test = np.isin(seq, test_seqs)
            model = make_pipeline(StandardScaler(), RidgeCV(alphas=DEFAULT_ALPHAS)).fit(X[~test], y[~test])
            pred[test] = model.predict(X[test])
        r2[layer] = 1 - ((pred - y) ** 2).sum() / ((y - y.mean()) ** 2).sum()
    return r2


def _timed(fn, device: str) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--synthetic", action="store_true", help="skip SmolLM2 and use synthetic activations")
    parser.add_argument("--device", default="cpu", help="device for posprobe's solve (sklearn always runs on CPU)")
    parser.add_argument("--n-seq", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--layers", type=int, default=30, help="layers of the synthetic activations")
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    source, synthetic, why = "synthetic", True, "requested"
    if not args.synthetic:
        try:
            acts, source = smollm2_acts(args.n_seq, args.seq_len)
            synthetic, why = False, None
        except (ImportError, OSError, RuntimeError, ValueError) as err:  # no packaged model here: fall back
            why = f"{type(err).__name__}: {err}"
    if synthetic:
        acts = synthetic_acts(args.layers, args.n_seq, args.seq_len, 576)
    acts = acts.float().contiguous()
    L, n_seq, seq_len, d = acts.shape

    kwargs = {"controls": (), "exclude_pos0": False, "device": args.device}
    probe_position(acts[:2, :10], **kwargs)  # warm-up (library loading, kernels)
    loo, loo_s = _timed(lambda: probe_position(acts, alpha_selection="loo", **kwargs), args.device)
    gcv, gcv_s = _timed(lambda: probe_position(acts, alpha_selection="gcv", **kwargs), args.device)
    _, full_s = _timed(lambda: probe_position(acts, device=args.device), args.device)
    r2_sklearn, sklearn_s = _timed(lambda: sklearn_loop(acts, loo.split), "cpu")
    r2_loo = loo.table.sort_values("layer")["r2"].to_numpy()
    r2_gcv = gcv.table.sort_values("layer")["r2"].to_numpy()

    results = [
        {"method": "sklearn_ridgecv_loop", "seconds": round(sklearn_s, 3)},
        {"method": "posprobe_loo", "seconds": round(loo_s, 3), "max_r2_diff": float(np.abs(r2_loo - r2_sklearn).max())},
        {"method": "posprobe_gcv", "seconds": round(gcv_s, 3), "max_r2_diff": float(np.abs(r2_gcv - r2_sklearn).max())},
        {"method": "posprobe_default_with_controls", "seconds": round(full_s, 3)},
    ]
    ratios = {
        "speedup_loo": round(sklearn_s / loo_s, 2),
        "speedup_gcv": round(sklearn_s / gcv_s, 2),
        "max_r2_diff_loo": results[1]["max_r2_diff"],
    }
    config = {
        "source": source,
        "synthetic": synthetic,
        "synthetic_reason": why,
        "device": args.device,
        "n_tokens": n_seq * seq_len,
        "layers": L,
        "d": d,
        "n_splits": len(loo.split),
        "n_alphas": len(DEFAULT_ALPHAS),
        "r2_range": [round(float(r2_loo.min()), 4), round(float(r2_loo.max()), 4)],
    }
    emit(envelope("probe_fit", results, ratios, config=config), args.out)


if __name__ == "__main__":
    main()
