"""Every supported Hugging Face family, checked against transformers itself on a tiny random-weight model.

One parametrised module over ``families.FAMILIES``: position facts read from the model, posprobe's
``pattern`` against transformers' eager ``output_attentions``, logits untouched by capturing,
``rot_q`` / ``rot_k`` against the rotated queries and keys transformers' own eager attention receives,
padding on either side, the residual identities, and every analysis run end to end.
"""

from __future__ import annotations

import contextlib
import sys

import numpy as np
import pytest
import torch
from conftest import assert_logits_unchanged, random_ids
from families import ALIBI, ENCODERS, FAMILIES, LEARNED, ROTARY, build

import posprobe as pp
from posprobe.models.hf import HFModel
from posprobe.models.position_schemes import alibi_slopes
from posprobe.sites import SiteKey

NAMES = list(FAMILIES)
INLINE = ("bloom", "mpt", "falcon")  # attention written inline: posprobe's eager copy runs for attention sites
PARALLEL = ("gpt_neox", "gptj", "phi", "falcon")
ATTENTION_SITES = ("q", "k", "rot_q", "rot_k", "z", "attn_scores", "pattern")


@pytest.fixture(scope="module")
def models(tokenizer):
    cache: dict[str, HFModel] = {}

    def get(family: str) -> HFModel:
        if family not in cache:
            cache[family] = pp.load_model(build(family), tokenizer=tokenizer)
        return cache[family]

    return get


def reference(model: HFModel, tokens: torch.Tensor, **kwargs):
    """transformers' own forward (no posprobe hooks): logits, or the last hidden state of an encoder."""
    with torch.no_grad():
        out = model.hf(input_ids=tokens, **kwargs)
    return out.last_hidden_state if model.layout.encoder else out.logits


@pytest.mark.parametrize("family", NAMES)
def test_position_facts_come_from_the_model(family, models):
    model = models(family)
    info = model.info
    expected = "rope" if family in ROTARY else "alibi" if family in ALIBI else "learned"
    assert info.position_scheme == expected
    assert info.causal == (family not in ENCODERS)
    assert info.parallel_residual == (family in PARALLEL)
    if family in ROTARY:
        rotary = model.rotary[0]
        assert np.allclose(info.rope_inv_freq[0], rotary.inv_freq().double().numpy(), rtol=1e-6)
        assert info.rotary_dims[0] == 2 * len(info.rope_inv_freq[0])
        assert {"rot_q", "rot_k"} <= set(model.available_sites())
    else:
        assert "rot_q" not in model.available_sites()
    if family in ALIBI:  # both builders give Press et al.'s slopes for 4 heads
        assert info.alibi_slopes == pytest.approx(alibi_slopes(info.n_heads).tolist())
    if family in LEARNED:
        assert "pos_embed" in model.available_sites()
        assert info.position_offset == (2 if family in ("opt", "roberta") else 0)
        assert info.n_ctx == 128  # RoBERTa: 130 table rows, the first two for padding
    assert model.info.summary()


def test_partial_rotary_and_pairing_as_the_families_define_them(models):
    facts = {f: (models(f).info.rotary_dims[0], models(f).info.rope_pairing) for f in ("gpt_neox", "gptj", "phi")}
    assert facts == {"gpt_neox": (4, "half"), "gptj": (8, "interleaved"), "phi": (6, "half")}  # 0.25·16, 8, 0.4·16
    gemma3 = models("gemma3").info
    assert gemma3.rope_bases == (1e4, 1e4, 1e6) and gemma3.sliding_windows == (6, 6, None)
    assert models("gemma2").info.attn_softcap == 50.0 and models("gemma2").info.final_softcap == 30.0


def test_llama3_scaled_frequencies_are_the_models_own(models):
    """rope_type llama3 divides the low frequencies by up to 32: posprobe reports what the model rotates with."""
    model = models("llama3")
    buffer = model.hf.model.rotary_emb.inv_freq.double().numpy()
    unscaled = 500000.0 ** (-np.arange(0, 16, 2) / 16)
    assert model.info.rope_types == ("llama3",) * 3 and model.info.rope_parameters["full_attention"]["factor"] == 32
    assert np.allclose(model.info.rope_inv_freq[1], buffer, rtol=1e-7)
    assert not np.allclose(buffer, unscaled) and np.isclose((unscaled / buffer).max(), 32.0)
    usage = pp.rope_frequency_usage(model, random_ids(2, 24), layers=[1], max_delta=8)
    rotary = usage.table.drop_duplicates("plane").query("rotary").sort_values("plane")
    assert np.allclose(rotary["theta"].to_numpy(), buffer, rtol=1e-7)


@pytest.mark.parametrize("family", NAMES)
def test_capturing_leaves_the_output_unchanged(family, models):
    model = models(family)
    x = random_ids(2, 12)
    plain = reference(model, x)
    sites = [s for s in model.available_sites() if s not in ("pattern", "attn_scores")]
    keys = sorted({SiteKey(s, None if s in ("embed", "pos_embed") else layer) for s in sites for layer in range(3)})
    out = model.run(x, capture=keys)
    got = out.logits if out.logits is not None else out.acts[SiteKey("resid_post", 2)]
    assert_logits_unchanged(got, plain, same_kernel=family not in INLINE)  # inline: posprobe's eager copy ran
    patterns = model.run(x, capture=[SiteKey("pattern", layer) for layer in range(3)])
    if patterns.logits is not None:
        assert_logits_unchanged(patterns.logits, plain, same_kernel=False)


@pytest.mark.parametrize("family", NAMES)
def test_pattern_equals_transformers_eager_attentions(family, models):
    model = models(family)
    x = random_ids(2, 12, seed=1)
    eager = build(family, attn_implementation="eager")  # same seed: the same weights, transformers' eager code
    with torch.no_grad():
        ref = eager(input_ids=x, output_attentions=True)
    keys = [SiteKey("pattern", layer) for layer in range(3)]
    out = model.run(x, capture=keys)
    for layer, key in enumerate(keys):
        assert torch.allclose(out.acts[key], ref.attentions[layer].float(), atol=1e-5), (family, layer)
    if out.logits is not None:
        assert_logits_unchanged(out.logits, ref.logits, same_kernel=False)


@pytest.mark.parametrize("family", [f for f in ROTARY if f not in INLINE])
def test_rot_q_and_rot_k_equal_the_rotated_vectors_transformers_attends_with(family, models, monkeypatch):
    """transformers' eager attention function receives the rotated queries and keys: record them there."""
    model = models(family)
    module = sys.modules[
        type(model.hf.get_submodule(model.layout.layers)[0].get_submodule(model.layout.attn)).__module__
    ]
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    original = module.eager_attention_forward

    def recording(mod, query, key, *args, **kwargs):
        seen.append((query.detach().clone(), key.detach().clone()))
        return original(mod, query, key, *args, **kwargs)

    monkeypatch.setattr(module, "eager_attention_forward", recording)
    x = random_ids(2, 14, seed=2)
    with torch.no_grad():
        build(family, attn_implementation="eager")(input_ids=x)
    acts = model.run(x, capture=[SiteKey(s, layer) for s in ("q", "k", "rot_q", "rot_k") for layer in range(3)]).acts
    for layer in range(3):
        query, key = seen[layer]
        rot_q, rot_k = acts[SiteKey("rot_q", layer)], acts[SiteKey("rot_k", layer)]
        assert torch.allclose(rot_q, query.transpose(1, 2), rtol=1e-5, atol=1e-5), (family, layer)
        assert torch.allclose(rot_k, key.transpose(1, 2), rtol=1e-5, atol=1e-5), (family, layer)
        q = acts[SiteKey("q", layer)]
        assert torch.allclose(q[:, 0], rot_q[:, 0], atol=1e-6)  # position 0 is not rotated
        assert torch.allclose(q.norm(dim=-1), rot_q.norm(dim=-1), atol=1e-4)  # rotation keeps norms


def test_falcon_rot_q_equals_what_its_own_rotary_returns(models, monkeypatch):
    """Falcon rotates inline (no attention function to read): record transformers' apply_rotary_pos_emb instead."""
    import transformers.models.falcon.modeling_falcon as falcon

    model = models("falcon")
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    original = falcon.apply_rotary_pos_emb

    def recording(q, k, cos, sin, *args, **kwargs):
        out = original(q, k, cos, sin, *args, **kwargs)
        seen.append((out[0].clone(), out[1].clone()))
        return out

    x = random_ids(2, 11, seed=9)
    monkeypatch.setattr(falcon, "apply_rotary_pos_emb", recording)
    reference(model, x)
    monkeypatch.setattr(falcon, "apply_rotary_pos_emb", original)
    acts = model.run(x, capture=[SiteKey(s, layer) for s in ("rot_q", "rot_k") for layer in range(3)]).acts
    for layer, (query, key) in enumerate(seen):
        assert torch.allclose(acts[SiteKey("rot_q", layer)], query.transpose(1, 2), atol=1e-6)
        assert torch.allclose(acts[SiteKey("rot_k", layer)], key.transpose(1, 2), atol=1e-6)


@pytest.mark.parametrize("family", NAMES)
def test_residual_stream_is_transformers_hidden_states(family, models):
    model = models(family)
    x = random_ids(2, 10, seed=3)
    with torch.no_grad():
        hidden = model.hf(input_ids=x, output_hidden_states=True).hidden_states
    acts = model.run(x, capture=[SiteKey("resid_pre", 0), SiteKey("resid_post", 0), SiteKey("resid_post", 1)]).acts
    assert torch.allclose(acts[SiteKey("resid_pre", 0)], hidden[0], atol=1e-6)
    assert torch.allclose(acts[SiteKey("resid_post", 0)], hidden[1], atol=1e-6)
    assert torch.allclose(acts[SiteKey("resid_post", 1)], hidden[2], atol=1e-6)


@pytest.mark.parametrize("family", [f for f in NAMES if f not in ENCODERS])  # post-LN encoders renormalise
def test_sub_blocks_add_up_to_the_residual_stream(family, models):
    model = models(family)
    x = random_ids(2, 10, seed=3)
    sites = ["resid_pre", "resid_post", "attn_out", "mlp_out"] + (["resid_mid"] if family not in PARALLEL else [])
    acts = model.run(x, capture=[SiteKey(s, 1) for s in sites]).acts
    get = lambda s: acts[SiteKey(s, 1)]  # noqa: E731
    if family in PARALLEL:
        with pytest.raises(ValueError, match="in parallel"):
            model.run(x, capture=[SiteKey("resid_mid", 1)])
        assert torch.allclose(get("resid_post"), get("resid_pre") + get("attn_out") + get("mlp_out"), atol=1e-5)
    else:
        assert torch.allclose(get("resid_mid"), get("resid_pre") + get("attn_out"), atol=1e-5)
        assert torch.allclose(get("resid_post"), get("resid_mid") + get("mlp_out"), atol=1e-5)


@pytest.mark.parametrize("family", NAMES)
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_gives_every_real_token_its_unpadded_activations(family, side, models):
    model = models(family)
    lengths = [11, 6, 3]
    seqs = [random_ids(1, n, seed=i)[0] for i, n in enumerate(lengths)]
    width = max(lengths)
    tokens, mask = torch.full((3, width), 1), torch.zeros(3, width, dtype=torch.long)
    for i, s in enumerate(seqs):
        where = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
        tokens[i, where], mask[i, where] = s, 1
    sites = ["resid_post", "mlp_post", "pattern"] + (["rot_q"] if family in ROTARY else [])
    keys = [SiteKey(s, layer) for s in sites for layer in (0, 2)]
    padded = model.run(tokens, attention_mask=mask, capture=keys).acts
    for i, s in enumerate(seqs):
        alone = model.run(s[None], capture=keys).acts
        where = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
        for key in keys:
            got = padded[key][i, :, where, where] if key.site == "pattern" else padded[key][i, where]
            assert torch.allclose(got, alone[key][0], atol=1e-4), (family, side, key, i)


@pytest.mark.parametrize("family", NAMES)
def test_every_analysis_runs(family, models, tmp_path):
    model = models(family)
    tokens = random_ids(6, 16, seed=4)
    probes = pp.probe_model(model, tokens, layers=[0, 2], n_splits=3)
    assert set(probes.table["layer"]) >= {0, 2}
    stats = pp.attention_stats(model, tokens, layers=[0, 2])
    assert stats.roles["role"].notna().all() and np.isfinite(stats.heads["entropy"]).all()
    store = pp.extract(model, tokens, sites=["mlp_post"], layers=[1], out=tmp_path / "store")
    neurons = pp.positional_neurons(store, layers=[1], device="cpu")
    assert len(neurons.table) == model.info.d_mlp
    if family in ENCODERS:
        with pytest.raises(ValueError, match="no language-model head"):
            pp.patch_positions(model, tokens[:2], layers=[1])
    else:
        patched = pp.patch_positions(model, tokens[:2], layers=[1])
        assert len(patched.table) and np.isfinite(patched.table["effect"]).all()
    if family in ROTARY:
        usage = pp.rope_frequency_usage(model, tokens, layers=[1], max_delta=4)
        assert np.isfinite(usage.table["q_norm"]).all()
    else:
        with pytest.raises(ValueError, match=f"position scheme {model.info.position_scheme!r}"):
            pp.rope_frequency_usage(model, tokens)


@pytest.mark.parametrize("family", NAMES)
def test_report_quick_composes_every_section(family, models, tmp_path):
    from posprobe.reporting import ReportSettings, build_report

    model = models(family)
    page = build_report(model, tmp_path, settings=ReportSettings(n=6, seq_len=16, seed=0, device="cpu"), progress=False)
    text = page.read_text()
    for key in ("model", "probes", "neurons", "attention", "shift"):
        assert f"<section id='{key}'>" in text, key
    assert ("<section id='rope'>" in text) == (family in ROTARY)


@pytest.mark.parametrize("family", [f for f in NAMES if f not in ENCODERS])  # TL adapts BertForMaskedLM, not BertModel
def test_a_transformer_bridge_loads_through_the_native_path(family, models, tokenizer):
    """A TransformerBridge is unwrapped to transformers' own modules (same tensors) and hooked natively."""
    from posprobe.models.bridge import boot_bridge

    bridge = boot_bridge(build(family), tokenizer)
    loaded = pp.load_model(bridge, tokenizer=tokenizer)
    assert isinstance(loaded, HFModel) and loaded.source == "transformer-lens"
    assert loaded.hf.get_input_embeddings().weight is bridge.original_model.get_input_embeddings().weight
    x = random_ids(2, 9, seed=5)
    keys = [SiteKey(s, 1) for s in ("resid_post", "mlp_post", "pattern")]
    ours, native = loaded.run(x, capture=keys), models(family).run(x, capture=keys)
    for key in keys:
        assert torch.equal(ours.acts[key], native.acts[key]), key
    with torch.no_grad():
        assert torch.allclose(bridge(x), native.logits, atol=1e-5)  # the bridge itself still runs


@pytest.mark.parametrize("family", NAMES)
def test_an_nnsight_model_loads_through_the_native_path(family, models, tokenizer):
    from nnsight import NNsight

    with pytest.warns(UserWarning) if family in ENCODERS else contextlib.nullcontext():  # 'output' submodule names
        wrapped = NNsight(build(family))
    loaded = pp.load_model(wrapped, tokenizer=tokenizer)
    assert isinstance(loaded, HFModel) and loaded.source == "nnsight"
    x = random_ids(2, 9, seed=6)
    key = SiteKey("resid_post", 2)
    assert torch.equal(loaded.run(x, capture=[key]).acts[key], models(family).run(x, capture=[key]).acts[key])


def mixtral(tokenizer):
    import transformers

    config = transformers.MixtralConfig(**FAMILIES["qwen2"][1] | {"num_local_experts": 4})
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def test_a_family_without_a_native_map_falls_back_to_the_bridge(tokenizer):
    """Mixtral's MLP is a mixture of experts (no single down projection): TransformerLens' hooks, one warning."""
    from posprobe.models.bridge import BridgeFallbackWarning, BridgeModel

    hf = mixtral(tokenizer)
    x = random_ids(2, 10, seed=7)
    with torch.no_grad():
        plain = hf(input_ids=x).logits
    with pytest.warns(BridgeFallbackWarning, match="no native map for model_type 'mixtral'") as caught:
        model = pp.load_model(hf, tokenizer=tokenizer)
    assert len(caught) == 1 and isinstance(model, BridgeModel)
    assert model.info.position_scheme == "rope" and model.info.n_kv_heads == 2
    assert np.allclose(model.info.rope_inv_freq[0], 1e6 ** (-np.arange(0, 16, 2) / 16))  # read from inv_freq
    keys = [SiteKey(s, 1) for s in ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "rot_q", "pattern")]
    out = model.run(x, capture=keys)
    assert torch.allclose(out.logits, plain, atol=1e-5)
    get = lambda s: out.acts[SiteKey(s, 1)]  # noqa: E731
    assert torch.allclose(get("resid_post"), get("resid_pre") + get("attn_out") + get("mlp_out"), atol=1e-5)
    assert torch.allclose(get("pattern").sum(-1), torch.ones(2, 4, 10), atol=1e-5)
    with pytest.raises(ValueError, match=r"mlp_post.*mixture of experts"):
        model.run(x, capture=[SiteKey("mlp_post", 1)])
    stats = pp.attention_stats(model, x, layers=[1])
    assert stats.roles["role"].notna().all()


def test_a_model_neither_posprobe_nor_transformerlens_knows_is_a_clear_error(tokenizer):
    import transformers

    xlnet = transformers.XLNetLMHeadModel(transformers.XLNetConfig(d_model=64, n_layer=2, n_head=4, d_inner=128,
                                                                   vocab_size=256)).eval()  # fmt: skip
    with pytest.raises(ValueError, match=r"model_type 'xlnet'.*TransformerLens has no adapter.*Two ways forward"):
        pp.load_model(xlnet, tokenizer=tokenizer)


def test_an_unknown_rope_scaling_type_is_named(tokenizer):
    hf = build("llama3")
    hf.config.rope_parameters = {**hf.config.rope_parameters, "rope_type": "spiral"}
    with pytest.raises(ValueError, match=r"unknown RoPE scaling type 'spiral'; transformers knows: default, .*yarn"):
        pp.load_model(hf, tokenizer=tokenizer)


def test_a_head_width_that_does_not_divide_d_model_is_named(tokenizer):
    hf = build("gpt2")
    hf.config.hidden_size = 66  # GPT-2's config has no head_dim: 66 / 4 heads is not a head width
    with pytest.raises(ValueError, match="hidden_size 66 is not a multiple of num_attention_heads 4"):
        pp.load_model(hf, tokenizer=tokenizer)


@pytest.mark.parametrize("family", [*ALIBI, "gpt2"])
def test_rope_analyses_on_a_model_without_rope_name_its_scheme(family, models):
    from posprobe.stats.rope_ablation import frequency_ablation_hooks

    model = models(family)
    scheme = model.info.position_scheme
    with pytest.raises(ValueError, match=f"position scheme '{scheme}'"):
        pp.rope_frequency_usage(model, random_ids(1, 8))
    with pytest.raises(ValueError, match=f"position scheme '{scheme}'"):
        frequency_ablation_hooks(model, [0], 0.5)
    with pytest.raises(ValueError, match=f"needs a rotary model.*'{scheme}'"):
        model.run(random_ids(1, 8), capture=[SiteKey("rot_q", 0)])


def test_falcon_with_alibi_reads_its_slopes_and_says_which_sites_it_lacks(tokenizer):
    import transformers

    config = transformers.FalconConfig(**FAMILIES["falcon"][1] | {"alibi": True})
    torch.manual_seed(0)
    model = pp.load_model(transformers.AutoModelForCausalLM.from_config(config).eval(), tokenizer=tokenizer)
    assert model.info.position_scheme == "alibi"
    assert model.info.alibi_slopes == pytest.approx(alibi_slopes(4).tolist())
    x = random_ids(2, 8)
    with torch.no_grad():
        plain = model.hf(input_ids=x).logits
    out = model.run(x, capture=[SiteKey("resid_post", 1), SiteKey("mlp_post", 0)])
    assert_logits_unchanged(out.logits, plain, same_kernel=True)
    with pytest.raises(ValueError, match=r"'pattern' is not available.*folds its bias into the attention mask"):
        model.run(x, capture=[SiteKey("pattern", 0)])


@pytest.mark.parametrize("family", ["llama3", "gemma3", "gpt_neox"])
def test_rope_facts_of_a_model_on_the_meta_device(family, models, tokenizer):
    """nnsight's remote models keep weights (and rotary buffers) on the meta device: transformers' own initialiser."""
    import transformers

    class_name, kwargs = FAMILIES[family]
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(getattr(transformers, class_name)(**kwargs))
    info = HFModel(hf, tokenizer).info
    for ours, real in zip(info.rope_inv_freq, models(family).info.rope_inv_freq, strict=True):
        assert np.allclose(ours, real, rtol=1e-6)
    assert info.rope_types == models(family).info.rope_types


@pytest.mark.parametrize("family", ["llama3", "gptj", "phi", "gemma3"])
def test_q_read_inside_attention_equals_q_at_the_projection(family, models, tokenizer):
    """Where no module gives q/k (fused qkv), posprobe turns the rotated ones back with the model's own frequencies.

    Checked where both routes exist: the un-rotated q/k equal the projection's, and an edit of q made inside
    attention (rotated forward again) changes the logits exactly as the same edit at the projection does.
    """
    import dataclasses

    native = models(family)
    inside_layout = dataclasses.replace(
        native.layout, sites={k: v for k, v in native.layout.sites.items() if k not in ("q", "k")}
    )
    inside = HFModel(native.hf, tokenizer, layout=inside_layout)
    x = random_ids(2, 12, seed=8)
    keys = [SiteKey(s, layer) for s in ("q", "k") for layer in (0, 2)]
    a, b = native.run(x, capture=keys).acts, inside.run(x, capture=keys).acts
    for key in keys:
        assert torch.allclose(a[key], b[key], rtol=1e-5, atol=1e-5), key

    def halve_head_0(t):
        out = t.clone()
        out[:, :, 0] *= 0.5
        return out

    edit = {SiteKey("q", 1): halve_head_0}
    assert torch.allclose(native.run(x, hooks=edit).logits, inside.run(x, hooks=edit).logits, atol=1e-5)
    assert not torch.allclose(native.run(x, hooks=edit).logits, native.run(x).logits, atol=1e-5)
