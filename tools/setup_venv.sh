#!/usr/bin/env bash
# Creates (or reuses) the project's virtual environment and installs what lib_lora and its tests need.
# Usage: tools/setup_venv.sh [runtime|test]   (default: test). Prints the venv's python path on its last line.
# Re-runs are quick: installs are skipped while the requirement files are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
kind="${1:-test}"
venv="${LIB_LORA_VENV:-.venv}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv" >&2
fi
py="$venv/bin/python"
"$py" -c 'import sys; assert sys.version_info >= (3, 10), "lib_lora needs Python 3.10 or newer"'

req="requirements.txt"
[ "$kind" = "test" ] && req="requirements-test.txt"
stamp="$venv/.lib_lora-$kind.stamp"
want="$(cat requirements-torch.txt requirements*.txt "$req" | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  "$py" -m pip install -q --disable-pip-version-check --upgrade pip >&2 || true
  # torch first, pinned: a bare "torch" would pull whatever build the index has.
  "$py" -m pip install -q --disable-pip-version-check -r requirements-torch.txt >&2
  "$py" -m pip install -q --disable-pip-version-check -r "$req" >&2
  # The ldm package the WebUI runs. Its own pins (transformers 4.33, open-clip 2.0) conflict with the WebUI's,
  # which is why the WebUI (and we) install it without dependencies.
  "$py" -m pip install -q --disable-pip-version-check --no-deps "stable-diffusion-sdkit==2.1.5" >&2
  echo "$want" > "$stamp"
fi
echo "$py"
