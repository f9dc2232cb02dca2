#!/usr/bin/env bash
# Sets up the runtime environment (tools/setup_venv.sh) and runs the headless demo: python -m lib_lora demo.
# Extra arguments go to the demo, e.g. --output-dir DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
py="$(bash tools/setup_venv.sh runtime | tail -n 1)"
exec "$py" -m lib_lora demo "$@"
