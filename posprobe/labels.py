"""The labels analyses give and figures colour by, in a leaf module: ``posprobe.plots`` never imports ``stats``.

Dependencies run one way: ``stats`` computes tables, ``plots`` draws them, and both read these names
from here (``tests/test_layering.py`` checks it).
"""

from __future__ import annotations

#: Attention head roles, in the order ``HeadRoleRules.classify`` tries them (the last is the fallback).
ROLES = ("previous-token", "sink", "local/positional", "broad/semantic")
#: Head roles from RoPE frequency use (Barbero et al. 2024); "mixed" is the fallback.
ROPE_ROLES = ("positional", "semantic", "mixed")
#: Categories of positional neurons (Voita et al. 2023), in the order they are tried.
CATEGORIES = ("oscillatory", "both-extremes", "one-extreme", "other-strong", "other-weak")
#: The category of neurons that are not positional.
NOT_POSITIONAL = "none"
#: The role / category / verdict given where a statistic it depends on is NaN.
UNDETERMINED = "undetermined"

__all__ = ["CATEGORIES", "NOT_POSITIONAL", "ROLES", "ROPE_ROLES", "UNDETERMINED"]
