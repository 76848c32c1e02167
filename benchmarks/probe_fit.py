"""Benchmark: all-layer ridge position probes with grouped CV, posprobe's batched solve vs a scikit-learn loop.

Both sides get the same in-memory activations [L n_seq seq d], the same sequence folds and the
same alpha grid, with features standardised inside each fold. The baseline is what one writes
by hand: for each layer and each fold, ``make_pipeline(StandardScaler(), RidgeCV(alphas))``
(exact leave-one-out alpha choice). posprobe runs twice: its default GCV alpha choice
(``posprobe_s``, ``max_r2_diff``) and exact leave-one-out like RidgeCV (``posprobe_loo_s``,
``max_r2_diff_loo``), each from one eigendecomposition per layer and fold. R² is pooled over
the held-out folds.

Uses SmolLM2-135M residual streams (64 × 256 tokens of real text, 30 layers, d=576) when
``posprobe.load_model`` and ``posprobe.extract`` can provide them; otherwise, or with
``--synthetic``, synthetic activations of the same shape (``"synthetic": true`` in the JSON).

    python benchmarks/probe_fit.py [--synthetic] [--device cpu|cuda] [--n-seq 64] [--seq-len 256]
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import platform
import tempfile
import time

import numpy as np
import torch
from sklearn.linear_model import RidgeCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from posprobe.stats.probe_estimators import DEFAULT_ALPHAS
from posprobe.stats.probes import probe_position

log = logging.getLogger("probe_fit")


def smollm2_acts(n_seq: int, seq_len: int) -> tuple[torch.Tensor, str]:
    """SmolLM2 resid_post at every layer on real text: [30 n_seq seq_len 576]."""
    import posprobe as pp
    from posprobe.extract import extract

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--synthetic", action="store_true", help="skip SmolLM2 and use synthetic activations")
    parser.add_argument("--device", default="cpu", help="device for posprobe's solve (sklearn always runs on CPU)")
    parser.add_argument("--n-seq", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--layers", type=int, default=30, help="layers of the synthetic activations")
    args = parser.parse_args()

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

    kwargs = {"controls": (), "exclude_bos": False, "device": args.device}
    probe_position(acts[:2, :10], **kwargs)  # warm-up (library loading, kernels)
    t0 = time.perf_counter()
    result = probe_position(acts, **kwargs)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    posprobe_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    loo = probe_position(acts, alpha_selection="loo", **kwargs)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    loo_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    probe_position(acts, device=args.device)
    full_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    r2_sklearn = sklearn_loop(acts, result.split)
    sklearn_s = time.perf_counter() - t0
    r2_posprobe = result.table.sort_values("layer")["r2"].to_numpy()
    r2_loo = loo.table.sort_values("layer")["r2"].to_numpy()

    print(
        json.dumps(
            {
                "benchmark": "probe_fit",
                "machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
                f"{torch.get_num_threads()} torch threads"
                + (f", {torch.cuda.get_device_name()}" if args.device.startswith("cuda") else ""),
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "source": source,
                "synthetic": synthetic,
                "synthetic_reason": why,
                "device": args.device,
                "n_tokens": n_seq * seq_len,
                "layers": L,
                "d": d,
                "n_splits": len(result.split),
                "n_alphas": len(DEFAULT_ALPHAS),
                "posprobe_s": round(posprobe_s, 3),
                "posprobe_loo_s": round(loo_s, 3),
                "posprobe_with_controls_and_pos0_variants_s": round(full_s, 3),
                "sklearn_s": round(sklearn_s, 3),
                "speedup": round(sklearn_s / posprobe_s, 2),
                "speedup_loo": round(sklearn_s / loo_s, 2),
                "max_r2_diff": float(np.abs(r2_posprobe - r2_sklearn).max()),
                "max_r2_diff_loo": float(np.abs(r2_loo - r2_sklearn).max()),
                "r2_range": [round(float(r2_posprobe.min()), 4), round(float(r2_posprobe.max()), 4)],
            }
        )
    )


if __name__ == "__main__":
    main()
