"""Progress bars for long jobs, with one switch to silence them all (``posprobe … -q``)."""

from __future__ import annotations

from typing import Any

from tqdm.auto import tqdm as _tqdm

_quiet = False


def set_quiet(quiet: bool = True) -> None:
    """Silence (or restore) every posprobe progress bar, whatever ``progress=`` a call passes."""
    global _quiet
    _quiet = bool(quiet)


def tqdm(*args: Any, disable: bool = False, **kwargs: Any) -> Any:
    """``tqdm.auto.tqdm``, off when ``disable`` or when ``set_quiet`` was called."""
    return _tqdm(*args, disable=disable or _quiet, **kwargs)


__all__ = ["set_quiet", "tqdm"]
