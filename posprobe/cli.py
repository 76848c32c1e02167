"""The ``posprobe`` command line: one subcommand per job, consistent flags, clean errors.

The contract every subcommand keeps (``tests/test_cli_contract.py`` walks the parsers to check it):

- ``--help`` shows each flag's default and accepted values, and an example that runs as printed;
- bad input exits with status 2 and one line on stderr naming the flag (``--debug`` shows the
  traceback), and errors speak in flags (``--overwrite``), never in Python parameters;
- the output folder is checked before any work; a failed run leaves no new or partial folder
  behind (outputs are written to a hidden staging folder and moved into place at the end; a
  resumable extraction or training keeps what it finished, and says ``--resume``);
- every run writes ``settings.json`` (command line, model, seed, versions) beside its outputs;
- ``-q/--quiet`` silences progress bars.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

from posprobe.devices import DTYPES
from posprobe.sites import SITES

EXAMPLES = {
    "models": "posprobe models\n  posprobe models --model gemma-3-270m",
    "extract": "posprobe extract --model smollm2-135m --sites resid_post rot_q --n 64 --seq-len 256 --out runs/smol",
    "probe": "posprobe probe --model zoo:none --site resid_post --target absolute --out out/probe",
    "rope": "posprobe rope --model gemma-3-270m --n 8 --out out/rope",
    "neurons": "posprobe neurons --model smollm2-135m --n 32 --out out/neurons",
    "positions": "posprobe positions --model minilm-l6 --out out/positions",
    "attention": "posprobe attention --model smollm2-135m --seq-len 1024 --n 4 --out out/attention",
    "sinks": "posprobe sinks --model smollm2-135m --n 16 --out out/sinks",
    "patch": "posprobe patch --model zoo:learned --shift 8 --out out/patch",
    "train": "posprobe train --pe rope --steps 2000 --out runs/zoo/rope\n"
    "  posprobe report --quick --model zoo:runs/zoo/rope",
    "report": "posprobe report --model smollm2-135m --out report/\n  posprobe report --quick --compare zoo:none",
}

#: The file every run writes beside its outputs.
SETTINGS_FILE = "settings.json"

#: Commands whose output folder holds resumable progress (kept after a failure, continued by --resume).
RESUMABLE = ("extract", "train")


class UsageError(ValueError):
    """Bad command-line input."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is the one line the README promises (exit 2), naming the flag."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keep the example's line breaks and show every flag's default."""


# -- argparse types: each names what it expects; argparse prefixes the flag ------------------------


def positive(kind: type = int) -> Callable[[str], Any]:
    def parse(value: str) -> Any:
        try:
            number = kind(value)
        except ValueError:
            number = None
        if number is None or not number > 0 or number != number:  # NaN fails too
            raise argparse.ArgumentTypeError(f"expected a positive {_noun(kind)}, got {value!r}")
        return number

    parse.__name__ = f"positive {_noun(kind)}"
    return parse


def non_negative(kind: type = int) -> Callable[[str], Any]:
    def parse(value: str) -> Any:
        try:
            number = kind(value)
        except ValueError:
            number = None
        if number is None or not number >= 0:
            raise argparse.ArgumentTypeError(f"expected a non-negative {_noun(kind)}, got {value!r}")
        return number

    parse.__name__ = f"non-negative {_noun(kind)}"
    return parse


def fraction(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = None
    if number is None or not 0.0 <= number <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {value!r}")
    return number


def open_fraction(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = None
    if number is None or not 0.0 < number < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number strictly between 0 and 1, got {value!r}")
    return number


def integer(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None


def _noun(kind: type) -> str:
    return "integer" if kind is int else "number"


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


def _device(value: str) -> str:
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, mps, cuda or cuda:<index>, got {value!r}")
    return value


# -- the parser -------------------------------------------------------------------------------------


def _quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="show tracebacks and info logs")


def _common(p: argparse.ArgumentParser, model: bool = True, default_out: str | None = None) -> None:
    if model:
        p.add_argument(
            "--model",
            default="smollm2-135m",
            help="a packaged name (posprobe models lists them: smollm2-135m, gemma-3-270m, minilm-l6, zoo:<scheme>), "
            "a Hugging Face id or a local path",
        )
    p.add_argument("--device", type=_device, default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1 …")
    p.add_argument("--seed", type=non_negative(int), default=0, help="seeds the text windows and random controls")
    p.add_argument(
        "--threads",
        type=positive(int),
        default=None,
        help="CPU threads for torch (default: torch's choice; 1 is fastest on a busy shared machine)",
    )
    out_help = "output folder (created; files of the same name in it are replaced)"
    p.add_argument("--out", default=default_out, required=default_out is None, help=out_help)
    _quiet(p)


def _figure_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--formats",
        nargs="+",
        default=[],
        choices=["png", "svg", "pdf"],
        help="also write figures as static images (needs kaleido and Chromium; HTML is always written)",
    )


def _tokens_args(p: argparse.ArgumentParser, n: int = 16, seq_len: int = 256) -> None:
    p.add_argument(  # --n-windows: torchrun reads a bare --n as an abbreviation of its own flags
        "--n", "--n-windows", type=positive(int), default=n, help="number of text windows (State of the Union)"
    )
    p.add_argument("--seq-len", type=positive(int), default=seq_len, help="tokens per window, at most the context")


def _sites_arg(p: argparse.ArgumentParser, default: str, verb: str) -> None:
    p.add_argument(
        "--sites", nargs="+", default=[default], choices=SITES, metavar="SITE", help=f"sites to {verb}, of: %(choices)s"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="posprobe", description="Where does a transformer keep position?")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    for name, (help_, add_arguments) in SUBCOMMANDS.items():
        p = sub.add_parser(
            name, help=help_, description=help_, epilog="example:\n  " + EXAMPLES[name], formatter_class=HelpFormatter
        )
        add_arguments(p)
    return parser


def _models_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="describe this model (its facts as JSON) instead of listing")
    _quiet(p)


def _extract_args(p: argparse.ArgumentParser) -> None:
    _common(p)
    _tokens_args(p)
    _sites_arg(p, "resid_post", "store")
    p.add_argument(
        "--layers", nargs="*", type=integer, default=None, help="layers to store (negative counts from the end)"
    )
    p.add_argument("--batch-size", type=_batch_size, default=16, help="sequences per forward, or auto")
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="compute dtype (default: the model's)")
    p.add_argument("--resume", action="store_true", help="finish an unfinished store in --out")
    p.add_argument("--overwrite", action="store_true", help="replace whatever store --out holds")


def _probe_args(p: argparse.ArgumentParser) -> None:
    from posprobe.stats.probes import KINDS, TARGETS

    _common(p)
    _tokens_args(p)
    p.add_argument("--site", default="resid_post", choices=SITES, metavar="SITE", help="site to probe, of: %(choices)s")
    p.add_argument("--target", default="absolute", choices=TARGETS, help="what the probe predicts")
    p.add_argument("--kind", default="ridge", choices=KINDS, help="probe estimator")
    p.add_argument("--n-splits", type=positive(int), default=5, help="cross-validation folds (split by window)")
    _figure_args(p)


def _analysis_args(n: int = 16, seq_len: int = 256) -> Callable[[argparse.ArgumentParser], None]:
    """The flags of an analysis that runs the model on text windows and draws figures."""

    def add(p: argparse.ArgumentParser) -> None:
        _common(p)
        _tokens_args(p, n=n, seq_len=seq_len)
        _figure_args(p)

    return add


def _sinks_args(p: argparse.ArgumentParser) -> None:
    from posprobe.stats.sinks import INPUT_KINDS

    _common(p)
    p.add_argument("--n", "--n-windows", type=positive(int), default=16, help="sequences per input kind")
    p.add_argument("--seq-len", type=positive(int), default=64, help="tokens per sequence (Gu et al.: 64)")
    p.add_argument(
        "--inputs", nargs="+", default=list(INPUT_KINDS), choices=INPUT_KINDS, help="input kinds, of: %(choices)s"
    )
    p.add_argument(
        "--bos", default="both", choices=list(SINK_BOS), help="run each input with a prepended BOS, without, or both"
    )
    p.add_argument(
        "--epsilon",
        type=open_fraction,
        default=0.3,
        help="a head is a sink on token k when its mean attention there exceeds this (between 0 and 1, exclusive)",
    )
    p.add_argument(
        "--first-k",
        type=positive(int),
        default=4,
        help="measure tokens 0 … first-k − 1, and move the first token behind this many fillers",
    )
    _figure_args(p)


#: ``--bos`` → ``attention_sinks(bos=...)``
SINK_BOS: dict[str, bool | str] = {"both": "both", "with": True, "without": False}


def _positions_args(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--components", type=positive(int), default=6, help="principal components to report")
    _figure_args(p)


def _patch_args(p: argparse.ArgumentParser) -> None:
    _common(p)
    _tokens_args(p, n=8, seq_len=64)
    p.add_argument("--shift", type=positive(int), default=8, help="positions the corrupted run is shifted by")
    _sites_arg(p, "resid_pre", "patch")
    p.add_argument(
        "--per-position", action="store_true", help="patch each position separately (n_layers × seq_len runs)"
    )
    _figure_args(p)


def _train_args(p: argparse.ArgumentParser) -> None:
    from posprobe.training import add_train_arguments

    p.add_argument("--device", type=_device, default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1 …")
    p.add_argument("--seed", type=non_negative(int), default=0, help="seeds the initialisation and the batch order")
    p.add_argument("--threads", type=positive(int), default=None, help="CPU threads for torch")
    add_train_arguments(p, positive, non_negative, fraction)
    _quiet(p)


def _report_args(p: argparse.ArgumentParser) -> None:
    _common(p, default_out="report")
    p.add_argument("--quick", action="store_true", help="small run (under 2 minutes on 2 CPU cores)")
    p.add_argument("--compare", default=None, help="a second model shown side by side, e.g. zoo:none")
    p.add_argument("--n", type=positive(int), default=None, help="text windows (default: 32, --quick 8)")
    p.add_argument("--seq-len", type=positive(int), default=None, help="tokens per window (default: 256, --quick 128)")


#: every subcommand, in the order ``--help`` lists them: its one-line help and the function adding its flags
SUBCOMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {
    "models": ("list the models posprobe loads offline, or describe one", _models_args),
    "extract": ("extract sites into an on-disk activation store", _extract_args),
    "probe": ("linear position probes per layer, with controls", _probe_args),
    "rope": ("RoPE frequency usage per layer and head", _analysis_args(n=8)),
    "positions": (
        "geometry of a learned or sinusoidal position table W_pos: PCA periods, helix, smoothness",
        _positions_args,
    ),
    "neurons": ("positional neurons in the MLPs", _analysis_args()),
    "attention": ("attention sinks, head roles, variance and similarity", _analysis_args(n=8)),
    "sinks": ("attention-sink rates on natural, random and repeated tokens (Gu et al. 2025)", _sinks_args),
    "patch": ("position-shift patching and shift invariance", _patch_args),
    "train": ("train a zoo model on the State of the Union (--data mix: plus the Python stdlib)", _train_args),
    "report": ("one HTML report on a model", _report_args),
}


def subparsers(parser: argparse.ArgumentParser | None = None) -> dict[str, argparse.ArgumentParser]:
    """Every subcommand's parser, by name."""
    parser = parser or build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


# -- checks before any work -------------------------------------------------------------------------


def _check_args(args: argparse.Namespace) -> None:
    """What can be refused from the flags alone, before a model is loaded."""
    if getattr(args, "resume", False) and getattr(args, "overwrite", False):
        raise UsageError("--resume and --overwrite contradict each other; give one")
    if args.command == "probe" and args.n < max(args.n_splits, 2):
        raise UsageError(
            f"--n {args.n} windows cannot make --n-splits {args.n_splits} folds split by window; "
            f"raise --n to {max(args.n_splits, 2)} or more, or lower --n-splits (at least 2)"
        )
    if args.command == "probe" and args.n_splits < 2:
        raise UsageError(f"--n-splits must be at least 2, got {args.n_splits}")
    out = getattr(args, "out", None)
    if out is not None:
        _check_out(Path(out))


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is an existing file; give a folder")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"--out {out}: {parent} is a file, so the folder cannot be created")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: {parent} is not writable")


def _windows(model, args: argparse.Namespace):
    import posprobe as pp

    if args.seq_len > model.info.n_ctx and not model.extrapolates:
        raise UsageError(
            f"--seq-len {args.seq_len} is beyond {model.info.name}'s context of {model.info.n_ctx} tokens; "
            f"use --seq-len {model.info.n_ctx} or less"
        )
    return pp.data.text_windows(model, n=args.n, seq_len=args.seq_len, seed=args.seed)


def _load(args: argparse.Namespace):
    import posprobe as pp

    model = pp.load_model(args.model, device=args.device)
    args.loaded_models = [*getattr(args, "loaded_models", []), _model_facts(model)]
    return model


def _model_facts(model) -> dict[str, Any]:
    info = model.info
    return {"name": info.name, "architecture": info.architecture, "position_scheme": info.position_scheme,
            "source": getattr(model, "source", None)}  # fmt: skip


# -- outputs ----------------------------------------------------------------------------------------


def _save(args: argparse.Namespace, results: Any, headline: str | None = None) -> None:
    """Save a result (or several by name, each in its own folder) with ``Result.save``; print the headline
    and keep it in ``summary.json``."""
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    if headline is not None:
        print(headline)
        (folder / "summary.json").write_text(json.dumps({"headline": headline}, indent=1) + "\n")
    if isinstance(results, Mapping):
        for name, result in results.items():
            result.save(folder / name, formats=args.formats)
    else:
        results.save(folder, formats=args.formats)
    logging.getLogger("posprobe").info("wrote %s", folder)


def _write_settings(folder: Path, args: argparse.Namespace, argv: Sequence[str], seconds: float) -> None:
    from posprobe.extraction import versions  # the versions a store records

    flags = {k: v for k, v in vars(args).items() if k not in ("loaded_models", "real_out")}
    if "out" in flags:
        flags["out"] = str(getattr(args, "real_out", args.out))
    settings = {
        "command": shlex.join(["posprobe", *argv]),
        "subcommand": args.command,
        "flags": flags,
        "models": getattr(args, "loaded_models", []),
        "seed": getattr(args, "seed", None),
        "versions": versions(),
        "machine": platform.platform(),
        "seconds": round(seconds, 1),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / SETTINGS_FILE).write_text(json.dumps(settings, indent=1, default=str) + "\n")


def _move_into(stage: Path, out: Path) -> list[str]:
    """Move every entry of ``stage`` into ``out`` (replacing entries of the same name), then drop ``stage``."""
    out.mkdir(parents=True, exist_ok=True)
    names = sorted(p.name for p in stage.iterdir())
    for name in names:
        target = out / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(stage / name, target)
    stage.rmdir()
    return names


def _version() -> str:
    from posprobe import __version__

    return __version__


# -- the commands ------------------------------------------------------------------------------------


def cmd_models(args: argparse.Namespace) -> None:
    import posprobe as pp

    if args.model is None:
        for name, desc in pp.known_models().items():
            print(f"{name:16s} {desc}")
        return
    print(json.dumps(pp.load_model(args.model).info.as_dict(), indent=1, default=str))


def cmd_extract(args: argparse.Namespace) -> None:
    from posprobe.distributed import current_ranks
    from posprobe.extraction import extract

    ranks = current_ranks(args.device)  # under torchrun: one process per device, each loads its own copy
    args.device = ranks.device(args.device)
    model = _load(args)
    store = extract(
        model,
        _windows(model, args),
        args.sites,
        args.layers,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        out=args.out,
        resume=args.resume,
        overwrite=args.overwrite,
    )
    if ranks.is_main:
        print(store)


def cmd_probe(args: argparse.Namespace) -> None:
    from posprobe.headlines import probe_headline
    from posprobe.stats.probes import probe_model

    model = _load(args)
    result = probe_model(
        model,
        _windows(model, args),
        site=args.site,
        seed=args.seed,
        target=args.target,
        kind=args.kind,
        n_splits=args.n_splits,
    )
    _save(args, result, probe_headline(result.table, args.site, args.target))


def _twin(model: Any, args: argparse.Namespace) -> Callable[[], Any]:
    return lambda: model.random_init_copy(args.seed)


def cmd_rope(args: argparse.Namespace) -> None:
    from posprobe.reporting import rope_roles

    model = _load(args)
    usage, headline = rope_roles(model, _windows(model, args), _twin(model, args), progress=True)
    _save(args, usage, headline)


def cmd_positions(args: argparse.Namespace) -> None:
    from posprobe.stats.position_table import position_embedding_geometry

    geometry = position_embedding_geometry(_load(args), n_components=args.components, seed=args.seed)
    _save(args, geometry)
    print(json.dumps(geometry.summary))


def cmd_neurons(args: argparse.Namespace) -> None:
    from posprobe.reporting import neuron_positions

    model = _load(args)
    result, headline = neuron_positions(model, _windows(model, args), _twin(model, args), progress=True)
    _save(args, result, headline)


def cmd_attention(args: argparse.Namespace) -> None:
    from posprobe.reporting import attention_roles
    from posprobe.stats.variance import attention_variance

    model = _load(args)
    tokens = _windows(model, args)
    stats, headline = attention_roles(model, tokens, _twin(model, args), progress=True)
    variance = attention_variance(model, tokens, progress=True)
    _save(args, {"attention_stats": stats, "attention_variance": variance}, headline)


def cmd_sinks(args: argparse.Namespace) -> None:
    from posprobe.reporting import sink_rates

    model = _load(args)
    settings = dict(inputs=args.inputs, n=args.n, seq_len=args.seq_len, epsilon=args.epsilon, first_k=args.first_k)
    result, headline = sink_rates(
        model, _twin(model, args), progress=True, bos=SINK_BOS[args.bos], seed=args.seed, **settings
    )
    _save(args, result, headline)


def cmd_patch(args: argparse.Namespace) -> None:
    from posprobe.headlines import shift_headline
    from posprobe.stats.patching import patch_positions, shift_invariance

    model = _load(args)
    tokens = _windows(model, args)
    result = patch_positions(model, tokens, shift=args.shift, sites=tuple(args.sites), per_position=args.per_position)
    invariance = shift_invariance(model, tokens, shifts=(1, args.shift))
    _save(args, {"patch_positions": result, "shift_invariance": invariance}, shift_headline(invariance.table))


def cmd_train(args: argparse.Namespace) -> None:
    from posprobe.training import run_train

    result = run_train(args)
    loss = f"{result.eval['heldout_loss']:.3f}" if result.eval else "not measured before the last step"
    print(f"zoo:{args.pe} trained for {result.step} steps into {args.out}; held-out loss {loss}")


def cmd_report(args: argparse.Namespace) -> None:
    from posprobe.reporting import ReportSettings, build_report

    settings = ReportSettings.make(quick=args.quick, n=args.n, seq_len=args.seq_len, seed=args.seed, device=args.device)
    model = _load(args)
    compare = None
    if args.compare is not None:
        compare = _load(argparse.Namespace(**{**vars(args), "model": args.compare}))
        args.loaded_models.append(_model_facts(compare))
    build_report(model, args.out, compare=compare, settings=settings)


COMMANDS: dict[str, Callable[[argparse.Namespace], None]] = {
    "models": cmd_models,
    "extract": cmd_extract,
    "probe": cmd_probe,
    "rope": cmd_rope,
    "neurons": cmd_neurons,
    "attention": cmd_attention,
    "sinks": cmd_sinks,
    "patch": cmd_patch,
    "positions": cmd_positions,
    "train": cmd_train,
    "report": cmd_report,
}


# -- errors in the command line's words ---------------------------------------------------------------


#: API parameter names whose flag is spelled differently.
API_NAMES = {"out_dir": "out"}


def speak_in_flags(message: str, parser: argparse.ArgumentParser) -> str:
    """Rewrite an API error for the command line: ``resume=True`` → ``--resume``, ``n_splits`` → ``--n-splits``."""
    flags = {o for a in parser._actions for o in a.option_strings if o.startswith("--")}

    def flag(name: str) -> str | None:
        candidate = "--" + API_NAMES.get(name, name).replace("_", "-")
        return candidate if candidate in flags else None

    message = re.sub(r"\s*\(CLI: [^)]*\)", "", message)
    message = re.sub(r"\b(?:rerun )?\w+\(\.\.\., (\w+)=True\)", lambda m: f"rerun with {flag(m[1]) or m[0]}", message)
    message = re.sub(r"\b(\w+)=(True|False)\b", lambda m: (flag(m[1]) or m[0]) if m[2] == "True" else m[0], message)
    return re.sub(r"\b([a-z]+(?:_[a-z0-9]+)+)\b", lambda m: flag(m[1]) or m[0], message)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``posprobe`` command."""
    from posprobe.distributed import is_main_process
    from posprobe.progress import set_quiet

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False)
    logging.basicConfig(level=logging.INFO if debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    set_quiet(args.quiet)
    if not debug:  # weight loading takes a second; its bar would bury a one-line error
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    out = Path(args.out) if getattr(args, "out", None) is not None else None
    existed = out is not None and out.exists()
    stage = None
    started = time.perf_counter()
    try:
        _check_args(args)
        if getattr(args, "threads", None) is not None:
            import torch

            torch.set_num_threads(args.threads)
        if out is not None and args.command not in RESUMABLE:  # written aside, moved into place when done
            stage = out.parent / f".{out.name}.partial-{os.getpid()}"
            args.real_out, args.out = args.out, str(stage)
        COMMANDS[args.command](args)
        if out is not None and is_main_process():  # one settings.json for the ranks of a distributed run
            _write_settings(stage or out, args, argv, time.perf_counter() - started)
        if stage is not None:
            assert out is not None  # a stage is only made for an out folder
            names = _move_into(stage, out)
            print(f"wrote {', '.join(names)} to {out}")
    except _user_errors() as err:
        kept = _clean_up(out, stage, existed, args)
        if debug:
            raise
        text = " ".join(str(err).split()) or type(err).__name__
        message = speak_in_flags(text, subparsers(parser)[args.command])
        print(f"posprobe {args.command}: error: {message}{kept}", file=sys.stderr)
        return 2
    except BaseException:
        _clean_up(out, stage, existed, args)
        raise
    return 0


def _user_errors() -> tuple[type[BaseException], ...]:
    """The errors a user fixes: said in one line (exit 2), without a traceback unless ``--debug``."""
    from posprobe.distributed import RankError
    from posprobe.finite import NonFiniteError
    from posprobe.plots.export import ExportError
    from posprobe.store import StoreError

    return (ValueError, StoreError, ExportError, FileNotFoundError, FileExistsError, ModuleNotFoundError,
            NotImplementedError, KeyError, NonFiniteError, RankError)  # fmt: skip


def _clean_up(out: Path | None, stage: Path | None, existed: bool, args: argparse.Namespace) -> str:
    """Remove what a failed run created; a resumable run that finished some work keeps it (returns the note)."""
    from posprobe.distributed import is_main_process

    if stage is not None and stage.exists():
        shutil.rmtree(stage, ignore_errors=True)
    if out is None or existed or not out.exists() or not is_main_process():
        return ""
    if args.command in RESUMABLE and _has_progress(out):
        advice = "" if args.resume else ": rerun with --resume to continue"
        return f" (the finished part is kept in {out}{advice})"
    shutil.rmtree(out, ignore_errors=True)
    return ""


def _has_progress(out: Path) -> bool:
    from posprobe.models.zoo import STATE_FILE

    return any(out.glob("shard_*.safetensors")) or (out / STATE_FILE).exists()


if __name__ == "__main__":
    sys.exit(main())
