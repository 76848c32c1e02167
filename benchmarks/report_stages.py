"""Benchmark: ``posprobe report`` stage by stage, at 1 and 2 intra-op threads, side by side.

Runs ``posprobe.reporting.analyse_model`` (every analysis the report composes) on SmolLM2 (``--model``) with the
``--quick`` settings (8 × 128 tokens) or the default ones (32 × 256, ``--full``), rounds
alternating between thread counts so a load spike on a shared machine hits both alike. Prints
one JSON object: per thread count and stage the median seconds, and the 2-thread / 1-thread ratio
per stage. Why: the probe stage runs hundreds of small float64 eigendecompositions; their
multi-threaded LAPACK path collapses when the cores are oversubscribed (8.5× slower than one
thread at load average ~7 on 2 cores), while an idle machine may gain from the second thread.

    python benchmarks/report_stages.py [--model smollm2-135m] [--full] [--threads 1 2] [--repeats 1] [--out FILE]
"""

from __future__ import annotations

import argparse
import logging
import re
import statistics

import torch
from _common import emit, envelope

STAGE_LINE = re.compile(r": (?P<stage>.+) took (?P<seconds>[0-9.]+) s$")


class _StageTimes(logging.Handler):
    """Collects the "<model>: <stage> took <s> s" lines that ``analyse_model`` logs."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.times: dict[str, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        match = STAGE_LINE.search(record.getMessage())
        if match:
            self.times[match["stage"]] = float(match["seconds"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--full", action="store_true", help="the default report settings instead of --quick")
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import posprobe as pp
    from posprobe.reporting import ReportSettings, analyse_model

    settings = ReportSettings.make(quick=not args.full, device="cpu")
    model = pp.load_model(args.model)
    handler = _StageTimes()
    report_log = logging.getLogger("posprobe.reporting")
    report_log.addHandler(handler)
    report_log.setLevel(logging.INFO)
    runs: dict[int, list[dict[str, float]]] = {t: [] for t in args.threads}
    for _ in range(args.repeats):
        for threads in args.threads:
            torch.set_num_threads(threads)
            torch.manual_seed(settings.seed)
            handler.times = {}
            analyse_model(model, settings, progress=False)
            runs[threads].append({**handler.times, "total": sum(handler.times.values())})
    results = [
        {"threads": t, "stage": stage, "median_s": round(statistics.median(r[stage] for r in rs), 2), "runs": len(rs)}
        for t, rs in runs.items()
        for stage in rs[0]
    ]
    ratios = {}
    if {1, 2} <= set(args.threads):
        by = {(r["threads"], r["stage"]): r["median_s"] for r in results}
        ratios = {
            f"{stage}: 2 threads / 1 thread": round(by[(2, stage)] / by[(1, stage)], 2)
            for stage in runs[1][0]
            if by[(1, stage)] > 0
        }
    emit(envelope("report_stages", results, ratios, model=args.model, settings=vars(settings)), args.out)


if __name__ == "__main__":
    main()
