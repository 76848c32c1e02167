"""The ``posprobe`` command line: one subcommand per job, consistent flags, clean errors.

Every subcommand takes ``--model``, ``--device``, ``--seed`` and ``--out``; bad input exits
with status 2 and one line on stderr (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

EXAMPLES = {
    "models": "posprobe models\n  posprobe models --model gemma-3-270m",
    "extract": "posprobe extract --model smollm2-135m --sites resid_post rot_q --n 64 --seq-len 256 --out runs/smol",
    "probe": "posprobe probe --model zoo:none --site resid_post --target absolute --out out/probe",
    "rope": "posprobe rope --model gemma-3-270m --n 8 --out out/rope",
    "neurons": "posprobe neurons --model smollm2-135m --n 32 --out out/neurons",
    "positions": "posprobe positions --model minilm-l6 --out out/positions",
    "attention": "posprobe attention --model smollm2-135m --seq-len 1024 --n 4 --out out/attention",
    "patch": "posprobe patch --model zoo:learned --shift 8 --out out/patch",
    "train": "posprobe train --pe rope --steps 2000 --out data/zoo/rope",
    "report": "posprobe report --model smollm2-135m --out report/\n  posprobe report --quick --compare zoo:none",
}


class UsageError(ValueError):
    """Bad command-line input."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is the one line the README promises (exit 2), naming the flag."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _batch_size(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        size = int(value)
    except ValueError:
        size = 0
    if size < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {value!r}")
    return size


def _common(p: argparse.ArgumentParser, model: bool = True, default_out: str | None = None) -> None:
    if model:
        p.add_argument("--model", default="smollm2-135m", help="packaged name, zoo:<variant>, HF id or path")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1 …")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default: torch's choice; 1 is fastest on a busy shared machine)",
    )
    p.add_argument("--out", default=default_out, required=default_out is None, help="output folder")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def _figure_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--formats",
        nargs="+",
        default=[],
        choices=["png", "svg", "pdf"],
        help="also write figures as static images (needs kaleido and Chromium; HTML is always written)",
    )


def _tokens_args(p: argparse.ArgumentParser, n: int = 16, seq_len: int = 256) -> None:
    p.add_argument("--n", type=int, default=n, help="number of text windows")
    p.add_argument("--seq-len", type=int, default=seq_len, help="tokens per window")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="posprobe", description="Where does a transformer keep position?")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help_: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=help_,
            description=help_,
            epilog="example:\n  " + EXAMPLES[name],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    p = add("models", "list the models posprobe loads offline, or describe one")
    p.add_argument("--model", default=None)
    p.add_argument("--debug", action="store_true")

    p = add("extract", "extract sites into an on-disk activation store")
    _common(p)
    _tokens_args(p)
    p.add_argument("--sites", nargs="+", default=["resid_post"])
    p.add_argument("--layers", nargs="*", type=int, default=None)
    p.add_argument("--batch-size", type=_batch_size, default=16, help="sequences per forward, or auto")
    p.add_argument("--dtype", default=None, help="compute dtype: float32, bf16, fp16")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--overwrite", action="store_true")

    p = add("probe", "linear position probes per layer, with controls")
    _common(p)
    _tokens_args(p)
    p.add_argument("--site", default="resid_post")
    p.add_argument("--target", default="absolute")
    p.add_argument("--kind", default="ridge")
    _figure_args(p)

    p = add("rope", "RoPE frequency usage per layer and head")
    _common(p)
    _tokens_args(p, n=8)
    _figure_args(p)

    p = add("positions", "geometry of a learned or sinusoidal position table W_pos: PCA periods, helix, smoothness")
    _common(p)
    p.add_argument("--components", type=int, default=6, help="principal components to report")
    _figure_args(p)

    p = add("neurons", "positional neurons in the MLPs")
    _common(p)
    _tokens_args(p)
    _figure_args(p)

    p = add("attention", "attention sinks, head roles, variance and similarity")
    _common(p)
    _tokens_args(p, n=8)
    _figure_args(p)

    p = add("patch", "position-shift patching and shift invariance")
    _common(p)
    _tokens_args(p, n=8, seq_len=64)
    p.add_argument("--shift", type=int, default=8)
    p.add_argument("--sites", nargs="+", default=["resid_pre"])
    p.add_argument(
        "--per-position", action="store_true", help="patch each position separately (n_layers × seq_len runs)"
    )
    _figure_args(p)

    add("train", "train a zoo model (posprobe train --help lists its flags)")

    p = add("report", "one HTML report on a model")
    _common(p, default_out="report")
    p.add_argument("--quick", action="store_true", help="small run (under 2 minutes on 2 CPU cores)")
    p.add_argument("--compare", default=None, help="a second model shown side by side, e.g. zoo:none")
    p.add_argument("--n", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None)
    return parser


def _load(args: argparse.Namespace):
    import posprobe as pp

    if not args.debug:  # weight loading takes a second; its bar would bury a one-line error
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    return pp.load_model(args.model, device=args.device)


def _check_args(args: argparse.Namespace) -> None:
    """Reject unknown sites, targets and probe kinds before a model is loaded."""
    from posprobe.sites import check_site

    for site in [getattr(args, "site", None), *(getattr(args, "sites", None) or [])]:
        if site is not None:
            check_site(site)
    if args.command == "probe":
        from posprobe.stats.probes import KINDS, TARGETS

        for value, accepted, what in ((args.target, TARGETS, "target"), (args.kind, KINDS, "kind")):
            if value not in accepted:
                raise UsageError(f"unknown {what} {value!r}; accepted: {', '.join(accepted)}")


def _windows(model, args: argparse.Namespace):
    import posprobe as pp

    if args.seq_len > model.info.n_ctx and not model.extrapolates:
        raise UsageError(
            f"--seq-len {args.seq_len} is beyond {model.info.name}'s context of {model.info.n_ctx} tokens; "
            f"use --seq-len {model.info.n_ctx} or less"
        )
    return pp.data.text_windows(model, n=args.n, seq_len=args.seq_len, seed=args.seed)


def _save(out: str, tables: dict[str, Any], figures: dict[str, Any], formats: Sequence[str] = ()) -> None:
    from posprobe.plots.export import save_figure

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    for name, table in tables.items():
        table.to_csv(folder / f"{name}.csv", index=False)
    for name, fig in figures.items():
        save_figure(fig, folder / f"{name}.html", formats)
    logging.getLogger("posprobe").info("wrote %s", folder)
    print(f"wrote {', '.join(list(tables) + list(figures))} to {folder}")


def cmd_models(args: argparse.Namespace) -> None:
    import posprobe as pp

    if args.model is None:
        for name, desc in pp.known_models().items():
            print(f"{name:16s} {desc}")
        return
    print(json.dumps(pp.load_model(args.model).info.as_dict(), indent=1, default=str))


def cmd_extract(args: argparse.Namespace) -> None:
    from posprobe.extract import extract

    model = _load(args)
    batch_size = args.batch_size
    store = extract(
        model,
        _windows(model, args),
        args.sites,
        args.layers,
        batch_size=batch_size,
        device=args.device,
        dtype=args.dtype,
        out=args.out,
        resume=args.resume,
        overwrite=args.overwrite,
    )
    print(store)


def cmd_probe(args: argparse.Namespace) -> None:
    from posprobe.stats.probes import probe_model

    model = _load(args)
    result = probe_model(model, _windows(model, args), args.site, seed=args.seed, target=args.target, kind=args.kind)
    _save(args.out, {"probes": result.table}, {"probes": result.plot()}, args.formats)


def cmd_rope(args: argparse.Namespace) -> None:
    from posprobe.stats.rope import rope_frequency_usage

    model = _load(args)
    usage = rope_frequency_usage(model, _windows(model, args), progress=True)
    _save(
        args.out,
        {"rope_usage": usage.table, "head_roles": usage.head_roles, "contributions": usage.contributions},
        {"rope_heatmap": usage.figure(), "rope_spectra": usage.spectrum_figure()},
        args.formats,
    )


def cmd_positions(args: argparse.Namespace) -> None:
    from posprobe.stats.position_table import FIGURE_KINDS, position_embedding_geometry

    geometry = position_embedding_geometry(_load(args), n_components=args.components, seed=args.seed)
    _save(
        args.out,
        {"components": geometry.components, "neighbours": geometry.neighbours, "coordinates": geometry.coords},
        {kind: geometry.figure(kind) for kind in FIGURE_KINDS},
        args.formats,
    )
    print(json.dumps(geometry.summary))


def cmd_neurons(args: argparse.Namespace) -> None:
    import tempfile

    from posprobe.extract import extract
    from posprobe.stats.neurons import positional_neurons

    model = _load(args)
    with tempfile.TemporaryDirectory() as tmp:
        result = positional_neurons(extract(model, _windows(model, args), "mlp_post", out=tmp))
    figures = {"neuron_counts": result.figure("counts")}
    if result.table["is_positional"].any():  # the heatmap draws positional neurons only
        figures["neuron_heatmap"] = result.figure("heatmap")
    _save(args.out, {"neurons": result.table, "layers": result.layer_summary}, figures, args.formats)


def cmd_attention(args: argparse.Namespace) -> None:
    from posprobe.stats.attention import attention_stats
    from posprobe.stats.variance import attention_variance

    model = _load(args)
    tokens = _windows(model, args)
    stats = attention_stats(model, tokens, progress=True)
    variance = attention_variance(model, tokens, progress=True)
    _save(
        args.out,
        {"heads": stats.heads, "roles": stats.roles, "variance": variance.table, "exponents": variance.exponents},
        {"head_roles": stats.figure(), "variance": variance.figure()},
        args.formats,
    )


def cmd_patch(args: argparse.Namespace) -> None:
    from posprobe.stats.patching import patch_positions, shift_invariance

    model = _load(args)
    tokens = _windows(model, args)
    result = patch_positions(model, tokens, shift=args.shift, sites=tuple(args.sites), per_position=args.per_position)
    invariance = shift_invariance(model, tokens, shifts=(1, args.shift))
    _save(
        args.out,
        {"patching": result.table, "shift_invariance": invariance},
        {"patching": result.figure()},
        args.formats,
    )


def cmd_report(args: argparse.Namespace) -> None:
    from posprobe.report import ReportSettings, build_report

    settings = ReportSettings.make(quick=args.quick, n=args.n, seq_len=args.seq_len, seed=args.seed, device=args.device)
    page = build_report(args.model, args.out, compare=args.compare, settings=settings)
    print(f"report written to {page}")


COMMANDS: dict[str, Callable[[argparse.Namespace], None]] = {
    "models": cmd_models,
    "extract": cmd_extract,
    "probe": cmd_probe,
    "rope": cmd_rope,
    "neurons": cmd_neurons,
    "attention": cmd_attention,
    "patch": cmd_patch,
    "positions": cmd_positions,
    "report": cmd_report,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``posprobe`` command."""
    from posprobe.plots.export import ExportError
    from posprobe.store import StoreError

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:  # posprobe.train's own parser reads every flag (--pe, --steps, …) and its --help
        from posprobe.train import main_train

        return main_train(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if getattr(args, "debug", False) else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        out = getattr(args, "out", None)
        if out is not None and Path(out).exists() and not Path(out).is_dir():
            raise UsageError(f"--out {out} is an existing file; give a folder")
        _check_args(args)
        if getattr(args, "threads", None) is not None:
            if args.threads < 1:
                raise UsageError(f"--threads must be at least 1, got {args.threads}")
            import torch

            torch.set_num_threads(args.threads)
        COMMANDS[args.command](args)
    except (
        ValueError,
        StoreError,
        ExportError,
        FileNotFoundError,
        ModuleNotFoundError,
        NotImplementedError,
        KeyError,
    ) as err:
        if getattr(args, "debug", False):
            raise
        print(f"posprobe {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
