"""Attention sinks as Gu et al. 2025 measure them (``pp.attention_sinks``), checked against closed-form answers.

Ground truth: a tiny Llama whose attention is built by hand (its head 0 puts a chosen share on the BOS,
every other head attends uniformly, the residual stream is the embedding in every layer), a positional
sink made with an attention-score bias, synthetic maps folded by hand, random-init zoo twins (no
sinks), and residual norms made equal or made large on the first token.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
import torch
from conftest import UnhookedZoo, ZooWithoutPattern, tiny_llama_hf, tiny_tokenizer

import posprobe as pp
from posprobe.data import from_texts, text_windows
from posprobe.models.base import positions_from_mask
from posprobe.models.hf import HFModel
from posprobe.models.zoo import ZooConfig, ZooModel, ZooTransformer
from posprobe.results import INFO_FILE
from posprobe.sites import SiteKey
from posprobe.stats.sinks import (
    INPUT_KINDS,
    MOVED_OUTCOMES,
    AttentionSinks,
    SinkSums,
    classify_moved,
    moved_first_token,
    plain_token_ids,
    sink_tokens,
)
from posprobe.stats.streaming import Batch

T = 16  # sequence length of the hand-built model's runs


# -- a tiny Llama whose attention is known --------------------------------------------------------------


def controlled_hf(c: float | None, unit_norm: bool = False):
    """A tiny Llama (3 layers, 4 heads, 2 kv heads) whose residual stream is its token embedding in every layer
    (attention and MLP outputs zeroed), and whose head 0 scores the BOS key ``c`` above every other key.

    Head 0's query is a constant bias and its key reads an embedding direction only the BOS has (RMSNorm
    without eps maps the BOS embedding e_0 to exactly 8·e_0), both in RoPE's slowest pair: rope_theta 1e12
    turns it by < 3e-9 rad over 64 positions, so cos = 1 in float32 and the score is c at every distance.
    Heads 1–3 score every key 0 (uniform attention); so does head 0 when ``c`` is None.
    """
    hf = tiny_llama_hf(
        attention_bias=True, rms_norm_eps=0.0, rope_parameters={"rope_type": "default", "rope_theta": 1e12}
    )
    with torch.no_grad():
        emb = hf.model.embed_tokens.weight
        emb[:, 0] = 0.0
        emb[0] = 0.0
        emb[0, 0] = 1.0  # the BOS (id 0): direction 0 alone
        if unit_norm:
            emb /= emb.norm(dim=1, keepdim=True)
        for layer in hf.model.layers:
            attn = layer.self_attn
            for linear in (attn.q_proj, attn.k_proj, attn.o_proj):
                linear.weight.zero_()
                linear.bias.zero_()
            layer.mlp.down_proj.weight.zero_()
            if c is not None:
                attn.k_proj.weight[7, 0] = 1 / 8  # kv head 0, dim 7 (slowest pair with 15): 1 on the BOS, 0 elsewhere
                attn.q_proj.bias[7] = c / attn.scaling  # query head 0 (kv head 0): score c on the BOS key
    return hf


def controlled(c: float | None, unit_norm: bool = False) -> HFModel:
    return HFModel(controlled_hf(c, unit_norm), tiny_tokenizer(), name="controlled-llama")


class FirstColumnBias(HFModel):
    """Head 0 of every layer gets +8 on the score of key column 0: in an unpadded batch a sink tied to position 0,
    whatever token stands there (an ALiBi-like additive score bias, here through posprobe's ``attn_scores`` site)."""

    def _run(self, tokens, attention_mask, position_ids, hooks, return_logits, stop_at_layer):
        bias = {SiteKey("attn_scores", layer): _bias_first_column for layer in range(self.info.n_layers)}
        return super()._run(tokens, attention_mask, position_ids, {**hooks, **bias}, return_logits, stop_at_layer)


def _bias_first_column(scores: torch.Tensor) -> torch.Tensor:
    scores = scores.clone()
    scores[:, 0, :, 0] += 8.0
    return scores


def alpha0_of_bos_head(c: float, t: int = T) -> float:
    """Gu's α_0 of head 0: the query at 0 sees only the BOS; a query at t ≥ 1 gives it e^c / (e^c + t)."""
    e = math.exp(c)
    return (1.0 + sum(e / (e + q) for q in range(1, t))) / t


def uniform_alpha(k: int, t: int = T) -> float:
    """α_k of a uniform causal head: query q puts 1/(q + 1) on every key it sees."""
    return sum(1.0 / (q + 1) for q in range(k, t)) / (t - k)


def bos_head_for(alpha: float, t: int = T) -> float:
    """The score c that gives head 0 Gu's α_0 = ``alpha`` (bisection: α_0 rises with c)."""
    low, high = -10.0, 20.0
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if alpha0_of_bos_head(mid, t) < alpha else (low, mid)
    return (low + high) / 2


def test_a_head_with_0_4_on_token_0_is_a_sink_at_0_3_and_not_at_0_5():
    """End to end through a real forward: head 0 of every layer has α_0 = 0.4 exactly, heads 1–3 are uniform."""
    c = bos_head_for(0.4)
    model = controlled(c)
    result = pp.attention_sinks(model, inputs=("random", "repeated"), n=2, seq_len=T, first_k=3, epsilon=0.3)
    table = result.table
    bos = table[table["bos"]]
    head0 = bos[(bos["head"] == 0) & (bos["k"] == 0)]
    assert len(head0) == 2 * 3 and np.allclose(head0["alpha"], 0.4, atol=2e-6), head0["alpha"].tolist()
    assert head0["is_sink"].all()
    for k in range(3):  # heads 1–3: uniform attention, α_k in closed form
        others = bos[(bos["head"] > 0) & (bos["k"] == k)]
        assert np.allclose(others["alpha"], uniform_alpha(k), atol=1e-6)
        e = math.exp(c)
        if k:  # head 0 on a plain token: 1 / (e^c + t) from each query that sees it
            expected = sum(1.0 / (e + q) for q in range(k, T)) / (T - k)
            assert np.allclose(bos[(bos["head"] == 0) & (bos["k"] == k)]["alpha"], expected, atol=1e-6)
    assert (table.loc[~table["bos"], "alpha"] < 0.3).all()  # without a BOS head 0 is uniform too
    assert set(table.loc[table["k"] == 0, "n_queries"]) == {2 * T}
    assert set(table.loc[table["k"] == 2, "n_queries"]) == {2 * (T - 2)}
    # Sink^0.3_0: head 0 of each of 3 layers = 3 of 12 heads
    assert result.sink_rate("random", True) == pytest.approx(25.0) == result.sink_rate("repeated", True)
    assert result.sink_rate("random", False) == 0.0
    assert result.sink_rate("random", True, k=1) == 0.0
    by_layer = result.by_layer[(result.by_layer["k"] == 0) & result.by_layer["bos"]]
    assert (by_layer["sink_rate"] == 25.0).all() and (by_layer["n_heads"] == 4).all()
    strict = pp.attention_sinks(model, inputs=("random",), n=2, seq_len=T, first_k=3, epsilon=0.5)
    assert strict.sink_rate("random", True) == 0.0 and not strict.table["is_sink"].any()


def test_the_sink_follows_a_content_sink_and_stays_with_a_positional_one():
    """Moved behind 4 fillers: a head that scores the BOS token follows it; a head biased to column 0 stays at the
    start (its sink is then on the first filler)."""
    content = pp.attention_sinks(controlled(6.0), inputs=("random",), n=2, seq_len=T, bos=True)
    moved = content.moved
    assert (moved["n_sink_heads"] == 1).all() and (moved["n_follows_token"] == 1).all()
    assert (moved["share_follows_token"] == 1.0).all()
    e = math.exp(6.0)
    expected = sum(e / (e + q) for q in range(4, T)) / (T - 4)  # the BOS at 4: query q sees it and q others
    assert np.allclose(moved["alpha_token"], expected, atol=1e-6)
    fillers = sum(4 / (e + q) for q in range(4, T)) / (T - 4)  # four fillers, each 1 / (e^c + q)
    assert np.allclose(moved["alpha_fillers"], fillers, atol=1e-6)
    positional = FirstColumnBias(controlled_hf(None), tiny_tokenizer(), name="positional-llama")
    stays = pp.attention_sinks(positional, inputs=("random",), n=2, seq_len=T, bos="both").moved
    assert (stays["n_sink_heads"] == 1).all() and (stays["n_stays_at_start"] == 1).all()
    assert (stays["share_stays_at_start"] == 1.0).all() and (stays["alpha_position0"] > 0.9).all()
    none = pp.attention_sinks(controlled(6.0), inputs=("random",), n=2, seq_len=T, bos=False).moved
    assert (none["n_sink_heads"] == 0).all() and none["share_follows_token"].isna().all()  # NaN, not 0


def test_classify_moved():
    outcome = classify_moved(
        np.array([0.8, 0.1, 0.2, 0.5, np.nan, 0.4]), np.array([0.1, 0.7, 0.1, 0.5, 0.6, np.nan]), 0.3
    )
    assert list(outcome) == [
        "follows_token",
        "stays_at_start",
        "dissolved",
        "stays_at_start",  # a tie goes to the start
        "stays_at_start",
        "follows_token",
    ]
    assert set(outcome) <= set(MOVED_OUTCOMES)


def test_moved_first_token_puts_fillers_before_the_real_tokens():
    ids = torch.tensor([[7, 8, 9, 10, 11], [1, 1, 5, 6, 7]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    batch = pp.data.TokenBatch(ids, mask, False, "test")
    moved = moved_first_token(batch, 2, (5, 3))
    assert moved.tokens[0].tolist() == [5, 5, 7, 8, 9]
    assert moved.tokens[1].tolist() == [1, 1, 3, 3, 5]  # its first token is the filler: the second filler is used
    assert torch.equal(moved.attention_mask, mask)


# -- the fold, on synthetic maps -------------------------------------------------------------------------------


def synthetic(causal: bool, window: int | None = None, seed: int = 0):
    """Random attention maps [3 2 9 9] over rows unpadded, left-padded by 2 and right-padded by 3."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.tensor([[1] * 9, [0, 0] + [1] * 7, [1] * 6 + [0] * 3])
    pos = positions_from_mask(mask)
    real = mask.bool()
    allowed = real[:, :, None] & real[:, None, :]
    delta = pos[:, :, None] - pos[:, None, :]
    if causal:
        allowed &= delta >= 0
    if window:
        allowed &= delta.abs() < window
    scores = torch.randn(3, 2, 9, 9, generator=gen).masked_fill(~allowed[:, None], float("-inf"))
    weights = torch.softmax(scores, -1).nan_to_num(0.0)
    return weights, Batch(0, mask, pos), pos, real


def brute_force(weights, pos, real, keys, causal, window, min_query):
    sums, counts = np.zeros((2, len(keys))), np.zeros(len(keys))
    for row in range(3):
        for j, k in enumerate(keys):
            cols = [c for c in range(9) if real[row, c] and pos[row, c] == k]
            for q in range(9):
                t = int(pos[row, q])
                ok = real[row, q] and cols and t >= min_query and (t >= k or not causal)
                if ok and (not window or abs(t - k) < window):
                    sums[:, j] += weights[row, :, q, cols[0]].double().numpy()
                    counts[j] += 1
    return sums / np.where(counts > 0, counts, np.nan)


@pytest.mark.parametrize(
    ("causal", "window", "min_query"), [(True, None, 0), (True, 3, 0), (True, None, 2), (False, None, 0)]
)
def test_the_fold_matches_a_hand_sum_whole_and_in_blocks(causal, window, min_query):
    weights, batch, pos, real = synthetic(causal, window)
    keys = (0, 1, 2, 5)
    expected = brute_force(weights, pos, real, keys, causal, window, min_query)
    whole = SinkSums(keys, causal, lambda layer: window, min_query)
    whole.add(0, weights, batch)
    blocks = SinkSums(keys, causal, lambda layer: window, min_query)
    for q0 in range(0, 9, 4):  # blocks of 4 queries against the keys they may see
        c = min(4, 9 - q0)
        seen = q0 + c if causal else 9
        blocks.add(0, weights[:, :, q0 : q0 + c, :seen], batch, q0)
    np.testing.assert_allclose(whole.alpha(0), expected, rtol=1e-12, equal_nan=True)
    np.testing.assert_allclose(blocks.alpha(0), expected, rtol=1e-12, equal_nan=True)
    assert torch.equal(whole.counts[0], blocks.counts[0])


# -- inputs -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def zoo_rope():
    return pp.load_model("zoo:rope", device="cpu")


def test_natural_inputs_are_corpus_text_with_and_without_bos(zoo_rope):
    base = sink_tokens(zoo_rope, "natural", n=3, seq_len=20, seed=1)
    windows = text_windows(zoo_rope, n=3, seq_len=20, seed=1, prepend_bos=False)
    assert torch.equal(base.tokens, windows.tokens) and base.source == "sotu:heldout" and not base.prepend_bos
    bos = sink_tokens(zoo_rope, "natural", n=3, seq_len=20, seed=1, prepend_bos=True)
    assert bos.prepend_bos and bos.shape == (3, 20)
    assert (bos.tokens[:, 0] == zoo_rope.info.bos_token_id).all()
    assert torch.equal(bos.tokens[:, 1:], base.tokens[:, :-1])  # the same text after the BOS
    assert bos.str_tokens is not None and bos.str_tokens[0][0] == "<|bos|>"


def test_random_inputs_are_uniform_plain_ids_and_repeated_is_one_id():
    tok = tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["t100"]})  # a special token in mid-vocabulary: id 102
    model = HFModel(tiny_llama_hf(), tok, name="tiny-llama")
    plain = plain_token_ids(model)
    assert 0 not in plain and 1 not in plain and 102 not in plain and len(plain) == 253
    rand = sink_tokens(model, "random", n=64, seq_len=64, seed=3)
    counts = torch.bincount(rand.tokens.flatten(), minlength=256)
    assert counts[[0, 1, 102]].sum() == 0 and (counts[plain] > 0).all()  # every plain id, no special one
    assert counts[plain].float().std() / counts[plain].float().mean() < 0.4  # ~ Poisson(16.2): sd/mean 0.25
    assert not rand.prepend_bos and rand.source == "random"
    rep = sink_tokens(model, "repeated", n=8, seq_len=64, seed=3)
    assert all(len(row.unique()) == 1 for row in rep.tokens) and len(rep.tokens[:, 0].unique()) > 1
    assert bool(torch.isin(rep.tokens[:, 0], plain).all())
    rep_bos = sink_tokens(model, "repeated", n=8, seq_len=64, seed=3, prepend_bos=True)
    assert (rep_bos.tokens[:, 0] == 0).all() and torch.equal(rep_bos.tokens[:, 1:], rep.tokens[:, 1:])
    assert torch.equal(sink_tokens(model, "random", n=64, seq_len=64, seed=3).tokens, rand.tokens)  # seeded


def test_runs_cover_every_kind_and_bos_choice_plus_given_tokens(zoo_rope):
    given = pp.data.random_tokens(zoo_rope, n=2, seq_len=12, seed=5)
    result = pp.attention_sinks(zoo_rope, given, n=2, seq_len=16, layers=[0, -1])
    runs = result.summary[result.summary["k"] == 0][["input", "bos"]].values.tolist()
    assert runs == [["natural", True], ["natural", False], ["random", True], ["random", False],
                    ["repeated", True], ["repeated", False], ["given", True]]  # fmt: skip
    assert sorted(result.table["layer"].unique()) == [0, 3]
    assert result.info.params["inputs"] == [*INPUT_KINDS, "given"]
    only_without = pp.attention_sinks(zoo_rope, inputs=("repeated",), n=2, seq_len=16, bos=False)
    assert only_without.summary["bos"].tolist() == [False] * 4 and only_without.info.prepend_bos is False


# -- the zoo's random-init twins, blocks vs whole maps, massive activations ------------------------------------


@pytest.mark.parametrize("scheme", ["rope", "none"])
def test_random_init_zoo_models_have_no_sinks(scheme):
    """Gu et al.: sinks emerge in training; at initialisation attention is near uniform (α_0 ≈ H_64 / 64 = 0.07)."""
    twin = pp.load_model(f"zoo:{scheme}", random_init=True, device="cpu")
    result = pp.attention_sinks(twin, n=4)
    rates = result.summary[result.summary["k"] == 0]
    assert len(rates) == 6 and (rates["sink_rate"] == 0.0).all(), rates
    assert result.table["alpha"].max() < 0.3


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gemma3"])
def test_blocks_of_queries_give_the_whole_map_table(fixture, request):
    """Padded given texts and the built-in kinds; Gemma 3's sliding window (8) is shorter than the sequences."""
    model = request.getfixturevalue(fixture)
    texts = from_texts(model, ["t1 t2 t3 t4 t5 t6 t7 t8 t9 t10 t11 t12", "t5 t6 t7", "t9 t8 t7 t6 t5"], "left")
    settings = dict(inputs=("random", "repeated"), n=3, seq_len=T, first_k=3, seed=2)
    blocks = pp.attention_sinks(model, texts, query_block=5, **settings)
    whole = pp.attention_sinks(model, texts, query_block=None, **settings)
    assert blocks.info.params["query_block"] == 5 and whole.info.params["query_block"] is None
    for name, table in whole.tables().items():
        pd.testing.assert_frame_equal(blocks.tables()[name], table, check_exact=False, rtol=1e-5, atol=1e-7)
    assert whole.table["alpha"].notna().all()


def test_massive_activation_ratio_is_large_for_a_huge_first_token_and_one_for_equal_norms(tiny_llama):
    with torch.no_grad():
        tiny_llama.hf.model.embed_tokens.weight[0] *= 1000.0  # the BOS row
    big = pp.attention_sinks(tiny_llama, inputs=("random",), n=3, seq_len=T).massive
    assert (big.loc[big["bos"], "ratio_mean"] > 100).all(), big
    assert (big.loc[~big["bos"], "ratio_mean"] < 5).all(), big
    equal = pp.attention_sinks(controlled(None, unit_norm=True), inputs=("random", "repeated"), n=3, seq_len=T)
    massive = equal.massive
    assert len(massive) == 2 * 2 * 3 and (massive["n_sequences"] == 3).all()
    np.testing.assert_allclose(massive["ratio_mean"], 1.0, atol=1e-6)
    np.testing.assert_allclose(massive["ratio_median"], 1.0, atol=1e-6)


# -- settings, errors, the result contract -------------------------------------------------------------------


def _tiny_zoo_net(pe: str = "rope"):
    return ZooTransformer(ZooConfig(pe=pe, d_model=32, n_layers=1, n_heads=2, d_head=16, d_mlp=64, n_ctx=64))


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"epsilon": 0.0}, r"epsilon must lie in \(0, 1\).*got 0.0"),
        ({"epsilon": 1.0}, r"epsilon must lie in \(0, 1\).*got 1.0"),
        ({"epsilon": -0.3}, r"got -0.3"),
        ({"epsilon": True}, r"got True"),
        ({"first_k": 0}, r"first_k must be a positive int, got 0"),
        ({"first_k": 16}, r"first_k=16 must be below seq_len=16"),
        ({"inputs": ("natural", "noise")}, r"unknown input kind\(s\) \['noise'\]; known kinds: natural, random, rep"),
        ({"inputs": "natural"}, r"inputs is a sequence of input kinds, got the string 'natural'"),
        ({"inputs": ()}, r"no input to measure"),
        ({"bos": "maybe"}, r"bos must be True, False or 'both', got 'maybe'"),
        ({"n": 0}, r"n must be a positive int, got 0"),
        ({"batch_size": 0}, r"batch_size must be a positive int, got 0"),
        ({"seq_len": 100}, r"seq_len 100 exceeds tiny-zoo's context of 64 tokens"),
        ({"layers": [5]}, r"layer 5 out of range"),
        ({"query_block": 0}, r"query_block must be a positive int, 'auto' or None, got 0"),
    ],
)
def test_bad_settings_are_refused_naming_the_value(settings, message):
    model = ZooModel(_tiny_zoo_net("learned"), name="tiny-zoo")  # a learned table: no positions past 64
    with pytest.raises(ValueError, match=message):
        pp.attention_sinks(model, **{"inputs": ("random",), "n": 2, "seq_len": 16, **settings})


def test_models_whose_attention_weights_cannot_be_read_are_refused():
    for model in (ZooWithoutPattern(_tiny_zoo_net(), name="no-pattern"), UnhookedZoo(_tiny_zoo_net(), name="unhooked")):
        with pytest.raises(ValueError, match=rf"{model.info.name} does not expose attention weights"):
            pp.attention_sinks(model, inputs=("random",), n=2, seq_len=16)


def test_result_contract_info_figures_and_save(zoo_rope, tmp_path):
    result = pp.attention_sinks(zoo_rope, n=2, seq_len=16, first_k=2, seed=4)
    assert isinstance(result, AttentionSinks)
    info = result.info
    assert info.analysis == "attention_sinks" and info.model == "zoo:rope" and info.site == "pattern"
    assert info.layers == (0, 1, 2, 3) and info.seed == 4 and info.prepend_bos is None and info.causal
    assert info.n_sequences == 12 and info.n_tokens == 12 * 16 and info.seq_len == 16
    assert info.params["epsilon"] == 0.3 and info.params["first_k"] == 2 and info.params["bos"] == "both"
    assert info.params["filler_token"] == "Ċ"  # the newline of the zoo's byte-level BPE
    assert list(result.table.columns) == ["input", "bos", "layer", "head", "k", "paper_k", "alpha", "n_queries",
                                          "is_sink"]  # fmt: skip
    assert (result.table["paper_k"] == result.table["k"] + 1).all()
    assert len(result.table) == 6 * 4 * 4 * 2
    assert result.figure_kinds() == ["rate", "massive", "moved"]
    for kind in (None, "rate", "massive", "moved"):
        assert isinstance(result.figure(kind), go.Figure)
    assert len(result.figure().data) == 6  # one line per input kind and BOS choice
    with pytest.raises(ValueError, match="kinds: rate, massive, moved"):
        result.figure("heatmap")
    folder = result.save(tmp_path / "saved")
    names = {p.name for p in folder.iterdir()}
    for table in ("table", "summary", "by_layer", "massive", "moved"):
        assert {f"{table}.csv", f"{table}.parquet"} <= names
    assert {"rate.html", "massive.html", "moved.html", INFO_FILE} <= names
    assert json.loads((folder / INFO_FILE).read_text())["params"]["inputs"] == list(INPUT_KINDS)


def test_figures_survive_nan_and_empty_tables():
    from posprobe.plots.sinks import massive_activation_ratio, moved_sink_shares, sink_rate_by_layer

    by_layer = pd.DataFrame({"input": ["random"] * 2, "bos": [True] * 2, "layer": [0, 1], "k": [0, 0],
                             "sink_rate": [np.nan, 50.0], "n_sink_heads": [0, 1], "n_heads": [0, 2]})  # fmt: skip
    assert len(sink_rate_by_layer(by_layer).data) == 1
    assert sink_rate_by_layer(by_layer, k=3).layout.annotations  # nothing at k = 3: said, not an error
    moved = pd.DataFrame({"input": ["random"] * 2, "bos": [False] * 2, "layer": [0, 1], "n_sink_heads": [0, 0],
                          "share_follows_token": [np.nan] * 2, "share_stays_at_start": [np.nan] * 2})  # fmt: skip
    assert moved_sink_shares(moved).layout.annotations
    massive = pd.DataFrame(columns=["input", "bos", "layer", "ratio_mean", "first_norm", "median_norm"])
    assert massive_activation_ratio(massive).layout.annotations
    with pytest.raises(ValueError, match="needs columns"):
        sink_rate_by_layer(by_layer.drop(columns="sink_rate"))


def test_a_model_name_is_a_source():
    result = pp.attention_sinks("zoo:none", inputs=("repeated",), n=2, seq_len=16, bos=True)
    assert result.info.model == "zoo:none" and len(result.table) == 4 * 4 * 4


# -- the command line and the report --------------------------------------------------------------------------


def test_cli_sinks_writes_tables_figures_and_a_headline(tmp_path, capsys):
    from posprobe.cli import SETTINGS_FILE, main
    from posprobe.progress import set_quiet

    out = tmp_path / "sinks"
    try:
        code = main(["sinks", "--model", "zoo:rope", "--n", "2", "--seq-len", "16", "--bos", "with", "--out", str(out),
                     "--inputs", "random", "repeated", "-q"])  # fmt: skip
    finally:
        set_quiet(False)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    names = {p.name for p in out.iterdir()}
    assert {"table.csv", "summary.csv", "by_layer.csv", "massive.csv", "moved.csv", "rate.html", "moved.html",
            "massive.html", INFO_FILE, SETTINGS_FILE, "summary.json"} <= names  # fmt: skip
    headline = json.loads((out / "summary.json").read_text())["headline"]
    assert headline.startswith("Sink^0.3_0") and "random-init twin at most 0%" in headline
    assert "random" in headline and "natural" not in headline
    summary = pd.read_csv(out / "summary.csv")
    assert summary["bos"].all() and set(summary["input"]) == {"random", "repeated"}


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        (["--epsilon", "1"], "argument --epsilon: expected a number strictly between 0 and 1, got '1'"),
        (["--bos", "sometimes"], "argument --bos: invalid choice"),
        (["--first-k", "16"], "--first-k=16 must be below --seq-len=16"),
        (["--seq-len", "5000", "--model", "zoo:learned"], "--seq-len 5000 exceeds zoo:learned's context of 256 tokens"),
    ],
)
def test_cli_sinks_refuses_bad_flags_in_one_line(flags, said, tmp_path, capsys):
    from posprobe.cli import main

    argv = ["sinks", "--model", "zoo:rope", "--n", "2", "--seq-len", "16", *flags, "--out", str(tmp_path / "o")]
    try:
        code = main(argv)
    except SystemExit as exit_info:  # argparse refuses a bad value before main's handler
        code = exit_info.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and said in err[0], err
    assert not (tmp_path / "o").exists()


def test_report_section_on_a_tiny_model():
    from posprobe.reporting import ReportSettings, _sinks, sinks_headline

    model = ZooModel(_tiny_zoo_net(), name="tiny-zoo")
    twin = lambda: model.random_init_copy(1)  # noqa: E731
    section = _sinks(model, ReportSettings(n=3, seq_len=16, device="cpu"), twin)
    assert section.key == "sinks" and len(section.figures) == 3
    assert section.summary.startswith("Sink^0.3_0") and "random-init twin at most" in section.summary
    result, kept = section.results["sinks"]
    assert result.info.params["n"] == 3 and result.info.seq_len == 16
    assert set(kept) == {"summary", "by_layer", "massive", "moved"}
    assert {f"sinks.{t}" for t in kept} <= set(section.all_tables())
    alone = sinks_headline(result)
    assert "twin" not in alone and alone.split(";")[:3] == section.summary.split(";")[:3]
