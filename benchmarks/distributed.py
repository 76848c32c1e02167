"""Data parallelism: tokens/s of 1 process against N under torchrun, same cores in all (prints JSON).

Each configuration runs ``torchrun --standalone --nproc-per-node P`` on this file (``--child``),
with ``--cores / P`` torch threads per process, so every configuration uses the same cores: the
ratio says what splitting the batches across processes buys over threads inside one process. Two
workloads: ``extract`` (every rank loads SmolLM2-135M and extracts ``resid_post`` and ``mlp_post``
at every layer of the same ``--windows`` × ``--seq-len`` windows into one store) and ``neurons`` (every
rank reads its shards of that store and the positional-neuron sums are all-reduced). Each reports
the time from a barrier before the call to one after it (the slowest rank's). The stores and the
neuron tables of all configurations are checked to be identical. Configurations alternate over
``--repeats`` rounds (median reported).

    .venv/bin/python benchmarks/distributed.py [--procs 1 2] [--windows 16] [--seq-len 256]
        [--out benchmarks/results/distributed-extraction-cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

import pandas as pd
from _common import bench_tokens, default_threads, emit, envelope

SITES = ("resid_post", "mlp_post")


def child(args: argparse.Namespace) -> None:
    """One rank: load, wait for the others, run the workload, wait again; rank 0 prints the seconds."""
    import torch
    import torch.distributed as dist

    import posprobe as pp
    from posprobe.distributed import current_ranks

    torch.set_num_threads(args.threads)
    ranks = current_ranks("cpu")
    if args.workload == "extract":
        model = pp.load_model(args.model, device="cpu")
        tokens = bench_tokens(model, args.n, args.seq_len)

        def work() -> None:
            pp.extract(model, tokens, sites=SITES, batch_size=args.batch_size, out=args.store, device="cpu",
                       progress=False)  # fmt: skip
    else:
        store = pp.open_store(args.store)

        def work() -> None:
            table = pp.positional_neurons(store, site="mlp_post", device="cpu").table
            if ranks.is_main:
                table.to_pickle(Path(args.store) / f"neurons-{ranks.world}.pkl")

    if ranks.active:
        dist.barrier()
    start = time.perf_counter()
    work()
    if ranks.active:
        dist.barrier()
    if ranks.is_main:
        print(json.dumps({"seconds": time.perf_counter() - start}), flush=True)


def run(procs: int, args: argparse.Namespace, store: Path, workload: str) -> float:
    threads = max(1, args.cores // procs)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}", __file__]
    cmd += ["--child", "--model", args.model, "--windows", str(args.n), "--seq-len", str(args.seq_len)]
    cmd += ["--batch-size", str(args.batch_size), "--threads", str(threads), "--store", str(store)]
    cmd += ["--workload", workload]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{procs} process(es) failed:\n{proc.stderr[-3000:]}")
    return float(json.loads(re.findall(r"\{[^{}]*\}", proc.stdout)[-1])["seconds"])


def same_store(a: Path, b: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    names = sorted(p.name for p in a.glob("*.safetensors"))
    if names != sorted(p.name for p in b.glob("*.safetensors")):
        return False
    return all(
        all(torch.equal(x, y) for x, y in zip(load_file(a / n).values(), load_file(b / n).values(), strict=True))
        for n in names
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    p.add_argument("--windows", dest="n", type=int, default=16, help="text windows (torchrun would take --n)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--cores", type=int, default=default_threads())
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--store", default=None, help=argparse.SUPPRESS)
    p.add_argument("--workload", default="extract", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.child:
        return child(args)
    work = Path(tempfile.mkdtemp(prefix="posprobe-bench-dist-"))
    seconds: dict[tuple[str, int], list[float]] = {}
    try:
        for r in range(args.repeats):
            for procs in args.procs:
                store = work / f"store-{procs}-{r}"
                seconds.setdefault(("extract", procs), []).append(run(procs, args, store, "extract"))
                seconds.setdefault(("neurons", procs), []).append(run(procs, args, store, "neurons"))
                if r > 0:  # the first round's stores are compared below; later ones only take disk
                    shutil.rmtree(store)
        first = work / f"store-{args.procs[0]}-0"
        identical = all(same_store(first, work / f"store-{k}-0") for k in args.procs)
        tables = [pd.read_pickle(work / f"store-{k}-0" / f"neurons-{k}.pkl") for k in args.procs]
        neurons_equal = all(t.equals(tables[0]) for t in tables[1:])
        neurons_close = all(_close(t, tables[0]) for t in tables[1:])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    tokens = args.n * args.seq_len
    results = [
        {"workload": w, "processes": k, "threads_per_process": max(1, args.cores // k),
         "seconds": statistics.median(v), "all_seconds": [round(x, 3) for x in v],
         "tokens_per_s": tokens / statistics.median(v)}
        for (w, k), v in seconds.items()
    ]  # fmt: skip
    ratios = {}
    for w in ("extract", "neurons"):
        rows = [r for r in results if r["workload"] == w]
        for r in rows[1:]:
            ratios[f"{w}_tokens_per_s_{r['processes']}_vs_{rows[0]['processes']}"] = (
                r["tokens_per_s"] / rows[0]["tokens_per_s"]
            )
    doc = envelope("distributed", results, ratios, stores_identical=identical, neuron_tables_identical=neurons_equal,
                   neuron_tables_equal_to_rounding=neurons_close, sites=list(SITES), model=args.model, n=args.n,
                   seq_len=args.seq_len, batch_size=args.batch_size)  # fmt: skip
    emit(doc, args.out)


def _close(a: pd.DataFrame, b: pd.DataFrame) -> bool:
    try:
        pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-9)
    except AssertionError:
        return False
    return True


if __name__ == "__main__":
    main()
