"""RoPE frequency analyses (Barbero et al. 2024; Hong et al. 2024) on heads built to use known planes."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
import torch
from conftest import random_ids, tiny_llama_hf

from posprobe.models.hf import HFModel
from posprobe.models.zoo import ZooModel
from posprobe.models.zoo_net import ZooConfig, ZooTransformer
from posprobe.sites import SiteKey
from posprobe.stats.rope import (
    dim_thetas,
    kv_heads,
    layer_planes,
    rope_frequency_usage,
    rope_planes,
    rope_thetas,
)
from posprobe.stats.rope_ablation import ablated_planes, default_layer_groups, frequency_ablation_hooks, rope_ablation
from posprobe.stats.rope_roles import classify_heads

D_HEAD, N_PLANES = 16, 8  # tiny Llama: hidden 64 / 4 heads
PREV_HEAD, PLANE_HEAD = 0, 2  # layer-0 query heads built below; they read kv heads 0 and 1
TINY_ZOO = dict(d_model=32, n_layers=2, n_heads=2, d_head=16, d_mlp=64, n_ctx=32, d_vocab=4096)


def built_llama(tokenizer, plane: int = N_PLANES - 1) -> HFModel:
    """Tiny Llama whose layer-0 head 0 attends to the previous token through plane 0 (θ = 1 rad/token)
    and whose head 2 (with its kv head 1) uses only ``plane``.

    Head 0: q and k are constant (weights 0, biases set), q_z = A and k_z = B·e^{i}, so its plane-0 logit
    is scale·A·B·cos(Δ − 1): largest at Δ = 1, and 16 logit units above any other Δ < 16.
    """
    hf = tiny_llama_hf(num_hidden_layers=2, attention_bias=True)
    attn = hf.model.layers[0].self_attn
    with torch.no_grad():
        for proj, head in ((attn.q_proj, PREV_HEAD), (attn.k_proj, PREV_HEAD)):
            rows = slice(head * D_HEAD, (head + 1) * D_HEAD)
            proj.weight[rows] = 0
            proj.bias[rows] = 0
        attn.q_proj.bias[0] = 40.0
        attn.k_proj.bias[0], attn.k_proj.bias[N_PLANES] = 40.0 * math.cos(1.0), 40.0 * math.sin(1.0)
        for proj, head in ((attn.q_proj, PLANE_HEAD), (attn.k_proj, PLANE_HEAD // 2)):
            keep = torch.zeros(D_HEAD, dtype=torch.bool)
            keep[[plane, plane + N_PLANES]] = True
            rows = torch.arange(head * D_HEAD, (head + 1) * D_HEAD)
            proj.weight[rows[~keep]] = 0
            proj.weight[rows[keep]] *= 30  # large enough for a far-from-uniform pattern
            proj.bias[rows] = 0
    return HFModel(hf, tokenizer, name="built-llama")


def tiny_zoo(**kw) -> ZooModel:
    return ZooModel(
        ZooTransformer(ZooConfig(pe=kw.pop("pe", "rope"), init_std=0.5, **{**TINY_ZOO, **kw})), name="tiny-zoo"
    )


# -- plane geometry ---------------------------------------------------------------------------------


def test_half_and_interleaved_pairings_give_each_dim_its_theta():
    first, second = rope_planes(8, 8, "half")
    assert first.tolist() == [0, 1, 2, 3] and second.tolist() == [4, 5, 6, 7]
    first, second = rope_planes(8, 8, "interleaved")
    assert first.tolist() == [0, 2, 4, 6] and second.tolist() == [1, 3, 5, 7]
    first, second = rope_planes(8, 4, "half")  # partial rotary: dims 0-3 rotate, 4-7 do not
    assert first.tolist() == [0, 1, 4, 5] and second.tolist() == [2, 3, 6, 7]
    t = 100.0 ** -(np.arange(4) / 4)
    assert np.allclose(rope_thetas(100.0, 8), t)
    assert np.allclose(dim_thetas(8, 8, 100.0, "half"), np.concatenate([t, t]))
    assert np.allclose(dim_thetas(8, 8, 100.0, "interleaved"), np.repeat(t, 2))
    assert np.allclose(dim_thetas(8, 4, 100.0, "half"), [1, 0.1, 1, 0.1, 0, 0, 0, 0])


@pytest.mark.parametrize("pairing", ["half", "interleaved"])
def test_planes_rotate_as_complex_numbers_under_each_convention(pairing):
    """Hand-written RoPE (rotate_half for Hugging Face, rotate_every_two for GPT-J) turns plane z by e^{iθ·pos}."""
    d, rot, base = 12, 8, 50.0
    x = torch.randn(5, d, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    pos = torch.arange(5, dtype=torch.float64)[:, None]
    freqs = torch.as_tensor(rope_thetas(base, rot))
    if pairing == "half":
        emb = torch.cat([freqs, freqs]) * pos
        half = x[:, :rot]
        turned = torch.cat([-half[:, rot // 2 :], half[:, : rot // 2]], dim=-1)
    else:
        emb = freqs.repeat_interleave(2) * pos
        pairs = x[:, :rot].reshape(5, -1, 2)
        turned = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).reshape(5, rot)
    rotated = torch.cat([x[:, :rot] * emb.cos() + turned * emb.sin(), x[:, rot:]], dim=-1)
    first, second = rope_planes(d, rot, pairing)
    theta = torch.as_tensor(np.concatenate([rope_thetas(base, rot), np.zeros((d - rot) // 2)]))
    z = torch.complex(x[:, first], x[:, second])
    z_rot = torch.complex(rotated[:, first], rotated[:, second])
    assert torch.allclose(z_rot, z * torch.exp(1j * theta * pos), atol=1e-12)


def test_gqa_kv_head_mapping(tiny_llama):
    assert kv_heads(9, 3).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert kv_heads(4, 1).tolist() == [0, 0, 0, 0]
    assert kv_heads(4, 4).tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="n_heads=9 is not a multiple of n_kv_heads=2"):
        kv_heads(9, 2)
    table = rope_frequency_usage(tiny_llama, random_ids(2, 8), layers=[0]).table
    assert table.groupby("head")["kv_head"].first().tolist() == [0, 0, 1, 1]


@pytest.mark.parametrize("fixture", ["tiny_llama", "zoo"])
def test_table_planes_reproduce_the_model_rotation(fixture, request):
    """rot_q = q with plane z turned by e^{iθ·pos}, θ from the table: for HF and for zoo p-RoPE + partial rotary."""
    if fixture == "zoo":
        model = tiny_zoo(p_rope=0.5, rotary_fraction=0.5, rope_base=500.0)
        assert model.info.rotary_dims[0] == 4  # 8 rotary dims, the lowest half of the spectrum dropped
    else:
        model = request.getfixturevalue(fixture)
    x = random_ids(2, 10, seed=4)
    acts = model.run(x, capture=[SiteKey("q", 1), SiteKey("rot_q", 1)]).acts
    planes = layer_planes(model.info, 1)
    theta = torch.as_tensor(planes.theta, dtype=torch.float32)
    pos = torch.arange(10, dtype=torch.float32)[None, :, None, None]
    expected = planes.split(acts[SiteKey("q", 1)]) * torch.exp(1j * theta * pos)
    assert torch.allclose(planes.split(acts[SiteKey("rot_q", 1)]), expected, atol=1e-4)
    result = rope_frequency_usage(model, x, layers=[1])
    table = result.table
    if fixture == "zoo":
        assert "layers [1]: partial rotary, 4 of 16 dims rotate; the rest have θ = 0" in result.notes
        rotary = table[(table["head"] == 0) & table["rotary"]]
        assert np.allclose(rotary["theta"], model.info.extra["rope_inv_freq"])
        assert np.allclose(rotary["theta"], 500.0 ** -(np.arange(2) * 2 / 8))  # base^(-2i/d_rot) of the full spectrum
        assert (~table["rotary"]).sum() == 2 * (8 - 2) and (table.loc[~table["rotary"], "theta"] == 0).all()


def test_plane_norms_are_rotation_invariant(tiny_llama):
    x = random_ids(2, 12, seed=5)
    acts = tiny_llama.run(x, capture=[SiteKey("q", 0), SiteKey("rot_q", 0), SiteKey("k", 0), SiteKey("rot_k", 0)]).acts
    planes = layer_planes(tiny_llama.info, 0)
    for site in ("q", "k"):
        before, after = planes.split(acts[SiteKey(site, 0)]).abs(), planes.split(acts[SiteKey(f"rot_{site}", 0)]).abs()
        assert torch.allclose(before, after, atol=1e-5)
    table = rope_frequency_usage(tiny_llama, x, layers=[0]).table
    mean_q = planes.split(acts[SiteKey("rot_q", 0)]).abs().mean((0, 1))  # [heads planes]
    assert np.allclose(table["q_norm"], mean_q.ravel().numpy(), atol=1e-5)


# -- ground truth: built heads --------------------------------------------------------------------


@pytest.mark.parametrize("plane, role", [(N_PLANES - 1, "semantic"), (3, "mixed")])
def test_a_head_using_one_plane_puts_its_norm_there(tokenizer, plane, role):
    model = built_llama(tokenizer, plane=plane)
    result = rope_frequency_usage(model, random_ids(4, 16, seed=1), layers=[0])
    head = result.table[result.table["head"] == PLANE_HEAD].set_index("plane")
    assert head.loc[plane, "share"] > 0.99 and head.loc[plane, "q_share"] > 0.99
    assert head["share"].sum() == pytest.approx(1.0)
    roles = result.head_roles.set_index("head")
    assert roles.loc[PLANE_HEAD, "role"] == role, roles.loc[PLANE_HEAD, "rule"]
    if role == "semantic":
        assert roles.loc[PLANE_HEAD, "low_freq_share"] > 0.99
        assert roles.loc[PLANE_HEAD, "rule"].startswith("low_freq_share 1.000 ≥ 0.5")


def test_a_previous_token_head_on_the_highest_frequency_is_positional(tokenizer):
    model = built_llama(tokenizer)
    result = rope_frequency_usage(model, random_ids(4, 16, seed=2), layers=[0, 1], max_delta=15)
    roles = result.head_roles.set_index(["layer", "head"])
    prev = roles.loc[(0, PREV_HEAD)]
    assert prev["high_freq_share"] > 0.99 and prev["prev_token_score"] > 0.99
    assert prev["role"] == "positional" and "prev_token_score" in prev["rule"]
    assert list(result.head_roles.columns[:2]) == ["layer", "head"]
    assert {"high_freq_share", "prev_token_score", "diag_score", "role", "rule"} <= set(result.head_roles.columns)
    # its plane-0 contribution is scale·A·B·cos(Δ − 1), peaking at Δ = 1
    c = result.contributions.query("layer == 0 and head == @PREV_HEAD and plane == 0").set_index("delta")[
        "contribution"
    ]
    assert c.idxmax() == 1
    assert np.allclose(c.to_numpy(), 0.25 * 1600 * np.cos(np.arange(16) - 1.0), rtol=1e-4)
    assert result.classify().equals(result.head_roles)
    diffuse = classify_heads(result.table, result.pattern_scores.assign(prev_token_score=0.1, diag_score=0.1))
    assert (
        diffuse.set_index(["layer", "head"]).loc[(0, PREV_HEAD), "role"] == "mixed"
    )  # high frequency, no sharp pattern


@pytest.mark.parametrize("fixture, layer", [("tiny_llama", 1), ("tiny_gemma3", 0), ("tiny_gemma3", 2)])
def test_plane_contributions_sum_to_the_mean_logit_by_distance(fixture, layer, request):
    """Σ_planes contribution(Δ) = mean pre-softmax score over real (query, key) pairs at distance Δ; Gemma's
    query_pre_attn_scalar sets the scale and its sliding layers stop at Δ = window − 1."""
    model = request.getfixturevalue(fixture)
    x = random_ids(3, 20, seed=6)
    mask = torch.ones_like(x)
    mask[1, 14:] = 0  # right padding in one row: its pairs must not count
    x[1, 14:] = 1
    result = rope_frequency_usage(model, _batch(x, mask), layers=[layer], max_delta=12)
    scores = model.run(x, attention_mask=mask, capture=[SiteKey("attn_scores", layer)]).acts[
        SiteKey("attn_scores", layer)
    ]
    logits = result.head_logits().set_index(["head", "delta"])["logit"]
    window = model.info.sliding_windows[layer]
    assert logits.index.get_level_values("delta").max() == (window - 1 if window else 12)
    for delta in sorted(set(logits.index.get_level_values("delta"))):
        rows = [(b, i) for b in range(3) for i in range(delta, 20) if mask[b, i] and mask[b, i - delta]]
        ref = torch.stack([scores[b, :, i, i - delta] for b, i in rows]).mean(0)
        assert np.allclose(logits.xs(delta, level="delta").to_numpy(), ref.numpy(), atol=1e-5), delta
    if window:
        assert any(f"sliding window of {window} tokens applies; it limits" in note for note in result.notes)


def _batch(tokens, mask):
    from posprobe.data import TokenBatch

    return TokenBatch(tokens, mask, prepend_bos=False, source="test")


def test_padding_is_excluded(tiny_llama):
    seq = random_ids(1, 10, seed=7)
    alone = rope_frequency_usage(tiny_llama, seq, max_delta=5)
    for side in ("left", "right"):
        tokens, mask = torch.ones(2, 14, dtype=torch.long), torch.zeros(2, 14, dtype=torch.long)
        sl = slice(0, 10) if side == "right" else slice(4, 14)
        tokens[0, sl], mask[0, sl] = seq[0], 1
        tokens[1], mask[1] = tokens[0], mask[0]
        padded = rope_frequency_usage(tiny_llama, _batch(tokens, mask), max_delta=5)
        assert np.allclose(padded.table["q_norm"], alone.table["q_norm"], atol=1e-5)
        assert np.allclose(padded.contributions["contribution"], alone.contributions["contribution"], atol=1e-5)
        assert np.allclose(
            padded.pattern_scores["prev_token_score"], alone.pattern_scores["prev_token_score"], atol=1e-5
        )
    no_bos = rope_frequency_usage(tiny_llama, seq, max_delta=5, exclude_pos0=True)
    assert not np.allclose(no_bos.table["q_norm"], alone.table["q_norm"])
    assert any("excluding position 0" in note for note in no_bos.notes)


# -- ablations ------------------------------------------------------------------------------------


def test_ablated_planes_pick_the_lowest_or_highest_frequencies(tiny_llama):
    planes = layer_planes(tiny_llama.info, 0)
    assert ablated_planes(planes, 0.25, "lowest").tolist() == [6, 7]
    assert ablated_planes(planes, 0.5, "highest").tolist() == [0, 1, 2, 3]
    assert ablated_planes(planes, 1.0, "lowest").tolist() == list(range(8))


@pytest.mark.parametrize("mode", ["zero", "unrotate"])
def test_ablating_frequencies_a_head_does_not_use_leaves_its_pattern(tokenizer, mode):
    model = built_llama(tokenizer, plane=N_PLANES - 1)  # head 2 uses only the lowest plane
    x = random_ids(2, 16, seed=3)
    key = SiteKey("pattern", 0)
    base = model.run(x, capture=[key]).acts[key][:, PLANE_HEAD]
    unused = frequency_ablation_hooks(model, [0, 1], 0.75, "highest", mode)
    used = frequency_ablation_hooks(model, [0, 1], 0.25, "lowest", mode)
    assert (model.run(x, capture=[key], hooks=unused).acts[key][:, PLANE_HEAD] - base).abs().max() <= 1e-5
    # unrotating a plane of wavelength ~2·10^4 tokens moves a 16-token pattern only a little
    assert (model.run(x, capture=[key], hooks=used).acts[key][:, PLANE_HEAD] - base).abs().max() > 1e-3
    result = rope_ablation(model, x, ps=(0.75,), which=("highest",), layer_groups={"first": [0]}, mode=mode)
    row = result.heads.set_index(["layer", "head"]).loc[(0, PLANE_HEAD)]
    assert row["prev_token_after"] == pytest.approx(row["prev_token_before"], abs=1e-5)


def test_zeroing_before_the_rotation_equals_zeroing_after(tiny_llama):
    x = random_ids(2, 12, seed=8)
    planes = layer_planes(tiny_llama.info, 1)
    dims = list(planes.first[[1, 5]]) + list(planes.second[[1, 5]])

    def zero(t):
        t = t.clone()
        t[..., dims] = 0
        return t

    before = tiny_llama.run(x, hooks={SiteKey("q", 1): zero, SiteKey("k", 1): zero}).logits
    after = tiny_llama.run(x, hooks={SiteKey("rot_q", 1): zero, SiteKey("rot_k", 1): zero}).logits
    assert torch.allclose(before, after, atol=1e-5)
    assert not torch.allclose(before, tiny_llama.run(x).logits, atol=1e-4)


def test_unrotating_every_plane_is_nope():
    """p-RoPE with p = 1 (every plane stops rotating) is the NoPE model with the same weights."""
    rope = tiny_zoo()
    nope = ZooModel(ZooTransformer(rope.net.cfg.replace(pe="none")))
    x = random_ids(2, 12, seed=9)
    hooks = frequency_ablation_hooks(rope, range(2), 1.0, "lowest", "unrotate")
    assert torch.allclose(rope.run(x, hooks=hooks).logits, nope.run(x).logits, atol=1e-5)
    assert not torch.allclose(rope.run(x).logits, nope.run(x).logits, atol=1e-3)


def test_rope_ablation_reports_loss_and_heads_per_group(tiny_gemma3):
    groups = default_layer_groups(tiny_gemma3.info)
    assert groups["local"] == (0, 1) and groups["global"] == (2,) and groups["all"] == (0, 1, 2)
    x = random_ids(3, 20, seed=10)
    result = rope_ablation(tiny_gemma3, x, ps=(0.5, 1.0), which=("lowest", "highest"))
    assert len(result.table) == len(groups) * 2 * 2
    assert set(result.table["group"]) == set(groups)
    full = result.table.query("group == 'all' and p == 1.0")
    assert full["n_planes_ablated"].tolist() == [3 * 16, 3 * 16]  # head_dim 32: 16 planes per layer
    assert full["loss"].iloc[0] == pytest.approx(full["loss"].iloc[1])  # p = 1 removes every plane either way
    assert np.allclose(result.table["delta_loss"], result.table["loss"] - result.table["base_loss"])
    assert len(result.heads) == len(result.table) * 3 * 4
    assert {"prev_token_before", "prev_token_after", "diag_before", "diag_after", "delta_prev_token"} <= set(
        result.heads.columns
    )
    heads = result.figure("heads", group="local", which="highest")
    assert isinstance(result.figure(), go.Figure) and isinstance(heads, go.Figure)


# -- figures ------------------------------------------------------------------------------------------


def test_figures_carry_layer_head_theta_and_wavelength(tiny_gemma3):
    result = rope_frequency_usage(tiny_gemma3, random_ids(2, 12), max_delta=6)
    heat = result.figure()
    assert heat.data[0].z.shape == (3 * 4, 16) and "θ" in heat.data[0].hovertemplate
    assert "wavelength" in heat.data[0].hovertemplate and heat.data[0].customdata.shape == (12, 16, 5)
    spectra = result.figure("spectrum", layer=2)
    assert len(spectra.data) == 4 and spectra.layout.xaxis.type == "log"
    curves = result.figure("contribution", layer=2, head=1, top=3)
    assert len(curves.data) == 4 and "θ" in curves.data[1].hovertemplate
    assert isinstance(result.figure("roles"), go.Figure)
    with pytest.raises(ValueError, match="unknown value 'norm'"):
        result.figure(value="norm")
    with pytest.raises(ValueError, match="layer 7 not in the table"):
        result.figure("spectrum", layer=7)


# -- the result contract -----------------------------------------------------------------------------


def test_frequency_usage_records_its_run_in_info(tiny_llama):
    x = random_ids(3, 10, seed=13)
    result = rope_frequency_usage(tiny_llama, x, layers=[1, -1], max_delta=4, batch_size=2)
    info = result.info
    assert (info.analysis, info.model, info.layers) == ("rope_frequency_usage", "tiny-llama", (1, 2))
    assert (info.n_sequences, info.seq_len, info.n_tokens) == (3, 10, 30)
    assert info.causal is True and info.prepend_bos is False and info.exclude_pos0 is False and info.seed is None
    assert info.notes == result.notes and any("logit units" in note for note in info.notes)
    assert dict(info.params) == {
        "model": "tiny-llama",
        "layers": [1, 2],
        "batch_size": 2,
        "max_delta": 4,
        "logit_scale": 16**-0.5,
        "include_position_zero": True,
        "n_sequences": 3,
        "seq_len": 10,
        "n_tokens": 30,
    }
    no_bos = rope_frequency_usage(tiny_llama, x, layers=[1], max_delta=4, exclude_pos0=True)
    assert no_bos.info.exclude_pos0 is True and no_bos.info.n_tokens == no_bos.info.params["n_tokens"] == 27
    assert no_bos.info.params["include_position_zero"] is False


def test_frequency_usage_figures_by_kind(tiny_llama):
    result = rope_frequency_usage(tiny_llama, random_ids(2, 10, seed=14), max_delta=4)
    assert result.figure_kinds() == ["heatmap", "spectrum", "contribution", "roles"]
    default = result.figure()
    assert default.to_json() == result.figure("heatmap").to_json()
    q_share = result.figure("heatmap", value="q_share")
    assert q_share.data[0].colorbar.title.text == "share of the query norm"
    assert result.figure(value="q_share").to_json() == q_share.to_json()  # value= alone still picks the heatmap
    assert len(result.figure("spectrum", layer=0).data) == 4
    assert len(result.figure("contribution", layer=1, head=2, top=2).data) == 3
    assert isinstance(result.figure("roles"), go.Figure)
    with pytest.raises(ValueError, match=r"unknown figure kind 'norms'.*kinds: heatmap, spectrum, contribution, roles"):
        result.figure("norms")


def test_ablation_records_its_run_and_draws_by_kind(tiny_llama):
    x = random_ids(3, 10, seed=15)
    groups = {"early": [0], "late": (1, 2)}
    result = rope_ablation(tiny_llama, x, ps=(0.5,), which=("highest",), layer_groups=groups, batch_size=2)
    info = result.info
    assert (info.analysis, info.model, info.layers) == ("rope_ablation", "tiny-llama", (0, 1, 2))
    assert (info.n_sequences, info.seq_len, info.n_tokens, info.exclude_pos0) == (3, 10, 30, None)
    assert dict(info.params) == {
        "model": "tiny-llama",
        "ps": [0.5],
        "which": ["highest"],
        "mode": "zero",
        "groups": groups,
        "n_sequences": 3,
        "seq_len": 10,
        "source": "tensor",
    }
    assert result.loss is result.table and result.table["n_tokens"].tolist() == [27, 27]
    assert result.figure_kinds() == ["loss", "heads"]
    assert result.figure().to_json() == result.figure("loss").to_json()
    heads = result.figure("heads")  # default: the first group and direction of the run
    assert heads.to_json() == result.figure("heads", group="early", which="highest").to_json()
    with pytest.raises(ValueError, match=r"unknown figure kind 'prev'.*kinds: loss, heads"):
        result.figure("prev")


def test_results_save_tables_info_and_figures(tiny_llama, tmp_path):
    import json

    x = random_ids(2, 8, seed=16)
    usage = rope_frequency_usage(tiny_llama, x, layers=[0], max_delta=3)
    usage.save(tmp_path / "usage")
    names = ("table", "contributions", "pattern_scores", "head_roles")
    expected = {f"{n}.{ext}" for n in names for ext in ("csv", "parquet")} | {"info.json"}
    expected |= {"heatmap.html", "spectrum.html", "roles.html"}  # contribution needs a layer and a head
    assert {f.name for f in (tmp_path / "usage").iterdir()} == expected
    saved = json.loads((tmp_path / "usage" / "info.json").read_text())
    assert saved["analysis"] == "rope_frequency_usage" and saved["params"]["layers"] == [0]
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "usage" / "contributions.parquet"), usage.contributions)
    ablation = rope_ablation(tiny_llama, x, ps=(0.5,), which=("lowest",), layer_groups={"all": range(3)})
    ablation.save(tmp_path / "ablation")
    expected = {f"{n}.{ext}" for n in ("table", "heads") for ext in ("csv", "parquet")}
    assert {f.name for f in (tmp_path / "ablation").iterdir()} == expected | {"info.json", "loss.html", "heads.html"}
    assert json.loads((tmp_path / "ablation" / "info.json").read_text())["params"]["groups"] == {"all": [0, 1, 2]}


def test_deprecated_spellings_warn_and_give_the_same_numbers(tiny_llama):
    x = random_ids(2, 10, seed=17)
    new = rope_frequency_usage(tiny_llama, x, max_delta=4, exclude_pos0=True)
    with pytest.warns(DeprecationWarning, match="include_position_zero= is deprecated.*use exclude_pos0="):
        old = rope_frequency_usage(tiny_llama, x, max_delta=4, include_position_zero=False)
    for name, table in new.tables().items():
        pd.testing.assert_frame_equal(table, old.tables()[name], check_exact=True)
    assert old.info == new.info
    with pytest.warns(DeprecationWarning, match=r"RopeFrequencyUsage.params is deprecated.*info.params"):
        assert old.params == dict(new.info.params)
    for call, kind, options in [
        (lambda r: r.spectrum_figure(layer=1), "spectrum", {"layer": 1}),
        (lambda r: r.contribution_figure(1, 0, top=2), "contribution", {"layer": 1, "head": 0, "top": 2}),
        (lambda r: r.roles_figure(), "roles", {}),
        (lambda r: r.figure("q_norm"), "heatmap", {"value": "q_norm"}),
    ]:
        with pytest.warns(DeprecationWarning, match="is deprecated"):
            fig = call(new)
        assert fig.to_json() == new.figure(kind, **options).to_json(), kind
    ablation = rope_ablation(tiny_llama, x, ps=(0.5,), which=("lowest", "highest"), layer_groups={"all": [0, 1, 2]})
    with pytest.warns(DeprecationWarning, match=r"RopeAblation.heads_figure\(\) is deprecated"):
        fig = ablation.heads_figure(which="highest")
    assert fig.to_json() == ablation.figure("heads", group="all", which="highest").to_json()
    with pytest.warns(DeprecationWarning, match="RopeAblation.params is deprecated"):
        assert ablation.params == dict(ablation.info.params)


def test_exclude_pos0_drops_position_zero_and_is_checked(tiny_llama):
    x = random_ids(2, 10, seed=18)
    kept = rope_frequency_usage(tiny_llama, x, layers=[0], max_delta=4)
    dropped = rope_frequency_usage(tiny_llama, x, layers=[0], max_delta=4, exclude_pos0=True)
    assert kept.info.n_tokens == 20 and dropped.info.n_tokens == 18
    assert not np.allclose(kept.table["q_norm"], dropped.table["q_norm"])
    assert any("excluding position 0" in note for note in dropped.info.notes)
    assert not any("excluding position 0" in note for note in kept.info.notes)
    # the mean plane norm over positions 1.. only, read straight from the model
    q = dropped.table.query("head == 0")["q_norm"].to_numpy()
    acts = tiny_llama.run(x, capture=[SiteKey("q", 0)]).acts[SiteKey("q", 0)]
    planes = layer_planes(tiny_llama.info, 0)
    assert np.allclose(q, planes.split(acts[:, 1:]).abs().mean((0, 1))[0].numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="exclude_pos0 must be True or False, got 'both'"):
        rope_frequency_usage(tiny_llama, x, exclude_pos0="both")


def test_batches_do_not_change_the_numbers(tiny_llama):
    x = random_ids(5, 12, seed=19)
    whole = rope_frequency_usage(tiny_llama, x, max_delta=6, batch_size=5)
    rows = rope_frequency_usage(tiny_llama, x, max_delta=6, batch_size=2)
    for name, table in whole.tables().items():
        pd.testing.assert_frame_equal(table, rows.tables()[name], check_exact=False, atol=1e-5)
    one = rope_ablation(tiny_llama, x, ps=(0.5,), which=("lowest",), layer_groups={"all": [0, 1, 2]}, batch_size=5)
    two = rope_ablation(tiny_llama, x, ps=(0.5,), which=("lowest",), layer_groups={"all": [0, 1, 2]}, batch_size=2)
    assert np.allclose(one.table["loss"], two.table["loss"], atol=1e-5)
    assert np.allclose(one.heads["prev_token_after"], two.heads["prev_token_after"], atol=1e-5)


def test_source_is_anything_load_model_accepts_and_the_rest_is_keyword_only():
    import posprobe as pp

    x = random_ids(2, 8, seed=20, high=100)
    by_name = rope_frequency_usage("zoo:rope", x, layers=[0], max_delta=3)
    loaded = rope_frequency_usage(pp.load_model("zoo:rope", device="cpu"), x, layers=[0], max_delta=3)
    assert by_name.info.model == loaded.info.model == "zoo:rope"
    assert np.allclose(by_name.table["share"], loaded.table["share"], atol=1e-5)
    ablation = rope_ablation("zoo:rope", x, ps=(0.5,), which=("lowest",), layer_groups={"first": [0]})
    assert ablation.info.model == "zoo:rope"
    with pytest.raises(TypeError, match="positional argument"):
        rope_frequency_usage("zoo:rope", x, [0])
    with pytest.raises(TypeError, match="positional argument"):
        rope_ablation("zoo:rope", x, (0.5,))
    with pytest.raises(ValueError, match="running zoo:rope needs tokens"):
        rope_frequency_usage("zoo:rope")


# -- bad input ----------------------------------------------------------------------------------------


def test_a_model_without_rope_is_refused_naming_its_scheme(tiny_bert):
    x = random_ids(1, 8)
    with pytest.raises(ValueError, match="uses position scheme 'learned'; accepted position scheme: 'rope'"):
        rope_frequency_usage(tiny_bert, x)
    with pytest.raises(ValueError, match="position scheme 'learned'"):
        rope_ablation(tiny_bert, x)
    with pytest.raises(ValueError, match="position scheme 'alibi'"):
        rope_frequency_usage(tiny_zoo(pe="alibi"), x)


def test_bad_arguments_name_the_bad_value(tiny_llama):
    x = random_ids(1, 8)
    with pytest.raises(ValueError, match="unknown RoPE pairing 'neox'; accepted pairings: half, interleaved"):
        rope_planes(8, 8, "neox")
    with pytest.raises(ValueError, match="rotary_dims=10"):
        rope_planes(8, 10, "half")
    with pytest.raises(ValueError, match="layer 5 out of range"):
        rope_frequency_usage(tiny_llama, x, layers=[5])
    with pytest.raises(ValueError, match="max_delta=-1"):
        rope_frequency_usage(tiny_llama, x, max_delta=-1)
    with pytest.raises(ValueError, match="unknown which 'middle'; accepted: lowest, highest"):
        rope_ablation(tiny_llama, x, which=("middle",))
    with pytest.raises(ValueError, match=r"ps must lie in \(0, 1\], got 1.5"):
        rope_ablation(tiny_llama, x, ps=(1.5,))
    with pytest.raises(ValueError, match="unknown ablation mode 'drop'; accepted: zero, unrotate"):
        rope_ablation(tiny_llama, x, mode="drop")
    with pytest.raises(ValueError, match="layer group 'none' is empty"):
        rope_ablation(tiny_llama, x, layer_groups={"none": []})
    with pytest.raises(ValueError, match="high_fraction must lie in"):
        classify_heads(rope_frequency_usage(tiny_llama, x).table, None, high_fraction=0.8)
    with pytest.raises(ValueError, match="every token is padding"):
        rope_frequency_usage(tiny_llama, x[:, :1], exclude_pos0=True)


# -- pretrained models (slow) -----------------------------------------------------------------------


@pytest.mark.slow
def test_gemma3_local_and_global_layers_report_their_own_bases():
    import posprobe as pp

    model = pp.load_model("gemma-3-270m")
    result = rope_frequency_usage(model, random_ids(1, 24, seed=11, high=1000), layers=[0, 5, 11, 17], max_delta=8)
    bases = result.table.groupby("layer")["base"].unique()
    assert bases[0].tolist() == [1e4] and bases[5].tolist() == [1e6] and bases[11].tolist() == [1e6]
    windows = result.table.groupby("layer")["window"].first()
    assert windows[0] == 512 and windows[[5, 11, 17]].isna().all()
    assert set(result.table["kv_head"]) == {0} and result.table["head"].nunique() == 4
    assert result.table.query("layer == 5 and plane == 127")["theta"].iloc[0] == pytest.approx(1e6 ** (-254 / 256))


@pytest.mark.slow
def test_smollm2_reports_base_1e5_and_nine_heads_on_three_kv_heads(smollm2):
    result = rope_frequency_usage(smollm2, random_ids(1, 24, seed=12, high=1000), layers=[0, 29], max_delta=8)
    assert set(result.table["base"]) == {1e5}
    mapping = result.table.groupby("head")["kv_head"].first()
    assert mapping.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert result.table["plane"].nunique() == 32 and result.table["rotary"].all()
    assert set(result.head_roles["role"]) <= {"positional", "semantic", "mixed"}
