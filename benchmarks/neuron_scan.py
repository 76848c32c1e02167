"""Positional-neuron scan: time and peak memory vs token count, measured side by side (prints JSON).

Builds synthetic stores of ``scale × base_seq`` sequences (default 64 × 256 positions × 2 layers
× 1536 neurons, scales 1, 4, 16), written shard by shard so building them never holds a whole
run in memory, then scans each in a fresh process with ``positional_neurons`` and reports wall
time (of the streaming pass alone, and of the whole scan with scores) and peak RSS above the
process's RSS before the scan. A streaming scan should take time linear in the tokens and
memory flat in them (O(layers × positions × neurons)).

    .venv/bin/python benchmarks/neuron_scan.py [--scales 1 4 16] [--neurons 1536] [--device cpu] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import PeakRSS, emit, envelope

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_store(path: Path, n_seq: int, seq_len: int, n_layers: int, n_neurons: int, batch_size: int) -> None:
    """Random activations with one period-16 neuron per layer, written one shard at a time."""
    from posprobe.models.base import positions_from_mask
    from posprobe.sites import SiteKey
    from posprobe.store import mark_complete, prepare_store, token_hash, write_shard

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 1000, (n_seq, seq_len), generator=g)
    mask = torch.ones_like(tokens)
    keys = [SiteKey("mlp_post", layer) for layer in range(n_layers)]
    manifest = {
        "model": {"name": "synthetic-benchmark", "act_fn": "relu"},
        "keys": [k.name for k in keys],
        "token_hash": token_hash(tokens, mask),
        "batch_size": batch_size,
        "store_dtype": "float32",
        "n_seq": n_seq,
        "seq_len": seq_len,
        "prepend_bos": True,
    }
    nbytes = n_seq * seq_len * n_neurons * n_layers * 4
    store = prepare_store(
        path, manifest, tokens, mask, positions_from_mask(mask), resume=False, overwrite=True, bytes_needed=nbytes
    )
    wave = torch.sin(2 * math.pi * torch.arange(seq_len) / 16)
    for index, (start, stop) in enumerate(store.shard_bounds()):
        acts = {}
        for key in keys:
            x = torch.randn(stop - start, seq_len, n_neurons, generator=g)
            x[..., 0] += 2 * wave
            acts[key] = x
        write_shard(store, index, acts)
    mark_complete(store)


def scan(path: str, device: str, threads: int) -> dict:
    """Run in a child process: one scan, its wall time and peak RSS above the pre-scan RSS."""
    import psutil

    torch.set_num_threads(threads)
    from posprobe.devices import resolve_device
    from posprobe.stats.neurons import neuron_position_stats, positional_neurons
    from posprobe.store import open_store

    store = open_store(path)
    dev = resolve_device(device)
    torch.zeros(1, device=dev).sum().item()  # start CUDA (if used) before the clock and the memory baseline
    before = psutil.Process().memory_info().rss
    start = time.perf_counter()
    neuron_position_stats(store, device=device)  # the streaming pass alone
    middle = time.perf_counter()
    with PeakRSS() as mem:
        result = positional_neurons(store, device=device)  # the pass again, then the scores
    seconds = time.perf_counter() - middle
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return {
        "device": str(dev),
        "seconds": seconds,
        "pass_seconds": middle - start,
        "peak_rss_above_start_mb": (peak - before) / 2**20,
        "peak_anon_above_start_mb": mem.anon_peak_above_start / 2**20,
        "oscillatory_found": int(result.layer_summary["oscillatory"].sum()),
        "tokens": int(store.attention_mask.sum()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--base-seq", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--neurons", type=int, default=1536)
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per shard")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadiest on a shared machine)")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(scan(args.child, args.device, args.threads)))
        return

    runs = []
    for scale in args.scales:
        with tempfile.TemporaryDirectory(prefix="neuron_scan_") as tmp:
            path = Path(tmp) / "store"
            build_store(path, scale * args.base_seq, args.seq_len, args.layers, args.neurons, args.batch_size)
            cmd = [sys.executable, __file__, "--child", str(path), "--device", args.device]
            cmd += ["--threads", str(args.threads)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
            runs.append({"scale": scale, **json.loads(out.stdout.strip().splitlines()[-1])})
    base = runs[0]
    for run in runs:
        run["time_ratio"] = run["seconds"] / base["seconds"]
        run["pass_time_ratio"] = run["pass_seconds"] / base["pass_seconds"]
        run["token_ratio"] = run["tokens"] / base["tokens"]
        run["peak_memory_ratio"] = run["peak_rss_above_start_mb"] / base["peak_rss_above_start_mb"]
        run["peak_anon_memory_ratio"] = run["peak_anon_above_start_mb"] / base["peak_anon_above_start_mb"]
        run["seconds_per_million_tokens"] = run["seconds"] / run["tokens"] * 1e6
    names = ("base_seq", "seq_len", "layers", "neurons", "batch_size", "device", "threads")
    config = {k: getattr(args, k) for k in names}
    accumulators_mb = 3 * args.layers * args.seq_len * args.neurons * 8 / 2**20
    shard_mb = args.batch_size * args.seq_len * args.layers * args.neurons * 4 / 2**20
    last = runs[-1]
    ratios = {
        "token_ratio": last["token_ratio"],
        "time_ratio": round(last["time_ratio"], 3),
        "pass_time_ratio": round(last["pass_time_ratio"], 3),
        "peak_memory_ratio": round(last["peak_memory_ratio"], 3),
        "peak_anon_memory_ratio": round(last["peak_anon_memory_ratio"], 3),
    }
    extra = {"expected_working_set_mb": {"accumulators": accumulators_mb, "one_shard": shard_mb}}
    emit(envelope("neuron_scan", runs, ratios, config={**config, "device_used": base["device"]}, **extra), args.out)


if __name__ == "__main__":
    main()
