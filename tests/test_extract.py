"""Extraction into the on-disk store: exact values, resumable after a real kill, clear refusals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import random_ids, tiny_llama_hf

import posprobe as pp
from posprobe.extraction import NonFiniteActivationError, extract
from posprobe.sites import SiteKey
from posprobe.store import StoreError, open_store, write_store


def test_store_holds_exactly_what_the_model_computes(tiny_llama, tmp_path):
    tokens = random_ids(10, 16)
    store = extract(
        tiny_llama,
        tokens,
        ["resid_post", "rot_q", "mlp_post", "pattern"],
        layers=[0, 2],
        batch_size=4,
        out=tmp_path / "s",
        progress=False,
    )
    assert store.complete and len(store.shard_bounds()) == 3
    keys = [SiteKey(s, layer) for s in ("resid_post", "rot_q", "mlp_post", "pattern") for layer in (0, 2)]
    direct = tiny_llama.run(tokens, capture=keys).acts
    for key in keys:
        assert torch.equal(store.get(key.site, key.layer), direct[key]), key
    assert store.stack("resid_post").shape == (2, 10, 16, 64)
    reopened = open_store(tmp_path / "s")
    assert reopened.layers("rot_q") == [0, 2] and reopened.model_name == "tiny-llama"
    table = reopened.token_table()
    assert len(table) == 160 and set(table.columns) >= {"seq", "position", "token_id", "token", "is_bos"}


def test_store_records_padding_and_positions(tiny_llama, tmp_path):
    batch = pp.data.from_texts(tiny_llama, ["t1 t2 t3 t4", "t5 t6"], padding_side="left", prepend_bos=True)
    store = extract(tiny_llama, batch, ["resid_post"], layers=[1], out=tmp_path / "s", progress=False)
    assert store.position_ids[1].tolist() == [0, 0, 0, 1, 2]
    assert store.attention_mask[1].tolist() == [0, 0, 1, 1, 1]
    table = store.token_table()
    assert table[table.seq == 1].position.tolist() == [0, 1, 2] and store.prepend_bos
    assert table[table.seq == 1].token.tolist() == ["<bos>", "t5", "t6"]


def test_streaming_shards_cover_the_run(tiny_llama, tmp_path):
    store = extract(
        tiny_llama, random_ids(7, 8), "resid_pre", layers=0, batch_size=3, out=tmp_path / "s", progress=False
    )
    shards = list(store.iter_shards(["resid_pre.0"]))
    assert [(s.start, s.stop) for s in shards] == [(0, 3), (3, 6), (6, 7)]
    assert torch.equal(torch.cat([s["resid_pre.0"] for s in shards]), store.get("resid_pre", 0))


def test_refuses_a_folder_holding_another_models_run(tiny_llama, tiny_gemma3, tmp_path):
    extract(tiny_llama, random_ids(2, 8), "resid_post", layers=0, out=tmp_path / "s", progress=False)
    with pytest.raises(StoreError, match=r"holds another run.*'tiny-llama'"):
        extract(tiny_gemma3, random_ids(2, 8), "resid_post", layers=0, out=tmp_path / "s", progress=False)
    extract(tiny_gemma3, random_ids(2, 8), "resid_post", layers=0, out=tmp_path / "s", overwrite=True, progress=False)
    assert open_store(tmp_path / "s").model_name == "tiny-gemma3"


def test_an_empty_text_is_an_error_not_a_one_token_store(tiny_llama):
    with pytest.raises(ValueError, match=r"empty texts \(no tokens\) at \[1\]"):
        pp.data.from_texts(tiny_llama, ["t3 t4", ""], prepend_bos=True)


def test_the_same_run_twice_reuses_the_store_and_an_unfinished_one_says_resume(tiny_llama, tmp_path, caplog):
    tokens = random_ids(4, 8)
    first = extract(tiny_llama, tokens, "resid_post", layers=0, batch_size=2, out=tmp_path / "s", progress=False)
    written = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "s").glob("shard_*")}
    with caplog.at_level("WARNING", logger="posprobe.store"):
        again = extract(tiny_llama, tokens, "resid_post", layers=0, batch_size=2, out=tmp_path / "s", progress=False)
    assert "already holds this exact run" in caplog.text and "reusing it" in caplog.text
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "s").glob("shard_*")} == written  # nothing recomputed
    assert torch.equal(again.get("resid_post", 0), first.get("resid_post", 0))
    (tmp_path / "s" / "shard_00001.safetensors").unlink()
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    (tmp_path / "s" / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    with pytest.raises(StoreError, match=r"unfinished run of this same extraction.*pass resume=True to finish it"):
        extract(tiny_llama, tokens, "resid_post", layers=0, batch_size=2, out=tmp_path / "s", progress=False)


def test_non_finite_activations_are_reported_and_not_written(tiny_llama, tmp_path):
    with torch.no_grad():
        tiny_llama.hf.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteActivationError, match="site 'resid_post' layer 1"):
        extract(tiny_llama, random_ids(2, 8), "resid_post", out=tmp_path / "s", progress=False)
    assert not list((tmp_path / "s").glob("shard_*"))


def test_bad_requests_are_refused_before_any_work(tiny_llama, tiny_bert, tmp_path):
    with pytest.raises(ValueError, match="unknown site 'resid'"):
        extract(tiny_llama, random_ids(2, 8), "resid", out=tmp_path / "a", progress=False)
    with pytest.raises(ValueError, match="layer 3 out of range"):
        extract(tiny_llama, random_ids(2, 8), "resid_post", layers=3, out=tmp_path / "b", progress=False)
    with pytest.raises(ValueError, match="needs a rotary model"):
        extract(tiny_bert, random_ids(2, 8), "rot_k", out=tmp_path / "c", progress=False)
    with pytest.raises(ValueError, match="context of 128"):
        extract(tiny_llama, random_ids(1, 130), "resid_post", out=tmp_path / "d", progress=False)
    with pytest.raises(ValueError, match="non-empty"):
        extract(tiny_llama, torch.zeros(0, 4, dtype=torch.long), "resid_post", out=tmp_path / "e", progress=False)
    with pytest.raises(ValueError, match="unknown model 'gpt5'; known models: smollm2-135m"):
        pp.load_model("gpt5")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_incomplete_or_corrupt_stores_say_what_to_do(tiny_llama, tmp_path):
    store = extract(
        tiny_llama, random_ids(6, 8), "resid_post", layers=0, batch_size=2, out=tmp_path / "s", progress=False
    )
    store.shard_path(1).write_bytes(store.shard_path(1).read_bytes()[:50])
    with pytest.raises(StoreError, match=r"corrupt.*resume=True"):
        store.get("resid_post", 0)
    store.shard_path(1).unlink()
    with pytest.raises(StoreError, match=r"incomplete: shards \[1\]"):
        store.get("resid_post", 0)
    with pytest.raises(StoreError, match="'mlp_post' is not in this store"):
        store.layers("mlp_post")


def test_write_store_for_synthetic_data(tmp_path):
    acts = {"mlp_post.0": torch.randn(5, 7, 3)}
    store = write_store(tmp_path / "syn", acts, torch.zeros(5, 7, dtype=torch.long), batch_size=2)
    assert torch.equal(store.get("mlp_post", 0), acts["mlp_post.0"])
    assert store.model_name == "synthetic"


KILL_SCRIPT = textwrap.dedent(
    """
    import sys, time, torch
    from posprobe.extraction import extract
    from posprobe.models import load_model
    ex = sys.modules["posprobe.extraction"]
    commit = ex.commit_shard  # on CPU every shard is streamed, then committed here
    def slow_commit(*args):  # a slow disk, so the parent can kill us mid-run
        commit(*args)
        time.sleep(0.3)
    ex.commit_shard = slow_commit
    model = load_model(sys.argv[1])
    tokens = torch.load(sys.argv[2], weights_only=True)
    extract(model, tokens, ["resid_post", "rot_k"], batch_size=2, out=sys.argv[3], resume=True, progress=False)
    """
)


def test_resume_after_a_killed_extraction_equals_an_uninterrupted_run(tokenizer, tmp_path):
    hf = tiny_llama_hf()
    hf.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    tokens = random_ids(24, 16)
    torch.save(tokens, tmp_path / "tokens.pt")
    script = tmp_path / "run.py"
    script.write_text(KILL_SCRIPT)
    out = tmp_path / "killed"
    cmd = [sys.executable, str(script), str(tmp_path / "model"), str(tmp_path / "tokens.pt"), str(out)]
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": str(Path(__file__).parent)})
    deadline = time.time() + 120
    while len(list(out.glob("shard_*.safetensors"))) < 3 and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(out.glob("shard_*.safetensors"))
    assert 3 <= len(done) < 12, "the run was not interrupted mid-way"
    assert not json.loads((out / "manifest.json").read_text())["complete"]
    (out / "shard_00011.safetensors.tmp").write_bytes(b"half a shard")  # what a kill mid-write leaves
    done[-1].write_bytes(done[-1].read_bytes()[:-10])  # and a shard damaged behind our back

    model = pp.load_model(str(tmp_path / "model"))
    resumed = extract(model, tokens, ["resid_post", "rot_k"], batch_size=2, out=out, resume=True, progress=False)
    fresh = extract(model, tokens, ["resid_post", "rot_k"], batch_size=2, out=tmp_path / "fresh", progress=False)
    assert resumed.complete and not list(out.glob("*.tmp"))
    for key in fresh.keys:
        assert torch.equal(resumed.get(key.site, key.layer), fresh.get(key.site, key.layer)), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_streamed_shard_is_a_safetensors_file(dtype, tmp_path):
    """Written tensor by tensor at offsets (any order, views included): what safetensors itself reads back."""
    from safetensors.torch import load_file

    from posprobe.store import StreamedShard

    values = {"resid_post.0": torch.randn(2, 5, 8), "rot_q.1": torch.randn(2, 3, 5, 4).transpose(1, 2)}
    shard = StreamedShard(tmp_path / "shard_00000.safetensors", {k: tuple(v.shape) for k, v in values.items()}, dtype)
    for name in reversed(list(values)):
        shard.write(name, values[name])
    with pytest.raises(ValueError, match=r"shape \(5, 8\), the shard expects \(2, 5, 8\)"):
        shard.write("resid_post.0", values["resid_post.0"][0])
    shard.commit()
    loaded = load_file(tmp_path / "shard_00000.safetensors")
    for name, value in values.items():
        assert loaded[name].dtype == dtype and torch.equal(loaded[name], value.to(dtype)), name
    aborted = StreamedShard(tmp_path / "shard_00001.safetensors", {"x": (1,)}, dtype)
    aborted.abort()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard_00000.safetensors"]
