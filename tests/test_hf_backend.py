"""The Hugging Face backend: hooks are exact, sites are where TransformerLens puts them, padding is position-correct."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_logits_unchanged, random_ids

from posprobe.sites import SiteKey

NON_MAP_SITES = [
    "embed",
    "resid_pre",
    "resid_mid",
    "resid_post",
    "attn_out",
    "mlp_out",
    "mlp_post",
    "q",
    "k",
    "rot_q",
    "rot_k",
    "z",
]


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gemma3"])
def test_capturing_does_not_change_logits(fixture, request):
    model = request.getfixturevalue(fixture)
    x = random_ids(2, 12)
    with torch.no_grad():
        plain = model.hf(input_ids=x).logits
    keys = [SiteKey(s, None if s == "embed" else layer) for s in NON_MAP_SITES for layer in range(model.info.n_layers)]
    out = model.run(x, capture=sorted(set(keys)))
    assert_logits_unchanged(out.logits, plain, same_kernel=True)
    assert out.acts[SiteKey("resid_post", 1)].shape == (2, 12, model.info.d_model)
    assert out.acts[SiteKey("rot_k", 0)].shape == (2, 12, model.info.n_kv_heads, model.info.d_head)
    assert out.acts[SiteKey("mlp_post", 2)].shape == (2, 12, model.info.d_mlp)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gemma3"])
def test_pattern_equals_hf_eager_attentions(fixture, request):
    model = request.getfixturevalue(fixture)
    x = random_ids(2, 12, seed=1)
    hf = model.hf
    hf.set_attn_implementation("eager")
    with torch.no_grad():
        ref = hf(input_ids=x, output_attentions=True)
    hf.set_attn_implementation("sdpa")
    keys = [SiteKey("pattern", layer) for layer in range(model.info.n_layers)]
    out = model.run(x, capture=keys)
    assert_logits_unchanged(out.logits, ref.logits, same_kernel=False)
    for layer in range(model.info.n_layers):
        assert torch.allclose(out.acts[keys[layer]], ref.attentions[layer], atol=1e-6)


def test_sites_are_consistent_with_each_other(tiny_llama):
    """resid_mid = resid_pre + attn_out; resid_post = resid_mid + mlp_out; rot_q is q rotated."""
    x = random_ids(2, 10, seed=2)
    layer = 1
    keys = [SiteKey(s, layer) for s in ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "q", "rot_q")]
    acts = tiny_llama.run(x, capture=keys).acts
    get = lambda s: acts[SiteKey(s, layer)]  # noqa: E731
    assert torch.allclose(get("resid_mid"), get("resid_pre") + get("attn_out"), atol=1e-5)
    assert torch.allclose(get("resid_post"), get("resid_mid") + get("mlp_out"), atol=1e-5)
    assert torch.allclose(get("q")[:, 0], get("rot_q")[:, 0], atol=1e-6)  # position 0: no rotation
    assert torch.allclose(get("q").norm(dim=-1), get("rot_q").norm(dim=-1), atol=1e-4)  # rotation keeps norms


def test_hooks_edit_activations(tiny_llama):
    x = random_ids(1, 8, seed=3)
    base = tiny_llama.run(x).logits
    zeroed = tiny_llama.run(x, hooks={SiteKey("attn_out", 0): torch.zeros_like}).logits
    same = tiny_llama.run(x, hooks={SiteKey("attn_out", 0): lambda t: None}).logits
    assert not torch.allclose(base, zeroed)
    assert torch.equal(base, same)
    with pytest.raises(NotImplementedError, match="resid_mid"):
        tiny_llama.run(x, hooks={SiteKey("resid_mid", 0): torch.zeros_like})


def test_hooks_are_removed_after_run(tiny_llama):
    x = random_ids(1, 8)
    tiny_llama.run(x, capture=[SiteKey("resid_post", 0), SiteKey("pattern", 1)])
    hooked = [m for m in tiny_llama.hf.modules() if m._forward_hooks or m._forward_pre_hooks]
    assert hooked == []
    assert tiny_llama.hf.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gemma3"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_gives_the_activations_of_the_unpadded_sequence(fixture, side, request):
    model = request.getfixturevalue(fixture)
    lengths = [12, 7, 3]
    seqs = [random_ids(1, n, seed=i)[0] for i, n in enumerate(lengths)]
    width = max(lengths)
    tokens = torch.full((3, width), 1)
    mask = torch.zeros_like(tokens)
    for i, s in enumerate(seqs):
        sl = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
        tokens[i, sl], mask[i, sl] = s, 1
    keys = [SiteKey("resid_post", model.info.n_layers - 1), SiteKey("rot_q", 1), SiteKey("mlp_post", 0)]
    padded = model.run(tokens, attention_mask=mask, capture=keys)
    for i, s in enumerate(seqs):
        alone = model.run(s[None], capture=keys)
        sl = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
        for key in keys:
            assert torch.allclose(padded.acts[key][i, sl], alone.acts[key][0], atol=1e-4), (key, i)
        assert torch.allclose(padded.logits[i, sl], alone.logits[0], atol=1e-4)


def test_stop_at_layer_skips_the_rest(tiny_llama):
    x = random_ids(2, 8)
    full = tiny_llama.run(x, capture=[SiteKey("resid_post", 0)])
    early = tiny_llama.capture(x, [SiteKey("resid_post", 0)])
    assert torch.equal(full.acts[SiteKey("resid_post", 0)], early[SiteKey("resid_post", 0)])


def test_bert_sites_and_bidirectional_attention(tiny_bert):
    x = random_ids(2, 10)
    acts = tiny_bert.run(x, capture=[SiteKey("pos_embed", None), SiteKey("pattern", 0), SiteKey("resid_post", 1)]).acts
    pattern = acts[SiteKey("pattern", 0)]
    assert tiny_bert.info.position_scheme == "learned" and not tiny_bert.info.causal
    assert pattern[0, 0, 0, 5] > 0  # not causal
    assert torch.allclose(acts[SiteKey("pos_embed", None)][0], tiny_bert.hf.embeddings.position_embeddings.weight[:10])
    with torch.no_grad():
        ref = tiny_bert.hf(input_ids=x, token_type_ids=torch.zeros_like(x)).last_hidden_state
    assert torch.allclose(acts[SiteKey("resid_post", 1)], ref, atol=1e-5)


def test_info_reads_per_layer_rope_bases_and_windows(tiny_gemma3, tiny_llama):
    info = tiny_gemma3.info
    assert info.rope_bases == (1e4, 1e4, 1e6)
    assert info.sliding_windows == (8, 8, None)
    assert info.n_kv_heads == 1 and info.d_head == 32 and info.rope_pairing == "half"
    assert tiny_llama.info.rope_bases == (1e4,) * 3 and tiny_llama.info.rotary_dims == (16,) * 3


def test_random_init_copy_is_seeded_and_different(tiny_llama):
    a, b = tiny_llama.random_init_copy(7), tiny_llama.random_init_copy(7)  # the fixture itself was built with seed 0
    x = random_ids(1, 6)
    assert torch.equal(a.run(x).logits, b.run(x).logits)
    assert not torch.allclose(a.run(x).logits, tiny_llama.run(x).logits)
    assert a.info.n_layers == tiny_llama.info.n_layers


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m: m.run(random_ids(1, 4), capture=[SiteKey("resid", 0)]), "unknown site 'resid'; known sites: embed"),
        (lambda m: m.run(random_ids(1, 4), capture=[SiteKey("resid_post", 7)]), "layer 7 out of range"),
        (lambda m: m.run(random_ids(1, 200)), "beyond tiny-llama's context of 128"),
        (lambda m: m.run(torch.zeros(0, 0, dtype=torch.long)), "non-empty"),
        (lambda m: m.run(torch.tensor([[3, 999]])), r"token ids must lie in \[0, 256\)"),
    ],
)
def test_bad_input_is_named(tiny_llama, call, message):
    with pytest.raises(ValueError, match=message):
        call(tiny_llama)


def test_rotary_sites_on_a_non_rotary_model(tiny_bert):
    with pytest.raises(ValueError, match=r"needs a rotary model.*'learned'"):
        tiny_bert.run(random_ids(1, 4), capture=[SiteKey("rot_q", 0)])
