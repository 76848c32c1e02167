"""Headlines say what the controls say: each case built, from real probe runs and from tables."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from posprobe.finite import UNDETERMINED
from posprobe.headlines import MARGIN, neurons_headline, probe_headline, roles_headline, shift_headline
from posprobe.stats.attention import ROLES
from posprobe.stats.probes import probe_position

N_SEQ, SEQ, D = 24, 16, 12


def position_code(strength: float, seed: int) -> torch.Tensor:
    """[2 n seq d]: noise, plus ``strength`` × a linear code of position in the first dimension."""
    gen = torch.Generator().manual_seed(seed)
    acts = torch.randn(2, N_SEQ, SEQ, D, generator=gen)
    acts[..., 0] += strength * torch.arange(SEQ, dtype=torch.float32) / SEQ * 4
    return acts


def headline(real: torch.Tensor, twin: torch.Tensor) -> str:
    result = probe_position(real, random_init_store=twin, device="cpu", controls=("shuffled", "random_init"))
    return probe_headline(result.table)


def test_a_clear_win_over_every_control():
    said = headline(position_code(3.0, 0), position_code(0.0, 1))
    assert said.startswith("absolute position is linearly decodable from resid_post, best at layer")
    assert "R² above the random-init twin" in said and "no more than" not in said


def test_r2_below_zero_everywhere_is_not_decodable():
    said = headline(position_code(0.0, 0), position_code(0.0, 1))
    assert said.startswith("absolute position is not linearly decodable from resid_post: R² ≤ 0 at every layer")


def test_a_model_below_its_random_init_twin_says_so():
    said = headline(position_code(1.0, 0), position_code(3.0, 1))
    assert "but no more than from the random-init twin" in said
    assert "the architecture, not training, provides it" in said


def probe_table(r2, twin, shuffled=0.0):
    n = len(r2)
    return pd.DataFrame(
        {"layer": range(n), "target": "absolute", "kind": "ridge", "include_pos0": False, "r2": r2, "mae": 3.0,
         "control_shuffled": shuffled, "control_random_init": twin}
    )  # fmt: skip


def test_probe_headline_rules_on_tables():
    # the Gemma 3 case: best R² 0.557 while the twin lies at 0.45–0.65
    gemma = probe_table([0.40, 0.50, 0.557, 0.52], [0.45, 0.60, 0.65, 0.55])
    assert "no more than from the random-init twin" in probe_headline(gemma)
    # the zoo:rope case: R² −0.028 at best
    assert "not linearly decodable" in probe_headline(probe_table([-0.2, -0.028], [-0.1, -0.5]))
    # a gain exactly at the margin is not a win; just above it is
    assert "no more than" in probe_headline(probe_table([0.5], [0.5 - MARGIN]))
    assert "above the random-init twin" in probe_headline(probe_table([0.5], [0.5 - MARGIN - 0.01]))
    # the best layer is no win but another layer is: that layer is named
    mixed = probe_headline(probe_table([0.9, 0.6], [0.88, 0.1]))
    assert "best at layer 0" in mixed and "the largest gain is at layer 1 (+0.500)" in mixed
    assert "the twin comes within 0.05 or above at 1 of 2 layers" in mixed
    assert "than shuffled labels" in probe_headline(probe_table([0.3], [0.0], shuffled=0.28))
    # a twin below R² 0 is a floor of 0, not of its own R² (SmolLM2's twin reaches −1.9)
    below = probe_headline(probe_table([0.72, 0.6], [-1.89, -0.5]))
    assert "+0.720 R² above the random-init twin (R² -1.890, below 0: it decodes nothing)" in below
    assert "the largest gain" not in below
    assert "random-init control was not run" in probe_headline(probe_table([0.7], [math.nan]))


def test_roles_headline_sets_each_count_beside_the_twin():
    roles = pd.DataFrame({"role": ["sink"] * 4 + ["previous-token"] + ["local/positional"] * 2 + [UNDETERMINED]})
    twin = pd.DataFrame({"role": ["local/positional"] * 3 + ["broad/semantic"] * 5})
    said = roles_headline(roles, twin, ROLES, ROLES[-1])
    assert said.startswith("head roles: 1 previous-token (random-init twin: 0), 4 sink (random-init twin: 0)")
    assert "no more than the random-init twin: 2 local/positional (twin: 3)" in said
    assert "broad/semantic" not in said and said.endswith("; 1 undetermined (a NaN score)")  # none: not listed
    assert "no random-init control" in roles_headline(roles, None, ROLES, ROLES[-1])


def test_neurons_headline_against_the_twin():
    table = pd.DataFrame({"is_positional": [True] * 3 + [False] * 7, "category": ["one-extreme"] * 3 + ["none"] * 7})
    twin = pd.DataFrame({"is_positional": [True] * 5 + [False] * 5, "category": ["other-weak"] * 5 + ["none"] * 5})
    assert "3 of 10 MLP neurons are positional, no more than the random-init twin (5)" in neurons_headline(table, twin)
    said = neurons_headline(twin, table)
    assert said == "5 of 10 MLP neurons are positional against 3 in the random-init twin; categories: 5 other-weak"


@pytest.mark.parametrize(
    ("kl", "verdict"), [([1e-9, 3e-8], "position enters only relatively"), ([1e-9, 0.02], "reads absolute position")]
)
def test_shift_headline_against_float_rounding(kl, verdict):
    table = pd.DataFrame({"shift": [1, 8], "kl": kl, "mean_abs_logit_diff": 0.1, "output": "logits"})
    assert verdict in shift_headline(table)
    table["kl"] = [1e-9, math.nan]
    assert "undetermined" in shift_headline(table)
