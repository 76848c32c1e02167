"""The position zoo: each scheme against its closed form, invariances, training, shipped checkpoints."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
import torch
from conftest import assert_logits_unchanged

from posprobe.models.position_schemes import SCHEMES, alibi_slopes, rope_inv_freq
from posprobe.models.zoo import ZOO_DIR, ZOO_VARIANTS, ZooModel, load_checkpoint, load_zoo
from posprobe.models.zoo_net import ZooConfig, ZooTransformer
from posprobe.sites import SITES, SiteKey, resolve_sites

TINY = dict(d_model=32, n_layers=2, n_heads=2, d_head=16, d_mlp=64, n_ctx=32, d_vocab=4096)


def tiny(pe: str, init_std: float = 0.5, seed: int = 0, **kw) -> ZooModel:
    """A random-weight zoo model; a large init makes positional effects far above float noise."""
    return ZooModel(ZooTransformer(ZooConfig(pe=pe, init_std=init_std, seed=seed, **{**TINY, **kw})), name=f"tiny-{pe}")


def ids(n: int, s: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(2, 4096, (n, s), generator=torch.Generator().manual_seed(seed))


def all_keys(model: ZooModel) -> list[SiteKey]:
    return resolve_sites(list(model.available_sites()), None, model.info.n_layers)


# -- position schemes against their definitions ---------------------------------------------


def test_rope_scores_depend_only_on_relative_offset():
    model = tiny("rope")
    tokens = ids(2, 12)
    pos = torch.arange(12).expand(2, 12)
    keys = [SiteKey("attn_scores", layer) for layer in range(2)] + [SiteKey("rot_q", 0)]
    base = model.capture(tokens, keys, position_ids=pos)
    shifted = model.capture(tokens, keys, position_ids=pos + 37)
    assert not torch.allclose(base[SiteKey("rot_q", 0)], shifted[SiteKey("rot_q", 0)], atol=1e-2)  # rotation is real
    for layer in range(2):
        key = SiteKey("attn_scores", layer)
        assert base[key][torch.isfinite(base[key])].abs().mean() > 1.0
        torch.testing.assert_close(shifted[key], base[key], atol=1e-5, rtol=1e-5)


def test_rope_half_pairing_matches_formula():
    model = tiny("rope", rotary_fraction=0.5)  # 8 of 16 dims rotate, pairs (i, i + 4)
    tokens = ids(1, 6)
    got = model.capture(tokens, [SiteKey("q", 0), SiteKey("rot_q", 0)])
    q, rot = got[SiteKey("q", 0)][0], got[SiteKey("rot_q", 0)][0]  # [s heads d_head]
    inv = 10000.0 ** (-torch.arange(0, 8, 2, dtype=torch.float64) / 8)
    for p in range(6):
        for i in range(4):
            c, s = math.cos(p * inv[i]), math.sin(p * inv[i])
            a, b = q[p, :, i].double(), q[p, :, i + 4].double()
            torch.testing.assert_close(rot[p, :, i].double(), a * c - b * s, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(rot[p, :, i + 4].double(), b * c + a * s, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rot[:, :, 8:], q[:, :, 8:])
    assert model.info.rope_pairing == "half" and model.info.rotary_dims == (8, 8)


def test_p_rope_leaves_lowest_frequency_planes_unrotated():
    model = tiny("rope", p_rope=0.5)  # 8 planes, the 4 lowest dropped
    full = rope_inv_freq(16, 10000.0, 1.0, 0.0)
    torch.testing.assert_close(model.net.position.inv_freq, full[:4])
    got = model.capture(ids(1, 10), [SiteKey("k", 1), SiteKey("rot_k", 1)])
    k, rot = got[SiteKey("k", 1)], got[SiteKey("rot_k", 1)]
    assert torch.equal(rot[..., 8:], k[..., 8:])
    assert not torch.allclose(rot[:, 1:, :, :8], k[:, 1:, :, :8], atol=1e-3)
    assert model.info.rotary_dims == (8, 8) and model.info.extra["p_rope"] == 0.5


def test_alibi_adds_minus_slope_times_distance():
    alibi = tiny("alibi", n_heads=4, d_head=8)
    nope = ZooModel(ZooTransformer(alibi.net.cfg.replace(pe="none")))
    nope.net.load_state_dict(alibi.net.state_dict())  # same weights: neither scheme has parameters
    tokens, key = ids(2, 9), SiteKey("attn_scores", 0)
    diff = alibi.capture(tokens, [key])[key] - nope.capture(tokens, [key])[key]
    dist = torch.arange(9).view(9, 1) - torch.arange(9).view(1, 9)
    slopes = torch.tensor([2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8])
    expected = (-slopes.view(4, 1, 1) * dist).expand(2, 4, 9, 9)
    causal = dist >= 0
    torch.testing.assert_close(diff[..., causal], expected[..., causal], atol=1e-5, rtol=1e-5)
    assert alibi.info.extra["alibi_slopes"] == slopes.tolist()


def test_alibi_slopes_for_non_power_of_two():
    # the 4-head slopes, then every other slope of the 8-head geometric sequence (Press et al.'s get_slopes)
    assert alibi_slopes(6).tolist() == [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8, 2.0**-1, 2.0**-3]


def test_nope_has_no_positional_parameters_and_ignores_position_ids():
    nope = tiny("none")
    assert nope.net.positional_parameters() == {}
    names = {pe: set(ZooTransformer(ZooConfig(pe=pe, **TINY)).state_dict()) for pe in SCHEMES}
    assert names["none"] == names["rope"] == names["alibi"] == names["sinusoidal"]
    assert names["learned"] - names["none"] == {"position.W_pos"}
    tokens = ids(2, 8)
    a = nope.run(tokens).logits
    b = nope.run(tokens, position_ids=torch.arange(8).expand(2, 8) + 100).logits
    torch.testing.assert_close(a, b)
    assert "pos_embed" not in nope.available_sites() and "rot_q" not in nope.available_sites()


def test_sinusoidal_embedding_matches_formula():
    model = tiny("sinusoidal", init_std=0.02)
    scale = 0.02 * math.sqrt(2)  # per-dimension RMS equal to the token embedding's at init
    assert model.info.extra["sinusoidal_scale"] == pytest.approx(scale)
    pe = model.capture(ids(1, 32), [SiteKey("pos_embed", None)])[SiteKey("pos_embed", None)][0]
    for p in (0, 1, 7, 31):
        for i in (0, 3, 15):
            angle = p / 10000 ** (2 * i / 32)
            assert pe[p, 2 * i].item() == pytest.approx(scale * math.sin(angle), abs=1e-7)
            assert pe[p, 2 * i + 1].item() == pytest.approx(scale * math.cos(angle), abs=1e-7)


def test_learned_positions_are_in_the_residual():
    model = tiny("learned")
    got = model.capture(ids(1, 5), [SiteKey("embed", None), SiteKey("pos_embed", None), SiteKey("resid_pre", 0)])
    torch.testing.assert_close(
        got[SiteKey("resid_pre", 0)], got[SiteKey("embed", None)] + got[SiteKey("pos_embed", None)]
    )
    torch.testing.assert_close(got[SiteKey("pos_embed", None)][0], model.net.position.W_pos[:5].detach())


# -- the hooked forward -------------------------------------------------------------------


@pytest.mark.parametrize("pe", list(SCHEMES))
def test_capture_shapes_for_every_site(pe):
    model = tiny(pe)
    b, s, c = 2, 7, model.info
    out = model.run(ids(b, s), capture=all_keys(model))
    expected = {
        "embed": (b, s, c.d_model), "pos_embed": (b, s, c.d_model), "mlp_post": (b, s, c.d_mlp),
        "attn_scores": (b, c.n_heads, s, s), "pattern": (b, c.n_heads, s, s),
    }  # fmt: skip
    for key, value in out.acts.items():
        want = expected.get(
            key.site,
            (b, s, c.n_heads, c.d_head) if key.site in ("q", "k", "rot_q", "rot_k", "z") else (b, s, c.d_model),
        )
        assert tuple(value.shape) == want, key
    assert {k.site for k in out.acts} == set(model.available_sites())
    assert out.logits.shape == (b, s, c.d_vocab)
    assert all(not hp._forward_hooks for hp in model.net.hook_dict.values())  # hooks removed on exit


@pytest.mark.parametrize("pe", list(SCHEMES))
def test_hooks_do_not_change_logits(pe):
    model = tiny(pe)
    tokens = ids(2, 10)
    plain = model.run(tokens).logits
    hooked = model.run(tokens, capture=all_keys(model)).logits  # explicit attention path
    assert_logits_unchanged(hooked, plain, same_kernel=False)
    zeroed = model.run(tokens, hooks={SiteKey("mlp_out", 1): torch.zeros_like}).logits
    assert not torch.allclose(zeroed, plain)


def test_stop_at_layer_and_no_logits():
    model = tiny("rope")
    out = model.run(ids(1, 6), capture=[SiteKey("resid_post", 0)], stop_at_layer=0)
    assert out.logits is None and out[SiteKey("resid_post", 0)].shape == (1, 6, 32)
    assert model.run(ids(1, 6), return_logits=False).logits is None


@pytest.mark.parametrize("pe", list(SCHEMES))
def test_left_padding_gives_unpadded_activations(pe):
    model = tiny(pe)
    long, short = ids(1, 10, seed=1), ids(1, 6, seed=2)
    pad = model.tokenizer.pad_token_id
    tokens = torch.cat([long, torch.cat([torch.full((1, 4), pad), short], dim=1)])
    mask = torch.ones_like(tokens)
    mask[1, :4] = 0
    keys = [k for k in all_keys(model) if k.site not in ("attn_scores", "pattern")]
    batch = model.run(tokens, attention_mask=mask, capture=[*keys, SiteKey("pattern", 1)])
    alone = model.run(short, capture=[*keys, SiteKey("pattern", 1)])
    for key in keys:
        torch.testing.assert_close(batch[key][1:, 4:], alone[key], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(
        batch[SiteKey("pattern", 1)][1:, :, 4:, 4:], alone[SiteKey("pattern", 1)], atol=1e-4, rtol=1e-4
    )
    torch.testing.assert_close(batch.logits[1:, 4:], alone.logits, atol=1e-4, rtol=1e-4)
    assert torch.isfinite(batch.logits).all()


# -- config and bad input ---------------------------------------------------------------------


def test_config_json_round_trip(tmp_path):
    cfg = ZooConfig(pe="rope", p_rope=0.25, rotary_fraction=0.5, rope_base=500.0, **TINY)
    assert ZooConfig.from_json(cfg.to_json()) == cfg
    cfg.to_json(tmp_path / "config.json")
    assert ZooConfig.from_json(tmp_path / "config.json") == cfg
    with pytest.raises(ValueError, match="unknown ZooConfig field"):
        ZooConfig.from_dict({**cfg.to_dict(), "rope_scaling": 2})


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"pe": "t5"}, "unknown position scheme 't5'; known schemes: none, learned, sinusoidal, rope, alibi"),
        ({"pe": "rope", "rotary_fraction": 0.0}, "rotary_fraction must lie in"),
        ({"pe": "rope", "rotary_fraction": 1.5}, "rotary_fraction must lie in"),
        ({"pe": "rope", "d_head": 15}, "d_head=15"),
        ({"pe": "rope", "p_rope": 1.0}, "p_rope must lie in"),
        ({"d_model": 0}, "d_model must be a positive integer"),
    ],
)
def test_bad_config_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ZooConfig(**{**TINY, **kwargs})


@pytest.mark.parametrize("pe", ["learned", "sinusoidal"])
def test_absolute_schemes_refuse_positions_beyond_context(pe):
    model = tiny(pe)
    assert not model.extrapolates
    with pytest.raises(ValueError, match="beyond"):
        model.run(ids(1, 33))
    with pytest.raises(ValueError, match="cannot extrapolate"):
        model.net(ids(1, 33))


@pytest.mark.parametrize("pe", ["none", "rope", "alibi"])
def test_relative_schemes_extrapolate(pe):
    model = tiny(pe)
    assert model.extrapolates
    assert torch.isfinite(model.run(ids(1, 80)).logits).all()


def test_unknown_variant_lists_known():
    with pytest.raises(ValueError, match="known variants: none, learned, sinusoidal, rope, alibi"):
        load_zoo("t5")


def test_half_precision_keeps_rope_frequencies_float32():
    model = tiny("rope").to(dtype=torch.bfloat16)
    assert model.net.position.inv_freq.dtype == torch.float32
    assert model.run(ids(1, 6)).logits.dtype == torch.bfloat16


# -- training -------------------------------------------------------------------------------

TRAIN_CFG = ZooConfig(pe="rope", d_model=32, n_layers=1, n_heads=2, d_head=16, d_mlp=64, n_ctx=32)
TRAIN_KW = dict(steps=50, batch_size=8, lr=3e-3, seed=0, device="cpu", eval_windows=8, progress=False)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    from posprobe.training import train

    out = tmp_path_factory.mktemp("straight")
    return out, train(TRAIN_CFG, out, **TRAIN_KW)


def _weights(path):
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


def test_training_lowers_the_loss(straight_run):
    out, state = straight_run
    losses = [loss for _, loss in state.state["loss_history"]]
    assert len(losses) == 50 and np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5
    saved = json.loads((out / "train_state.json").read_text())
    assert set(saved["eval"]) >= {"heldout_loss", "unigram_loss"}
    torch.load(out / "optimizer.pt", weights_only=True)
    model = load_checkpoint(out)
    assert model.info.extra["eval"] == saved["eval"]


def test_resume_equals_training_straight_through(straight_run, tmp_path):
    from posprobe.training import train

    straight, state = straight_run
    partial = train(TRAIN_CFG, tmp_path, stop_at=20, **TRAIN_KW)
    assert partial.state["step"] == 20 and "eval" not in partial.state
    resumed = train(TRAIN_CFG, tmp_path, resume=True, **TRAIN_KW)
    assert resumed.state["loss_history"] == state.state["loss_history"]
    a, b = _weights(straight), _weights(tmp_path)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_train_result_keeps_the_contract(straight_run, tmp_path):
    out, result = straight_run
    assert list(result.table.columns) == ["step", "loss"] and len(result.table) == 50
    assert result.table["loss"].tolist() == [loss for _, loss in result.state["loss_history"]]
    assert result.info.analysis == "train" and result.info.seed == 0 and result.info.params["steps"] == 50
    assert result.step == 50 and result.eval == result.state["eval"] and result.path == out
    fig = result.figure()
    assert [t.name for t in fig.data] == ["training batch"] and len(fig.layout.shapes) == 2  # held-out, unigram
    result.save(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {"table.csv", "table.parquet", "info.json", "loss.html"}
    with pytest.warns(DeprecationWarning, match=r"\.state\[key\]"):
        assert result["step"] == 50  # the dict train returned before
    with pytest.warns(DeprecationWarning):
        assert "eval" in result


def test_resume_refuses_another_config_or_run(straight_run, tmp_path):
    from posprobe.training import train

    out, _ = straight_run
    with pytest.raises(ValueError, match=r"pe: checkpoint 'rope' vs requested 'alibi'"):
        train(TRAIN_CFG.replace(pe="alibi"), out, resume=True, **TRAIN_KW)
    with pytest.raises(ValueError, match=r"lr: checkpoint 0.003 vs requested 0.01"):
        train(TRAIN_CFG, out, resume=True, **{**TRAIN_KW, "lr": 1e-2})
    with pytest.raises(FileExistsError, match="resume=True"):
        train(TRAIN_CFG, out, **TRAIN_KW)
    with pytest.raises(FileNotFoundError, match="cannot resume"):
        train(TRAIN_CFG, tmp_path / "empty", resume=True, **TRAIN_KW)


def test_main_train_parses_the_cli(tmp_path):
    from posprobe.training import main_train

    argv = ["--pe", "alibi", "--steps", "3", "--out", str(tmp_path), "--d-model", "32", "--n-layers", "1",
            "--n-heads", "2", "--d-head", "16", "--d-mlp", "64", "--n-ctx", "16", "--eval-windows", "2"]  # fmt: skip
    assert main_train(argv) == 0
    assert ZooConfig.from_json(tmp_path / "config.json").pe == "alibi"


# -- the shipped zoo ------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ZOO_VARIANTS)
def test_shipped_checkpoint_loads_fast_and_beats_unigram(variant):
    import posprobe.data as pdata

    load_zoo(variant)  # first call also reads the tokenizer
    start = time.perf_counter()
    model = load_zoo(variant)
    assert time.perf_counter() - start < 1.0
    cfg = json.loads((ZOO_DIR / variant / "config.json").read_text())
    scheme, p_rope = ("rope", 0.25) if variant == "p-rope" else (variant, 0.0)
    assert model.info.position_scheme == scheme and cfg["pe"] == scheme and cfg["p_rope"] == p_rope
    assert model.info.bos_token_id == 0 and model.info.name == f"zoo:{variant}"
    ev = json.loads((ZOO_DIR / variant / "train_state.json").read_text())["eval"]
    assert ev["heldout_loss"] < ev["unigram_loss"] - 1.0
    batch = pdata.text_windows(model, n=4, seq_len=model.info.n_ctx, seed=1)
    loss = model.loss(batch.tokens).nanmean().item()
    assert loss < ev["unigram_loss"] - 1.0


def test_random_init_twin_is_seeded_and_untrained():
    a, b = load_zoo("rope", random_init=True, seed=3), load_zoo("rope", random_init=True, seed=3)
    trained = load_zoo("rope")
    assert all(torch.equal(x, y) for x, y in zip(a.net.parameters(), b.net.parameters(), strict=True))
    assert not torch.equal(a.net.W_E, trained.net.W_E)
    assert a.info.extra["random_init"] and "random init" in a.info.name
    copy = trained.random_init_copy(3)
    assert torch.equal(copy.net.W_E, a.net.W_E)


def test_sites_cover_tl_names():
    net = ZooTransformer(ZooConfig(pe="rope", **TINY))
    for site in SITES:
        layer = None if site in ("embed", "pos_embed") else 1
        assert SiteKey(site, layer).hook_name in net.hook_dict


# -- length generalisation ------------------------------------------------------------------


def test_length_generalization_table_and_figure():
    from posprobe.plots.length import length_generalization_figure
    from posprobe.stats.length import length_generalization

    models = [tiny("rope", init_std=0.02), tiny("learned", init_std=0.02)]
    df = length_generalization(models, 2, bucket=16).table
    assert list(df["model"].unique()) == ["tiny-rope", "tiny-learned"]
    assert len(df) == 2 * 8  # 4 × n_ctx = 128 tokens → 127 predictions in buckets of 16
    rope, learned = df[df.model == "tiny-rope"], df[df.model == "tiny-learned"]
    assert rope["available"].all() and rope["loss"].between(7.0, 9.5).all()  # near log(4096) at init
    assert rope["n_tokens"].tolist() == [32] * 7 + [30]
    assert (rope.loc[rope.bucket_end < 32, "gap"] == 0).all()
    assert learned["available"].tolist() == [True, True] + [False] * 6
    assert learned.loc[~learned["available"], "loss"].isna().all()
    assert learned["window_loss"].notna().all()  # a sliding window never leaves the context
    assert learned["n_tokens"].tolist() == [32, 30] + [0] * 6
    assert (df["beyond_context"] == (df["bucket_start"] >= 32)).all()
    fig = length_generalization_figure(df)
    assert [t.name for t in fig.data] == [
        "tiny-rope",
        "tiny-rope (sliding window)",
        "tiny-learned",
        "tiny-learned (sliding window)",
    ]


def test_sliding_window_scores_the_same_targets():
    from posprobe.stats.length import length_generalization

    model = tiny("rope")
    for block in model.net.blocks:  # no attention: each prediction depends on its own token only
        block.attn.W_O.data.zero_()
    df = length_generalization(model, 2, bucket=8).table
    torch.testing.assert_close(
        torch.tensor(df["loss"].to_numpy()), torch.tensor(df["window_loss"].to_numpy()), atol=1e-5, rtol=1e-6
    )
