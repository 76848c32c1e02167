"""Position probes: constructions with known answers, scikit-learn agreement, controls, splits, bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.base import clone
from sklearn.linear_model import Ridge, RidgeCV
from sklearn.model_selection import GroupKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from posprobe.finite import NonFiniteError
from posprobe.plots.probes import METRICS as METRIC_TITLES
from posprobe.stats.probes import (
    LogisticProbe,
    ProbeResult,
    RidgeProbe,
    SparseProbe,
    probe_model,
    probe_position,
    random_baseline_mad,
)
from posprobe.store import StoreError, write_store

N_SEQ, SEQ, D = 20, 16, 64


def sinusoid(n_pos: int, d: int, base: float = 10000.0) -> torch.Tensor:
    """Transformer sinusoidal position features [n_pos d] (Vaswani et al. 2017)."""
    pos = torch.arange(n_pos, dtype=torch.float32)[:, None]
    freqs = base ** (-torch.arange(0, d, 2, dtype=torch.float32) / d)
    return torch.cat([torch.sin(pos * freqs), torch.cos(pos * freqs)], dim=-1)


def planted_acts(seed: int = 0) -> torch.Tensor:
    """[3 n seq d]: layer 1 carries sinusoidal position plus noise; layers 0 and 2 are noise only."""
    gen = torch.Generator().manual_seed(seed)
    acts = 0.05 * torch.randn(3, N_SEQ, SEQ, D, generator=gen)
    acts[1] += sinusoid(SEQ, D)
    return acts


def rows(result: ProbeResult, **where) -> list[dict]:
    table = result.table
    for column, value in where.items():
        table = table[table[column] == value]
    return table.to_dict("records")


# -- ground truth ---------------------------------------------------------------------------------


def test_sinusoidal_features_decode_with_ridge():
    result = probe_position(planted_acts(), device="cpu", controls=("shuffled",))
    for row in rows(result, layer=1):
        assert row["r2"] > 0.99
        assert row["mad"] < 0.5
        assert row["selectivity"] > 0.99
    for row in rows(result, layer=0):
        assert abs(row["r2"]) < 0.1


def test_relative_offsets_decode_from_pair_differences():
    result = probe_position(planted_acts(), target="relative", device="cpu", controls=("shuffled",), n_pairs=16)
    (row,) = rows(result, layer=1, include_pos0=True)
    assert row["r2"] > 0.99
    assert abs(row["control_shuffled"]) < 0.05


def test_every_target_and_kind_runs_with_both_pos0_variants():
    acts = planted_acts()[:2, :10, :8, :16]
    tokens = torch.arange(80).reshape(10, 8) % 5
    result = probe_position(
        acts,
        target=["absolute", "log", "bucket"],
        kind=["ridge", "sparse"],
        n_splits=2,
        device="cpu",
        k=4,
        tokens=tokens,
    )
    table = result.table
    assert len(table) == 2 * 3 * 2 * 2
    assert set(table["include_pos0"]) == {True, False}
    assert table[["r2", "mae", "accuracy", "mad", "control_shuffled", "control_token"]].notna().all().all()
    assert table["control_random_init"].isna().all()
    assert table["controls_missing"].str.contains("random_init: no random_init_store given").all()
    sparse = table[table["kind"] == "sparse"]
    assert sparse["neurons"].map(len).eq(4).all()
    assert table.loc[table["kind"] == "ridge", "neurons"].isna().all()


def test_logistic_probe_classifies_positions():
    acts = planted_acts()[:2, :10, :8, :16]
    result = probe_position(acts, target="bucket", kind="logistic", n_buckets=4, n_splits=2, device="cpu", max_iter=15)
    table = result.table
    assert table.loc[table["layer"] == 1, "accuracy"].min() > 0.8
    assert table.loc[table["layer"] == 0, "accuracy"].max() < 0.6
    assert table["mad"].notna().all()


def test_zoo_sinusoidal_layer0_decodes(tmp_path, tokenizer):
    from posprobe.extraction import extract
    from posprobe.models.zoo import ZooConfig, ZooModel, ZooTransformer

    cfg = ZooConfig(d_model=64, n_layers=1, n_heads=2, d_head=32, d_mlp=64, n_ctx=64, d_vocab=256, pe="sinusoidal")
    model = ZooModel(ZooTransformer(cfg), tokenizer, name="tiny-sinusoidal")
    tokens = torch.randint(2, 256, (16, 32), generator=torch.Generator().manual_seed(0))
    sites = ["resid_pre", "pos_embed"]
    store = extract(model, tokens, sites=sites, layers=[0], out=tmp_path / "random", progress=False)
    assert probe_position(store, site="pos_embed", device="cpu", n_splits=4).table["r2"].min() > 0.99
    # random token embeddings are as large as the position code at init: content noise, selectively above controls
    mixed = probe_position(store, site="resid_pre", device="cpu", n_splits=4).table
    assert (mixed["selectivity"] > 0.5).all()
    # one repeated token: the residual is a constant plus the sinusoid, so position decodes exactly
    same = extract(model, torch.full((16, 32), 7), sites=sites, layers=[0], out=tmp_path / "same", progress=False)
    assert probe_position(same, site="resid_pre", device="cpu", n_splits=4).table["r2"].min() > 0.99


def test_nope_random_init_shuffled_control_is_near_zero(tokenizer):
    from posprobe.models.zoo import ZooConfig, ZooModel, ZooTransformer

    cfg = ZooConfig(d_model=32, n_layers=2, n_heads=2, d_head=16, d_mlp=64, n_ctx=64, d_vocab=256, pe="none")
    model = ZooModel(ZooTransformer(cfg), tokenizer, name="tiny-nope")
    tokens = torch.randint(2, 256, (24, 32), generator=torch.Generator().manual_seed(1))
    result = probe_model(model, tokens, site="resid_post", n_splits=4, device="cpu")
    table = result.table
    assert (table["control_shuffled"].abs() < 0.05).all()
    assert table[["control_random_init", "control_token"]].notna().all().all()
    assert table["controls_missing"].eq("").all()
    assert list(table["layer"].unique()) == [0, 1]
    info = result.info
    assert (info.analysis, info.model, info.site, info.layers, info.seed) == (
        "probe_model",
        "tiny-nope",
        "resid_post",
        (0, 1),
        0,
    )
    assert (info.n_sequences, info.seq_len, info.n_tokens, info.causal) == (24, 32, 24 * 32, True)
    assert info.params["batch_size"] == 16 and info.params["random_init_control"] is True


def test_sparse_probe_finds_planted_neurons(tmp_path):
    gen = torch.Generator().manual_seed(0)
    acts = torch.randn(2, N_SEQ, SEQ, 256, generator=gen)
    planted = (17, 99, 200)
    pos = torch.arange(SEQ, dtype=torch.float32) / SEQ
    for neuron, weight in zip(planted, (12.0, -8.0, 10.0), strict=True):
        acts[1, :, :, neuron] += weight * pos
    tokens = torch.randint(0, 50, (N_SEQ, SEQ), generator=gen)
    store = write_store(tmp_path / "s", {"mlp_post.0": acts[0], "mlp_post.1": acts[1]}, tokens)
    result = probe_position(store, site="mlp_post", kind="sparse", k=3, device="cpu")
    for row in rows(result, layer=1):
        assert row["neurons"] == planted
        assert row["r2"] > 0.95
    X, y = acts[1].reshape(-1, 256).numpy(), np.tile(np.arange(SEQ), N_SEQ)
    probe = SparseProbe(k=3).fit(X, y)
    assert tuple(probe.selected_) == planted
    assert np.count_nonzero(probe.coef_) == 3


def sklearn_oof(acts: torch.Tensor, split, make) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """scikit-learn on layer 1 with posprobe's split: (X, y, pooled out-of-fold predictions, their R²)."""
    X = acts[1].reshape(-1, D).double().numpy()
    y = np.tile(np.arange(SEQ), N_SEQ).astype(float)
    seq = np.repeat(np.arange(N_SEQ), SEQ)
    pred = np.empty_like(y)
    for test_seqs in split:
        test = np.isin(seq, test_seqs)
        pred[test] = make().fit(X[~test], y[~test]).predict(X[test])
    return X, y, pred, 1 - ((pred - y) ** 2).sum() / ((y - y.mean()) ** 2).sum()


def test_ridge_equals_sklearn_on_the_same_split():
    acts = planted_acts()
    acts[1] += 0.5 * torch.randn(N_SEQ, SEQ, D, generator=torch.Generator().manual_seed(3))
    alpha = 3.0
    result = probe_position(acts, layers=[1], alphas=(alpha,), controls=(), device="cpu", exclude_pos0=False)
    (row,) = rows(result)
    X, y, pred, r2 = sklearn_oof(acts, result.split, lambda: make_pipeline(StandardScaler(), Ridge(alpha=alpha)))
    assert row["r2"] == pytest.approx(r2, abs=1e-4)
    assert row["mae"] == pytest.approx(np.abs(pred - y).mean(), abs=1e-4)
    probe = RidgeProbe(alpha).fit(X, y)
    sk = make_pipeline(StandardScaler(), Ridge(alpha=alpha)).fit(X, y)
    np.testing.assert_allclose(probe.predict(X), sk.predict(X), atol=1e-4)
    np.testing.assert_allclose(probe.coef_, sk[-1].coef_ / sk[0].scale_, atol=1e-4)


def test_loo_alpha_selection_equals_sklearn_ridgecv():
    acts = planted_acts()
    acts[1] += 3.0 * torch.randn(N_SEQ, SEQ, D, generator=torch.Generator().manual_seed(4))
    acts[1, :, 0] *= 20  # high-leverage position-0 rows, where GCV and LOO part ways
    grid = (0.1, 1.0, 10.0, 100.0, 1000.0)
    result = probe_position(acts, layers=[1], alphas=grid, alpha_selection="loo", controls=(), exclude_pos0=False)
    X, y, _, r2 = sklearn_oof(acts, result.split, lambda: make_pipeline(StandardScaler(), RidgeCV(alphas=grid)))
    assert result.table["r2"].item() == pytest.approx(r2, abs=1e-6)
    seq = np.repeat(np.arange(N_SEQ), SEQ)
    for test_seqs in result.split:
        train = ~np.isin(seq, test_seqs)
        sk = make_pipeline(StandardScaler(), RidgeCV(alphas=grid)).fit(X[train], y[train])
        probe = RidgeProbe(grid, alpha_selection="loo").fit(X[train], y[train])
        assert probe.alpha_ == sk[-1].alpha_


def test_estimators_compose_with_sklearn_cross_validation():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(120, 6))
    y = X @ rng.normal(size=6) + 0.1 * rng.normal(size=120)
    groups = np.repeat(np.arange(12), 10)
    cv = GroupKFold(n_splits=3)
    for probe in (RidgeProbe(alpha=[0.1, 1.0, 10.0]), SparseProbe(k=3)):
        scores = cross_val_score(probe, X, y, groups=groups, cv=cv)
        assert scores.shape == (3,) and (scores > 0.5).all()
        assert clone(probe).get_params() == probe.get_params()
    labels = (y > np.median(y)).astype(int)
    scores = cross_val_score(LogisticProbe(max_iter=20), X, labels, groups=groups, cv=cv)
    assert (scores > 0.8).all()
    fitted = LogisticProbe(max_iter=20).fit(X, labels)
    assert fitted.predict_proba(X).shape == (120, 2)
    assert fitted.score(X, labels) == pytest.approx((fitted.predict(X) == labels).mean())


# -- baselines and splits -------------------------------------------------------------------------


def test_random_baseline_mad_formula():
    assert random_baseline_mad(1024) == pytest.approx(341.3, abs=0.05)
    for n in (1, 2, 7):
        brute = np.abs(np.arange(n)[:, None] - np.arange(n)[None, :]).mean()
        assert random_baseline_mad(n) == pytest.approx(brute)
    result = probe_position(planted_acts()[:1], device="cpu", controls=())
    assert rows(result, include_pos0=True)[0]["mad_chance"] == pytest.approx(random_baseline_mad(SEQ))
    assert rows(result, include_pos0=False)[0]["mad_chance"] == pytest.approx(random_baseline_mad(SEQ - 1))


def test_exclude_pos0_picks_the_pos0_variants():
    acts = planted_acts()[:1]
    only_without = probe_position(acts, exclude_pos0=True, controls=("shuffled",), device="cpu").table
    assert list(only_without["include_pos0"]) == [False]
    assert only_without["n_samples"].item() == N_SEQ * (SEQ - 1)
    assert abs(only_without["control_shuffled"].item()) < 0.05
    with pytest.raises(ValueError, match="exclude_pos0 must be True or False or 'both', got 'yes'"):
        probe_position(acts, exclude_pos0="yes")
    bad = pytest.raises(ValueError, match="exclude_pos0 must be True or False or 'both', got 'yes'")
    with pytest.warns(DeprecationWarning, match="exclude_bos= is deprecated"), bad:
        probe_position(acts, exclude_bos="yes")


def test_split_is_by_sequence_and_recorded():
    result = probe_position(planted_acts()[:1], target=["absolute", "relative"], n_splits=4, seed=3, device="cpu")
    folds = [set(f) for f in result.split]
    assert len(folds) == 4
    assert set().union(*folds) == set(range(N_SEQ))
    assert sum(len(f) for f in folds) == N_SEQ
    other = probe_position(planted_acts()[:1], n_splits=4, seed=4, device="cpu", controls=())
    assert other.split != result.split


def test_fold_plan_never_trains_on_a_test_sequence():
    from posprobe.stats.probe_cv import FoldPlan
    from posprobe.stats.probes import _split

    seq = torch.arange(N_SEQ).repeat_interleave(SEQ)
    fold, split = _split(seq, 5, seed=0)
    at_pos0 = torch.arange(SEQ).repeat(N_SEQ) == 0
    plan = FoldPlan.build(fold, at_pos0, 5, (True, False))
    for i, (_, f, test_rows) in enumerate(plan.fits):
        train_rows = plan.train_blocks[i][plan.block].nonzero().squeeze(1)
        assert not set(seq[train_rows].tolist()) & set(seq[test_rows].tolist())
        assert set(seq[test_rows].tolist()) == set(split[f])


def test_missing_random_init_is_nan_and_said():
    result = probe_position(planted_acts()[:1], device="cpu")
    table = result.table
    assert table["control_random_init"].isna().all()
    assert table["control_token"].isna().all()
    assert table["controls_missing"].str.contains("random_init").all()
    assert table["controls_missing"].str.contains("token: no token ids").all()
    fig = result.figure()
    assert fig.layout.yaxis.title.text.startswith("R²")
    assert len(fig.data) >= 2
    with pytest.warns(
        DeprecationWarning, match=r"plot\(metric\) is deprecated.*use ProbeResult\.figure\(kind=metric\)"
    ):
        old = result.plot("mae")  # the old spelling still works for one release
    assert old.to_dict() == result.figure("mae").to_dict()
    with pytest.raises(ValueError, match="unknown figure kind 'nope' for ProbeResult; kinds: r2, mae, "):
        result.figure("nope")


def test_random_init_store_fills_its_column(tmp_path):
    acts = planted_acts()
    tokens = torch.randint(0, 50, (N_SEQ, SEQ), generator=torch.Generator().manual_seed(0))
    real = write_store(tmp_path / "real", {f"resid_post.{i}": acts[i] for i in range(3)}, tokens)
    noise = 0.05 * torch.randn(3, N_SEQ, SEQ, D, generator=torch.Generator().manual_seed(9))
    rand = write_store(tmp_path / "rand", {f"resid_post.{i}": noise[i] for i in range(3)}, tokens)
    result = probe_position(real, random_init_store=rand, device="cpu")
    table = result.table
    assert (table["control_random_init"].abs() < 0.1).all()
    assert table["controls_missing"].eq("").all()
    control_max = table[["control_shuffled", "control_random_init", "control_token"]].max(axis=1)
    np.testing.assert_allclose(table["selectivity"], table["r2"] - control_max)


# -- bad input ------------------------------------------------------------------------------------


def test_unknown_target_and_kind_list_the_accepted():
    acts = planted_acts()
    with pytest.raises(ValueError, match=r"unknown target 'position'.*absolute, log, bucket, relative"):
        probe_position(acts, target="position")
    with pytest.raises(ValueError, match=r"unknown kind 'mlp'.*ridge, sparse, logistic"):
        probe_position(acts, kind=["ridge", "mlp"])
    with pytest.raises(ValueError, match="unknown control 'zero'"):
        probe_position(acts, controls=("zero",))


def test_unknown_site_in_store(tmp_path):
    store = write_store(tmp_path / "s", {"resid_post.0": planted_acts()[0]}, torch.zeros(N_SEQ, SEQ, dtype=torch.long))
    with pytest.raises(StoreError, match="'resid_mid' is not in this store; stored sites: resid_post"):
        probe_position(store, site="resid_mid")
    with pytest.raises(ValueError, match="unknown site 'resid'"):
        probe_position(store, site="resid")
    with pytest.raises(ValueError, match=r"layers \[5\] of 'resid_post' are not in the store"):
        probe_position(store, layers=[5])


def test_empty_activations():
    with pytest.raises(ValueError, match="no activations given"):
        probe_position({})
    with pytest.raises(ValueError, match="empty"):
        probe_position(torch.zeros(2, 0, SEQ, D))


def test_nan_activations_name_the_layer():
    acts = planted_acts()
    acts[2, 3, 4, 5] = math.nan
    with pytest.raises(NonFiniteError, match=r"1 non-finite value \(NaN/inf\) in site 'resid_post' layer 2"):
        probe_position(acts, device="cpu")


def test_fewer_sequences_than_folds():
    with pytest.raises(ValueError, match="3 sequences cannot make 5 folds"):
        probe_position(planted_acts()[:, :3], device="cpu")


def test_estimator_bad_input():
    with pytest.raises(ValueError, match=r"k must be an integer in 1\.\.4"):
        SparseProbe(k=9).fit(np.ones((5, 4)), np.arange(5))
    with pytest.raises(ValueError, match="NaN"):
        RidgeProbe().fit(np.full((5, 2), np.nan), np.arange(5))
    with pytest.raises(ValueError, match="one value per row"):
        RidgeProbe().fit(np.ones((5, 2)), np.arange(4))


def test_gcv_never_picks_an_interpolating_alpha():
    """Fewer training tokens than features: GCV must not choose the alpha that fits noise exactly."""
    gen = torch.Generator().manual_seed(0)
    acts = torch.randn(1, 10, 16, 512, generator=gen)  # [L n_seq seq d], no positional signal at all
    result = probe_position(acts, controls=("shuffled",), exclude_pos0=False, device="cpu")
    assert result.table["r2"].min() > -0.5, result.table[["r2", "alpha"]]


# -- the result contract ---------------------------------------------------------------------------


def test_info_records_a_run_on_activations_in_memory():
    acts = planted_acts()[:2, :10, :8, :16]
    mask = torch.ones(10, 8, dtype=torch.long)
    mask[0, -2:] = 0
    result = probe_position(
        acts, target=["absolute", "log"], controls=("shuffled",), n_splits=2, seed=3, attention_mask=mask, device="cpu"
    )
    info = result.info
    assert (info.analysis, info.model, info.site, info.layers) == (
        "probe_position",
        "activations",
        "resid_post",
        (0, 1),
    )
    assert (info.seed, info.exclude_pos0, info.causal, info.prepend_bos) == (3, "both", None, None)
    assert (info.n_sequences, info.seq_len, info.n_tokens) == (10, 8, 78)
    assert info.params["targets"] == ["absolute", "log"] and info.params["kinds"] == ["ridge"]
    assert info.params["controls"] == ["shuffled"] and info.params["random_init_control"] is False
    assert (info.params["n_splits"], info.params["alpha_selection"], info.params["device"]) == (2, "loo", "cpu")
    assert result.site == "resid_post"


def test_a_store_folder_reads_through_the_input_layer(tmp_path):
    acts = planted_acts()
    tokens = torch.randint(0, 50, (N_SEQ, SEQ), generator=torch.Generator().manual_seed(0))
    store = write_store(tmp_path / "s", {f"resid_post.{i}": acts[i] for i in range(3)}, tokens, prepend_bos=True)
    by_folder = probe_position(tmp_path / "s", layers=-1, n_splits=2, exclude_pos0=True, device="cpu")
    by_store = probe_position(store, layers=[2], n_splits=2, exclude_pos0=True, device="cpu")
    pd.testing.assert_frame_equal(by_folder.table, by_store.table)
    assert by_folder.table["control_token"].notna().all()  # the store's own token ids
    info = by_folder.info
    assert (info.model, info.layers, info.exclude_pos0, info.prepend_bos) == ("synthetic", (2,), True, True)
    assert (info.n_sequences, info.seq_len, info.n_tokens) == (N_SEQ, SEQ, N_SEQ * SEQ)
    with pytest.raises(ValueError, match="a store already holds its tokens"):
        probe_position(store, tokens)
    with pytest.raises(StoreError, match="is not a posprobe store"):
        probe_position(tmp_path / "nothing")


def test_the_site_is_a_keyword():
    with pytest.raises(TypeError, match=r"second argument is token ids.*pass the site by name: site='resid_post'"):
        probe_position(planted_acts(), "resid_post")


def test_figure_kinds_are_the_metrics_of_the_table():
    result = probe_position(planted_acts()[:2, :10, :8, :16], n_splits=2, controls=("shuffled",), device="cpu")
    assert result.figure_kinds() == ["r2", "mae", "accuracy", "mad", "selectivity"]
    assert result.figure().to_json() == result.figure("r2").to_json()
    for kind in result.figure_kinds():
        assert result.figure(kind).layout.yaxis.title.text == METRIC_TITLES[kind]
    narrow = ProbeResult(result.table.drop(columns=["mae", "accuracy"]), result.split, result.info)
    assert narrow.figure_kinds() == ["r2", "mad", "selectivity"]
    with pytest.raises(ValueError, match="unknown figure kind 'mae' for ProbeResult; kinds: r2, mad, selectivity"):
        narrow.figure("mae")


def test_save_writes_the_table_info_and_r2_figure(tmp_path):
    acts = planted_acts()[:2, :10, :8, :16]
    result = probe_position(acts, kind=["ridge", "sparse"], k=4, n_splits=2, controls=("shuffled",), device="cpu")
    out = result.save(tmp_path / "probes")
    assert {p.name for p in out.iterdir()} == {"table.csv", "table.parquet", "info.json", "r2.html"}
    info = json.loads((out / "info.json").read_text())
    assert (info["analysis"], info["exclude_pos0"], info["layers"]) == ("probe_position", "both", [0, 1])
    back = pd.read_parquet(out / "table.parquet")
    assert back["include_pos0"].tolist() == result.table["include_pos0"].tolist()
    np.testing.assert_array_equal(back["r2"], result.table["r2"])


def test_deprecated_exclude_bos_gives_the_same_numbers():
    acts = planted_acts()[:1]
    for value in (True, False, "both"):
        new = probe_position(acts, exclude_pos0=value, controls=("shuffled",), device="cpu")
        with pytest.warns(DeprecationWarning, match="exclude_bos= is deprecated.*use exclude_pos0="):
            old = probe_position(acts, exclude_bos=value, controls=("shuffled",), device="cpu")
        pd.testing.assert_frame_equal(old.table, new.table, check_exact=True)
        assert old.info == new.info and new.info.exclude_pos0 == value
    assert list(new.table["include_pos0"]) == [True, False]
