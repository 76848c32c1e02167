"""Scaling: tokens/s and peak memory of extraction and attention statistics vs token count and length (prints JSON).

Two sweeps on SmolLM2-135M, each case in a fresh child process (``benchmarks/_common.py``):

- ``tokens``: resid_post extraction at every layer (shards written to disk) of ``--base-seq`` ×
  {1, 4, 16} sequences of ``--seq-len`` tokens in batches of ``--batch-size``. Time should grow
  linearly and peak RAM stay flat: a run holds one batch being computed and one being written.
- ``length``: a constant ``--length-tokens`` tokens cut into sequences of 128 … 2048 tokens,
  batches of ``--batch-tokens`` tokens. Two workloads: resid_post extraction, and
  ``posprobe.stats.attention.attention_stats`` over every layer, which reads attention
  probabilities through a streaming pattern hook. Its peak memory is reported beside one layer's
  attention maps for one batch ([b heads s s] float32) and all layers' maps: streaming keeps it
  near the former (it grows as b·s², i.e. linearly in s at constant batch tokens), never the latter.

    .venv/bin/python benchmarks/scaling.py [--quick] [--device auto] [--sweeps tokens length]
        [--out benchmarks/results/scaling-cpu.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

from _common import bench_model, bench_tokens, default_threads, emit, envelope, measure_memory, run_child


def child(case: dict[str, Any]) -> dict[str, Any]:
    """Run one case in this (fresh) process: a warm-up on one sequence, then one measured run."""
    from posprobe.extraction import extract
    from posprobe.stats.attention import attention_stats

    torch.set_num_threads(case["threads"])
    model = bench_model(case["model"], case["weights"], case["device"], case["dtype"])
    tokens = bench_tokens(model, case["n_seq"], case["seq_len"])
    workdir = Path(tempfile.mkdtemp(prefix="bench-scaling-", dir=case["workdir"]))

    def run(batch: Any, out: Path) -> Any:
        if case["workload"] == "extract_resid_post":
            return extract(model, batch, ["resid_post"], batch_size=case["batch_size"], out=out, progress=False)
        return attention_stats(model, batch, batch_size=case["batch_size"])

    run(tokens[:1], workdir / "warm")  # one sequence of the measured length
    memory = measure_memory(lambda: run(tokens, workdir / "run"), model.device)
    stored = sum(p.stat().st_size for p in (workdir / "run").glob("shard_*"))
    shutil.rmtree(workdir, ignore_errors=True)
    n_tokens = int(tokens.attention_mask.sum())
    info = model.info
    b = min(case["batch_size"], case["n_seq"])
    one_map = b * info.n_heads * case["seq_len"] ** 2 * 4
    return {
        **memory,
        "tokens": n_tokens,
        "tokens_per_s": n_tokens / memory["seconds_cold"],
        "stored_mb": stored / 2**20,
        "one_layer_maps_mb": one_map / 2**20,
        "all_layer_maps_mb": info.n_layers * one_map / 2**20,
        "token_source": tokens.source,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sweeps: 2 × {1, 4} sequences; lengths 128 … 512")
    parser.add_argument("--sweeps", nargs="+", default=["tokens", "length"], choices=["tokens", "length"])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--weights", default="packaged", choices=["packaged", "random"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--base-seq", type=int, default=8)
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 512, 1024, 2048])
    parser.add_argument("--length-tokens", type=int, default=4096)
    parser.add_argument("--batch-tokens", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument("--workdir", default=None, help="where stores are written (default: the system temp folder)")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    if args.quick:
        args.base_seq, args.scales, args.seq_len, args.batch_size = 2, [1, 4], 128, 2
        args.lengths, args.length_tokens, args.batch_tokens = [128, 256, 512], 1024, 512
    common = {
        "model": args.model,
        "weights": args.weights,
        "device": args.device,
        "dtype": args.dtype,
        "threads": args.threads,
        "workdir": args.workdir,
    }
    results: list[dict[str, Any]] = []
    started = time.perf_counter()
    if "tokens" in args.sweeps:
        for scale in args.scales:
            case = {
                **common,
                "sweep": "tokens",
                "workload": "extract_resid_post",
                "scale": scale,
                "n_seq": scale * args.base_seq,
                "seq_len": args.seq_len,
                "batch_size": args.batch_size,
            }
            results.append({**case, **run_child(__file__, ["--child", json.dumps(case)])})
    if "length" in args.sweeps:
        for workload in ("extract_resid_post", "attention_stats"):
            for seq_len in args.lengths:
                case = {
                    **common,
                    "sweep": "length",
                    "workload": workload,
                    "n_seq": max(1, args.length_tokens // seq_len),
                    "seq_len": seq_len,
                    "batch_size": max(1, args.batch_tokens // seq_len),
                }
                results.append({**case, **run_child(__file__, ["--child", json.dumps(case)])})
    for row in results:
        for key in ("model", "weights", "device", "dtype", "threads", "workdir"):
            row.pop(key, None)
    emit(
        envelope(
            "scaling",
            results,
            _ratios(results),
            config={**common, "seconds_total": round(time.perf_counter() - started, 1)},
        ),
        args.out,
    )


def _ratios(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per sweep: tokens/s and peak RSS relative to the first case (flat memory means ratios near 1)."""
    ratios: dict[str, Any] = {}
    ok = [r for r in results if "error" not in r]
    for sweep, workload, axis in (
        ("tokens", "extract_resid_post", "scale"),
        ("length", "extract_resid_post", "seq_len"),
        ("length", "attention_stats", "seq_len"),
    ):
        rows = [r for r in ok if r["sweep"] == sweep and r["workload"] == workload]
        if not rows:
            continue
        first = rows[0]
        table = {}
        for r in rows:
            table[str(r[axis])] = {
                "tokens_per_s": round(r["tokens_per_s"] / first["tokens_per_s"], 3),
                "peak_rss": round(r["peak_rss_above_start_mb"] / max(first["peak_rss_above_start_mb"], 1e-9), 3),
            }
            if workload == "attention_stats":
                table[str(r[axis])]["peak_rss_over_one_layer_maps"] = round(
                    r["peak_rss_above_start_mb"] / r["one_layer_maps_mb"], 3
                )
        ratios[f"{sweep}/{workload}"] = table
    return ratios


if __name__ == "__main__":
    main()
