"""One way in, one way out: every analysis takes ``(source, tokens=None, *, …)`` and returns a frozen ``Result``
with ``.table``, ``.info``, ``.figure(kind)`` and ``.save(folder)``.

The list of analyses is posprobe's own (``posprobe._LAZY``): an analysis added without a case here fails.
"""

from __future__ import annotations

import dataclasses
import inspect
import json

import pandas as pd
import plotly.graph_objects as go
import pytest

import posprobe as pp
from posprobe.results import INFO_FILE, Result, RunInfo
from posprobe.stats.streaming import UNSET

#: public callables of posprobe that are not analyses of a source (they make stores, models or reports)
NOT_ANALYSES = {"extract", "extract_remote", "train"}
ANALYSES = sorted(set(pp._LAZY) - NOT_ANALYSES)
#: keywords that spell position 0 the old way, kept one release
OLD_POS0 = {"exclude_bos", "include_position_zero"}


@pytest.fixture(scope="module")
def rope():
    return pp.load_model("zoo:rope", device="cpu")


@pytest.fixture(scope="module")
def learned():
    return pp.load_model("zoo:learned", device="cpu")


@pytest.fixture(scope="module")
def tokens(rope):
    return pp.data.text_windows(rope, n=6, seq_len=24)


@pytest.fixture(scope="module")
def store(rope, tokens, tmp_path_factory):
    out = tmp_path_factory.mktemp("store")
    return pp.extract(rope, tokens, sites=("resid_post", "mlp_post"), out=out, device="cpu", progress=False)


def _probe(rope, tokens, store, learned, tmp):
    return pp.probe_position(store, site="resid_post", n_splits=3, controls=())


def _subspace(rope, tokens, store, learned, tmp):
    from posprobe.stats.patch_runs import fit_site_probe

    probe = fit_site_probe(rope, tokens, site="resid_pre", layer=1)  # the direction a position probe reads
    return pp.subspace_patch(rope, tokens, site="resid_pre", layer=1, direction=probe.estimator, shift=2)


CASES = {
    "attention_sinks": lambda m, t, s, learned, tmp: pp.attention_sinks(m, t, n=2, seq_len=16),
    "attention_stats": lambda m, t, s, learned, tmp: pp.attention_stats(m, t),
    "attention_variance": lambda m, t, s, learned, tmp: pp.attention_variance(m, t),
    "embedding_similarity": lambda m, t, s, learned, tmp: pp.embedding_similarity(m, t),
    "length_generalization": lambda m, t, s, learned, tmp: pp.length_generalization(m, 2, max_len=96, bucket=32),
    "patch_positions": lambda m, t, s, learned, tmp: pp.patch_positions(m, t, shift=2, layers=[0, 1]),
    "position_embedding_geometry": lambda m, t, s, learned, tmp: pp.position_embedding_geometry(learned),
    "positional_neurons": lambda m, t, s, learned, tmp: pp.positional_neurons(s, site="mlp_post"),
    "probe_model": lambda m, t, s, learned, tmp: pp.probe_model(m, t, out=tmp, n_splits=3, controls=()),
    "probe_position": _probe,
    "rope_ablation": lambda m, t, s, learned, tmp: pp.rope_ablation(m, t, ps=(0.5,), which=("highest",)),
    "rope_frequency_usage": lambda m, t, s, learned, tmp: pp.rope_frequency_usage(m, t, max_delta=8),
    "shift_invariance": lambda m, t, s, learned, tmp: pp.shift_invariance(m, t, shifts=(1, 4)),
    "subspace_patch": _subspace,
}


def test_every_analysis_has_a_case():
    assert sorted(CASES) == ANALYSES


@pytest.mark.parametrize("name", ANALYSES)
def test_signature_a_user_can_guess(name):
    """``source`` first, then ``tokens`` where the analysis runs text, then keywords only; position 0 one way."""
    params = list(inspect.signature(getattr(pp, name)).parameters.values())
    assert params[0].name == "source", f"{name} starts with {params[0].name!r}"
    rest = params[2:] if len(params) > 1 and params[1].name == "tokens" else params[1:]
    if len(params) > 1 and params[1].name == "tokens":
        assert params[1].default is None, f"{name}: tokens must default to None (a store holds its own)"
    positional = [p.name for p in rest if p.kind not in (p.KEYWORD_ONLY, p.VAR_KEYWORD)]
    assert not positional, f"{name}: {positional} must be keyword-only"
    for p in params:
        if p.name in OLD_POS0:
            assert p.default is UNSET, f"{name}: {p.name} is the old spelling of exclude_pos0; it only warns now"


@pytest.mark.parametrize("name", ANALYSES)
def test_result_contract(name, rope, tokens, store, learned, tmp_path):
    result = CASES[name](rope, tokens, store, learned, tmp_path / "work")
    assert isinstance(result, Result) and dataclasses.is_dataclass(result)
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.table = None  # type: ignore[misc]
    assert isinstance(result.table, pd.DataFrame) and len(result.table)
    info = result.info
    assert isinstance(info, RunInfo) and info.analysis == name and info.model
    assert json.loads(json.dumps(info.as_dict()))["analysis"] == name
    kinds = result.figure_kinds()
    assert kinds, f"{name} draws no figure"
    assert isinstance(result.figure(), go.Figure)
    with pytest.raises(ValueError, match="kinds: " + ", ".join(kinds)):
        result.figure("no-such-kind")
    folder = result.save(tmp_path / "saved")
    names = {p.name for p in folder.iterdir()}
    for table_name, table in result.tables().items():
        assert {f"{table_name}.csv", f"{table_name}.parquet"} <= names
        assert pd.read_parquet(folder / f"{table_name}.parquet").shape == table.shape
    saved_kinds = result.saved_kinds()
    assert {f"{k}.html" for k in saved_kinds} <= names and saved_kinds
    assert json.loads((folder / INFO_FILE).read_text())["model"] == info.model


def test_train_keeps_the_contract_too(tmp_path):
    """``train`` is not an analysis of a source, but what it returns is a Result like every other."""
    from posprobe.models.zoo_net import ZooConfig
    from posprobe.training import TrainResult

    config = ZooConfig(pe="rope", d_model=32, n_layers=1, n_heads=2, d_head=16, d_mlp=64, n_ctx=16)
    result = pp.train(config, tmp_path / "run", steps=3, batch_size=2, device="cpu", eval_windows=2, progress=False)
    assert isinstance(result, TrainResult) and isinstance(result, Result) and result.info.analysis == "train"
    assert {p.name for p in result.save(tmp_path / "saved").iterdir()} >= {"table.csv", "info.json", "loss.html"}


def test_an_unknown_figure_kind_names_the_kinds(rope, tokens):
    result = pp.attention_variance(rope, tokens)
    with pytest.raises(ValueError, match=r"unknown figure kind 'heatmap' for AttentionVariance; kinds: curves"):
        result.figure("heatmap")


def test_a_model_name_is_a_source(tokens):
    """The input layer coerces anything load_model accepts: here a packaged name."""
    by_name = pp.attention_variance("zoo:rope", tokens)
    assert by_name.info.model == "zoo:rope" and len(by_name.table)
