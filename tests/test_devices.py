"""Device, dtype and batch-size choice; reduced-precision extraction; models split by a device map.

The ``gpu`` tests run only where CUDA is present (``pytest -m gpu``; benchmarks/gpu_check.sh).
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
from conftest import random_ids, tiny_llama_hf

import posprobe as pp
import posprobe.devices as devices
from posprobe.devices import (
    CPU_BATCH_CAP,
    auto_batch_size,
    batch_size_for_memory,
    forward_bytes_per_sequence,
    resolve_device,
    resolve_dtype,
    shard_bytes_per_sequence,
)
from posprobe.extraction import _to_host, _writer_count, extract, extract_remote
from posprobe.models.hf import HFModel
from posprobe.sites import SiteKey, resolve_sites

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")
SITES = ["resid_post", "rot_q", "rot_k", "mlp_post", "pattern"]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


# -- device and dtype choice ---------------------------------------------------------------------


def test_auto_device_is_cuda_when_present_else_cpu():
    assert resolve_device("auto") == torch.device("cuda" if CUDA else "cpu")
    assert resolve_device(None) == resolve_device("auto")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(CUDA, reason="checks the refusal on a machine without CUDA")
def test_explicit_cuda_without_cuda_is_a_clear_error(tiny_llama, tmp_path):
    with pytest.raises(ValueError, match=r"CUDA is not available.*'cpu' or 'auto'"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="CUDA is not available"):
        extract(tiny_llama, random_ids(1, 4), "resid_post", device="cuda:0", out=tmp_path / "s", progress=False)
    assert not (tmp_path / "s").exists()


def test_unknown_device_names_the_accepted_ones():
    with pytest.raises(ValueError, match="unknown device 'gpu0'; use 'auto', 'cpu', 'cuda' or 'cuda:N'"):
        resolve_device("gpu0")


def test_dtype_names_and_refusals():
    assert resolve_dtype("bf16") is torch.bfloat16 and resolve_dtype("bfloat16") is torch.bfloat16
    assert resolve_dtype("fp16") is torch.float16 and resolve_dtype("half") is torch.float16
    assert resolve_dtype("float32") is torch.float32 and resolve_dtype(torch.float64) is torch.float64
    with pytest.raises(ValueError, match="unknown dtype 'fp8'; known: float32, fp32"):
        resolve_dtype("fp8")
    with pytest.raises(ValueError, match=r"torch.int64 is not a floating-point dtype"):
        resolve_dtype(torch.int64)


# -- batch sizing arithmetic -----------------------------------------------------------------------


@pytest.fixture
def smol_info(tiny_llama):
    """SmolLM2-135M's shape facts on the tiny model's ModelInfo (the arithmetic needs no weights)."""
    return dataclasses.replace(
        tiny_llama.info, n_layers=30, n_heads=9, n_kv_heads=3, d_model=576, d_head=64, d_mlp=1536, d_vocab=49152
    )


def test_batch_size_is_the_budget_over_the_estimate(smol_info):
    keys = resolve_sites("resid_post", None, 30)
    per_seq = forward_bytes_per_sequence(smol_info, 256, keys, 4)
    assert batch_size_for_memory(smol_info, 256, keys, 7 * per_seq + 1, 4) == 7
    assert batch_size_for_memory(smol_info, 256, keys, 7 * per_seq - 1, 4) == 6


def test_batch_size_is_monotone_at_least_one_and_capped(smol_info):
    keys = resolve_sites("resid_post", None, 30)
    sizes = [batch_size_for_memory(smol_info, 256, keys, 2.0**e, 4, cap=64) for e in range(10, 40)]
    assert sizes == sorted(sizes)
    assert sizes[0] == 1 and sizes[-1] == 64
    with pytest.raises(ValueError, match="cap must be at least 1, got 0"):
        batch_size_for_memory(smol_info, 256, keys, 1e9, 4, cap=0)


def test_shorter_sequences_and_cheaper_sites_give_larger_batches(smol_info):
    resid = resolve_sites("resid_post", None, 30)
    pattern = resolve_sites("pattern", [0, 10, 20, 29], 30)
    budget = 8 * 2**30
    by_len = [batch_size_for_memory(smol_info, s, resid, budget, 4, cap=10**6) for s in (128, 256, 512, 1024, 2048)]
    assert all(a > b for a, b in itertools.pairwise(by_len))
    assert batch_size_for_memory(smol_info, 1024, pattern, budget, 4) < batch_size_for_memory(
        smol_info, 1024, resid, budget, 4
    )
    with_logits = batch_size_for_memory(smol_info, 256, resid, budget, 4, cap=10**6, logits=True)
    assert with_logits < by_len[1]
    assert batch_size_for_memory(smol_info, 256, resid, budget, 2, cap=10**6) > by_len[1]  # bf16 halves activations


def test_auto_batch_size_follows_host_memory_and_caps_the_shard(tiny_llama, monkeypatch):
    keys = resolve_sites(SITES, None, tiny_llama.info.n_layers)
    assert auto_batch_size(tiny_llama, 16, keys) == CPU_BATCH_CAP  # plenty of memory: the CPU cap
    per_seq = forward_bytes_per_sequence(tiny_llama.info, 16, keys, 4)
    monkeypatch.setattr(devices, "host_available_bytes", lambda: 6 * per_seq)
    assert auto_batch_size(tiny_llama, 16, keys) == 3  # half of the available memory
    monkeypatch.setattr(devices, "host_available_bytes", lambda: None)
    shard = shard_bytes_per_sequence(tiny_llama.info, 16, keys, 2)
    monkeypatch.setattr(devices, "MAX_SHARD_BYTES", 5 * shard)
    assert auto_batch_size(tiny_llama, 16, keys, store_dtype=torch.float16) == 5
    with pytest.raises(ValueError, match=r"budget_fraction must lie in \(0, 1\], got 0"):
        auto_batch_size(tiny_llama, 16, keys, budget_fraction=0)


def test_extract_with_auto_batch_size_records_it(tiny_llama, tmp_path, monkeypatch):
    keys = resolve_sites("resid_post", None, tiny_llama.info.n_layers)
    monkeypatch.setattr(devices, "MAX_SHARD_BYTES", 3 * shard_bytes_per_sequence(tiny_llama.info, 8, keys, 4))
    store = extract(tiny_llama, random_ids(7, 8), "resid_post", batch_size="auto", out=tmp_path / "s", progress=False)
    assert store.manifest["batch_size"] == 3 and len(store.shard_bounds()) == 3
    with pytest.raises(ValueError, match="batch_size must be a positive int or 'auto', got 'big'"):
        extract(tiny_llama, random_ids(2, 8), "resid_post", batch_size="big", out=tmp_path / "t", progress=False)


# -- reduced precision -------------------------------------------------------------------------------


def test_bf16_compute_matches_fp32_approximately(tiny_llama, tmp_path):
    tokens = random_ids(4, 16)
    ref = extract(tiny_llama, tokens, SITES, out=tmp_path / "fp32", progress=False)
    low = extract(tiny_llama, tokens, SITES, dtype="bf16", out=tmp_path / "bf16", progress=False)
    assert low.manifest["compute_dtype"] == "bfloat16" and tiny_llama.dtype == torch.bfloat16
    for key in ref.keys:
        got = low.get(key.site, key.layer)
        assert got.dtype == torch.float32, key  # stored in the default store dtype
        assert _rel(got, ref.get(key.site, key.layer)) < 3e-2, key


def test_float16_store_holds_half_the_bytes(tiny_llama, tmp_path):
    tokens = random_ids(4, 16)
    ref = extract(tiny_llama, tokens, SITES, out=tmp_path / "fp32", progress=False)
    half = extract(tiny_llama, tokens, SITES, store_dtype="float16", out=tmp_path / "fp16", progress=False)
    assert half.manifest["store_dtype"] == "float16"
    for key in ref.keys:
        got = half.get(key.site, key.layer)
        assert got.dtype == torch.float16
        assert _rel(got, ref.get(key.site, key.layer)) < 2e-3, key
    size = lambda s: sum(p.stat().st_size for p in s.path.glob("shard_*"))  # noqa: E731
    assert size(half) < 0.55 * size(ref)


def test_attention_scores_with_masked_minus_inf_are_stored(tiny_llama, tmp_path):
    store = extract(tiny_llama, random_ids(2, 8), "attn_scores", layers=0, out=tmp_path / "s", progress=False)
    scores = store.get("attn_scores", 0)
    assert torch.isneginf(scores).any() and not torch.isnan(scores).any()


def test_one_tensor_at_two_sites_is_stored_at_both(tiny_llama, tmp_path):
    # resid_post.L is the very tensor resid_pre.L+1 reads (and embed is resid_pre.0): a shard may not share memory
    sites = ["embed", "resid_pre", "resid_post"]
    store = extract(tiny_llama, random_ids(2, 8), sites, out=tmp_path / "s", progress=False)
    assert torch.equal(store.get("resid_pre", 1), store.get("resid_post", 0))
    assert torch.equal(store.get("resid_pre", 0), store.get("embed"))


def test_one_writer_thread_on_cpu():
    assert _writer_count(torch.device("cpu")) == 1


# -- models split across devices (accelerate device maps) -----------------------------------------------

SPLIT = {
    "model.embed_tokens": "cpu",
    "model.rotary_emb": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.layers.2": "disk",
    "model.norm": "cpu",
    "lm_head": "cpu",
}


def _same_stores(a, b, atol: float = 0.0) -> None:
    assert a.keys == b.keys
    for key in a.keys:
        torch.testing.assert_close(a.get(key.site, key.layer), b.get(key.site, key.layer), atol=atol, rtol=0)


def test_dispatched_model_extracts_the_same_as_the_whole_one(tokenizer, tmp_path):
    from accelerate import dispatch_model

    whole = HFModel(tiny_llama_hf(), tokenizer, name="tiny")
    hf = dispatch_model(tiny_llama_hf(), SPLIT, offload_dir=str(tmp_path / "offload"))
    hf.hf_device_map = SPLIT  # what from_pretrained(device_map=...) records
    split = HFModel(hf, tokenizer, name="tiny")
    assert split.device_map == SPLIT and split.device == torch.device("cpu")
    assert next(hf.model.layers[1].parameters()).device.type == "meta"  # really offloaded
    tokens = random_ids(5, 12)
    _same_stores(
        extract(split, tokens, SITES, batch_size=2, out=tmp_path / "a", progress=False),
        extract(whole, tokens, SITES, batch_size=2, device="cpu", out=tmp_path / "b", progress=False),
    )
    torch.testing.assert_close(split.run(tokens).logits, whole.run(tokens).logits, atol=0, rtol=0)


def test_load_model_passes_device_map_to_from_pretrained(tokenizer, tmp_path):
    tiny_llama_hf().save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    path = str(tmp_path / "model")
    split = pp.load_model(path, device_map=SPLIT, offload_folder=str(tmp_path / "offload"))
    whole = pp.load_model(path)
    assert split.device_map is not None and whole.device_map is None
    tokens = random_ids(3, 8)
    _same_stores(
        extract(split, tokens, ["resid_post", "pattern"], out=tmp_path / "a", progress=False),
        extract(whole, tokens, ["resid_post", "pattern"], device="cpu", out=tmp_path / "b", progress=False),
    )
    assert pp.load_model(path, device_map="auto").device_map is None  # one device: an ordinary model


def test_dispatched_model_refuses_moves_and_casts(tokenizer, tmp_path):
    from accelerate import dispatch_model

    hf = dispatch_model(tiny_llama_hf(), SPLIT, offload_dir=str(tmp_path / "offload"))
    hf.hf_device_map = SPLIT
    split = HFModel(hf, tokenizer, name="tiny")
    assert split.to(device="cpu", dtype=torch.float32) is split  # already there: nothing to do
    with pytest.raises(ValueError, match=r"split across devices by a device map.*load it again"):
        split.to(dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="device='cpu' cannot apply; pass device='auto'"):
        extract(split, random_ids(2, 8), "resid_post", device="cpu", out=tmp_path / "a", progress=False)
    with pytest.raises(ValueError, match="cannot be cast to 'bf16' here: load it with dtype='bf16'"):
        extract(split, random_ids(2, 8), "resid_post", dtype="bf16", out=tmp_path / "b", progress=False)


# -- CUDA (skipped without a GPU) ---------------------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
def test_cuda_extraction_equals_cpu(tiny_llama, tiny_gemma3, tmp_path):
    for model in (tiny_llama, tiny_gemma3):
        tokens = random_ids(6, 32)
        cpu = extract(
            model, tokens, SITES, batch_size=4, device="cpu", out=tmp_path / f"{model.info.name}-cpu", progress=False
        )
        gpu = extract(
            model, tokens, SITES, batch_size=4, device="auto", out=tmp_path / f"{model.info.name}-gpu", progress=False
        )
        assert model.device.type == "cuda" and gpu.manifest["compute_dtype"] == "float32"
        for key in cpu.keys:
            assert _rel(gpu.get(key.site, key.layer), cpu.get(key.site, key.layer)) < 1e-4, (model.info.name, key)


@pytest.mark.gpu
@needs_cuda
def test_host_copies_are_pinned_non_blocking_and_exact():
    g = torch.Generator(device="cuda").manual_seed(0)
    acts = {
        SiteKey("resid_post", 0): torch.randn(4, 64, 32, device="cuda", generator=g),
        SiteKey("rot_q", 0): torch.randn(4, 2, 64, 8, device="cuda", generator=g).transpose(1, 2),
        SiteKey("pattern", 0): torch.rand(4, 2, 64, 64, device="cuda", generator=g).to(torch.bfloat16),
    }
    host = _to_host(acts, torch.float32, start=0, name="m")
    for key, x in acts.items():
        assert host[key].device.type == "cpu" and host[key].is_pinned() and host[key].dtype == torch.float32
        assert torch.equal(host[key], x.float().cpu()), key
    low = _to_host(acts, torch.float16, start=0, name="m")
    assert all(v.dtype == torch.float16 and v.is_pinned() for v in low.values())


@pytest.mark.gpu
@needs_cuda
def test_cuda_auto_batch_size_adapts_to_free_memory(tiny_llama, tmp_path):
    tiny_llama.to("cuda")
    resid = resolve_sites("resid_post", None, tiny_llama.info.n_layers)
    pattern = resolve_sites("pattern", None, tiny_llama.info.n_layers)
    big = auto_batch_size(tiny_llama, 128, resid)
    assert 1 <= big <= devices.GPU_BATCH_CAP
    assert auto_batch_size(tiny_llama, 128, pattern, budget_fraction=1e-6) <= auto_batch_size(
        tiny_llama, 128, resid, budget_fraction=1e-6
    )
    store = extract(tiny_llama, random_ids(9, 64), SITES, batch_size="auto", out=tmp_path / "s", progress=False)
    assert store.manifest["batch_size"] >= 1 and store.complete


@pytest.mark.gpu
@needs_cuda
def test_cuda_bf16_matches_fp32(tiny_llama, tmp_path):
    tokens = random_ids(4, 32)
    ref = extract(tiny_llama, tokens, SITES, device="cuda", out=tmp_path / "fp32", progress=False)
    low = extract(
        tiny_llama,
        tokens,
        SITES,
        device="cuda",
        dtype="bf16",
        store_dtype="bf16",
        out=tmp_path / "bf16",
        progress=False,
    )
    for key in ref.keys:
        got = low.get(key.site, key.layer)
        assert got.dtype == torch.bfloat16 and _rel(got, ref.get(key.site, key.layer)) < 3e-2, key


@pytest.mark.gpu
@needs_cuda
def test_cuda_and_cpu_split_by_a_device_map_equals_cpu(tokenizer, tmp_path):
    from accelerate import dispatch_model

    mixed = {**{k: 0 for k in SPLIT}, "model.layers.1": "cpu"}  # layer 1's weights stay on the host
    hf = dispatch_model(tiny_llama_hf(), mixed, main_device=0)
    hf.hf_device_map = mixed
    split = HFModel(hf, tokenizer, name="tiny")
    assert split.device == torch.device("cuda", 0)
    tokens = random_ids(5, 16)
    ref = extract(
        HFModel(tiny_llama_hf(), tokenizer, name="tiny"),
        tokens,
        SITES,
        device="cpu",
        out=tmp_path / "cpu",
        progress=False,
    )
    got = extract(split, tokens, SITES, out=tmp_path / "split", progress=False)
    for key in ref.keys:
        assert _rel(got.get(key.site, key.layer), ref.get(key.site, key.layer)) < 1e-4, key


@pytest.mark.gpu
@needs_cuda
def test_cuda_index_beyond_the_visible_gpus_is_refused():
    with pytest.raises(ValueError, match=r"only .* GPU"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")


# -- models no local machine holds: nnsight's remote execution -------------------------------------------------

BOUNDARY = ["embed", "resid_pre", "q", "k", "attn_out", "resid_mid", "mlp_post", "mlp_out", "resid_post"]


@pytest.mark.parametrize("build", ["llama", "gemma3"])
def test_remote_path_stores_what_posprobe_hooks_read(build, tokenizer, tmp_path):
    import conftest
    from nnsight import TransformersModel

    hf = getattr(conftest, f"tiny_{build}_hf")
    lm = TransformersModel(hf(), tokenizer=tokenizer)
    local = HFModel(hf(), tokenizer, name="tiny")
    padded = pp.data.from_texts(local, ["t1 t2 t3 t4 t5", "t5 t6", "t7"], padding_side="left", prepend_bos=True)
    for i, tokens in enumerate((random_ids(3, 12), padded)):
        # remote="local": nnsight serialises the request exactly as for NDIF and runs it in this process
        got = extract_remote(lm, tokens, BOUNDARY, remote="local", batch_size=2, out=tmp_path / f"r{i}", progress=False)
        ref = extract(local, tokens, BOUNDARY, batch_size=2, device="cpu", out=tmp_path / f"l{i}", progress=False)
        assert got.manifest["source"] == ref.manifest["source"]
        _same_stores(got, ref, atol=1e-6)


def test_remote_flag_reaches_nnsight_and_attention_sites_are_refused(tokenizer, tmp_path, monkeypatch):
    from nnsight import TransformersModel

    lm = TransformersModel(tiny_llama_hf(), tokenizer=tokenizer)
    seen = []
    trace = type(lm).trace

    def spy(self, *args, **kwargs):
        seen.append(kwargs["remote"])
        return trace(self, *args, **{**kwargs, "remote": False})

    monkeypatch.setattr(type(lm), "trace", spy)
    extract_remote(lm, random_ids(3, 8), "resid_post", layers=1, batch_size=2, out=tmp_path / "a", progress=False)
    assert seen == [True, True]
    with pytest.raises(ValueError, match=r"site 'pattern' lies inside attention.*supports: embed, pos_embed"):
        extract_remote(lm, random_ids(2, 8), "pattern", out=tmp_path / "b", progress=False)
    with pytest.raises(ValueError, match="site 'pos_embed' does not exist"):
        extract_remote(
            TransformersModel(tiny_llama_hf(), tokenizer=tokenizer),
            random_ids(2, 8),
            "pos_embed",
            out=tmp_path / "c",
            progress=False,
        )
