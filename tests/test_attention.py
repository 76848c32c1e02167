"""Attention diagnostics on constructions with known answers: Chi's 1/t variance, uniform and previous-token heads,
sinks, similarity of nearby embeddings, streaming == stored, and bad inputs."""

from __future__ import annotations

import inspect
import json
import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
import torch
from conftest import UnhookedZoo, ZooWithoutPattern, random_ids

from posprobe.data import TokenBatch
from posprobe.models.zoo import ZooConfig, ZooModel, ZooTransformer
from posprobe.plots.attention import (
    attention_by_distance,
    attention_pattern_viewer,
    head_role_map,
    position_predictor_comparison,
    similarity_curves,
    variance_curves,
)
from posprobe.results import INFO_FILE
from posprobe.stats.attention import ROLES, HeadRoleRules, attention_patterns, attention_stats
from posprobe.stats.similarity import compare_position_predictors, embedding_similarity
from posprobe.stats.variance import attention_variance
from posprobe.store import StoreError, write_store

ZOO_VOCAB = 4096


def nope_zoo(n_layers: int = 1, seed: int = 0) -> ZooModel:
    """A random-init causal NoPE decoder with near-uniform attention (queries shrunk 10×)."""
    cfg = ZooConfig(pe="none", n_layers=n_layers, d_model=64, n_heads=2, d_head=32, d_mlp=128, n_ctx=256, seed=seed)
    net = ZooTransformer(cfg)
    with torch.no_grad():
        for block in net.blocks:
            block.attn.W_Q.mul_(0.1)
    return ZooModel(net)


def zoo_tokens(n: int, s: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(2, ZOO_VOCAB, (n, s), generator=torch.Generator().manual_seed(seed))


def planted_patterns(n: int = 4, s: int = 40) -> torch.Tensor:
    """Pattern [n 4 s s]: head 0 previous-token, 1 sink (all on position 0), 2 uniform, 3 diagonal."""
    eye = torch.eye(s)
    prev = torch.diag(torch.ones(s - 1), -1)
    prev[0, 0] = 1.0
    sink = torch.zeros(s, s)
    sink[:, 0] = 1.0
    uniform = torch.tril(torch.ones(s, s))
    uniform = uniform / uniform.sum(-1, keepdim=True)
    return torch.stack([prev, sink, uniform, eye]).expand(n, 4, s, s).contiguous()


# -- Chi et al. 2023: variance ∝ 1/(t+1) --------------------------------------------------------


def test_nope_attention_variance_falls_as_one_over_t():
    model = nope_zoo()
    result = attention_variance(model, zoo_tokens(16, 128))
    fit = result.exponents.iloc[0]
    assert abs(fit["exponent"] - 1.0) < 0.2, fit
    assert fit["r2"] > 0.95
    assert fit["spearman"] < -0.8  # variance falls with position within each sequence
    table = result.table
    assert list(table.columns) == ["layer", "position", "n_keys", "n_tokens", "variance", "std", "sem"]
    assert (table["n_keys"] == table["position"] + 1).all()
    assert isinstance(result.figure(), go.Figure)


def test_variance_of_cumulative_means_in_a_store(tmp_path):
    """attn_out = mean of t+1 iid N(0, 1) vectors: variance 1/(t+1) exactly in expectation."""
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(32, 64, 256, generator=g)
    acts = noise.cumsum(1) / torch.arange(1, 65).view(1, 64, 1)
    store = write_store(tmp_path / "s", {"attn_out.0": acts}, torch.zeros(32, 64, dtype=torch.long), batch_size=8)
    result = attention_variance(store)
    assert result.exponents["exponent"].iloc[0] == pytest.approx(1.0, abs=0.05)
    t = result.table
    assert np.allclose(t["variance"], 1.0 / t["n_keys"], rtol=0.15)


def test_variance_per_head_on_z_matches_store(tmp_path):
    from posprobe.extraction import extract

    model, tokens = nope_zoo(), zoo_tokens(6, 48)
    live = attention_variance(model, tokens, site="z", batch_size=4)
    store = extract(model, tokens, ["z"], out=tmp_path / "z", progress=False)
    stored = attention_variance(store, site="z")
    assert set(live.table.columns) >= {"layer", "head", "position", "variance"}
    assert len(live.exponents) == model.info.n_heads
    np.testing.assert_allclose(live.table["variance"], stored.table["variance"], rtol=1e-5)


# -- attention_stats: constructions with known answers ------------------------------------------


def test_uniform_head_has_entropy_log_t_plus_1(tiny_llama):
    """q = 0 for head 0 of layer 0, so its scores are constant and the head is uniform over visible keys."""
    d = tiny_llama.info.d_head
    with torch.no_grad():
        tiny_llama.hf.model.layers[0].self_attn.q_proj.weight[:d].zero_()
    result = attention_stats(tiny_llama, random_ids(3, 20), layers=[0])
    pos = result.by_position()
    head0 = pos[(pos["layer"] == 0) & (pos["head"] == 0)]
    np.testing.assert_allclose(head0["entropy"], np.log(head0["position"] + 1), atol=1e-5)
    np.testing.assert_allclose(head0["uniform_entropy"], np.log(head0["position"] + 1), atol=1e-6)
    assert np.allclose(head0["normalized_entropy"].iloc[1:], 1.0, atol=1e-5)
    assert math.isnan(head0["normalized_entropy"].iloc[0])
    row = result.heads.query("layer == 0 and head == 0 and not include_pos0").iloc[0]
    t = np.arange(1, 20)
    assert row["mean_distance"] == pytest.approx(np.mean(t / 2), rel=1e-5)
    assert row["previous_token"] == pytest.approx(np.mean(1 / (t + 1)), rel=1e-5)
    assert row["first_token_mass"] == pytest.approx(np.mean(1 / (t + 1)), rel=1e-5)


def test_planted_heads_scores_and_roles(tmp_path):
    pattern = planted_patterns()
    tokens = torch.zeros(pattern.shape[0], pattern.shape[-1], dtype=torch.long)
    store = write_store(
        tmp_path / "p", {"pattern.0": pattern}, tokens, model_info={"name": "planted", "causal": True}, prepend_bos=True
    )
    result = attention_stats(store, window=4)
    excl = result.heads[~result.heads["include_pos0"]].set_index("head")
    incl = result.heads[result.heads["include_pos0"]].set_index("head")
    assert excl.loc[0, "previous_token"] > 0.99
    assert excl.loc[1, "first_token_mass"] == pytest.approx(1.0)
    assert excl.loc[3, "diagonal"] == pytest.approx(1.0)
    assert excl.loc[3, "mean_distance"] == pytest.approx(0.0)
    assert excl.loc[0, "mean_distance"] == pytest.approx(1.0)
    # the query at position 0 attends to itself: it adds a diagonal hit and a first-token hit
    s = pattern.shape[-1]
    assert incl.loc[0, "diagonal"] == pytest.approx(1 / s)
    assert incl.loc[0, "previous_token"] == pytest.approx((s - 1) / s)
    assert list(result.roles.sort_values("head")["role"]) == [
        "previous-token",
        "sink",
        "broad/semantic",
        "local/positional",
    ]
    assert result.prepend_bos and result.heads["bos_prepended"].all()
    assert list(result.rules_table["role"]) == list(ROLES)
    mass = result.by_distance(include_pos0=True).groupby("head")["mass"].sum()
    np.testing.assert_allclose(mass, 1.0, atol=1e-9)
    assert isinstance(result.figure(), go.Figure)
    assert isinstance(result.figure("distance", layer=0), go.Figure)


def test_previous_token_head_written_by_a_pattern_hook():
    """A permanent hook on the zoo's hook_pattern writes a previous-token map; attention_stats sees it downstream."""
    model = nope_zoo()
    s = 64  # long enough that a uniform head keeps most mass outside the 8-token window
    planted = planted_patterns(1, s)[0, 0]

    def write_prev(pattern, hook):
        out = pattern.clone()
        out[:, 1] = planted[: pattern.shape[-2], : pattern.shape[-1]]
        return out

    model.net.blocks[0].attn.hook_pattern.add_hook(write_prev, is_permanent=True)
    result = attention_stats(model, zoo_tokens(3, s))
    row = result.roles.set_index("head").loc[1]
    assert row["previous_token"] > 0.99
    assert row["role"] == "previous-token"
    assert result.roles.set_index("head").loc[0, "role"] == "broad/semantic"


def test_sliding_window_layers_keep_all_mass_in_the_window(tiny_gemma3):
    """Gemma 3's local layers see only keys with Δ < 8; its global layer sees the whole prefix."""
    result = attention_stats(tiny_gemma3, random_ids(2, 32), window=8)
    local = result.roles.groupby("layer")["local_mass"].min()
    assert local[0] == pytest.approx(1.0, abs=1e-6) and local[1] == pytest.approx(1.0, abs=1e-6)
    assert local[2] < 0.99
    uniform = result.by_position().query("layer == 0 and position >= 8")["uniform_entropy"]
    np.testing.assert_allclose(uniform, math.log(8), atol=1e-6)


def test_streamed_stats_equal_stored_patterns(tiny_llama, tmp_path):
    from posprobe.extraction import extract

    tokens = random_ids(5, 16, seed=4)
    live = attention_stats(tiny_llama, tokens, batch_size=2)
    store = extract(tiny_llama, tokens, ["pattern"], out=tmp_path / "s", batch_size=3, progress=False)
    stored = attention_stats(store)
    numeric = live.heads.select_dtypes("number").columns
    np.testing.assert_allclose(live.heads[numeric].to_numpy(), stored.heads[numeric].to_numpy(), rtol=1e-5, atol=1e-7)
    assert (live.roles["role"] == stored.roles["role"]).all()
    np.testing.assert_allclose(live.by_distance()["mass"], stored.by_distance()["mass"], rtol=1e-5, atol=1e-8)


def test_left_and_right_padding_give_the_same_stats(tiny_llama):
    ids = random_ids(2, 12, seed=5)
    lengths = [12, 7]
    right = torch.ones_like(ids)
    right[1, 7:] = 0
    left_ids = ids.clone()
    left_ids[1] = torch.cat([torch.ones(5, dtype=torch.long), ids[1, :7]])
    left = torch.ones_like(ids)
    left[1, :5] = 0
    batches = [TokenBatch(t, m, False, "test") for t, m in ((ids, right), (left_ids, left))]
    a, b = (attention_stats(tiny_llama, batch) for batch in batches)
    numeric = a.heads.select_dtypes("number").columns
    np.testing.assert_allclose(a.heads[numeric].to_numpy(), b.heads[numeric].to_numpy(), rtol=1e-4, atol=1e-6)
    assert int(a.heads["n_queries"].max()) == sum(lengths)


# -- Zuo et al. 2025: similarity of nearby embeddings ---------------------------------------------


def test_similarity_of_cumulative_means_recovers_order(tmp_path):
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(8, 48, 128, generator=g)
    acts = {"resid_post.0": noise.cumsum(1) / torch.arange(1, 49).view(1, 48, 1), "resid_post.1": noise}
    store = write_store(tmp_path / "s", acts, torch.zeros(8, 48, dtype=torch.long))
    result = embedding_similarity(store, max_distance=20)
    table = result.table[~result.table["include_pos0"]]
    smooth = table[table["layer"] == 0]["cos_sim"].to_numpy()
    assert (np.diff(smooth) < 0).all()  # similarity falls with distance
    assert np.abs(table[table["layer"] == 1]["cos_sim"]).max() < 0.05  # iid vectors: no similarity
    assert table["distance"].max() == 20
    summary = result.summary.set_index(["layer", "include_pos0"])
    assert summary.loc[(0, False), "adjacency"] > 0.9
    assert summary.loc[(0, False), "spectral_spearman"] > 0.95
    assert summary.loc[(1, False), "adjacency"] < 0.2
    assert summary.loc[(1, False), "spectral_spearman"] < 0.5
    assert summary.loc[(1, False), "adjacency_chance"] == pytest.approx(2 / 46, rel=0.1)
    assert isinstance(result.figure(), go.Figure)


def test_similarity_beats_variance_as_position_predictor_in_nope():
    """Zuo et al.: on the first causal attention layer's output, similarity orders tokens better than variance."""
    model, tokens = nope_zoo(seed=0), zoo_tokens(12, 96)
    variance = attention_variance(model, tokens)
    similarity = embedding_similarity(model, tokens, site="attn_out")
    table = compare_position_predictors(variance, similarity)
    best = table[table["best"]]
    assert list(best["predictor"]) == ["embedding_similarity"]
    assert best["abs_spearman"].iloc[0] > 0.95
    assert isinstance(position_predictor_comparison(table), go.Figure)
    with pytest.raises(ValueError, match="attn_out"):
        compare_position_predictors(attention_variance(model, tokens, site="z"), similarity)


# -- bidirectional models, length 1, unhookable models, bad arguments ----------------------------


def test_encoder_is_supported_and_says_what_assumes_causality(tiny_bert):
    tokens = random_ids(2, 10, seed=6)
    stats = attention_stats(tiny_bert, tokens)
    assert not stats.causal and stats.notes
    assert (stats.by_distance()["distance"] < 0).any()
    assert stats.heads["n_queries"].max() == 20
    variance = attention_variance(tiny_bert, tokens)
    assert not variance.causal and variance.notes
    similarity = embedding_similarity(tiny_bert, tokens)
    assert not similarity.causal


def test_length_one_sequences_are_refused(tiny_llama):
    one = random_ids(2, 1)
    with pytest.raises(ValueError, match="length 1"):
        attention_stats(tiny_llama, one)
    with pytest.raises(ValueError, match="power law"):
        attention_variance(tiny_llama, one)
    with pytest.raises(ValueError, match="no distances"):
        embedding_similarity(tiny_llama, one)


def test_models_whose_attention_cannot_be_hooked_get_a_clear_message():
    net = nope_zoo().net
    with pytest.raises(RuntimeError, match="never fired"):
        attention_stats(UnhookedZoo(net), zoo_tokens(1, 8))
    with pytest.raises(ValueError, match="does not expose attention weights"):
        attention_stats(ZooWithoutPattern(net), zoo_tokens(1, 8))


def test_bad_arguments(tiny_llama, tmp_path):
    tokens = random_ids(1, 8)
    store = write_store(tmp_path / "s", {"attn_out.0": torch.randn(1, 8, 4)}, tokens)
    with pytest.raises(ValueError, match="already holds its tokens"):
        attention_variance(store, tokens)
    with pytest.raises(ValueError, match="needs tokens"):
        attention_stats(tiny_llama)
    with pytest.raises(TypeError, match="expected a model"):
        attention_stats(3, tokens)  # a name string is a model now (loaded like pp.load_model)
    with pytest.raises(ValueError, match="'attn_out' or 'z'"):
        attention_variance(tiny_llama, tokens, site="resid_post")
    with pytest.raises(ValueError, match="window"):
        attention_stats(tiny_llama, tokens, window=0)
    with pytest.raises(ValueError, match=r"^layer 99 out of range; this model has layers 0\.\.2$"):
        attention_stats(tiny_llama, tokens, layers=[99])  # the layer, not the attention implementation
    with pytest.raises(StoreError, match="'pattern' is not in this store"):
        attention_stats(store)
    with pytest.raises(ValueError, match="one vector per token"):
        embedding_similarity(tiny_llama, random_ids(1, 8), site="z")
    with pytest.raises(ValueError, match="sink"):
        HeadRoleRules(sink=0.0)


# -- plots -----------------------------------------------------------------------------------------


def test_pattern_viewer_has_one_heatmap_per_head_and_token_hover(tiny_llama):
    table = attention_patterns(tiny_llama, random_ids(2, 12, seed=7), seq=1, layers=[0, 2], max_tokens=6).table
    assert set(table["layer"]) == {0, 2} and len(table) == 2 * 4 * 21
    assert table.groupby(["layer", "head", "query_pos"])["weight"].sum().between(1 - 1e-5, 1 + 1e-5).all()
    fig = attention_pattern_viewer(table)
    assert len(fig.data) == 8 and sum(trace.visible for trace in fig.data) == 1
    assert len(fig.layout.updatemenus[0].buttons) == 8
    assert "query" in fig.data[0].text[3][1] and "key" in fig.data[0].text[3][1]
    with pytest.raises(ValueError, match="seq 5"):
        attention_patterns(tiny_llama, random_ids(2, 12), seq=5)


def test_plot_functions_read_tables_and_reject_bad_ones(tmp_path):
    pattern = planted_patterns(2, 16)
    store = write_store(tmp_path / "p", {"pattern.0": pattern}, torch.zeros(2, 16, dtype=torch.long))
    stats = attention_stats(store)
    role_fig = head_role_map(stats.roles)
    assert role_fig.data[0].z.shape == (1, 4)
    assert isinstance(attention_by_distance(stats.by_distance()), go.Figure)
    with pytest.raises(ValueError, match="needs columns"):
        head_role_map(stats.roles.drop(columns="role"))
    with pytest.raises(ValueError, match="needs columns"):
        variance_curves(stats.roles)
    with pytest.raises(ValueError, match="needs columns"):
        similarity_curves(stats.roles)


# -- the result contract: .table, .info, .figure(kind), .save ------------------------------------


def saved_files(tables: tuple[str, ...], figures: tuple[str, ...]) -> set[str]:
    """The files ``Result.save`` writes for these tables and figure kinds."""
    return {f"{t}.{ext}" for t in tables for ext in ("csv", "parquet")} | {f"{k}.html" for k in figures} | {INFO_FILE}


def test_attention_stats_result_contract(tmp_path):
    tokens = torch.zeros(2, 16, dtype=torch.long)
    planted = {"name": "planted", "causal": True}
    write_store(tmp_path / "p", {"pattern.0": planted_patterns(2, 16)}, tokens, model_info=planted, prepend_bos=True)
    result = attention_stats(str(tmp_path / "p"), window=4)  # a store's folder is a source too
    info = result.info
    assert (info.analysis, info.model, info.site, info.layers) == ("attention_stats", "planted", "pattern", (0,))
    assert (info.n_sequences, info.seq_len, info.n_tokens) == (2, 16, 32)
    assert info.causal and info.prepend_bos and info.exclude_pos0 == "both" and info.notes == ()
    rules = {"previous_token": 0.5, "sink": 0.5, "local": 0.5}
    assert info.params == {"window": 4, "rules": rules, "query_block": None}  # a store: whole maps
    assert result.heads is result.table and result.window == 4 and result.model_name == "planted"
    assert result.figure_kinds() == ["roles", "distance"]
    assert result.figure().data[0].type == "heatmap"  # the default: the head-role map
    with pytest.raises(
        ValueError, match=r"^unknown figure kind 'spectrum' for AttentionStats; kinds: roles, distance$"
    ):
        result.figure("spectrum")
    with pytest.warns(DeprecationWarning, match=r"distance_figure\(layer\) is deprecated"):
        old = result.distance_figure(0, max_distance=8)
    assert old.to_json() == result.figure("distance", layer=0, max_distance=8).to_json()
    out = result.save(tmp_path / "saved")
    assert {f.name for f in out.iterdir()} == saved_files(("table", "roles", "rules_table"), ("roles",))
    assert json.loads((out / INFO_FILE).read_text())["exclude_pos0"] == "both"
    assert pd.read_parquet(out / "roles.parquet")["role"].tolist() == result.roles["role"].tolist()


def test_embedding_similarity_result_contract(tmp_path):
    acts = {"resid_post.0": torch.randn(3, 12, 8, generator=torch.Generator().manual_seed(0))}
    write_store(tmp_path / "s", acts, torch.zeros(3, 12, dtype=torch.long), model_info={"name": "synthetic"})
    result = embedding_similarity(tmp_path / "s", max_distance=5, n_neighbors=2)
    info = result.info
    assert (info.analysis, info.model, info.site, info.layers) == (
        "embedding_similarity",
        "synthetic",
        "resid_post",
        (0,),
    )
    assert (info.n_sequences, info.seq_len, info.n_tokens, info.exclude_pos0) == (3, 12, 36, "both")
    assert info.params == {"max_distance": 5, "max_spectral_tokens": 512, "n_neighbors": 2}
    assert (result.site, result.n_neighbors, result.max_spectral_tokens) == ("resid_post", 2, 512)
    assert result.figure_kinds() == ["curves"]
    assert "without position 0" in result.figure().layout.title.text
    with_pos0 = result.figure("curves", include_pos0=True)
    assert "with position 0" in with_pos0.layout.title.text
    with pytest.warns(DeprecationWarning, match=r"figure\(include_pos0\) is deprecated"):
        assert result.figure(True).to_json() == with_pos0.to_json()
    with pytest.raises(ValueError, match="unknown figure kind 'heatmap' for EmbeddingSimilarity; kinds: curves"):
        result.figure("heatmap")
    out = result.save(tmp_path / "saved")
    assert {f.name for f in out.iterdir()} == saved_files(("table", "summary"), ("curves",))
    pd.testing.assert_frame_equal(pd.read_parquet(out / "summary.parquet"), result.summary)


def test_attention_patterns_result_reads_like_its_table_for_one_release(tiny_llama, tmp_path):
    result = attention_patterns(tiny_llama, random_ids(2, 12, seed=7), seq=1, layers=[0], max_tokens=6)
    info = result.info
    assert (info.analysis, info.model, info.site, info.layers) == ("attention_patterns", "tiny-llama", "pattern", (0,))
    assert (info.n_sequences, info.seq_len, info.n_tokens) == (1, 6, 6)
    assert info.params == {"seq": 1, "max_tokens": 6}
    assert result.figure_kinds() == ["viewer"]
    title = "Attention of tiny-llama, sequence 1"
    assert result.figure().to_json() == attention_pattern_viewer(result.table, title=title).to_json()
    with pytest.warns(
        DeprecationWarning, match=r"AttentionPatterns\[\.\.\.\] \(the result read as .*\.table\[\.\.\.\]"
    ):
        assert result["weight"].equals(result.table["weight"])
    with pytest.warns(DeprecationWarning, match=r"len\(AttentionPatterns\)"):
        assert len(result) == len(result.table) == 4 * 21
    with pytest.warns(DeprecationWarning, match=r"AttentionPatterns.groupby \(the result read as a DataFrame\)"):
        assert result.groupby("head").ngroups == 4
    with pytest.warns(DeprecationWarning, match="'column' in AttentionPatterns"):
        assert "weight" in result
    with pytest.warns(DeprecationWarning):  # the viewer still takes the old return value
        old = attention_pattern_viewer(result)
    assert old.to_json() == attention_pattern_viewer(result.table).to_json()
    with pytest.raises(AttributeError, match="no attribute 'no_such_column'"):
        _ = result.no_such_column
    out = result.save(tmp_path / "saved")
    assert {f.name for f in out.iterdir()} == saved_files(("table",), ("viewer",))


def test_everything_after_tokens_is_keyword_only(tiny_llama):
    for fn in (attention_stats, attention_patterns, embedding_similarity):
        params = list(inspect.signature(fn).parameters.values())
        assert [p.name for p in params[:2]] == ["source", "tokens"], fn.__name__
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params[2:]), fn.__name__
    with pytest.raises(TypeError, match="positional"):
        attention_stats(tiny_llama, random_ids(1, 8), [0])


# -- pretrained ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_has_a_first_token_sink(smollm2):
    import posprobe as pp

    tokens = pp.data.text_windows(smollm2, n=2, seq_len=1024, seed=0)
    result = attention_stats(smollm2, tokens, batch_size=2)
    assert result.prepend_bos == tokens.prepend_bos
    assert (result.roles["first_token_mass"] > 0.5).any()
    assert (result.roles["role"] == "sink").sum() >= 1


# -- long context: the map a block of queries at a time --------------------------------------------


@pytest.mark.parametrize("padded", [True, False])
@pytest.mark.parametrize("family", ["llama", "gemma3", "bert"])
@pytest.mark.parametrize("block", [1, 7, 16])
def test_query_blocks_give_the_whole_map_numbers(
    family, block, padded, tiny_llama, tiny_gemma3, tiny_bert, monkeypatch
):
    """Blocks of queries against every key give what whole maps give, to float32 rounding (sums in float64):
    GQA (llama), sliding windows (gemma3), bidirectional attention (bert), left padding, blocks that do not
    divide the length and a block holding position 0 or not."""
    model = {"llama": tiny_llama, "gemma3": tiny_gemma3, "bert": tiny_bert}[family]
    ids = random_ids(3, 24, seed=4)
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :5] = 0  # left padding: position 0 of row 1 sits in column 5
    tokens = TokenBatch(ids, mask, prepend_bos=False, source="random ids")
    import posprobe.models.hf as hf

    whole = attention_stats(model, tokens, query_block=None)
    calls, real = [], hf.blocked_attention
    monkeypatch.setattr(hf, "blocked_attention", lambda *a, **kw: calls.append(a[6]) or real(*a, **kw))
    blocks = attention_stats(model, tokens, query_block=block)
    assert calls == [block] * model.info.n_layers  # the block path ran in every layer
    assert blocks.info.params["query_block"] == block and whole.info.params["query_block"] is None
    pd.testing.assert_frame_equal(blocks.table, whole.table, check_exact=False, rtol=1e-6, atol=1e-9)
    for layer, sums in whole.sums.items():
        for name, value in sums.items():
            torch.testing.assert_close(blocks.sums[layer][name], value, rtol=1e-6, atol=1e-9, msg=name)


def test_diagonal_sums_are_the_distance_histogram(monkeypatch, tiny_llama):
    """The strided-view sums (unpadded batches) equal the scattered sums (index_add over every pair), to float32
    rounding."""
    import posprobe.stats.attention as attention

    tokens = random_ids(2, 20, seed=5)
    fast = attention_stats(tiny_llama, tokens, query_block=6)
    real = attention._diagonals
    monkeypatch.setattr(attention, "_diagonals", lambda *a: {**real(*a), "aligned": False})
    slow = attention_stats(tiny_llama, tokens, query_block=6)
    for layer, sums in slow.sums.items():
        # chunks of rows sum in float32 (then float64): float32 rounding, not float64's
        torch.testing.assert_close(fast.sums[layer]["dist"], sums["dist"], rtol=1e-6, atol=1e-9)
    x = torch.rand(2, 4, 3, 7)  # [b heads s t]
    expected = torch.zeros(4, 10, dtype=torch.float64)
    for r in range(3):
        for j in range(7):
            expected[:, 3 - r + j] += x[:, :, r, j].double().sum(0)  # m = s − (r − j): distance r − j
    torch.testing.assert_close(attention._diagonal_sums(x), expected)
    torch.testing.assert_close(attention._diagonal_sums(x, rows=2), expected)  # in chunks of rows


def test_query_blocks_compute_what_explicit_attention_computes():
    """The block path hands the observer each block's weights up to its last visible key ([b heads block seen];
    causal: seen = the block's last query + 1), never the whole map, and its output is explicit attention's
    (GQA, a causal mask, a block that does not divide the length)."""
    from posprobe.models.hf import blocked_attention, explicit_attention

    q, k, v = torch.randn(2, 4, 10, 16), torch.randn(2, 2, 10, 16), torch.randn(2, 2, 10, 16)
    allowed = torch.ones(10, 10, dtype=torch.bool).tril()
    seen = []
    out = blocked_attention(q, k, v, allowed, 0.25, lambda w, q0, _: seen.append((w.clone(), q0)), 4)
    assert [(tuple(w.shape), q0) for w, q0 in seen] == [((2, 4, 4, 4), 0), ((2, 4, 4, 8), 4), ((2, 4, 2, 10), 8)]
    full_out, full = explicit_attention(q, k, v, allowed, 0.25, {})
    rows = torch.cat([torch.nn.functional.pad(w, (0, 10 - w.shape[-1])) for w, _ in seen], dim=2)
    torch.testing.assert_close(rows, full)
    torch.testing.assert_close(out, full_out)
    entropies = []  # the entropy each block hands over is the map's own −Σ p log p, 0 where a query sees nothing
    causal_out = blocked_attention(q, k, v, None, 0.25, lambda w, q0, h: entropies.append(h.clone()), 4, causal=True)
    torch.testing.assert_close(causal_out, full_out)  # the causal mask never built whole: the same attention
    torch.testing.assert_close(torch.cat(entropies, dim=2), -torch.special.xlogy(full, full).sum(-1))
    padded = allowed & torch.tensor([False, False] + [True] * 8)  # keys 0, 1 masked: query 0 and 1 see nothing
    out_padded = blocked_attention(q, k, v, padded, 0.25, lambda *_: None, 4)
    full_out_padded, full_padded = explicit_attention(q, k, v, padded, 0.25, {})
    torch.testing.assert_close(out_padded, full_out_padded)
    entropies.clear()
    blocked_attention(q, k, v, padded, 0.25, lambda w, q0, h: entropies.append(h.clone()), 4)
    torch.testing.assert_close(torch.cat(entropies, dim=2), -torch.special.xlogy(full_padded, full_padded).sum(-1))
    assert not torch.cat(entropies, dim=2)[:, :, :2].any()
    bidirectional = []
    blocked_attention(q, k, v, None, 0.25, lambda w, q0, _: bidirectional.append(tuple(w.shape)), 4)
    assert bidirectional == [(2, 4, 4, 10), (2, 4, 4, 10), (2, 4, 2, 10)]  # every key visible: whole rows


def test_query_block_auto_and_bad_values(tiny_llama):
    tokens = random_ids(1, 12)
    assert attention_stats(tiny_llama, tokens).info.params["query_block"] == 256  # a model: blocks
    with pytest.raises(ValueError, match="query_block must be a positive int, 'auto' or None, got 0"):
        attention_stats(tiny_llama, tokens, query_block=0)
