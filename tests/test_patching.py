"""Position patching and subspace patching on tiny models built so the answer is known."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
import torch
from conftest import random_ids, tiny_gemma3_hf, tiny_llama_hf

import posprobe as pp
from posprobe import data
from posprobe.models.hf import HFModel
from posprobe.models.zoo import ZOO_DIR, ZooModel
from posprobe.models.zoo_net import ZooConfig, ZooTransformer
from posprobe.stats.patching import corrupt_inputs, fit_site_probe, patch_positions, shift_invariance
from posprobe.stats.probe_estimators import RidgeProbe
from posprobe.stats.subspace import downstream_read_matrix, split_direction, subspace_patch

TINY = dict(d_model=32, n_layers=2, n_heads=2, d_head=16, d_mlp=64, n_ctx=32, d_vocab=4096)


def tiny_zoo(pe: str = "learned", name: str | None = None, **kw) -> ZooModel:
    """A random-weight zoo model; a large init makes positional effects far above float noise."""
    cfg = ZooConfig(pe=pe, init_std=kw.pop("init_std", 0.5), **{**TINY, **kw})
    return ZooModel(ZooTransformer(cfg), name=name or f"tiny-{pe}")


def toks(model, n: int = 3, s: int = 10, seed: int = 0) -> data.TokenBatch:
    return data.random_tokens(model, n=n, seq_len=s, seed=seed, prepend_bos=False)


def one_head_model(head: int = 1) -> ZooModel:
    """One-layer learned-PE zoo model in which position reaches the output only through ``head``.

    The position vectors w_p = 3 (cos 0.4p (e0 − e1) + sin 0.4p (e2 − e3)) / √2 live on dims 0-3,
    are orthogonal to the all-ones vector and have one norm, so no LayerNorm's mean or scale depends
    on p. Token embeddings, attention and MLP outputs write nothing to dims 0-3; the MLP's and the
    unembedding's LayerNorm gains are 0 there; other heads' W_O are 0. Only ``head``'s q, k, v read w_p.
    """
    model = tiny_zoo("learned", name="one-head", n_layers=1, n_heads=4, d_head=8)
    net = model.net
    phi = 0.4 * torch.arange(net.cfg.n_ctx, dtype=torch.float32)
    with torch.no_grad():
        w = torch.zeros_like(net.position.W_pos)
        w[:, 0], w[:, 1] = math.cos(0) * torch.cos(phi), -torch.cos(phi)
        w[:, 2], w[:, 3] = torch.sin(phi), -torch.sin(phi)
        net.position.W_pos.copy_(3 * w / math.sqrt(2))
        net.W_E[:, :4] = 0
        block = net.blocks[0]
        block.ln2.weight[:4] = 0
        net.ln_final.weight[:4] = 0
        block.attn.W_O[:, :, :4] = 0
        block.mlp.W_out[:, :4] = 0
        for h in range(4):
            if h != head:
                block.attn.W_O[h] = 0
        for W in (block.attn.W_Q, block.attn.W_K, block.attn.W_V):
            W[head, :4] *= 4
    return model


# -- ground truth ------------------------------------------------------------------------------------


def test_identical_input_gives_zero_effect():
    model = tiny_zoo("learned")
    sites = ["pos_embed", "resid_pre", "attn_out", "z", "mlp_out", "mlp_post"]
    result = patch_positions(model, toks(model, s=6), shift=0, sites=sites, layers=[1], heads=True, batch_size=6)
    table = result.table
    assert set(table["site"]) == set(sites) and table["position"].notna().all()
    assert set(table.loc[table["site"] == "z", "head"]) == {0, 1}
    assert table["effect"].abs().max() <= 1e-6
    assert table["normalized"].isna().all()  # no full change to normalise by


def test_identical_input_gives_zero_effect_on_hf_rotary_sites(tiny_llama):
    batch = random_ids(2, 8, seed=1)
    result = patch_positions(
        tiny_llama, batch, shift=0, mode="filler", sites=["rot_q", "rot_k", "z", "resid_post"], layers=[0], heads=True
    )
    assert result.table["effect"].abs().max() <= 1e-6
    assert set(result.table.loc[result.table["site"] == "rot_k", "head"]) == {0, 1}  # 2 kv heads


def test_pos_embed_patch_moves_decoded_position_by_the_shift():
    model = tiny_zoo("learned", d_model=64)
    # fit on every position the shifted run can reach: learned tables decode exactly only where seen
    probe = fit_site_probe(
        model, toks(model, n=4, s=32, seed=1), site="pos_embed", layer=None, estimator=RidgeProbe(alpha=1e-8)
    )
    k = 5
    result = patch_positions(model, toks(model, s=12), shift=k, sites=["pos_embed", "resid_post"], probe=probe)
    moved = result.table[(result.table["metric"] == "probe_position") & (result.table["site"] == "pos_embed")]
    assert len(moved) == 12
    np.testing.assert_allclose(moved["effect"], k, atol=0.05)
    np.testing.assert_allclose(moved["normalized"], 1.0, atol=0.01)
    later = result.table[(result.table["metric"] == "probe_position") & (result.table["site"] == "resid_post")]
    assert later["effect"].abs().max() == 0  # a patch after the probe's site cannot move its reading
    whole = patch_positions(model, toks(model, s=12), shift=k, sites="pos_embed", per_position=False, probe=probe)
    row = whole.table[whole.table["metric"] == "probe_position"].iloc[0]
    assert abs(row["effect"] - k) < 0.05 and pd.isna(row["position"])
    out = whole.table[whole.table["metric"] != "probe_position"]
    np.testing.assert_allclose(out["normalized"], 1.0, atol=1e-4)  # the only position signal of the model


def test_known_head_explains_the_whole_effect():
    head = 1
    model = one_head_model(head)
    result = patch_positions(
        model, toks(model, n=4, s=12), shift=6, sites=["z", "attn_out"], per_position=False, heads=True
    )
    table = result.table.set_index(["site", "head", "metric"])
    for metric in ("logprob", "kl"):
        assert table.loc[("attn_out", pd.NA, metric), "normalized"] == pytest.approx(1.0, abs=1e-3)
        assert table.loc[("z", head, metric), "normalized"] >= 0.95
        for other in (0, 2, 3):
            assert abs(table.loc[("z", other, metric), "normalized"]) <= 1e-6
    full = table.loc[("z", head, "kl")]
    assert full["corrupt"] > 1e-3  # the shift really changes the output


def test_filler_mode_aligns_tokens_and_final_residual_explains_all():
    model = tiny_zoo("none", name="tiny-nope")
    batch = toks(model, n=2, s=8)
    corrupt = corrupt_inputs(model, batch, 3, "filler")
    assert corrupt.tokens.shape == (2, 11) and torch.equal(corrupt.tokens[:, corrupt.index], batch.tokens)
    result = patch_positions(
        model, batch, shift=3, mode="filler", sites=["resid_pre", "resid_post"], layers=[0, 1], per_position=False
    )
    t = result.table.set_index(["site", "layer", "metric"])["normalized"]
    assert abs(t[("resid_pre", 0, "kl")]) <= 1e-6  # embeddings of aligned tokens are identical in NoPE
    assert t[("resid_post", 1, "kl")] == pytest.approx(1.0, abs=1e-5)
    assert t[("resid_post", 1, "logprob")] == pytest.approx(1.0, abs=1e-4)
    bos = data.random_tokens(model, n=2, seq_len=8, prepend_bos=True)
    shifted = corrupt_inputs(model, bos, 3, "filler")
    assert shifted.index.tolist()[:2] == [0, 4] and (shifted.tokens[:, 0] == bos.tokens[:, 0]).all()


def test_exactly_relative_model_has_no_normalised_effect(tiny_llama):
    result = patch_positions(tiny_llama, random_ids(2, 8), shift=4, sites="resid_pre", layers=[1], per_position=False)
    assert result.table["normalized"].isna().all()  # RoPE without sinks: shifting changes nothing
    fig = result.figure("kl", value="effect")
    assert isinstance(fig, go.Figure) and "Position patching" in fig.layout.title.text


def test_nnsight_wrapped_model_gives_the_same_table(tokenizer):
    from nnsight import NNsight

    hf = tiny_llama_hf()
    batch = random_ids(2, 8, seed=3)
    kw = dict(shift=2, mode="filler", sites="z", layers=[2], heads=True, per_position=False)
    direct = patch_positions(HFModel(hf, tokenizer, name="tiny"), batch, **kw).table
    wrapped = patch_positions(pp.load_model(NNsight(hf), tokenizer=tokenizer), batch, **kw).table
    np.testing.assert_allclose(direct["effect"], wrapped["effect"], atol=1e-7)


def test_heatmap_has_a_panel_per_site():
    model = tiny_zoo("learned")
    result = patch_positions(model, toks(model, n=2, s=6), shift=2, sites=["resid_pre", "z"], heads=True)
    fig = result.figure("logprob")
    assert len(fig.data) == 2 and fig.layout.xaxis.title.text.startswith("patched position")
    assert list(fig.data[1].y) == ["L0.H0", "L0.H1", "L1.H0", "L1.H1"]


# -- shift invariance -----------------------------------------------------------------------------


@pytest.mark.parametrize("pe", ["none", "rope", "alibi"])
def test_relative_schemes_are_shift_invariant(pe):
    model = tiny_zoo(pe)
    table = shift_invariance(model, toks(model, n=2, s=12), shifts=(1, 8, 19)).table
    assert list(table.columns[:6]) == ["model", "shift", "with_bos", "kl", "max_abs_logit_diff", "mean_abs_logit_diff"]
    assert (table["kl"].abs() <= 1e-6).all() and not table["with_bos"].any()


@pytest.mark.skipif(not (ZOO_DIR / "learned" / "model.safetensors").exists(), reason="no trained zoo checkpoints")
def test_trained_zoo_shift_invariance():
    from posprobe.models.zoo import load_zoo

    kl = {}
    for variant in ("none", "rope", "learned"):
        model = load_zoo(variant)
        kl[variant] = shift_invariance(model, toks(model, n=2, s=32), shifts=(8,)).table["kl"].iloc[0]
    assert kl["none"] <= 1e-6 and kl["rope"] <= 1e-6 and kl["learned"] > 1e-4


def test_learned_positions_are_not_shift_invariant_and_bos_variants(tiny_llama):
    model = tiny_zoo("learned")
    table = shift_invariance(model, toks(model, n=2, s=12), shifts=(1, 8), with_bos=(False, True)).table
    assert len(table) == 4 and (table["kl"] > 1e-3).all() and set(table["with_bos"]) == {False, True}
    hf = shift_invariance(tiny_llama, random_ids(2, 8), shifts=(1, 64)).table
    assert (hf["kl"] <= 1e-6).all()


def test_an_encoder_without_lm_head_compares_its_last_hidden_state(tiny_bert):
    table = shift_invariance(tiny_bert, random_ids(2, 8), shifts=(1, 4)).table
    assert (table["output"] == "final_hidden").all() and table["kl"].isna().all()
    # learned absolute positions: moving them moves the hidden state
    assert (table["max_abs_logit_diff"] > 1e-3).all() and (table["mean_abs_logit_diff"] > 0).all()


# -- subspace patching -----------------------------------------------------------------------------


def makelov_model() -> ZooModel:
    """Learned-PE zoo model built for Makelov et al.'s illusion at ``mlp_post.0``.

    Only neurons 0-31 write to the residual (W_out rows 32-63 are 0), so the row space of the
    read matrix W_outᵀ is exactly span(e_0 … e_31). Neuron 0 is dormant (W_in column and bias 0,
    so gelu(0) = 0 on every input) but writes strongly; neuron 40 varies with position and writes nothing.
    """
    model = tiny_zoo("learned", name="makelov", n_layers=1)
    mlp = model.net.blocks[0].mlp
    with torch.no_grad():
        mlp.W_out[32:] = 0
        mlp.W_in[:, 0] = 0
        mlp.b_in[0] = 0
        mlp.W_out[0] *= 20
        mlp.W_in[:, 40] *= 5
    return model


def test_read_matrix_row_space_is_the_writing_neurons():
    model = makelov_model()
    read = downstream_read_matrix(model, "mlp_post", 0)
    assert read.shape == (32, 64)
    e = torch.eye(64, dtype=torch.float64)
    row, null = split_direction(e[0] + e[40], read)
    torch.testing.assert_close(row, e[0])
    torch.testing.assert_close(null, e[40])


def test_illusion_is_flagged_and_clean_direction_is_not():
    model = makelov_model()
    fit, held = toks(model, n=3, s=10, seed=0), toks(model, n=3, s=10, seed=7)
    e = torch.eye(64)
    illusion = subspace_patch(
        model, fit, site="mlp_post", layer=0, direction=e[0] + e[40], shift=6, heldout_tokens=held
    )
    assert illusion.possible_illusion and len(illusion.flags) == 2 and illusion.flags["possible_illusion"].all()
    effects = illusion.table[illusion.table["metric"] == "kl"].set_index(["split", "patch"])["effect"]
    assert effects[("fit", "subspace")] > 1e-3
    assert effects[("fit", "row")] <= 1e-9 and effects[("fit", "null")] <= 1e-9
    assert illusion.flags["null_share"].tolist() == pytest.approx([1.0, 1.0])
    clean = subspace_patch(model, fit, site="mlp_post", layer=0, direction=e[5], shift=6, heldout_tokens=held)
    assert not clean.possible_illusion
    assert clean.flags["row_fraction"].tolist() == pytest.approx([1.0, 1.0])
    assert isinstance(illusion.figure(), go.Figure)


def test_zoo_read_matrix_is_the_linear_part_of_the_next_block():
    model = tiny_zoo("rope")
    block = model.net.blocks[1]
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(0))
    read = downstream_read_matrix(model, "resid_pre", 1).float()
    normed = block.ln1(x)
    sigma = (x.var(-1, unbiased=False) + block.ln1.eps).sqrt()[:, None]
    q = torch.einsum("nd,hdk->nhk", normed, block.attn.W_Q).reshape(5, -1)
    torch.testing.assert_close(x @ read[: q.shape[1]].T / sigma, q, atol=1e-4, rtol=1e-4)
    mlp_in = block.ln2(x) @ block.mlp.W_in
    torch.testing.assert_close(x @ read[-64:].T / sigma, mlp_in, atol=1e-4, rtol=1e-4)
    assert downstream_read_matrix(model, "resid_post", 1).shape == (4096, 32)  # last layer: the unembedding
    assert downstream_read_matrix(model, "resid_post", 0, scope="all").shape[0] == 3 * 32 + 64 + 4096


def test_residual_direction_of_a_llama_is_all_row_space(tiny_llama, tiny_gemma3):
    # the next block reads all 64 residual dims, so nothing is dormant-by-construction and nothing is flagged
    v = torch.randn(64, generator=torch.Generator().manual_seed(0))
    result = subspace_patch(
        tiny_llama, random_ids(2, 8), site="resid_pre", layer=1, direction=v, shift=2, mode="filler"
    )
    assert result.info.params["row_weight"] == pytest.approx(1.0) and not result.possible_illusion
    kl = result.table[result.table["metric"] == "kl"].set_index("patch")["effect"]
    assert kl["full"] > 0 and kl["row"] == pytest.approx(kl["subspace"], rel=1e-4) and kl["null"] == 0
    z = subspace_patch(
        tiny_gemma3, random_ids(2, 8), site="z", layer=0, direction=torch.ones(128), shift=2, mode="filler"
    )
    assert z.info.params["read_shape"] == (64, 128) and len(z.flags) == 1


@pytest.mark.parametrize("build", [tiny_llama_hf, tiny_gemma3_hf])
def test_hf_read_matrix_composes_the_rmsnorm_gain(build, tokenizer):
    hf = build()
    with torch.no_grad():
        for p in hf.parameters():
            if p.ndim == 1:
                p.normal_(generator=torch.Generator().manual_seed(1))  # non-trivial norm gains
    model = HFModel(hf, tokenizer)
    layer = model.hf.model.layers[0]
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    read = downstream_read_matrix(model, "resid_pre", 0).float()
    norm = layer.input_layernorm
    eps = getattr(norm, "variance_epsilon", None) or norm.eps
    rms = (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    q = layer.self_attn.q_proj(layer.input_layernorm(x))
    if layer.self_attn.q_proj.bias is not None:
        q = q - layer.self_attn.q_proj.bias
    torch.testing.assert_close(x @ read[: q.shape[1]].T / rms, q, atol=1e-4, rtol=1e-4)
    assert downstream_read_matrix(model, "z", 0).shape == (64, model.info.n_heads * model.info.d_head)


# -- bad input ---------------------------------------------------------------------------------------


def test_unequal_clean_and_corrupt_lengths_are_refused():
    model = makelov_model()
    with pytest.raises(ValueError, match="equal length"):
        subspace_patch(
            model,
            toks(model, s=10),
            corrupt_tokens=toks(model, s=12),
            site="mlp_post",
            layer=0,
            direction=torch.ones(64),
        )
    with pytest.raises(ValueError, match="either"):
        subspace_patch(model, toks(model), site="mlp_post", layer=0, direction=torch.ones(64))
    with pytest.raises(ValueError, match="vector of 64"):
        subspace_patch(model, toks(model), shift=1, site="mlp_post", layer=0, direction=torch.ones(32))
    with pytest.raises(ValueError, match="supports sites"):
        subspace_patch(model, toks(model), shift=1, site="rot_q", layer=0, direction=torch.ones(32))


def test_probe_from_another_site_or_model_is_refused():
    model = tiny_zoo("learned")
    batch = toks(model, n=2, s=8)
    on_mlp = fit_site_probe(model, batch, site="mlp_post", layer=0)
    with pytest.raises(ValueError, match="reads 64 features"):
        patch_positions(model, batch, shift=1, probe=on_mlp.estimator, probe_site="resid_pre.0")
    with pytest.raises(ValueError, match="disagrees"):
        patch_positions(model, batch, shift=1, probe=on_mlp, probe_site="resid_pre.0")
    other = tiny_zoo("learned", name="another-model")
    with pytest.raises(ValueError, match="fitted on model 'tiny-learned'"):
        patch_positions(other, batch, shift=1, probe=on_mlp)
    with pytest.raises(ValueError, match="probe_site"):
        patch_positions(model, batch, shift=1, probe=on_mlp.estimator)


def test_shift_beyond_the_learned_table_is_refused():
    model = tiny_zoo("learned")
    batch = toks(model, n=2, s=20)
    with pytest.raises(ValueError, match="beyond tiny-learned's context of 32"):
        patch_positions(model, batch, shift=13)
    with pytest.raises(ValueError, match="at most 12"):
        shift_invariance(model, batch, shifts=(64,))
    with pytest.raises(ValueError, match="non-negative integer"):
        patch_positions(model, batch, shift=-1)
    with pytest.raises(ValueError, match="unknown patching mode"):
        patch_positions(model, batch, shift=1, mode="swap")
    with pytest.raises(ValueError, match="attention maps"):
        patch_positions(model, batch, shift=1, sites="pattern")
    padded = data.TokenBatch(
        batch.tokens, torch.ones_like(batch.tokens).index_fill(1, torch.tensor([0]), 0), False, "x"
    )
    with pytest.raises(ValueError, match="filler mode needs unpadded"):
        patch_positions(model, padded, shift=1, mode="filler")
    with pytest.raises(ValueError, match="left padding"):
        patch_positions(model, padded, shift=1)
    with pytest.raises(ValueError, match="does not exist"):
        patch_positions(tiny_zoo("rope"), batch, shift=1, sites="pos_embed")


# -- the result contract (.table / .info / .figure(kind) / .save) ------------------------------------


def test_patch_result_contract(tmp_path):
    model = tiny_zoo("learned")
    batch = toks(model, n=3, s=8)
    probe = fit_site_probe(model, batch, site="resid_pre", layer=1)
    result = patch_positions(model, batch, shift=2, sites=["resid_pre", "pos_embed"], layers=[-1], probe=probe)
    info = result.info
    assert (info.analysis, info.model, info.site, info.layers) == (
        "patch_positions",
        "tiny-learned",
        "resid_pre,pos_embed",
        (1,),
    )
    assert (info.n_sequences, info.seq_len, info.n_tokens, info.prepend_bos, info.exclude_pos0) == (
        3,
        8,
        24,
        False,
        None,
    )
    assert dict(info.params) == {
        "model": "tiny-learned",
        "shift": 2,
        "mode": "offset",
        "sites": ["resid_pre.1", "pos_embed"],
        "per_position": True,
        "heads": False,
        "probe_site": "resid_pre.1",
        "n_sequences": 3,
        "seq_len": 8,
        "prepend_bos": False,
        "source": batch.source,
    }
    assert result.figure_kinds() == ["logprob", "kl", "probe_position"]
    assert "log-prob" in result.figure().layout.title.text
    for kind in result.figure_kinds():
        assert isinstance(result.figure(kind), go.Figure)
    assert "patched − clean" in result.figure("kl", value="effect").layout.title.text
    with pytest.raises(
        ValueError, match="unknown figure kind 'bogus' for PatchResult; kinds: logprob, kl, probe_position"
    ):
        result.figure("bogus")
    folder = result.save(tmp_path / "patch")
    written = {p.name for p in folder.iterdir()}
    assert written == {"table.csv", "table.parquet", "info.json", "logprob.html", "kl.html", "probe_position.html"}
    saved = json.loads((folder / "info.json").read_text())
    assert saved["params"]["sites"] == ["resid_pre.1", "pos_embed"] and saved["layers"] == [1]
    pd.testing.assert_frame_equal(pd.read_parquet(folder / "table.parquet"), result.table)
    without = patch_positions(model, batch, shift=2, per_position=False)
    assert without.figure_kinds() == ["logprob", "kl"]  # no probe, no probe_position figure


def test_patch_result_old_spellings_warn_and_agree():
    model = tiny_zoo("learned")
    result = patch_positions(model, toks(model, n=2, s=6), shift=2, per_position=False)
    with pytest.warns(DeprecationWarning, match=r"PatchResult.params is deprecated.*info.params"):
        params = result.params
    assert params == dict(result.info.params)
    with pytest.warns(DeprecationWarning, match=r"figure\(metric=...\) is deprecated"):
        old = result.figure(metric="kl", value="effect")
    assert old.to_json() == result.figure("kl", value="effect").to_json()
    with pytest.raises(TypeError, match="both kind 'kl' and metric 'logprob'"), pytest.warns(DeprecationWarning):
        result.figure("kl", metric="logprob")


def test_subspace_result_contract(tmp_path):
    model = makelov_model()
    e = torch.eye(64)
    fit, held = toks(model, n=2, s=8, seed=0), toks(model, n=2, s=8, seed=7)
    result = subspace_patch(model, fit, site="mlp_post", layer=0, direction=e[0] + e[40], shift=3, heldout_tokens=held)
    info = result.info
    assert (info.analysis, info.model, info.site, info.layers, info.n_sequences, info.seq_len) == (
        "subspace_patch",
        "makelov",
        "mlp_post",
        (0,),
        2,
        8,
    )
    assert list(info.params) == [
        "model",
        "site",
        "scope",
        "read_shape",
        "row_weight",
        "shift",
        "mode",
        "illusion_threshold",
        "min_fraction",
    ]
    assert (
        info.params["site"] == "mlp_post.0"
        and info.params["read_shape"] == (32, 64)
        and info.params["mode"] == "offset"
    )
    assert result.figure_kinds() == ["kl", "logprob"]
    assert "KL" in result.figure().layout.yaxis.title.text
    assert "log-prob" in result.figure("logprob").layout.yaxis.title.text
    with pytest.raises(ValueError, match="unknown figure kind 'effect' for SubspaceResult; kinds: kl, logprob"):
        result.figure("effect")
    folder = result.save(tmp_path / "sub")
    assert {p.name for p in folder.iterdir()} == {
        "table.csv",
        "table.parquet",
        "flags.csv",
        "flags.parquet",
        "info.json",
        "kl.html",
        "logprob.html",
    }
    assert json.loads((folder / "info.json").read_text())["params"]["read_shape"] == [32, 64]
    with pytest.warns(DeprecationWarning, match="SubspaceResult.params"):
        assert result.params == dict(info.params)
    with pytest.warns(DeprecationWarning, match=r"SubspaceResult.figure\(metric=...\)"):
        old = result.figure(metric="logprob")
    assert old.to_json() == result.figure("logprob").to_json()


def test_shift_invariance_contract(tmp_path, tiny_bert):
    model = tiny_zoo("learned")
    result = shift_invariance(model, toks(model, n=2, s=12), shifts=(1, 8), with_bos=(False, True))
    info = result.info
    assert (info.analysis, info.model, info.n_sequences, info.seq_len, info.n_tokens) == (
        "shift_invariance",
        "tiny-learned",
        2,
        12,
        24,
    )
    assert dict(info.params) == {"shifts": [1, 8], "with_bos": [False, True]} and info.notes == ()
    assert result.figure_kinds() == ["curves"]
    fig = result.figure()
    assert len(fig.data) == 2 and fig.layout.yaxis.title.text == "KL (nats)"
    assert result.figure("curves", value="max_abs_logit_diff").layout.yaxis.title.text == "max |Δ|"
    with pytest.raises(ValueError, match="unknown figure kind 'kl' for ShiftInvariance; kinds: curves"):
        result.figure("kl")
    folder = result.save(tmp_path / "shift")
    assert {p.name for p in folder.iterdir()} == {"table.csv", "table.parquet", "info.json", "curves.html"}
    encoder = shift_invariance(tiny_bert, random_ids(2, 8), shifts=(1, 4))
    assert "no language-model head" in encoder.info.notes[0]
    assert "last hidden state" in encoder.figure().layout.title.text  # kl is NaN: the hidden-state change is drawn


def test_shift_invariance_still_reads_as_its_old_dataframe():
    from posprobe.headlines import shift_headline

    model = tiny_zoo("learned")
    result = shift_invariance(model, toks(model, n=2, s=12), shifts=(1, 8))
    table = result.table
    with pytest.warns(DeprecationWarning, match=r"ShiftInvariance\[...\] .*deprecated.*ShiftInvariance.table\[...\]"):
        pd.testing.assert_series_equal(result["kl"], table["kl"])
    with pytest.warns(DeprecationWarning, match=r"len\(ShiftInvariance\)"):
        assert len(result) == len(table) == 2
    with pytest.warns(DeprecationWarning, match=r"ShiftInvariance.columns .*deprecated.*ShiftInvariance.table.columns"):
        assert list(result.columns) == list(table.columns)
    with pytest.warns(DeprecationWarning):
        assert "kl" in result and list(result) == list(table)
    with pytest.warns(DeprecationWarning):
        assert shift_headline(result) == shift_headline(table)
    with pytest.warns(DeprecationWarning):
        both = pd.concat([result, result], ignore_index=True)
    pd.testing.assert_frame_equal(both, pd.concat([table, table], ignore_index=True))


# -- one way in ----------------------------------------------------------------------------------------


def test_analyses_take_a_source_and_keyword_only_settings(tmp_path):
    model = tiny_zoo("learned")
    batch = toks(model, n=2, s=6)
    for call in (
        lambda: patch_positions(model, batch, 2),
        lambda: shift_invariance(model, batch, (1,)),
        lambda: subspace_patch(model, batch, batch, site="mlp_post", layer=0, direction=torch.ones(64)),
        lambda: fit_site_probe(model, batch, "resid_pre"),
    ):
        with pytest.raises(TypeError, match="positional argument"):
            call()
    store = pp.extract(model, batch, sites=["resid_pre"], layers=[0], out=tmp_path / "store", progress=False)
    for call in (
        lambda: patch_positions(store, shift=1),
        lambda: shift_invariance(tmp_path / "store"),
        lambda: subspace_patch(store, site="mlp_post", layer=0, direction=torch.ones(64), shift=1),
        lambda: fit_site_probe(store),
    ):
        with pytest.raises(ValueError, match="runs the model itself; pass a model"):
            call()
    with pytest.raises(ValueError, match="needs tokens"):
        patch_positions(model)


@pytest.mark.skipif(not (ZOO_DIR / "learned" / "model.safetensors").exists(), reason="no trained zoo checkpoints")
def test_a_model_name_is_a_source():
    model = pp.load_model("zoo:learned")
    batch = toks(model, n=2, s=8)
    kw = dict(shift=2, sites="resid_pre", layers=[0], per_position=False)
    by_name = patch_positions("zoo:learned", batch, **kw)
    pd.testing.assert_frame_equal(by_name.table, patch_positions(model, batch, **kw).table)
    assert by_name.info.model == model.info.name
    pd.testing.assert_frame_equal(
        shift_invariance("zoo:learned", batch, shifts=(1,)).table, shift_invariance(model, batch, shifts=(1,)).table
    )


def test_shift_invariance_curves_refuses_an_unknown_value():
    from posprobe.plots.patching import shift_invariance_curves

    model = tiny_zoo("rope")
    table = shift_invariance(model, toks(model, n=2, s=8), shifts=(1, 4)).table
    with pytest.raises(ValueError, match="unknown value 'r2'; accepted: kl, max_abs_logit_diff, mean_abs_logit_diff"):
        shift_invariance_curves(table, value="r2")
