"""``load_model``: one entry point for packaged, zoo, Hugging Face and wrapped models."""

from __future__ import annotations

import logging
from typing import Any

import torch

from posprobe.models.base import ModelInfo, PositionModel, RunOutput, positions_from_mask
from posprobe.models.packaged import PACKAGED, load_packaged

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"

__all__ = [
    "DEFAULT_MODEL",
    "ModelInfo",
    "PositionModel",
    "RunOutput",
    "known_models",
    "load_model",
    "positions_from_mask",
]


def known_models() -> dict[str, str]:
    """Names ``load_model`` accepts without a network, with a one-line description."""
    names = {name: spec.description for name, spec in PACKAGED.items()}
    try:
        from posprobe.models.zoo import ZOO_VARIANTS, user_variants, zoo2_variants

        names.update({f"zoo:{v}": f"posprobe zoo decoder: {what}" for v, what in ZOO_VARIANTS.items()})
        names.update({f"zoo:{v}": f"your zoo variant in {path}" for v, path in user_variants().items()})
        names.update({f"zoo2:{v}": f"posprobe zoo v2 decoder: {ZOO_VARIANTS.get(v, v)}" for v in zoo2_variants()})
    except ImportError:
        pass
    return names


def load_model(
    model: Any = DEFAULT_MODEL,
    *,
    device: str | torch.device = "auto",
    dtype: torch.dtype | str = torch.float32,
    trust_remote_code: bool = False,
    random_init: bool = False,
    seed: int = 0,
    **hf_kwargs: Any,
) -> PositionModel:
    """Load or wrap a model so every posprobe analysis can hook it.

    ``model`` is a packaged name (``smollm2-135m``, ``gemma-3-270m``, ``minilm-l6``), a zoo
    variant (``zoo:rope``; ``zoo2:rope`` for the zoo v2 once trained), a Hugging Face hub id or
    local path (needs a network for hub ids), or an object: a PositionModel, a Hugging Face
    ``PreTrainedModel``, a TransformerLens ``TransformerBridge`` or an nnsight model (their
    underlying HF model is hooked directly). ``trust_remote_code`` is passed to transformers
    only when you set it. Other keyword arguments go to ``from_pretrained`` for hub ids and
    paths: ``device_map="auto"`` splits a model too large for one GPU across the visible GPUs
    (then CPU and disk) through accelerate; ``device`` is then ignored and inputs go to the
    embedding's device. ``device`` defaults to ``"auto"`` (CUDA when present), as everywhere
    in posprobe.
    """
    from posprobe.devices import resolve_device, resolve_dtype

    device = resolve_device(device)
    dtype = resolve_dtype(dtype)
    wrapped = _wrap(model, dtype=dtype, trust_remote_code=trust_remote_code, seed=seed, **hf_kwargs)
    if random_init:
        wrapped = wrapped.random_init_copy(seed)
    if wrapped.device_map is not None:  # placed by accelerate's device_map: moving it would undo that
        return wrapped
    return wrapped.to(device=device, dtype=dtype)


def _wrap(model: Any, *, dtype: torch.dtype, trust_remote_code: bool, seed: int, **hf_kwargs: Any) -> PositionModel:
    if isinstance(model, PositionModel):
        return model
    if isinstance(model, str):
        if model in PACKAGED:
            from posprobe.models.hf import HFModel

            hf, tok = load_packaged(model, dtype=dtype)
            return HFModel(hf, tok, name=model, source=f"package:{PACKAGED[model].package}")
        if model.startswith("zoo:"):
            from posprobe.models.zoo import load_zoo

            return load_zoo(model.removeprefix("zoo:"))
        if model.startswith("zoo2:"):
            from posprobe.models.zoo import load_zoo2

            return load_zoo2(model.removeprefix("zoo2:"))
        return _from_hub(model, dtype=dtype, trust_remote_code=trust_remote_code, **hf_kwargs)
    from transformers import PreTrainedModel

    tokenizer = hf_kwargs.pop("tokenizer", None)
    if isinstance(model, PreTrainedModel):
        return native_or_bridge(model, tokenizer or _tokenizer_for(model), source="object")
    if type(model).__name__ == "TransformerBridge":
        from posprobe.models.bridge import unbridged

        tok = tokenizer or model.tokenizer
        return native_or_bridge(unbridged(model), tok, name=model.cfg.model_name, source="transformer-lens",
                                bridge=model)  # fmt: skip
    if type(model).__module__.startswith("nnsight"):
        inner = model._module
        tok = tokenizer or getattr(model, "tokenizer", None) or _tokenizer_for(inner)
        return native_or_bridge(inner, tok, name=getattr(inner.config, "_name_or_path", None), source="nnsight")
    raise ValueError(
        f"cannot load {model!r}; pass one of {', '.join(known_models())}, a Hugging Face id or path, "
        "a PositionModel, a transformers model, a TransformerBridge or an nnsight model"
    )


def native_or_bridge(hf: Any, tokenizer: Any, name: str | None = None, source: str = "object",
                     bridge: Any = None) -> PositionModel:  # fmt: skip
    """posprobe's own hooks when it can map the model; else TransformerLens' bridge, with a one-line warning."""
    import warnings

    from posprobe.models.architecture import UnsupportedModelError
    from posprobe.models.bridge import BridgeFallbackWarning, BridgeModel, boot_bridge
    from posprobe.models.hf import HFModel

    try:
        return HFModel(hf, tokenizer, name=name, source=source)
    except UnsupportedModelError as err:
        bridge = bridge or boot_bridge(hf, tokenizer, name, why=err.why)
        warnings.warn(
            f"{err}; hooking it through TransformerLens' bridge instead (eager attention, slower)",
            BridgeFallbackWarning,
            stacklevel=3,
        )
        return BridgeModel(bridge, tokenizer, name, source="transformer-lens")


def _tokenizer_for(hf: Any) -> Any:
    from transformers import AutoTokenizer

    name = getattr(hf.config, "_name_or_path", "")
    if not name:
        raise ValueError("a bare transformers model needs its tokenizer: load_model(model, tokenizer=tok)")
    return AutoTokenizer.from_pretrained(name)


def _from_hub(name: str, *, dtype: torch.dtype, trust_remote_code: bool, **hf_kwargs: Any) -> PositionModel:
    """A Hugging Face id or local path (the real hub code path; it needs a network for ids)."""
    from pathlib import Path

    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    local = Path(name).exists()
    if not local and "/" not in name:
        raise ValueError(
            f"unknown model {name!r}; known models: {', '.join(known_models())}, or a Hugging Face id / path"
        )
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise ValueError(
            f"cannot load {name!r} from the Hugging Face hub or disk ({err}); offline, use one of: "
            f"{', '.join(known_models())}"
        ) from err
    from posprobe.models.architecture import ENCODERS

    causal = any(a.endswith("ForCausalLM") for a in (config.architectures or [])) or config.model_type not in ENCODERS
    auto = AutoModelForCausalLM if causal else AutoModel
    hf = auto.from_pretrained(name, dtype=dtype, trust_remote_code=trust_remote_code, **hf_kwargs)
    tok = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    return native_or_bridge(hf, tok, name=name, source="path" if local else "hub")
