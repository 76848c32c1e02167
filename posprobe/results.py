"""The one contract every analysis result keeps: ``.table``, ``.info``, ``.figure(kind)``, ``.save(folder)``.

A result is a frozen dataclass that mixes in ``Result``. It holds its main tidy table as
``table`` (other tables it names in ``TABLES``) and one typed run record ``info`` (``RunInfo``:
model, site, layers, tokens, seed, causal, prepend_bos, position-0 handling, notes, and the
analysis's own settings in ``params``). ``figure(kind)`` draws one of the kinds in ``FIGURES``
(the first is the default; an unknown kind is an error that lists them) and is the only step from
a result to ``posprobe.plots``: importing a result never loads plotly. ``save(folder)`` writes
every table as CSV and Parquet, the info as ``info.json`` and the figures in ``SAVED`` as HTML.

This module imports nothing of posprobe, so any part of it can build a result.
"""

from __future__ import annotations

import json
import math
import os
import sys
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, ClassVar

import pandas as pd

if TYPE_CHECKING:
    import plotly.graph_objects as go

__all__ = ["INFO_FILE", "DataFrameAlias", "ParamsAlias", "Result", "RunInfo", "deprecated_alias"]

#: the name ``Result.save`` gives the run record
INFO_FILE = "info.json"


@dataclass(frozen=True)
class RunInfo:
    """What was run to make a result: the same fields for every analysis, its own settings in ``params``.

    ``exclude_pos0`` is how position 0 was treated (True: left out, False: kept, ``"both"``: both,
    in an ``include_pos0`` column of the table; None where the analysis does not single it out).
    ``n_tokens`` counts the real (non-padding) tokens the statistics were read from.
    """

    analysis: str
    model: str
    site: str | None = None
    layers: tuple[int | None, ...] = ()
    n_sequences: int | None = None
    seq_len: int | None = None
    n_tokens: int | None = None
    seed: int | None = None
    causal: bool | None = None
    prepend_bos: bool | None = None
    exclude_pos0: bool | str | None = None
    notes: tuple[str, ...] = ()
    params: Mapping[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The record as plain JSON-ready values (tuples become lists, NaN stays a float)."""
        return _plain(asdict(self))


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset, range)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # numpy / torch scalars
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return str(value)


class Result:
    """Mixin for a frozen dataclass with the fields ``table`` and ``info`` (see the module docstring)."""

    #: figure kind → name of the method that draws it (called with the options given to ``figure``);
    #: the first kind is the default
    FIGURES: ClassVar[Mapping[str, str]] = {}
    #: the kinds ``save`` writes (they must draw without options); default: every kind
    SAVED: ClassVar[Sequence[str] | None] = None
    #: attribute names of further tables ``save`` writes beside ``table``
    TABLES: ClassVar[Sequence[str]] = ()

    table: pd.DataFrame
    info: RunInfo

    def figure_kinds(self) -> list[str]:
        """The kinds ``figure`` draws, the default first."""
        return list(self.FIGURES)

    def saved_kinds(self) -> list[str]:
        """The kinds ``save`` draws by default: ``SAVED``, else every kind."""
        return list(self.SAVED) if self.SAVED is not None else self.figure_kinds()

    def figure(self, kind: str | None = None, **options: Any) -> go.Figure:
        """Draw the figure ``kind`` (default: the first of ``figure_kinds()``) as a plotly Figure."""
        kinds = self.figure_kinds()
        if not kinds:
            raise ValueError(f"{type(self).__name__} draws no figure; its numbers are in .table")
        chosen = kinds[0] if kind is None else kind
        if chosen not in kinds:
            raise ValueError(f"unknown figure kind {chosen!r} for {type(self).__name__}; kinds: {', '.join(kinds)}")
        return self._draw(chosen, **options)

    def _draw(self, kind: str, **options: Any) -> go.Figure:
        """Draw one known kind; a result whose kinds are not fixed (e.g. one per metric) overrides this."""
        return getattr(self, self.FIGURES[kind])(**options)

    def tables(self) -> dict[str, pd.DataFrame]:
        """Every table of the result by name: ``table`` first, then those named in ``TABLES``."""
        found = {"table": self.table}
        for name in self.TABLES:
            value = getattr(self, name)
            if isinstance(value, pd.DataFrame):
                found[name] = value
        return found

    def save(
        self,
        folder: str | os.PathLike,
        *,
        figures: Sequence[str] | None = None,
        formats: Sequence[str] = (),
        prefix: str = "",
        tables: Sequence[str] | None = None,
    ) -> Path:
        """Write the tables (``<name>.csv`` and ``<name>.parquet``), ``info.json`` and figures (``<kind>.html``).

        ``figures`` names the kinds to draw (default ``saved_kinds()``; ``()`` for none);
        ``formats`` adds static images (``"png"``, ``"svg"``, ``"pdf"``; see ``posprobe.plots.export``);
        ``prefix`` starts every file name (several results in one folder); ``tables`` names the tables to
        write (default: all of ``tables()``). Returns the folder.
        """
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        for name, table in self.tables().items():
            if tables is not None and name not in tables:
                continue
            table.to_csv(out / f"{prefix}{name}.csv", index=False)
            table.to_parquet(out / f"{prefix}{name}.parquet", index=False)
        text = json.dumps(self.info.as_dict(), indent=1, default=_json_default, allow_nan=True)
        (out / f"{prefix}{INFO_FILE}").write_text(text + "\n")
        kinds = self.saved_kinds() if figures is None else figures
        if kinds:
            from posprobe.plots.export import save_figure  # the only place a result loads plotly

            for kind in kinds:
                save_figure(self.figure(kind), out / f"{prefix}{kind}.html", formats)
        return out


class ParamsAlias:
    """For one release: ``result.params``, the settings dict results kept before ``info.params``."""

    info: RunInfo

    @property
    def params(self) -> dict[str, Any]:
        """Deprecated: the settings are ``info.params``."""
        cls = type(self).__name__
        deprecated_alias(f"{cls}.params", f"{cls}.info.params")
        return dict(self.info.params)


class DataFrameAlias:
    """For one release: a result that used to be a bare DataFrame still reads like one, through ``.table``.

    ``[...]``, ``len()``, ``in``, iteration and the DataFrame's public attributes warn (DeprecationWarning);
    pandas' own internals pass silently, so ``pd.concat`` still takes the result.
    """

    table: pd.DataFrame

    def __getattr__(self, name: str) -> Any:
        table = vars(self).get("table")  # absent while the dataclass is built or copied
        if name.startswith("__") or table is None or not hasattr(table, name):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        if not name.startswith("_"):
            cls = type(self).__name__
            deprecated_alias(f"{cls}.{name} (the result read as a DataFrame)", f"{cls}.table.{name}")
        return getattr(table, name)

    def __getitem__(self, key: Any) -> Any:
        cls = type(self).__name__
        deprecated_alias(f"{cls}[...] (the result read as a DataFrame)", f"{cls}.table[...]")
        return self.table[key]

    def __len__(self) -> int:
        cls = type(self).__name__
        deprecated_alias(f"len({cls}) (the result read as a DataFrame)", f"len({cls}.table)")
        return len(self.table)

    def __iter__(self) -> Iterator[Any]:
        cls = type(self).__name__
        deprecated_alias(f"iterating a {cls} (the result read as a DataFrame)", f"{cls}.table")
        return iter(self.table)

    def __contains__(self, column: Any) -> bool:
        cls = type(self).__name__
        deprecated_alias(f"'column' in {cls} (the result read as a DataFrame)", f"{cls}.table")
        return column in self.table

    def __bool__(self) -> bool:
        return True  # a result is always there; a DataFrame's truth value was an error anyway


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value)


def deprecated_alias(old: str, new: str) -> None:
    """Warn that ``old`` is now spelled ``new`` (kept one release), pointing at the user's line: the first
    frame outside posprobe, so Python's default filters show it in a script or a notebook."""
    warnings.warn(
        f"{old} is deprecated and will be removed in the next release; use {new}",
        DeprecationWarning,
        stacklevel=_first_outside_package(),
    )


def _first_outside_package() -> int:
    """The ``stacklevel`` of the first caller outside posprobe, counted from ``warnings.warn``'s caller."""
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    frame: FrameType | None = sys._getframe(2)  # 1: deprecated_alias; 2: who called it
    level = 2
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1
    return level
