"""The packaged pretrained models: offline loading, real configs, agreement with TransformerLens and nnsight."""

from __future__ import annotations

import copy

import pytest
import torch

import posprobe as pp
from posprobe.extraction import extract
from posprobe.models.packaged import cache_dir
from posprobe.sites import SiteKey

pytestmark = pytest.mark.slow


def test_smollm2_loads_offline_with_its_real_config(smollm2):
    info = smollm2.info
    assert (info.n_layers, info.n_heads, info.n_kv_heads, info.d_model, info.d_head) == (30, 9, 3, 576, 64)
    assert info.rope_bases == (1e5,) * 30 and info.rope_pairing == "half" and info.position_scheme == "rope"
    assert (cache_dir() / "models" / "smollm2-135m" / "model.safetensors").exists()


def test_smollm2_predicts_real_text(smollm2):
    batch = pp.data.text_windows(smollm2, n=8, seq_len=256, seed=0)
    loss = smollm2.loss(batch.tokens).nanmean().item()
    assert loss < 4.0, f"mean next-token loss {loss:.2f} nats (ln vocab = 10.8)"


def test_transformer_lens_rotary_base_is_wrong_and_ours_is_right(smollm2):
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(
        "HuggingFaceTB/SmolLM2-135M", hf_model=copy.deepcopy(smollm2.hf), tokenizer=smollm2.tokenizer
    )
    assert bridge.cfg.rotary_base != 1e5
    assert set(smollm2.info.rope_bases) == {1e5}


def test_sites_equal_transformer_bridge_run_with_cache(smollm2):
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(
        "HuggingFaceTB/SmolLM2-135M", hf_model=copy.deepcopy(smollm2.hf), tokenizer=smollm2.tokenizer
    )
    x = pp.data.text_windows(smollm2, n=2, seq_len=32).tokens
    keys = [SiteKey("resid_post", 3), SiteKey("rot_q", 2), SiteKey("rot_k", 2), SiteKey("q", 5), SiteKey("mlp_post", 4)]
    # the bridge always runs eager attention; asking for every pattern makes us run eager too
    patterns = [SiteKey("pattern", layer) for layer in range(30)]
    ours = smollm2.run(x, capture=keys + patterns)
    names = {k.hook_name: k for k in keys + patterns[:3]}
    logits, cache = bridge.run_with_cache(x, names_filter=lambda n: n in names)
    assert (logits - ours.logits).abs().max() <= 1e-5
    for name, key in names.items():
        assert (cache[name] - ours[key]).abs().max() <= 1e-5, name


def test_sites_equal_nnsight_saves(smollm2):
    from nnsight import NNsight

    traced = NNsight(smollm2.hf)
    x = pp.data.text_windows(smollm2, n=2, seq_len=32, seed=1).tokens
    with traced.trace(x):
        resid = traced.model.layers[3].output.save()
        post = traced.model.layers[4].mlp.down_proj.input.save()
        attn = traced.model.layers[6].self_attn.output[0].save()
    ours = smollm2.run(x, capture=[SiteKey("resid_post", 3), SiteKey("mlp_post", 4), SiteKey("attn_out", 6)])
    assert (resid - ours["resid_post.3"]).abs().max() <= 1e-5
    assert (post - ours["mlp_post.4"]).abs().max() <= 1e-5
    assert (attn - ours["attn_out.6"]).abs().max() <= 1e-5


def test_loading_through_other_libraries_hooks_the_same_model(smollm2):
    from nnsight import NNsight

    wrapped = pp.load_model(NNsight(smollm2.hf))
    assert wrapped.hf is smollm2.hf
    plain = pp.load_model(smollm2.hf, tokenizer=smollm2.tokenizer)
    assert plain.info.rope_bases == smollm2.info.rope_bases


@pytest.mark.parametrize("side", ["left", "right"])
def test_smollm2_padding_invariance(smollm2, side):
    batch = pp.data.from_texts(smollm2, ["The State of the Union is strong.", "Congress"], padding_side=side)
    keys = [SiteKey("resid_post", 10), SiteKey("rot_q", 20)]
    padded = smollm2.run(batch.tokens, attention_mask=batch.attention_mask, capture=keys)
    real = batch.attention_mask[1].bool()
    alone = smollm2.run(batch.tokens[1:2, real], capture=keys)
    for key in keys:
        ref = alone[key][0]
        scale = ref.abs().max()
        assert (padded[key][1, real] - ref).abs().max() <= 1e-4 * max(1.0, scale), key


def test_smollm2_extraction_reads_back(smollm2, tmp_path):
    batch = pp.data.text_windows(smollm2, n=8, seq_len=256, seed=0)
    store = extract(
        smollm2, batch, ["resid_post", "rot_q", "mlp_post"], batch_size=4, out=tmp_path / "smol", progress=False
    )
    assert store.stack("resid_post").shape == (30, 8, 256, 576)
    assert store.get("rot_q", 29).shape == (8, 256, 9, 64)
    direct = smollm2.run(batch.tokens[:4], capture=[SiteKey("mlp_post", 7)])
    assert torch.equal(store.get("mlp_post", 7)[:4], direct["mlp_post.7"])


def test_gemma3_reports_local_and_global_bases():
    model = pp.load_model("gemma-3-270m")
    info = model.info
    assert info.n_layers == 18 and info.n_heads == 4 and info.n_kv_heads == 1 and info.d_head == 256
    globals_ = [i for i, t in enumerate(info.layer_types) if t == "full_attention"]
    assert globals_ == [5, 11, 17]
    assert all(info.rope_bases[i] == 1e6 for i in globals_)
    assert all(info.rope_bases[i] == 1e4 and info.sliding_windows[i] == 512 for i in range(18) if i not in globals_)
    batch = pp.data.text_windows(model, n=2, seq_len=64, seed=0)
    assert batch.prepend_bos and (batch.tokens[:, 0] == info.bos_token_id).all()
    loss = model.loss(batch.tokens).nanmean().item()
    assert loss < 4.5, loss


def test_minilm_loads_as_a_learned_position_encoder():
    model = pp.load_model("minilm-l6")
    assert model.info.position_scheme == "learned" and not model.info.causal and model.info.n_layers == 6
    batch = pp.data.from_texts(model, ["position lives here"])
    acts = model.run(batch.tokens, capture=[SiteKey("pos_embed", None), SiteKey("resid_post", 5)]).acts
    assert acts[SiteKey("resid_post", 5)].shape[-1] == 384
