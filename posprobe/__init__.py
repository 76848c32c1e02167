"""posprobe: where does a transformer keep position, and how does it use it?

The public names below load their modules on first use, so ``import posprobe`` stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

from posprobe import data
from posprobe.models import DEFAULT_MODEL, ModelInfo, PositionModel, known_models, load_model
from posprobe.sites import SITES, SiteKey
from posprobe.store import ActivationStore, open_store

__version__ = "0.1.0"

_LAZY = {
    "extract": "posprobe.extraction",
    "extract_remote": "posprobe.extraction",
    "probe_position": "posprobe.stats.probes",
    "probe_model": "posprobe.stats.probes",
    "rope_frequency_usage": "posprobe.stats.rope",
    "rope_ablation": "posprobe.stats.rope_ablation",
    "positional_neurons": "posprobe.stats.neurons",
    "attention_stats": "posprobe.stats.attention",
    "attention_variance": "posprobe.stats.variance",
    "attention_sinks": "posprobe.stats.sinks",
    "embedding_similarity": "posprobe.stats.similarity",
    "position_embedding_geometry": "posprobe.stats.position_table",
    "patch_positions": "posprobe.stats.patching",
    "subspace_patch": "posprobe.stats.patching",
    "shift_invariance": "posprobe.stats.patching",
    "length_generalization": "posprobe.stats.length",
    "train": "posprobe.training",
}


def report(model: Any = DEFAULT_MODEL, out: str = "report", **kwargs: Any):
    """Write the one-page HTML atlas for ``model`` to ``out/index.html`` (see ``posprobe.reporting``)."""
    from posprobe.reporting import build_report

    return build_report(model, out, **kwargs)


def __dir__() -> list[str]:
    """The module's names and the lazily loaded ones, so ``dir(pp)`` and tab completion list every analysis."""
    return sorted(set(globals()) | set(_LAZY))


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # loaded once; no module of posprobe shares a public function's name
        return value
    raise AttributeError(f"module 'posprobe' has no attribute {name!r}")


__all__ = [
    "DEFAULT_MODEL",
    "SITES",
    "ActivationStore",
    "ModelInfo",
    "PositionModel",
    "SiteKey",
    "data",
    "known_models",
    "load_model",
    "open_store",
    "report",
    *_LAZY,
]
