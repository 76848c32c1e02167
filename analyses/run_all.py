"""Run every reproduction script, each in its own process, and write ``<out>/run_all.json`` and ``<out>/manifest.json``.

Usage: ``python analyses/run_all.py [--quick] [--out DIR] [--zoo-root DIR] [--zoo v2] [--only a,b] [--threads N]``

``--quick`` is sized to finish in under 10 minutes on 2 CPU cores; without it the scripts run
their full settings (tens of minutes to hours on a CPU). A failing script is reported and the
others still run; the exit status is 1 if any failed. ``manifest.json`` lists, per script, the
files it wrote (relative to ``--out``); ``run_all.json`` the wall and CPU seconds of each.
``--zoo v2`` runs the scripts that take ``--zoo`` (``ZOO_SCRIPTS``) on the zoo v2, into ``analyses/out/zoo2``
unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = (
    "haviv_probes",
    "chi_variance",
    "zuo_similarity",
    "attention_zoo",
    "barbero_rope",
    "voita_neurons",
    "kazemnejad_length",
    "learned_positions",
    "patching_shift",
    "gu_sinks",
)
#: the scripts that also run on the zoo v2 (``--zoo``): the sections whose verdicts may change with it
ZOO_SCRIPTS = ("attention_zoo", "voita_neurons", "learned_positions", "gu_sinks")


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(HERE / "out"))
    parser.add_argument("--zoo-root", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--zoo", default=None, choices=["v1", "v2"], help=f"v2: {', '.join(ZOO_SCRIPTS)} on zoo v2")
    parser.add_argument("--only", default=None, help="comma-separated script names (default: all)")
    args = parser.parse_args(argv)
    known = ZOO_SCRIPTS if args.zoo == "v2" else SCRIPTS
    names = known if args.only is None else tuple(args.only.split(","))
    unknown = [n for n in names if n not in known]
    if unknown:
        parser.error(
            f"unknown script(s) {unknown}; known{' with --zoo v2' if args.zoo == 'v2' else ''}: {', '.join(known)}"
        )
    out = Path(args.out if args.zoo != "v2" or args.out != str(HERE / "out") else HERE / "out" / "zoo2")
    out.mkdir(parents=True, exist_ok=True)
    common = ["--out", str(out), "--threads", str(args.threads)]
    common += ["--quick"] if args.quick else []
    common += ["--zoo-root", args.zoo_root] if args.zoo_root else []
    runs, manifest = {}, {}
    for name in names:
        print(f"=== {name}", flush=True)
        wall, cpu = time.time(), _children_cpu()
        zoo = ["--zoo", args.zoo] if args.zoo and name in ZOO_SCRIPTS else []
        proc = subprocess.run([sys.executable, str(HERE / f"{name}.py"), *common, *zoo], check=False)
        runs[name] = {
            "returncode": proc.returncode,
            "wall_s": round(time.time() - wall, 1),
            "cpu_s": round(_children_cpu() - cpu, 1),
        }
        print(
            f"=== {name}: rc {proc.returncode}, {runs[name]['wall_s']} s wall, {runs[name]['cpu_s']} s CPU", flush=True
        )
        listed = out / name / "manifest.json"
        if proc.returncode == 0 and listed.exists():
            manifest[name] = [f"{name}/{f}" for f in json.loads(listed.read_text())["files"]]
    total = {
        "wall_s": round(sum(r["wall_s"] for r in runs.values()), 1),
        "cpu_s": round(sum(r["cpu_s"] for r in runs.values()), 1),
    }
    (out / "run_all.json").write_text(json.dumps({"quick": args.quick, "runs": runs, "total": total}, indent=2))
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    failed = [n for n, r in runs.items() if r["returncode"] != 0]
    print(f"total {total['wall_s']} s wall, {total['cpu_s']} s CPU; failed: {failed or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
