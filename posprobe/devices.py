"""Device, dtype and batch-size choice for extraction: ``device="auto"`` means CUDA when present, else CPU.

``batch_size="auto"`` sizes a batch from the memory it will need: the forward's working set and
the captured sites on the device (a budget out of free GPU memory, or available host memory on
CPU), and the shard that goes to host memory and disk (at most ``MAX_SHARD_BYTES``), so peak
memory does not grow with the number of tokens. The arithmetic is pure (``batch_size_for_memory``)
and tested on CPU.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from posprobe.sites import SiteKey

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}

#: The largest batch ``batch_size="auto"`` picks on CPU: larger batches gain no speed there.
CPU_BATCH_CAP = 16
#: The largest batch ``batch_size="auto"`` picks on a GPU.
GPU_BATCH_CAP = 256
#: ``batch_size="auto"`` keeps one batch's stored activations under this many bytes.
MAX_SHARD_BYTES = 1 << 30


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` (or None) → CUDA if available else CPU; anything else is validated.

    Raises ValueError for unknown device strings, for CUDA when torch sees no GPU, and for a
    GPU index beyond the visible ones.
    """
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"unknown device {device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device} requested but CUDA is not available here; use 'cpu' or 'auto'")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {device} requested but only {torch.cuda.device_count()} GPU(s) are visible")
    return device


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A floating torch dtype from a dtype or a name: float32/fp32, float16/fp16/half, bfloat16/bf16."""
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"dtype {dtype} is not a floating-point dtype; use one of: {', '.join(DTYPES)}")
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def site_shape(info: Any, site: str, seq_len: int) -> tuple[int, ...]:
    """Shape of one sequence's activation at ``site`` (no batch axis), from a ModelInfo."""
    shapes = {
        "mlp_post": (seq_len, info.d_mlp),
        "q": (seq_len, info.n_heads, info.d_head),
        "rot_q": (seq_len, info.n_heads, info.d_head),
        "z": (seq_len, info.n_heads, info.d_head),
        "k": (seq_len, info.n_kv_heads, info.d_head),
        "rot_k": (seq_len, info.n_kv_heads, info.d_head),
        "pattern": (info.n_heads, seq_len, seq_len),
        "attn_scores": (info.n_heads, seq_len, seq_len),
    }
    return shapes.get(site, (seq_len, info.d_model))


def _numel(shape: tuple[int, ...]) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


def forward_bytes_per_sequence(
    info: Any, seq_len: int, keys: Iterable[SiteKey], itemsize: int, *, logits: bool = False
) -> int:
    """Estimated device memory one sequence needs during a forward that captures ``keys``.

    Counts a layer's working set (about 24 residual-sized and 4 MLP-sized tensors per token),
    two float32 attention maps of one layer for kernels that materialise them, the logits when
    asked, every captured activation held until the batch is copied out, and the explicit
    attention computation (scores, float32 softmax, weights) when a map site is requested.
    """
    keys = list(keys)
    per_seq = seq_len * (24 * info.d_model + 4 * info.d_mlp) * itemsize
    per_seq += 2 * info.n_heads * seq_len * seq_len * 4
    if logits:
        per_seq += 2 * seq_len * info.d_vocab * 4
    per_seq += sum(_numel(site_shape(info, k.site, seq_len)) for k in keys) * itemsize
    if any(k.site in ("pattern", "attn_scores") for k in keys):
        per_seq += 3 * info.n_heads * seq_len * seq_len * 4
    return per_seq


def shard_bytes_per_sequence(info: Any, seq_len: int, keys: Iterable[SiteKey], store_itemsize: int) -> int:
    """Bytes one sequence adds to a stored shard (the host copy and the file)."""
    return sum(_numel(site_shape(info, k.site, seq_len)) for k in keys) * store_itemsize


def batch_size_for_memory(
    info: Any,
    seq_len: int,
    keys: Iterable[SiteKey],
    budget_bytes: float,
    itemsize: int,
    cap: int = GPU_BATCH_CAP,
    *,
    logits: bool = False,
) -> int:
    """The batch size whose estimated forward memory fits ``budget_bytes``, between 1 and ``cap``.

    Pure arithmetic over ``forward_bytes_per_sequence`` (testable on CPU). A batch of one is
    returned even when one sequence does not fit: the forward then says so itself.
    """
    if cap < 1:
        raise ValueError(f"cap must be at least 1, got {cap}")
    per_seq = forward_bytes_per_sequence(info, seq_len, keys, itemsize, logits=logits)
    return int(max(1, min(cap, budget_bytes // per_seq)))


def auto_batch_size(
    model: Any,
    seq_len: int,
    keys: Iterable[SiteKey],
    *,
    budget_fraction: float = 0.5,
    store_dtype: torch.dtype = torch.float32,
    cap: int | None = None,
) -> int:
    """Largest batch that fits ``budget_fraction`` of free memory and keeps a shard under ``MAX_SHARD_BYTES``.

    On CUDA the budget is the free memory of the model's (embedding's) GPU, capped at
    ``GPU_BATCH_CAP`` sequences; on CPU it is the available host memory, capped at
    ``CPU_BATCH_CAP``.
    """
    if not 0 < budget_fraction <= 1:
        raise ValueError(f"budget_fraction must lie in (0, 1], got {budget_fraction}")
    keys = list(keys)
    device = model.device
    free: int | None
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cap = GPU_BATCH_CAP if cap is None else cap
    else:
        free = host_available_bytes()
        cap = CPU_BATCH_CAP if cap is None else cap
    size = cap
    if free is not None:
        size = batch_size_for_memory(model.info, seq_len, keys, free * budget_fraction, model.dtype.itemsize, cap)
    shard = shard_bytes_per_sequence(model.info, seq_len, keys, store_dtype.itemsize)
    return int(max(1, min(size, MAX_SHARD_BYTES // max(shard, 1))))


def host_available_bytes() -> int | None:
    """Available host memory (Linux ``MemAvailable``), or None where it cannot be read."""
    meminfo = Path("/proc/meminfo")
    if not meminfo.exists():
        return None
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return None
