#!/usr/bin/env bash
# Sets up the test environment (tools/setup_venv.sh; tools/setup_browser.sh for the browser check), then runs
# the linter and the whole test suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
py="$(bash tools/setup_venv.sh test | tail -n 1)"
bash tools/setup_browser.sh
"$py" -m ruff check .
"$py" -m pytest -q -p no:cacheprovider "$@"
