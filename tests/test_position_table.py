"""position_embedding_geometry: PCA periods, helix fit and smoothness of W_pos, against tables we construct;
and the result of length_generalization (positions past the table)."""

from __future__ import annotations

import inspect
import json

import numpy as np
import pandas as pd
import pytest
import torch

import posprobe as pp
from posprobe.models.position_schemes import sinusoidal_table
from posprobe.models.zoo import ZooConfig, ZooModel, ZooTransformer
from posprobe.results import INFO_FILE
from posprobe.stats.length import length_generalization
from posprobe.stats.position_table import FIGURE_KINDS, position_embedding_geometry, position_table

TINY = dict(d_model=32, n_layers=1, n_heads=2, d_head=16, d_mlp=64, n_ctx=96)


def planted_helix(n: int = 240, d: int = 32, period: float = 6.0, noise: float = 0.01, seed: int = 0) -> np.ndarray:
    """A circle of ``period`` in two directions + a slow ramp in a third, in a random orthonormal basis, plus noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    latent = np.stack([np.cos(2 * np.pi * t / period), np.sin(2 * np.pi * t / period), 0.3 * (t / n - 0.5)], 1)
    basis = np.linalg.qr(rng.normal(size=(d, 3)))[0].T  # [3 d] orthonormal rows
    return latent @ basis + noise * rng.normal(size=(n, d))


def zoo(pe: str) -> ZooModel:
    torch.manual_seed(0)
    return ZooModel(ZooTransformer(ZooConfig(pe=pe, **TINY)), name=f"tiny-{pe}")


def test_finds_a_planted_helix() -> None:
    geometry = position_embedding_geometry(planted_helix(), model_name="synthetic")
    comps = geometry.components
    assert comps["period"].iloc[:2].tolist() == pytest.approx([6.0, 6.0])
    assert comps["period_power"].iloc[:2].min() > 0.9
    assert abs(comps["spearman_with_position"].iloc[2]) > 0.99
    assert comps["explained_variance"].iloc[:3].sum() > 0.99
    assert geometry.helix["pc12_turn_period"] == pytest.approx(6.0, rel=1e-3)
    assert geometry.helix["pc12_angle_linear_r2"] > 0.999
    assert list(geometry.coords.columns) == ["position", *(f"pc{c}" for c in range(1, 7))]
    assert geometry.summary["period_pc1_3"][:2] == [6.0, 6.0]


def test_a_random_table_has_no_helix_and_no_smoothness() -> None:
    geometry = position_embedding_geometry(np.random.default_rng(1).normal(size=(240, 32)))
    assert geometry.components["explained_variance"].iloc[0] < 0.1
    assert geometry.components["period_power"].iloc[:3].max() < 0.5
    assert geometry.helix["pc12_angle_linear_r2"] < 0.9
    assert abs(geometry.summary["neighbour_cos_d1"]) < 0.05


def test_reads_the_learned_table_the_forward_uses() -> None:
    """The table read through the pos_embed hook is the parameter itself, and a helix planted in it is found."""
    model = zoo("learned")
    helix = planted_helix(n=TINY["n_ctx"], d=TINY["d_model"], period=8.0)
    with torch.no_grad():
        model.net.position.W_pos.copy_(torch.from_numpy(helix).float())
    assert np.allclose(position_table(model), helix, atol=1e-6)
    geometry = pp.position_embedding_geometry(model)
    assert geometry.helix["pc12_turn_period"] == pytest.approx(8.0, rel=1e-2)
    assert geometry.summary["neighbour_cos_d1"] > 0.5
    assert abs(geometry.summary["random_init_neighbour_cos_d1"]) < 0.2  # N(0, 0.02²) rows are unrelated
    assert geometry.model_name == "tiny-learned" and geometry.summary["shape"] == [96, 32]
    assert geometry.info.seed == 0 and geometry.info.params["random_init_control"]


def test_reads_the_scaled_sinusoidal_table() -> None:
    model = zoo("sinusoidal")
    expected = sinusoidal_table(TINY["n_ctx"], TINY["d_model"]).double().numpy() * model.net.position.scale
    assert np.allclose(position_table(model), expected, atol=1e-7)
    geometry = position_embedding_geometry(model, random_init_control=False)
    assert "cos_sim_random_init" not in geometry.neighbours
    assert geometry.summary["neighbour_cos_d1"] > 0.9


def test_reads_a_bert_position_embedding(tiny_bert) -> None:
    weight = tiny_bert.hf.embeddings.position_embeddings.weight.detach().double().numpy()
    assert np.allclose(position_table(tiny_bert), weight, atol=1e-6)


def test_figures_draw_every_kind() -> None:
    geometry = position_embedding_geometry(planted_helix())
    assert len(geometry.figure("helix").data) == 1
    assert len(geometry.figure("components").data) == 4
    assert len(geometry.figure("neighbours").data) == 1
    with pytest.raises(ValueError, match="unknown figure kind 'pca'"):
        geometry.figure("pca")


def test_a_model_without_a_position_table_is_refused() -> None:
    with pytest.raises(ValueError, match="pos_embed"):
        position_embedding_geometry(zoo("rope"))


@pytest.mark.parametrize(
    "table, message",
    [
        (np.zeros(10), r"\[positions d_model\]"),
        (np.zeros((3, 8)), "at least 4 positions"),
        (np.where(np.eye(8, 4) > 0, np.nan, 1.0), r"^4 non-finite values \(NaN/inf\) in site 'pos_embed'"),
    ],
)
def test_bad_tables_are_refused(table, message) -> None:
    with pytest.raises(ValueError, match=message):
        position_embedding_geometry(table)


def test_a_model_whose_table_holds_nan_is_refused() -> None:
    model = zoo("learned")
    with torch.no_grad():
        model.net.position.W_pos[3, 5] = float("nan")
    with pytest.raises(ValueError, match=r"^1 non-finite value \(NaN/inf\) in site 'pos_embed' .*of tiny-learned"):
        position_embedding_geometry(model)


def test_n_components_is_checked_and_capped() -> None:
    with pytest.raises(ValueError, match="n_components"):
        position_embedding_geometry(planted_helix(), n_components=0)
    assert len(position_embedding_geometry(planted_helix(d=4), n_components=10).components) == 4


# -- the result contract: .table, .info, .figure(kind), .save ------------------------------------


def test_result_contract(tmp_path) -> None:
    geometry = position_embedding_geometry(planted_helix(), model_name="synthetic")
    info = geometry.info
    assert (info.analysis, info.model, info.seed, info.site) == ("position_embedding_geometry", "synthetic", None, None)
    assert info.params == {"n_components": 6, "random_init_control": False, "n_positions": 240, "d_model": 32}
    assert geometry.components is geometry.table and (geometry.n_positions, geometry.d_model) == (240, 32)
    assert geometry.figure_kinds() == list(FIGURE_KINDS) == ["helix", "components", "neighbours"]
    assert geometry.figure().data[0].type == "scatter3d"  # the default: the helix
    out = geometry.save(tmp_path / "saved")
    tables = {f"{t}.{ext}" for t in ("table", "coords", "neighbours") for ext in ("csv", "parquet")}
    assert {f.name for f in out.iterdir()} == tables | {INFO_FILE} | {f"{k}.html" for k in FIGURE_KINDS}
    assert json.loads((out / INFO_FILE).read_text())["params"]["n_positions"] == 240


def test_a_model_name_is_loaded_and_the_rest_is_keyword_only() -> None:
    geometry = position_embedding_geometry("zoo:learned", random_init_control=False)
    assert geometry.model_name == "zoo:learned" and geometry.summary["shape"] == [256, 128]
    params = list(inspect.signature(position_embedding_geometry).parameters.values())
    assert params[0].name == "source" and all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params[1:])
    with pytest.raises(TypeError, match="positional"):
        position_embedding_geometry(planted_helix(), 3)


# -- length_generalization: a result that reads like its table for one release ---------------------


def test_length_generalization_result(tmp_path) -> None:
    model = ZooModel(ZooTransformer(ZooConfig(pe="rope", init_std=0.02, **{**TINY, "n_ctx": 32})), name="tiny-rope")
    tokens = torch.randint(2, 4096, (2, 64), generator=torch.Generator().manual_seed(0))
    result = length_generalization({"rope": model}, tokens, bucket=16)
    info = result.info
    assert (info.analysis, info.model) == ("length_generalization", "rope")
    assert (info.n_sequences, info.seq_len, info.n_tokens) == (2, 64, 128)
    assert info.seed is None and info.causal is True
    params = {"bucket": 16, "max_len": None, "batch_size": 4, "sliding_window": True}
    assert info.params == {"models": ["rope"], **params}
    assert result.table["position_bucket"].tolist() == ["0-15", "16-31", "32-47", "48-62"]
    with pytest.warns(
        DeprecationWarning, match=r"LengthGeneralization\[\.\.\.\] \(the result read as a DataFrame\) is deprecated"
    ):
        assert result["loss"].equals(result.table["loss"])
    with pytest.warns(DeprecationWarning, match=r"len\(LengthGeneralization\)"):
        assert len(result) == 4
    with pytest.warns(DeprecationWarning, match=r"LengthGeneralization.model \(the result read as a DataFrame\)"):
        assert (result.model == "rope").all()  # df.column still reads the column
    with pytest.warns(DeprecationWarning):  # pd.concat still takes it, as the analyses' scripts do
        both = pd.concat([result, pd.DataFrame([{"model": "skipped", "note": "not run"}])], ignore_index=True)
    assert both["model"].tolist() == ["rope"] * 4 + ["skipped"]
    assert result.figure_kinds() == ["loss"]
    assert [t.name for t in result.figure().data] == ["rope", "rope (sliding window)"]
    with pytest.raises(ValueError, match="unknown figure kind 'gap' for LengthGeneralization; kinds: loss"):
        result.figure("gap")
    out = result.save(tmp_path / "saved")
    assert {f.name for f in out.iterdir()} == {"table.csv", "table.parquet", INFO_FILE, "loss.html"}
    pd.testing.assert_frame_equal(pd.read_parquet(out / "table.parquet"), result.table)
    drawn = length_generalization(model, 1, max_len=40, bucket=16, sliding_window=False).info
    assert (drawn.model, drawn.seed, drawn.n_sequences, drawn.seq_len) == ("tiny-rope", 0, 1, 40)
