"""Positional-neuron detectors (Voita et al. 2023) on planted neurons with known answers."""

from __future__ import annotations

import inspect
import json
import math

import pandas as pd
import plotly.graph_objects as go
import pytest
import torch

from posprobe.finite import NonFiniteError
from posprobe.results import INFO_FILE
from posprobe.stats.neurons import (
    CATEGORIES,
    NOT_POSITIONAL,
    active_threshold,
    neuron_position_stats,
    positional_neurons,
)
from posprobe.store import StoreError, write_store

N_SEQ, SEQ, N_NEURONS, VOCAB = 48, 96, 12, 40
OSC, EARLY, TOKEN, DEAD, ALWAYS = 0, 1, 2, 3, 4


def planted(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations [2 n seq N] and tokens [n seq]: layer 0 has the planted neurons, layer 1 is noise.

    Layer 0: neuron 0 oscillates with period 16, neuron 1 fires only at positions 0..7,
    neuron 2 depends only on token identity, 3 is dead, 4 always on, the rest N(0, 1) noise.
    """
    g = torch.Generator().manual_seed(seed)
    pos = torch.arange(SEQ).float().expand(N_SEQ, SEQ)
    tokens = torch.randint(0, VOCAB, (N_SEQ, SEQ), generator=g)
    acts = torch.randn(2, N_SEQ, SEQ, N_NEURONS, generator=g)
    x = acts[0]
    x[..., OSC] = torch.sin(2 * math.pi * pos / 16) + 0.3 * torch.randn(N_SEQ, SEQ, generator=g)
    x[..., EARLY] = torch.where(pos < 8, 1.0, -1.0) + 0.1 * torch.randn(N_SEQ, SEQ, generator=g)
    x[..., TOKEN] = torch.randn(VOCAB, generator=g)[tokens]
    x[..., DEAD] = -torch.rand(N_SEQ, SEQ, generator=g)
    x[..., ALWAYS] = 1 + torch.rand(N_SEQ, SEQ, generator=g)
    return acts, tokens


@pytest.fixture(scope="module")
def data():
    return planted()


@pytest.fixture
def store(tmp_path, data):
    acts, tokens = data
    return write_store(
        tmp_path / "store",
        {"mlp_post.0": acts[0], "mlp_post.1": acts[1]},
        tokens,
        model_info={"name": "synthetic", "act_fn": "relu"},
        batch_size=7,  # 7 shards, the last one short
    )


def row(result, layer: int, neuron: int) -> pd.Series:
    t = result.table
    return t[(t["layer"] == layer) & (t["neuron"] == neuron)].iloc[0]


def test_planted_neurons_are_found_with_their_categories(store):
    result = positional_neurons(store, device="cpu")
    osc, early, token = row(result, 0, OSC), row(result, 0, EARLY), row(result, 0, TOKEN)
    assert osc["is_positional"] and osc["category"] == "oscillatory"
    assert abs(osc["period"] - 16) < 0.5 and osc["period_power"] > 0.8
    assert early["is_positional"] and early["category"] == "one-extreme"
    assert early["eta2"] > 0.9
    assert not token["is_positional"] and token["category"] == NOT_POSITIONAL
    assert token["eta2"] < 0.05
    assert set(result.table.loc[result.table["is_positional"], "neuron"]) == {OSC, EARLY}
    assert (result.table.loc[result.table["layer"] == 1, "is_positional"]).sum() == 0
    # Noise neurons sit at the estimator's bias, far below the threshold.
    noise = result.table[(result.table["layer"] == 1)]
    assert noise["mi"].max() < 3 * noise["mi_bias"].iloc[0] < 0.05


def test_layer_summary_counts_dead_always_on_and_categories(store):
    summary = positional_neurons(store, device="cpu").layer_summary.set_index("layer")
    assert list(summary.columns) == ["n_neurons", "dead", "always_on", "positional", *CATEGORIES]
    assert summary.loc[0, ["n_neurons", "dead", "always_on", "positional"]].tolist() == [N_NEURONS, 1, 1, 2]
    assert summary.loc[0, "oscillatory"] == 1 and summary.loc[0, "one-extreme"] == 1
    assert summary.loc[1, ["dead", "always_on", "positional"]].tolist() == [0, 0, 0]


def test_streaming_equals_in_memory_exactly(store, data):
    acts, _ = data
    streamed = positional_neurons(store, device="cpu")
    in_memory = positional_neurons(acts, threshold=0.0, device="cpu")
    pd.testing.assert_frame_equal(streamed.table, in_memory.table, check_exact=True)
    for name in ("n_tokens", "n_active", "act_sum", "act_sumsq"):
        assert torch.equal(getattr(streamed.stats, name), getattr(in_memory.stats, name)), name


def test_mi_matches_a_direct_computation(data):
    acts, _ = data
    x = acts[0, :, 1:, EARLY]  # BOS excluded
    active = (x > 0).double()
    p_t, p = active.mean(0), active.mean()

    def h(q):
        return -(torch.special.xlogy(q, q) + torch.special.xlogy(1 - q, 1 - q)) / math.log(2)

    expected_mi = float(h(p) - h(p_t).mean())
    xd = x.double()
    expected_eta2 = float(((xd.mean(0) - xd.mean()) ** 2).sum() * N_SEQ / ((xd - xd.mean()) ** 2).sum())
    got = row(positional_neurons(acts[0], device="cpu"), 0, EARLY)
    assert got["mi"] == pytest.approx(expected_mi, rel=1e-9)
    assert got["eta2"] == pytest.approx(expected_eta2, rel=1e-9)


def test_padding_is_ignored_exactly(data):
    acts, _ = data
    x = acts[0]
    pad = 5
    padded = torch.full((N_SEQ, SEQ + pad, N_NEURONS), 1e3)  # garbage in the padded slots
    mask = torch.ones(N_SEQ, SEQ + pad, dtype=torch.long)
    padded[::2, pad:] = x[::2]  # even rows left-padded
    mask[::2, :pad] = 0
    padded[1::4, :SEQ] = x[1::4]  # right-padded
    mask[1::4, SEQ:] = 0
    padded[3::4, :40], padded[3::4, 40 + pad :] = x[3::4, :40], x[3::4, 40:]  # a hole in the middle
    mask[3::4, 40 : 40 + pad] = 0
    plain = positional_neurons(x, device="cpu").table
    got = positional_neurons(padded, attention_mask=mask, device="cpu").table
    pd.testing.assert_frame_equal(plain, got, check_exact=True)


def test_exclude_bos_and_position_zero(data):
    acts, _ = data
    x = acts[0].clone()
    x[:, 0, 5] = 10.0  # a neuron that fires only at position 0 (a BOS detector)
    x[:, 1:, 5] = -1.0
    with_bos = positional_neurons(x, exclude_pos0=False, device="cpu")
    without = positional_neurons(x, device="cpu")
    assert row(with_bos, 0, 5)["is_positional"] and row(with_bos, 0, 5)["category"] == "one-extreme"
    assert row(without, 0, 5)["dead"] and not row(without, 0, 5)["is_positional"]
    assert int(with_bos.stats.n_tokens[0]) == N_SEQ and int(without.stats.n_tokens[0]) == 0


def test_categories_of_other_shapes():
    g = torch.Generator().manual_seed(1)
    pos = torch.arange(SEQ).float().expand(N_SEQ, SEQ)
    noise = lambda: 0.1 * torch.randn(N_SEQ, SEQ, generator=g)  # noqa: E731
    x = torch.stack(
        [
            torch.where((pos < 16) | (pos > 80), 1.0, -1.0) + noise(),  # both ends
            1 - 2 * pos / SEQ + 3 * noise(),  # ramp: fires early, fades
            torch.where((pos > 30) & (pos < 60), 1.0, -1.0) + noise(),  # middle bump
            torch.where(pos > 60, 1.0, -1.0) + noise(),  # fires only late
        ],
        dim=-1,
    )
    cats = positional_neurons(x, device="cpu").table["category"].tolist()
    assert cats == ["both-extremes", "one-extreme", "other-strong", "one-extreme"]


def test_default_threshold_follows_act_fn(tmp_path, data):
    acts, tokens = data
    assert active_threshold("relu") == active_threshold("gelu") == active_threshold("silu") == 0.0
    assert active_threshold("sigmoid") == 0.5
    store = write_store(tmp_path / "s", {"mlp_post.0": acts[0]}, tokens, model_info={"name": "x", "act_fn": "sigmoid"})
    assert neuron_position_stats(store, device="cpu").threshold == 0.5
    unknown = write_store(tmp_path / "u", {"mlp_post.0": acts[0]}, tokens, model_info={"name": "x", "act_fn": "mish"})
    with pytest.raises(ValueError, match=r"'mish'.*threshold="):
        positional_neurons(unknown, device="cpu")
    assert positional_neurons(unknown, threshold=0.0, device="cpu").info.params["threshold"] == 0.0


def test_figures(store):
    result = positional_neurons(store, device="cpu")
    for fig in (result.figure(), result.figure("profile", layer=0, neuron=OSC), result.figure("heatmap", top=5)):
        assert isinstance(fig, go.Figure)
        assert fig.layout.xaxis.title.text and fig.layout.yaxis.title.text
    heat = result.figure("heatmap")
    assert list(heat.data[0].y) == ["L0 n0", "L0 n1"]  # highest mi first
    profile = result.profile(0, OSC)
    assert profile["position"].tolist() == list(range(1, SEQ))
    with pytest.raises(ValueError, match="unknown figure kind 'bars'"):
        result.figure("bars")


# -- the result contract: .table, .info, .figure(kind), .save ------------------------------------


def test_result_contract(store, tmp_path):
    result = positional_neurons(store, device="cpu")
    info = result.info
    assert (info.analysis, info.model, info.site, info.layers) == (
        "positional_neurons",
        "synthetic",
        "mlp_post",
        (0, 1),
    )
    assert (info.n_sequences, info.seq_len, info.n_tokens) == (N_SEQ, SEQ, N_SEQ * (SEQ - 1))  # position 0 left out
    assert info.exclude_pos0 is True and info.causal is True
    params = {"mi_threshold": 0.05, "always_on_rate": 0.99, "oscillation_power": 0.5}
    assert info.params == {"site": "mlp_post", "threshold": 0.0, "exclude_bos": True, **params}
    assert result.figure_kinds() == ["counts", "heatmap", "profile"]
    assert result.figure().to_json() == result.figure("counts").to_json()
    with pytest.raises(ValueError, match="needs neuron="):
        result.figure("profile")
    out = result.save(tmp_path / "saved")
    tables = {f"{t}.{ext}" for t in ("table", "layer_summary") for ext in ("csv", "parquet")}
    positional = bool(result.table["is_positional"].any())
    assert result.saved_kinds() == (["counts", "heatmap"] if positional else ["counts"])
    assert {f.name for f in out.iterdir()} == tables | {INFO_FILE} | {f"{k}.html" for k in result.saved_kinds()}
    assert json.loads((out / INFO_FILE).read_text())["params"]["exclude_bos"] is True
    in_memory = positional_neurons(planted()[0][0], exclude_pos0=False, device="cpu").info
    assert (in_memory.model, in_memory.layers, in_memory.n_sequences, in_memory.seq_len) == (
        "activations",
        (0,),
        N_SEQ,
        SEQ,
    )
    assert in_memory.n_tokens == N_SEQ * SEQ and in_memory.exclude_pos0 is False and in_memory.causal is None


def test_exclude_bos_is_the_old_spelling_of_exclude_pos0(data):
    x = data[0][0]
    new = positional_neurons(x, exclude_pos0=False, device="cpu")
    with pytest.warns(DeprecationWarning, match="exclude_bos= is deprecated .*; use exclude_pos0="):
        old = positional_neurons(x, exclude_bos=False, device="cpu")
    pd.testing.assert_frame_equal(old.table, new.table, check_exact=True)
    assert old.info == new.info
    with pytest.warns(DeprecationWarning, match="PositionalNeurons.params is deprecated"):
        assert old.params == dict(new.info.params) and old.params["exclude_bos"] is False
    with pytest.warns(DeprecationWarning, match="exclude_bos= is deprecated"):
        old_stats = neuron_position_stats(x, exclude_bos=False, device="cpu")
    new_stats = neuron_position_stats(x, exclude_pos0=False, device="cpu")
    assert torch.equal(old_stats.act_sum, new_stats.act_sum) and new_stats.exclude_pos0 is False
    with pytest.warns(DeprecationWarning, match="NeuronPositionStats.exclude_bos is deprecated"):
        assert new_stats.exclude_bos is False
    with pytest.raises(ValueError, match="exclude_pos0 must be True or False, got 'both'"):
        positional_neurons(x, exclude_pos0="both", device="cpu")


def test_a_model_is_extracted_first_and_scores_like_its_store(tmp_path):
    from posprobe.extraction import extract

    model = planted_zoo()
    tokens = torch.randint(0, model.info.d_vocab, (12, 64), generator=torch.Generator().manual_seed(2))
    direct = positional_neurons(model, tokens, device="cpu")
    extract(model, tokens, sites="mlp_post", device="cpu", out=tmp_path / "zoo", progress=False)
    from_folder = positional_neurons(tmp_path / "zoo", device="cpu")  # a store's folder is a source too
    pd.testing.assert_frame_equal(direct.table, from_folder.table, check_exact=True)
    assert direct.info == from_folder.info and direct.info.model == model.info.name
    with pytest.raises(ValueError, match="activations carry no tokens"):
        positional_neurons(torch.randn(2, 4, 3), tokens, device="cpu")
    with pytest.raises(ValueError, match="needs tokens"):
        positional_neurons(model, device="cpu")


def test_everything_after_tokens_is_keyword_only(data):
    for fn in (positional_neurons, neuron_position_stats):
        params = list(inspect.signature(fn).parameters.values())
        assert [p.name for p in params[:2]] == ["source", "tokens"], fn.__name__
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params[2:]), fn.__name__
    with pytest.raises(TypeError, match="positional"):
        positional_neurons(data[0][0], None, "mlp_post")


# -- bad input -----------------------------------------------------------------------------------


def test_site_not_in_store(store):
    with pytest.raises(StoreError, match="'resid_post' is not in this store; stored sites: mlp_post"):
        positional_neurons(store, site="resid_post", device="cpu")
    with pytest.raises(ValueError, match="unknown site 'mlp'"):
        positional_neurons(store, site="mlp", device="cpu")
    with pytest.raises(ValueError, match=r"layers \[5\].*stored layers: \[0, 1\]"):
        positional_neurons(store, layers=[5], device="cpu")


def test_empty_inputs(tmp_path, data):
    acts, tokens = data
    empty = write_store(tmp_path / "e", {"mlp_post.0": acts[0][:0]}, tokens[:0], batch_size=4)
    with pytest.raises(ValueError, match="empty"):
        positional_neurons(empty, device="cpu")
    with pytest.raises(ValueError, match="no tokens to analyse"):
        positional_neurons(acts[0], attention_mask=torch.zeros(N_SEQ, SEQ), device="cpu")
    with pytest.raises(ValueError, match="no tokens to analyse"):
        positional_neurons(acts[0][:, :1], device="cpu")  # only position 0, which is excluded


def test_nan_activations_name_the_layer(tmp_path, data):
    acts, tokens = data
    bad = acts.clone()
    bad[1, 20, 3, 7] = float("nan")
    store = write_store(tmp_path / "n", {"mlp_post.0": bad[0], "mlp_post.1": bad[1]}, tokens, batch_size=8)
    message = r"1 non-finite value \(NaN/inf\) in site 'mlp_post' layer 1 \(first in sequence 20\) read from shard"
    with pytest.raises(NonFiniteError, match=message):
        positional_neurons(store, device="cpu")
    mask = torch.ones(N_SEQ, SEQ, dtype=torch.long)
    with pytest.raises(NonFiniteError, match=r"in site 'mlp_post' layer 0 \(first in sequence 20\)"):
        positional_neurons(bad[1], device="cpu")
    mask[20, 3] = 0  # a NaN under padding is ignored
    assert not positional_neurons(bad[1], attention_mask=mask, device="cpu").table.empty


@pytest.mark.parametrize("threshold", [float("nan"), float("inf"), "0", True])
def test_invalid_threshold(data, threshold):
    with pytest.raises(ValueError, match="threshold must be a finite number"):
        positional_neurons(data[0][0], threshold=threshold, device="cpu")


@pytest.mark.parametrize("kwargs", [{"mi_threshold": -0.1}, {"always_on_rate": 1.5}, {"oscillation_power": "x"}])
def test_invalid_hyperparameters(data, kwargs):
    with pytest.raises(ValueError, match=f"{next(iter(kwargs))} must be a number in"):
        positional_neurons(data[0][0], device="cpu", **kwargs)


def test_invalid_device_and_shapes(data):
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        positional_neurons(data[0][0], device="tpu")
    with pytest.raises(ValueError, match=r"must be \[n seq neurons\] or \[L n seq neurons\]"):
        positional_neurons(data[0][0, 0], device="cpu")


# -- a zoo model with a planted positional neuron -----------------------------------------------


def planted_zoo():
    """A one-layer learned-APE zoo model: MLP neuron 0 reads a period-16 component of W_pos, 1 a token feature."""
    zoo = pytest.importorskip("posprobe.models.zoo")
    cfg = zoo.ZooConfig(d_model=32, n_layers=1, n_heads=2, d_head=16, d_mlp=16, n_ctx=64, d_vocab=300, pe="learned")
    net = zoo.ZooTransformer(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        net.position.W_pos[:, 0] = 3 * torch.sin(2 * math.pi * torch.arange(cfg.n_ctx) / 16)
        net.W_E[:, 0] = 0
        net.W_E[:, 1] = 3 * torch.randn(cfg.d_vocab, generator=g)  # a token-identity feature
        mlp = net.blocks[0].mlp
        mlp.W_in[:, :2] = 0
        mlp.W_in[0, 0] = mlp.W_in[1, 1] = 5.0
    return zoo.ZooModel(net)


def test_zoo_model_positional_neuron_is_found(tmp_path):
    from posprobe.sites import SiteKey

    model = planted_zoo()
    tokens = torch.randint(0, model.info.d_vocab, (24, 64), generator=torch.Generator().manual_seed(1))
    acts = model.run(tokens, capture=[SiteKey("mlp_post", 0)], return_logits=False).acts[SiteKey("mlp_post", 0)]
    results = [positional_neurons(acts, device="cpu")]
    extract = pytest.importorskip("posprobe.extraction").extract
    store = extract(model, tokens, sites="mlp_post", batch_size=8, device="cpu", out=tmp_path / "zoo", progress=False)
    assert store.model_info["act_fn"] == "gelu"
    results.append(positional_neurons(store, device="cpu"))
    for result in results:
        osc, token = row(result, 0, 0), row(result, 0, 1)
        assert osc["category"] == "oscillatory" and abs(osc["period"] - 16) < 0.5
        assert not token["is_positional"]


def test_short_runs_do_not_call_noise_positional():
    """With 8 tokens per position the plug-in MI of pure noise exceeds 0.05 bits; the bias correction must absorb it."""
    gen = torch.Generator().manual_seed(0)
    acts = torch.randn(8, 128, 64, generator=gen)
    result = positional_neurons(acts, exclude_pos0=False, device="cpu")
    assert (result.table["mi"] > 0.05).mean() > 0.5  # the raw estimate is fooled
    assert not result.table["is_positional"].any()
