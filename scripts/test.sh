#!/usr/bin/env bash
# The README's test command: set up (scripts/setup.sh), install what only the tests need, run the whole suite.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -x tests/test_families.py`).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
bash scripts/setup.sh
# headless Chromium renders the HTML report in tests/test_cli_report.py and drives kaleido's PNG/SVG export
if ! command -v chromium >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
        echo "scripts/test.sh: the report tests need Chromium; install it (Debian: sudo apt-get install chromium)" >&2
        exit 2
    fi
fi
exec .venv/bin/python -m pytest -q "$@"
