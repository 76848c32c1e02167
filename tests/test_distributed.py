"""Data-parallel extraction on torch.distributed: two and three gloo processes on this machine (torchrun).

The store N ranks write is the store one process writes, value for value and in its manifest; a rank
that dies leaves a store that a resumed run completes (recomputing only the missing shards); a rank
that fails makes every rank say which; ranks given different tokens, a folder of another run and more
ranks than batches are refused on every rank with one message.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import posprobe as pp

ROOT = Path(__file__).resolve().parents[1]
SITES = ("resid_post", "mlp_post", "pattern")
LAYERS = [0, 2]

#: what every rank runs: ``script.py MODE OUT``; MODE die / fail make rank 1 misbehave
SCRIPT = """
import json, os, sys
import posprobe as pp

mode, out = sys.argv[1], sys.argv[2]
rank = os.environ["RANK"]
if mode == "stats":  # every rank reads its share of the store at ``out`` and all-reduces
    store = pp.open_store(out)
    tables = {
        "neurons": pp.positional_neurons(store, site="mlp_post", threshold=0.0).table,
        "heads": pp.attention_stats(store).table,
        "similarity": pp.embedding_similarity(store).table,
        "similarity_summary": pp.embedding_similarity(store).summary,
    }
    pd_out = os.path.join(os.environ["RESULTS"], f"rank{rank}.pkl")
    import pandas as pd

    pd.to_pickle(tables, pd_out)
    sys.exit(0)
if mode == "probe_model":  # probes of a model: its stores must lie where every rank reaches them
    import pandas as pd

    model = pp.load_model("zoo:rope", device="cpu")
    tokens = pp.data.text_windows(model, n=6, seq_len=16, seed=0)
    folder = os.environ.get("OUT_FOLDER") or None
    result = pp.probe_model(model, tokens, layers=[0, 2], batch_size=2, out=folder, n_splits=3, progress=False)
    pd.to_pickle(result.table, os.path.join(os.environ["RESULTS"], f"probe_model{rank}.pkl"))
    sys.exit(0)
if mode == "probe":  # ridge and sparse probes: each rank holds its sequences, Gram matrices all-reduced
    import pandas as pd

    kinds = os.environ.get("KINDS", "ridge,sparse").split(",")
    result = pp.probe_position(out, site="resid_post", target=["absolute", "relative"], kind=kinds, k=4,
                               random_init_store=os.environ["TWIN"], n_splits=3)
    pd.to_pickle(result.table, os.path.join(os.environ["RESULTS"], f"probe{rank}.pkl"))
    sys.exit(0)
if mode == "split":  # a model split by a device map inside each rank (CPU + disk offload), data across ranks
    import torch

    split = json.loads(os.environ["SPLIT"])
    model = pp.load_model(os.environ["MODEL"], device_map=split, offload_folder=f"{out}.offload{rank}")
    assert model.device_map is not None
    ids = torch.randint(2, 100, (8, 12), generator=torch.Generator().manual_seed(0))
    pp.extract(model, ids, sites=("resid_post", "pattern"), batch_size=2, out=out, progress=False)
    sys.exit(0)
model = pp.load_model(os.environ.get("MODEL", "zoo:rope"), device="cpu")
seed = int(os.environ.get("SEED_" + rank, "0"))
tokens = pp.data.text_windows(model, n=int(os.environ.get("N", "10")), seq_len=32, seed=seed)
if rank == "1" and mode in ("die", "fail"):
    import posprobe.extraction as ex

    real, done = ex._stream_shard, []

    def misbehave(*args, **kwargs):
        if done:
            if mode == "die":
                os._exit(3)  # killed: no exception, no goodbye
            raise RuntimeError("boom on rank 1")
        done.append(1)
        return real(*args, **kwargs)

    ex._stream_shard = misbehave
store = pp.extract(model, tokens, sites=("resid_post", "mlp_post", "pattern"), layers=[0, 2], batch_size=2, out=out,
                   device="cpu", progress=False, resume=mode == "resume")
print(json.dumps({"rank": int(rank), "complete": store.manifest["complete"], "shards": len(store.shard_bounds())}))
"""


def torchrun(tmp_path: Path, n: int, *args: str, env: dict[str, str] | None = None, script: bool = True):
    """``torchrun --standalone --nproc-per-node n`` on the script (or on ``-m posprobe``), bounded in time."""
    path = tmp_path / "rank_script.py"
    path.write_text(SCRIPT)
    target = [str(path)] if script else ["-m", "posprobe"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", *target, *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "POSPROBE_DIST_TIMEOUT": "60"}
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path, env={**full_env, **(env or {})}
    )


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    """The store one process writes (the reference)."""
    out = tmp_path_factory.mktemp("single") / "store"
    model = pp.load_model("zoo:rope", device="cpu")
    tokens = pp.data.text_windows(model, n=10, seq_len=32, seed=0)
    pp.extract(model, tokens, sites=SITES, layers=LAYERS, batch_size=2, out=out, device="cpu", progress=False)
    return out


def assert_same_store(a: Path, b: Path) -> None:
    ma, mb = (json.loads((p / "manifest.json").read_text()) for p in (a, b))
    assert ma == mb
    files = sorted(p.name for p in a.glob("*.safetensors"))
    assert files == sorted(p.name for p in b.glob("*.safetensors")) and len(files) == 6  # tokens + 5 shards
    for name in files:
        x, y = load_file(a / name), load_file(b / name)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name


@pytest.mark.parametrize("n_ranks", [2, 3])
def test_ranks_write_the_store_one_process_writes(single, tmp_path, n_ranks):
    proc = torchrun(tmp_path, n_ranks, "plain", str(tmp_path / "store"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [json.loads(found) for found in re.findall(r"\{[^{}]*\}", proc.stdout)]  # lines may interleave
    assert sorted(r["rank"] for r in reports) == list(range(n_ranks)) and all(r["complete"] for r in reports)
    assert_same_store(single, tmp_path / "store")


def test_a_killed_rank_leaves_a_store_that_resuming_completes(single, tmp_path):
    store = tmp_path / "store"
    died = torchrun(tmp_path, 2, "die", str(store))
    assert died.returncode != 0
    manifest = json.loads((store / "manifest.json").read_text())
    assert not manifest["complete"]
    written = {p.name: p.stat().st_mtime_ns for p in store.glob("shard_*.safetensors")}
    assert "shard_00001.safetensors" in written or len(written) >= 1  # rank 1 wrote one shard before dying
    resumed = torchrun(tmp_path, 2, "resume", str(store))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_store(single, store)
    assert all((store / name).stat().st_mtime_ns == t for name, t in written.items())  # kept, not recomputed


def test_a_failing_rank_is_named_by_every_rank(tmp_path):
    proc = torchrun(tmp_path, 2, "fail", str(tmp_path / "store"))
    assert proc.returncode != 0
    assert "rank 1 of 2 failed while extracting: boom on rank 1" in proc.stderr
    assert json.loads((tmp_path / "store" / "manifest.json").read_text())["complete"] is False


def test_ranks_given_different_tokens_are_refused(tmp_path):
    proc = torchrun(tmp_path, 2, "plain", str(tmp_path / "store"), env={"SEED_1": "1"})
    assert proc.returncode != 0
    assert proc.stderr.count("the ranks of this run were given different tokens") >= 2  # every rank says it
    assert "same texts, n, seq_len and seed" in proc.stderr
    assert not (tmp_path / "store").exists()


def test_more_ranks_than_batches_is_refused(tmp_path):
    proc = torchrun(tmp_path, 3, "plain", str(tmp_path / "store"), env={"N": "4"})  # 2 batches of 2
    assert proc.returncode != 0
    assert proc.stderr.count("3 ranks but only 2 batch(es) of this run") >= 3


def test_a_folder_of_another_run_is_refused_by_every_rank(single, tmp_path):
    proc = torchrun(tmp_path, 2, "plain", str(single), env={"MODEL": "zoo:learned"})
    assert proc.returncode != 0
    assert proc.stderr.count("holds another run (model 'zoo:rope'") >= 2


def test_the_command_line_under_torchrun(single, tmp_path):
    out = tmp_path / "cli"
    args = [
        "extract",
        "--model",
        "zoo:rope",
        "--n-windows",
        "10",
        "--seq-len",
        "32",
        "--batch-size",
        "2",
        "--device",
        "cpu",
    ]
    args += ["--sites", *SITES, "--layers", *map(str, LAYERS), "--seed", "0", "--out", str(out), "-q"]
    proc = torchrun(tmp_path, 2, *args, script=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_store(single, out)
    assert json.loads((out / "settings.json").read_text())["subcommand"] == "extract"
    assert proc.stdout.count("ActivationStore") <= 1  # rank 0 alone speaks


@pytest.mark.parametrize("n_ranks", [2, 3])
def test_statistics_over_ranks_equal_one_process(single, tmp_path, n_ranks):
    """Sums over tokens accumulate per rank and are all-reduced once: counts exactly, sums to float rounding."""
    import pandas as pd

    proc = torchrun(tmp_path, n_ranks, "stats", str(single), env={"RESULTS": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    store = pp.open_store(single)
    alone = {
        "neurons": pp.positional_neurons(store, site="mlp_post", threshold=0.0).table,
        "heads": pp.attention_stats(store).table,
        "similarity": pp.embedding_similarity(store).table,
        "similarity_summary": pp.embedding_similarity(store).summary,
    }
    for rank in range(n_ranks):
        ranked = pd.read_pickle(tmp_path / f"rank{rank}.pkl")
        for name, table in alone.items():
            pd.testing.assert_frame_equal(ranked[name], table, check_exact=False, rtol=1e-9, atol=1e-12, obj=name)
        counts = ["n_queries", "n_pairs", "n_tokens"]
        for name in alone:
            for col in [c for c in counts if c in alone[name]]:
                assert ranked[name][col].tolist() == alone[name][col].tolist(), (name, col)  # exact


@pytest.fixture(scope="module")
def twin(tmp_path_factory) -> Path:
    """The random-init twin's store of the same tokens, in shards of another size (5 sequences, not 2)."""
    out = tmp_path_factory.mktemp("twin") / "store"
    model = pp.load_model("zoo:rope", device="cpu", random_init=True)
    tokens = pp.data.text_windows(model, n=10, seq_len=32, seed=0)
    pp.extract(model, tokens, sites=SITES, layers=LAYERS, batch_size=5, out=out, device="cpu", progress=False)
    return out


@pytest.mark.parametrize("n_ranks", [2, 3])
def test_probes_over_ranks_equal_one_process(single, twin, tmp_path, n_ranks):
    """Ridge and sparse probes (absolute and pair targets, every control) on a store read by N ranks, each
    holding its own sequences: Gram matrices, cross-products and leave-one-out errors are all-reduced and
    the predictions summed, so every rank's table is the one process's table (to float rounding)."""
    import pandas as pd

    env = {"RESULTS": str(tmp_path), "TWIN": str(twin)}
    proc = torchrun(tmp_path, n_ranks, "probe", str(single), env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    alone = pp.probe_position(
        single, site="resid_post", target=["absolute", "relative"], kind=["ridge", "sparse"], k=4,
        random_init_store=twin, n_splits=3,
    ).table  # fmt: skip
    assert alone["control_random_init"].notna().all() and alone["control_token"].notna().all()
    for rank in range(n_ranks):
        ranked = pd.read_pickle(tmp_path / f"probe{rank}.pkl")
        pd.testing.assert_frame_equal(ranked, alone, check_exact=False, rtol=1e-7, atol=1e-9)


def test_probe_model_under_torchrun(tmp_path):
    """probe_model extracts both stores with every rank and probes them with the ranks; without out= it says
    that the ranks need a shared folder."""
    import pandas as pd

    proc = torchrun(
        tmp_path, 2, "probe_model", "unused", env={"RESULTS": str(tmp_path), "OUT_FOLDER": str(tmp_path / "runs")}
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    model = pp.load_model("zoo:rope", device="cpu")
    tokens = pp.data.text_windows(model, n=6, seq_len=16, seed=0)
    alone = pp.probe_model(model, tokens, layers=[0, 2], batch_size=2, n_splits=3, progress=False).table
    for rank in range(2):
        ranked = pd.read_pickle(tmp_path / f"probe_model{rank}.pkl")
        pd.testing.assert_frame_equal(ranked, alone, check_exact=False, rtol=1e-7, atol=1e-9)
    refused = torchrun(tmp_path, 2, "probe_model", "unused", env={"RESULTS": str(tmp_path)})
    assert refused.returncode != 0 and refused.stderr.count("pass out= a folder on a shared filesystem") >= 2


def test_logistic_probes_are_refused_under_torchrun(single, twin, tmp_path):
    proc = torchrun(
        tmp_path, 2, "probe", str(single), env={"RESULTS": str(tmp_path), "TWIN": str(twin), "KINDS": "logistic"}
    )
    assert proc.returncode != 0
    assert proc.stderr.count("kind 'logistic' is fitted in one process") >= 2  # every rank says it


def test_a_model_split_by_a_device_map_inside_each_rank(tmp_path):
    """Pipeline within a rank (accelerate's device map: layers on the CPU and offloaded to disk), data across
    ranks: the store two such ranks write is the store of one process with the whole model."""
    from conftest import tiny_llama_hf, tiny_tokenizer

    path = tmp_path / "model"
    tiny_llama_hf().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    split = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
             "model.layers.1": "disk", "model.layers.2": "disk", "model.norm": "cpu", "lm_head": "cpu"}  # fmt: skip
    proc = torchrun(tmp_path, 2, "split", str(tmp_path / "store"), env={"MODEL": str(path), "SPLIT": json.dumps(split)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    ids = torch.randint(2, 100, (8, 12), generator=torch.Generator().manual_seed(0))
    alone = pp.extract(pp.load_model(str(path), device="cpu"), ids, sites=("resid_post", "pattern"), batch_size=2,
                       out=tmp_path / "alone", progress=False)  # fmt: skip
    ranked = pp.open_store(tmp_path / "store")
    assert ranked.keys == alone.keys and len(ranked.shard_bounds()) == 4
    for key in alone.keys:
        torch.testing.assert_close(ranked.get(key.site, key.layer), alone.get(key.site, key.layer), atol=0, rtol=0)


def test_statistics_refuse_more_ranks_than_shards(tmp_path):
    model = pp.load_model("zoo:rope", device="cpu")
    tokens = pp.data.text_windows(model, n=4, seq_len=32, seed=0)
    small = tmp_path / "small"
    pp.extract(model, tokens, sites=SITES, layers=LAYERS, batch_size=2, out=small, device="cpu", progress=False)
    proc = torchrun(tmp_path, 3, "stats", str(small), env={"RESULTS": str(tmp_path)})
    assert proc.returncode != 0
    assert proc.stderr.count(f"3 ranks but the store {small} has only 2 shard(s)") >= 3
