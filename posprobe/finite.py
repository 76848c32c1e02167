"""The one NaN/inf check every analysis goes through: activations in, statistics out.

Activations are checked where they live (a reduction on the device, flags gathered over a batch
and read with one synchronisation); a non-finite value raises ``NonFiniteError`` naming the site,
the layer, the first sequence and how many values. Statistics that decide something (a head role,
a neuron category, a headline) go through ``undetermined``: a NaN input gives no verdict but a note.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from posprobe.labels import UNDETERMINED

#: the site whose masked entries are -inf by design (attention probabilities are never infinite)
MASKED_SCORES = "attn_scores"


class NonFiniteError(ValueError):
    """An activation held NaN or inf; raised with its site, layer and how many values, before any result."""


def nonfinite_flag(site: str, x: Tensor) -> Tensor:
    """A 0-d bool tensor on ``x``'s device, set when ``x`` may hold NaN or inf; no synchronisation.

    One read of ``x``: its sum (in float32, float64 for float64 input) is NaN or inf exactly when
    some value is, or when the sum itself overflows, so a set flag is confirmed with
    ``count_nonfinite`` before anything is said. Attention scores may hold -inf (masked keys), so
    for them the flag is exact: NaN or +inf (a full pass that writes a mask: the sum is the cheap test).
    """
    if site == MASKED_SCORES:
        return ~(x < float("inf")).all()
    return ~torch.isfinite(x.sum(dtype=torch.float64 if x.dtype == torch.float64 else torch.float32))


def count_nonfinite(site: str, x: Tensor, mask: Tensor | None = None) -> int:
    """How many values of ``x`` are NaN or inf (attention scores: NaN or +inf); with ``mask`` at real tokens only."""
    return int(_bad(site, x, mask).sum())


def _bad(site: str, x: Tensor, mask: Tensor | None = None) -> Tensor:
    """Where ``x`` is NaN/inf; with ``mask`` [b s] (per-token activations only) only at real tokens."""
    bad = ~(x < float("inf")) if site == MASKED_SCORES else ~torch.isfinite(x)
    if mask is not None:
        if tuple(x.shape[:2]) != tuple(mask.shape):
            raise ValueError(f"mask {tuple(mask.shape)} does not match activations {tuple(x.shape)} of {site!r}")
        bad &= mask.bool().to(bad.device).reshape(*mask.shape, *([1] * (x.ndim - 2)))
    return bad


def _flag(site: str, x: Tensor, mask: Tensor | None) -> Tensor:
    """``nonfinite_flag``, or with ``mask`` the exact flag at real tokens (a masked sum would see padding's NaN)."""
    return nonfinite_flag(site, x) if mask is None else _bad(site, x, mask).any()


def _rows(bad: Tensor) -> Tensor:
    """Per-row flags [b] of a bad-value mask (a 0-d or 1-d tensor is one row)."""
    return bad.reshape(1) if bad.ndim == 0 else bad.reshape(bad.shape[0], -1).any(1)


def _error(
    site: str, layer: int | None, count: int, row: int | None, where: str, unit: str = "sequence"
) -> NonFiniteError:
    seq = f" (first in {unit} {row})" if row is not None else ""
    layer_text = "" if layer is None else f" layer {layer}"
    return NonFiniteError(
        f"{count} non-finite value{'s' if count != 1 else ''} (NaN/inf) in site {site!r}{layer_text}{seq}"
        f"{' ' + where if where else ''}; no result was computed from them — check the model's dtype "
        "(fp16 overflows) and its weights"
    )


def raise_nonfinite(
    site: str,
    layer: int | None,
    x: Tensor,
    *,
    start: int = 0,
    where: str = "",
    mask: Tensor | None = None,
    unit: str = "sequence",
) -> None:
    """Raise ``NonFiniteError`` if ``x`` holds NaN/inf (call when its flag is set: this confirms it exactly).

    ``start`` is the row of ``x[0]`` in the run; ``unit`` names what a row is ("sequence"; "position"
    for a position table).
    """
    bad = _bad(site, x, mask)
    count = int(bad.sum())
    if count == 0:  # the flag's sum overflowed: every value is finite
        return
    rows = _rows(bad).nonzero()
    row = int(rows[0, 0]) + start if x.ndim and len(rows) else None
    raise _error(site, layer, count, row, where, unit)


def check_finite(
    site: str,
    layer: int | None,
    x: Tensor,
    *,
    start: int = 0,
    where: str = "",
    mask: Tensor | None = None,
    unit: str = "sequence",
) -> None:
    """Raise ``NonFiniteError`` if ``x`` holds NaN/inf (at real tokens when ``mask`` [b s] is given).

    One read of ``x`` on its device and one synchronisation; the exact count only when flagged.
    """
    if bool(_flag(site, x, mask)):
        raise_nonfinite(site, layer, x, start=start, where=where, mask=mask, unit=unit)


class FiniteGuard:
    """Gather the NaN/inf flags of many activations on their device and check them all with one ``check``.

    A flag is one reduction per activation; the activations are referenced until ``check`` (they are
    alive anyway: captured, or in the batch being folded in) so the message can count and locate the
    bad values. A guard lives for one batch.
    """

    def __init__(self, start: int = 0, where: str = ""):
        self.start, self.where = start, where
        self._seen: list[tuple[str, int | None, Tensor, Tensor | None, Tensor]] = []

    def add(self, site: str, layer: int | None, x: Tensor, mask: Tensor | None = None) -> None:
        """Flag NaN/inf in ``x`` (at real tokens when ``mask`` [b s] is given) without synchronising."""
        x = x.detach()
        self._seen.append((site, layer, x, mask, _flag(site, x, mask)))

    def check(self) -> None:
        """Raise ``NonFiniteError`` for the first activation added that held NaN/inf; then start afresh."""
        seen, self._seen = self._seen, []
        if not seen:
            return
        flags = torch.stack([flag.to(seen[0][4].device) for *_, flag in seen]).cpu()
        for hit in flags.nonzero()[:, 0].tolist():  # in the order added; a flag is confirmed before it is said
            site, layer, x, mask, _ = seen[hit]
            raise_nonfinite(site, layer, x, start=self.start, where=self.where, mask=mask)


def undetermined(stats: Mapping[str, Any]) -> str:
    """A note naming the NaN statistics in ``stats`` ('' when all are numbers): no verdict is drawn from NaN."""
    bad = [name for name, value in stats.items() if _is_nan(value)]
    return f"{', '.join(bad)} {'is' if len(bad) == 1 else 'are'} NaN: no verdict" if bad else ""


def _is_nan(value: Any) -> bool:
    try:
        return value is None or math.isnan(float(value))
    except (TypeError, ValueError):
        return False


__all__ = [
    "UNDETERMINED",
    "FiniteGuard",
    "NonFiniteError",
    "check_finite",
    "count_nonfinite",
    "nonfinite_flag",
    "raise_nonfinite",
    "undetermined",
]
