"""Finite in, finite out: a NaN anywhere in a model or a store stops every analysis with its site and layer."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import random_ids, tiny_llama_hf

import posprobe as pp
from posprobe.finite import FiniteGuard, NonFiniteError, check_finite, nonfinite_flag, undetermined
from posprobe.models.hf import HFModel
from posprobe.stats.attention import UNDETERMINED, HeadRoleRules


@pytest.fixture
def nan_llama(tokenizer):
    """A tiny Llama with one NaN in layer 1's value bias (b_V): everything after it is NaN."""
    model = HFModel(tiny_llama_hf(attention_bias=True), tokenizer, name="nan-llama")
    with torch.no_grad():
        model.hf.model.layers[1].self_attn.v_proj.bias[3] = float("nan")
    return model


TOKENS = random_ids(4, 12)
# (name, call): every analysis that runs the model itself
ANALYSES = {
    "attention_stats": lambda m: pp.attention_stats(m, TOKENS),
    "attention_variance": lambda m: pp.attention_variance(m, TOKENS),
    "embedding_similarity": lambda m: pp.embedding_similarity(m, TOKENS),
    "rope_frequency_usage": lambda m: pp.rope_frequency_usage(m, TOKENS),
    "rope_ablation": lambda m: pp.rope_ablation(m, TOKENS, ps=(0.5,), which=("lowest",)),
    "patch_positions": lambda m: pp.patch_positions(m, TOKENS, shift=2),
    "shift_invariance": lambda m: pp.shift_invariance(m, TOKENS, shifts=(1,)),
    "length_generalization": lambda m: pp.length_generalization(m, TOKENS),
    "probe_model": lambda m: pp.probe_model(m, TOKENS, layers=[0, 2], n_splits=2),
}


@pytest.mark.parametrize("name", list(ANALYSES))
def test_every_analysis_that_runs_a_model_refuses_nan(nan_llama, name):
    with pytest.raises(
        NonFiniteError, match=r"non-finite values? \(NaN/inf\) in site '\w+'( layer [12])?.*of nan-llama"
    ):
        ANALYSES[name](nan_llama)


def test_the_same_analyses_run_on_the_same_model_without_the_nan(tiny_llama):
    """The NaN and nothing else is what stops them: the clean twin runs every one."""
    for name, call in ANALYSES.items():
        assert call(tiny_llama) is not None, name


def test_the_message_names_site_layer_count_and_sequence(nan_llama):
    with pytest.raises(NonFiniteError) as err:
        pp.attention_stats(nan_llama, TOKENS, layers=[2])
    # the value bias is NaN in one of its 16 dims for every token: layer 2's pattern is NaN everywhere
    assert str(err.value).startswith(
        f"{4 * 4 * 12 * 12} non-finite values (NaN/inf) in site 'pattern' layer 2 (first in sequence 0) of nan-llama"
    )
    with pytest.raises(NonFiniteError, match=r"^96 non-finite values \(NaN/inf\) in site 'z' layer 1 "):
        nan_llama.capture(TOKENS, [pp.SiteKey("z", 1)])  # dim 3 of kv head 0, read by query heads 0 and 1
    z = nan_llama.capture(TOKENS, [pp.SiteKey("z", 1)], check_finite=False)[pp.SiteKey("z", 1)]
    assert int(z.isnan().sum()) == 4 * 12 * 2  # the count is of values, not rows


def test_a_store_with_nan_is_refused_by_every_reader(tiny_llama, tmp_path):
    tokens = random_ids(4, 12)
    store = pp.extract(
        tiny_llama, tokens, ["resid_post", "mlp_post", "pattern"], out=tmp_path / "s", batch_size=2, progress=False
    )
    acts = {k.name: store.get(k.site, k.layer) for k in store.keys}
    acts["resid_post.1"][3, 5, 7] = float("inf")
    acts["mlp_post.1"][3, 5, 7] = float("nan")
    acts["pattern.1"][3, 0, 5, 2] = float("nan")
    bad = pp.store.write_store(tmp_path / "bad", acts, store.tokens, attention_mask=store.attention_mask, batch_size=2)
    where = r"layer 1 \(first in sequence 3\) read from shard"
    with pytest.raises(NonFiniteError, match=rf"1 non-finite value \(NaN/inf\) in site 'resid_post' {where}"):
        pp.probe_position(bad, layers=[1], device="cpu")
    with pytest.raises(NonFiniteError, match=f"site 'mlp_post' {where}"):
        pp.positional_neurons(bad, device="cpu")
    with pytest.raises(NonFiniteError, match=f"site 'pattern' {where}"):
        pp.attention_stats(bad)
    with pytest.raises(NonFiniteError, match=f"site 'resid_post' {where}"):
        pp.embedding_similarity(bad, layers=[1])
    assert pp.attention_stats(bad, layers=[0]).heads.notna().all().all()  # the clean layer still reads


def test_check_finite_counts_only_real_tokens_under_a_mask():
    x = torch.zeros(2, 3, 4)
    x[1, 2] = float("nan")
    check_finite("resid_post", 0, x, mask=torch.tensor([[1, 1, 1], [1, 1, 0]]))
    with pytest.raises(NonFiniteError, match=r"^4 non-finite values .* layer 0 \(first in sequence 6\)"):
        check_finite("resid_post", 0, x, start=5)
    scores = torch.full((1, 1, 2, 2), -math.inf)
    check_finite("attn_scores", 0, scores)  # -inf marks masked keys in attention scores
    with pytest.raises(NonFiniteError):
        check_finite("resid_post", 0, scores)


def test_the_guard_reports_the_first_bad_activation_after_one_check():
    guard = FiniteGuard(start=10, where="of m")
    guard.add("q", 0, torch.zeros(2, 3))
    guard.add("k", 2, torch.tensor([[0.0, 1.0], [math.inf, 0.0]]))
    guard.add("v", 3, torch.full((2, 2), math.nan))
    with pytest.raises(
        NonFiniteError, match=r"^1 non-finite value \(NaN/inf\) in site 'k' layer 2 \(first in sequence 11\) of m"
    ):
        guard.check()
    guard.check()  # a check starts afresh


def test_no_role_is_given_from_a_nan_statistic():
    rules = HeadRoleRules()
    assert rules.classify(0.9, 0.0, 0.9) == "previous-token"
    assert rules.classify(math.nan, 0.9, 0.9) == UNDETERMINED
    assert rules.classify(0.1, math.nan, 0.9) == UNDETERMINED
    assert undetermined({"a": 1.0, "b": math.nan, "c": None}) == "b, c are NaN: no verdict"
    assert undetermined({"a": 1.0}) == ""


def test_no_rope_role_from_nan_shares_or_missing_pattern_scores():
    from posprobe.stats.rope_roles import _role

    limits = {"high_threshold": 0.25, "low_threshold": 0.5, "pattern_threshold": 0.5}
    assert _role(0.4, 0.1, 0.9, 0.1, **limits)[0] == "positional"
    assert _role(math.nan, 0.1, 0.9, 0.1, **limits) == (UNDETERMINED, "high_freq_share is NaN: no verdict")
    assert _role(0.1, 0.7, math.nan, math.nan, **limits)[0] == "semantic"  # needs no pattern score
    role, rule = _role(0.4, 0.1, math.nan, math.nan, **limits)
    assert role == UNDETERMINED and "prev_token_score and diag_score are NaN" in rule


def test_no_neuron_category_from_a_nan_score():
    from posprobe.stats.neurons import _score_layer, neuron_position_stats

    acts = torch.randn(1, 6, 10, 5)
    stats = neuron_position_stats(acts, device="cpu", exclude_pos0=False)
    stats.act_sum[0, 3, 2] = math.nan  # a score that cannot be computed (sums corrupted after the check)
    stats.n_active[0, :, 2] = math.nan
    table = _score_layer(stats, 0, mi_threshold=0.0, always_on_rate=0.99, oscillation_power=0.5)
    row = table[table["neuron"] == 2].iloc[0]
    assert row["category"] == UNDETERMINED and row["note"] == "mi is NaN: no verdict"
    assert (table.loc[table["neuron"] != 2, "note"] == "").all()


def test_a_sum_that_overflows_is_not_called_non_finite():
    big = torch.full((4, 10), 3e38)  # finite values whose float32 sum is inf: the cheap flag fires, the count clears it
    assert bool(nonfinite_flag("resid_post", big))
    check_finite("resid_post", 0, big)
    guard = FiniteGuard()
    guard.add("resid_post", 0, big)
    guard.check()
    big[2, 3] = math.nan
    with pytest.raises(NonFiniteError, match=r"^1 non-finite value .* \(first in sequence 2\)"):
        check_finite("resid_post", 0, big)
