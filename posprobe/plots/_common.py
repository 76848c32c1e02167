"""What every plotting function checks before it draws."""

from __future__ import annotations

import pandas as pd


def require_columns(df: pd.DataFrame, columns: list[str], what: str, *, nonempty: bool = False) -> None:
    """Raise a ValueError naming ``what`` when ``df`` lacks any of ``columns`` (or, with ``nonempty``, has no rows)."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{what} needs columns {missing}; got {list(df.columns)}")
    if nonempty and df.empty:
        raise ValueError(f"{what} got an empty table")
