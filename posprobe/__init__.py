"""posprobe: where does a transformer keep position, and how does it use it?"""

from posprobe import data
from posprobe.models import DEFAULT_MODEL, ModelInfo, PositionModel, known_models, load_model
from posprobe.sites import SITES, SiteKey
from posprobe.store import ActivationStore, open_store

__version__ = "0.1.0"

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
]
