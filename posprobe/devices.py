"""Device and dtype choice: ``device="auto"`` means CUDA when present, else CPU."""

from __future__ import annotations

import torch

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` → CUDA if available else CPU; anything else is validated."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} requested but CUDA is not available; use 'cpu' or 'auto'")
    return device


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A torch dtype from a dtype or one of the names float32/fp32, float16/fp16, bfloat16/bf16."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def auto_batch_size(model, seq_len: int, keys, budget_fraction: float = 0.5, cap: int = 256) -> int:
    """Largest batch whose activations fit ``budget_fraction`` of free GPU memory (16 on CPU).

    The estimate counts the forward's working set (about 24 residual-sized tensors per
    token and layer group, plus attention maps where requested) and the captured sites.
    """
    if model.device.type != "cuda":
        return 16
    free, _ = torch.cuda.mem_get_info(model.device)
    return batch_size_for_memory(model.info, seq_len, keys, free * budget_fraction, model.dtype.itemsize, cap)


def batch_size_for_memory(info, seq_len: int, keys, budget_bytes: float, itemsize: int, cap: int = 256) -> int:
    """Batch size whose estimated memory fits ``budget_bytes`` (pure arithmetic, testable on CPU)."""
    per_seq = seq_len * (24 * info.d_model + 4 * info.d_mlp + 2 * info.d_vocab) * itemsize
    per_seq += seq_len * seq_len * info.n_heads * 4 * 2
    for key in keys:
        if key.site in ("pattern", "attn_scores"):
            per_seq += info.n_heads * seq_len * seq_len * 4
        elif key.site == "mlp_post":
            per_seq += seq_len * info.d_mlp * 4
        else:
            per_seq += seq_len * max(info.d_model, info.n_heads * info.d_head) * 4
    return int(max(1, min(cap, budget_bytes // per_seq)))
