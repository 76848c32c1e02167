"""attention_stats memory and time: streamed pattern hooks vs a plain forward vs keeping every map (prints JSON).

Each case runs in a fresh process on one sequence of ``seq_len`` random tokens and reports wall
time and peak RSS above the RSS after the model is loaded:

- ``plain``: the model body with fused SDPA and no hooks (the floor);
- ``stream``: ``attention_stats`` on every layer with whole maps (``query_block=None``: one layer's
  pattern alive at a time, computed eagerly);
- ``blocks``: ``attention_stats`` reading each map ``--block`` queries at a time while the forward runs
  fused (``query_block``): memory O(block × s) per layer;
- ``keep``: capturing every layer's pattern in memory, what storing full maps costs
  (skipped above ``--keep-max`` tokens, where its size is reported from the shapes instead).

Beyond the model's context (SmolLM2: 8,192 tokens) the same network is run with its context declared
``seq_len`` (``context_stretched``): RoPE computes any position, the statistics of positions past
training mean little, but the cost measured is the cost of that length.

At ``--check-len`` tokens the block and whole-map statistics are compared (largest absolute
difference of every head table column), in one more child process.

    .venv/bin/python benchmarks/attention_memory.py [--model smollm2-135m] [--seq-lens 1024 4096]
        [--keep-max 1024] [--block 256] [--check-len 1024] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from _common import emit, envelope

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def run_case(model_name: str, case: str, seq_len: int, threads: int, block: int = 256) -> dict:
    import posprobe as pp
    from posprobe.sites import SiteKey
    from posprobe.stats.attention import attention_stats

    torch.set_num_threads(threads)
    model = pp.load_model(model_name)
    stretched = seq_len > model.info.n_ctx
    if stretched:  # the same network with its context declared longer: positions past training, cost unchanged
        model.hf.config.max_position_embeddings = seq_len
        model = pp.load_model(model.hf)
    tokens = pp.data.random_tokens(model, n=1, seq_len=seq_len, seed=0)
    last = model.info.n_layers - 1
    base = rss_mb()
    start = time.perf_counter()
    if case == "plain":
        model.run(tokens.tokens, return_logits=False, stop_at_layer=last)
    elif case == "stream":
        attention_stats(model, tokens, batch_size=1, query_block=None)
    elif case == "blocks":
        attention_stats(model, tokens, batch_size=1, query_block=block)
    elif case == "check":
        whole = attention_stats(model, tokens, batch_size=1, query_block=None).table
        blocks = attention_stats(model, tokens, batch_size=1, query_block=block).table
        numeric = whole.select_dtypes("number").columns
        diff = (blocks[numeric] - whole[numeric]).abs()
        relative = (diff / whole[numeric].abs().clip(lower=1e-6)).max()
        return {
            "case": "check",
            "seq_len": seq_len,
            "block": block,
            "max_abs_difference": float(diff.max().max()),
            "max_relative_difference": float(relative.max()),
            "worst_column": str(relative.idxmax()),
        }
    elif case == "keep":
        keys = [SiteKey("pattern", layer) for layer in range(model.info.n_layers)]
        model.run(tokens.tokens, capture=keys, return_logits=False, stop_at_layer=last)
    else:
        raise ValueError(f"unknown case {case!r}; known: plain, stream, blocks, keep, check")
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    info = model.info
    return {
        "case": case,
        "seq_len": seq_len,
        "seconds": round(seconds, 2),
        "context_stretched": stretched,
        "peak_rss_above_loaded_mb": round(peak - base, 1),
        "one_layer_pattern_mb": round(info.n_heads * seq_len**2 * 4 / 2**20, 1),
        "all_patterns_mb": round(info.n_layers * info.n_heads * seq_len**2 * 4 / 2**20, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--keep-max", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--block", type=int, default=256, help="queries per block of the blocks case")
    parser.add_argument("--check-len", type=int, default=1024, help="tokens of the blocks-vs-whole-maps check")
    parser.add_argument("--cases", nargs="+", default=["plain", "stream", "blocks", "keep"])
    parser.add_argument("--out", default=None, help="also write the JSON here")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--seq-len", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.model, args.case, args.seq_len, args.threads, args.block)))
        return
    cmd = [sys.executable, __file__, "--model", args.model, "--threads", str(args.threads), "--block", str(args.block)]
    results = []
    for seq_len in args.seq_lens:
        cases = [c for c in args.cases if c != "keep" or seq_len <= args.keep_max]
        for case in cases:
            out = subprocess.run(
                [*cmd, "--case", case, "--seq-len", str(seq_len)], capture_output=True, text=True, check=True
            )
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    if args.check_len:
        out = subprocess.run(
            [*cmd, "--case", "check", "--seq-len", str(args.check_len)], capture_output=True, text=True, check=True
        )
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    by = {(r["seq_len"], r["case"]): r for r in results}
    ratios = {}
    for seq_len in args.seq_lens:
        plain = by[(seq_len, "plain")]
        entry = {}
        for case in ("stream", "blocks"):
            if (seq_len, case) not in by:
                continue
            run = by[(seq_len, case)]
            entry[f"{case}_vs_plain_time"] = round(run["seconds"] / plain["seconds"], 2)
            entry[f"{case}_peak_vs_one_layer_pattern"] = round(
                run["peak_rss_above_loaded_mb"] / run["one_layer_pattern_mb"], 3
            )
        stream = by.get((seq_len, "stream"))
        if (seq_len, "keep") in by and stream is not None:
            keep = by[(seq_len, "keep")]
            entry["keep_peak_vs_stream_peak"] = round(
                keep["peak_rss_above_loaded_mb"] / stream["peak_rss_above_loaded_mb"], 2
            )
        ratios[str(seq_len)] = entry
    emit(envelope("attention_memory", results, ratios, config={"model": args.model, "threads": args.threads}), args.out)


if __name__ == "__main__":
    main()
