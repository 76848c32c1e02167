"""Shared plumbing for the reproduction scripts: arguments, model loading, and writing tables and figures.

Every script in ``analyses/`` has ``main(argv)`` with ``--quick`` (minutes on 2 CPU cores) and
``--out DIR`` (default ``analyses/out``). A script writes into ``DIR/<script>/``: CSV tables,
HTML figures (plotly.js is written once as ``DIR/plotly.min.js`` and referenced, since the CDN
is unreachable offline), ``summary.json`` (the headline numbers quoted in ``RESULTS.md``) and
``manifest.json`` (every file it wrote, which ``tests/test_analyses.py`` checks).

A zoo checkpoint that is missing (or still training) is skipped with a note: the script keeps
going and the model appears in its tables as a row with ``note`` filled and metrics empty.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "analyses" / "out"
ZOO_ORDER = ("none", "learned", "sinusoidal", "rope", "alibi")


def parse_args(
    argv: Sequence[str] | None, description: str, extra: Callable[[argparse.ArgumentParser], None] | None = None
) -> argparse.Namespace:
    """The options every reproduction script shares (--quick, --out, --zoo-root, --threads, --seed) plus ``extra``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="small inputs: minutes on 2 CPU cores")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (default analyses/out)")
    parser.add_argument("--zoo-root", default=None, help="folder of zoo checkpoints (default: the shipped zoo)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    if extra is not None:
        extra(parser)
    args = parser.parse_args(list(argv) if argv is not None else None)
    torch.set_num_threads(args.threads)
    return args


def zoo_status(variant: str, root: str | os.PathLike | None) -> str | None:
    """None when the zoo checkpoint ``variant`` can be loaded, else why not (missing files, still training)."""
    from posprobe.models.zoo import ZOO_DIR

    folder = Path(root) if root is not None else ZOO_DIR
    path = folder / variant
    for name in ("config.json", "model.safetensors"):
        if not (path / name).exists():
            return f"skipped: no {name} in {path} (checkpoint not trained yet)"
    state_file = path / "train_state.json"
    if state_file.exists():
        state = json.loads(state_file.read_text())
        if state.get("steps") is not None and state.get("step", 0) < state["steps"]:
            return f"skipped: {path} is still training (step {state.get('step')} of {state['steps']})"
    return None


def load_zoo_model(variant: str, root: str | os.PathLike | None, random_init: bool = False, seed: int = 0):
    """(model, None) for a ready zoo checkpoint, or (None, note) when it is missing; the note is printed."""
    from posprobe.models.zoo import load_zoo

    note = zoo_status(variant, root)
    if note is not None:
        print(f"[zoo:{variant}] {note}")
        return None, note
    return load_zoo(variant, random_init=random_init, seed=seed, root=root), None


def skipped_row(model: str, note: str, **extra: Any) -> pd.DataFrame:
    """One table row standing for a model that could not be analysed."""
    return pd.DataFrame([{"model": model, **extra, "note": note}])


def with_notes(parts: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """The rows of ``parts`` in one table with a ``note`` column (None everywhere when no model was skipped)."""
    table = pd.concat(parts, ignore_index=True)
    if "note" not in table:
        table["note"] = None
    return table


def machine() -> str:
    """A one-line description of where the numbers came from."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines() if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    return f"{cpu}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, {platform.system()}"


class Output:
    """Where one script writes: ``<out>/<name>/``; records every file for the manifest."""

    def __init__(self, out: str | os.PathLike, name: str, args: argparse.Namespace):
        self.root = Path(out)
        self.dir = self.root / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.files: list[str] = []
        self.summary: dict[str, Any] = {}
        self.started = time.time()
        self.settings = {
            "quick": args.quick,
            "seed": args.seed,
            "threads": args.threads,
            "zoo_root": args.zoo_root or "posprobe/zoo_checkpoints",
        }
        self._write_plotlyjs()

    def _write_plotlyjs(self) -> None:
        target = self.root / "plotly.min.js"
        if not target.exists():
            from plotly.offline import get_plotlyjs

            tmp = target.with_suffix(".tmp")
            tmp.write_text(get_plotlyjs(), encoding="utf-8")
            tmp.replace(target)

    def table(self, stem: str, df: pd.DataFrame) -> Path:
        path = self.dir / f"{stem}.csv"
        df.to_csv(path, index=False)
        self.files.append(path.name)
        print(f"  wrote {path} ({len(df)} rows)")
        return path

    def figure(self, stem: str, fig: Any) -> Path:
        path = self.dir / f"{stem}.html"
        fig.write_html(path, include_plotlyjs="../plotly.min.js", full_html=True)
        self.files.append(path.name)
        print(f"  wrote {path}")
        return path

    def finish(self) -> dict[str, Any]:
        """Write summary.json and manifest.json; return the summary."""
        meta = {
            "script": self.name,
            "settings": self.settings,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": machine(),
            "wall_s": round(time.time() - self.started, 1),
        }
        (self.dir / "summary.json").write_text(json.dumps({**meta, "headline": self.summary}, indent=2, default=str))
        (self.dir / "manifest.json").write_text(json.dumps({"script": self.name, "files": self.files}, indent=2))
        print(f"[{self.name}] done in {meta['wall_s']} s")
        return self.summary


def model_label(model: Any) -> str:
    """The model's display name without the random-init suffix."""
    return model.info.name


def round_floats(d: dict[str, Any], digits: int = 4) -> dict[str, Any]:
    """A copy of ``d`` with floats rounded, for summary.json."""
    return {k: (round(v, digits) if isinstance(v, float) else v) for k, v in d.items()}


def begin(
    argv: Sequence[str] | None, doc: str, name: str, settings: Callable[[bool], dict]
) -> tuple[argparse.Namespace, Output, dict]:
    """What every script's ``main`` starts with: the shared options, ``<out>/<name>/`` opened, the settings recorded."""
    args = parse_args(argv, doc.splitlines()[0])
    out = Output(args.out, name, args)
    cfg = settings(args.quick)
    out.settings.update(cfg)
    return args, out, cfg
