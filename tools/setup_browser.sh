#!/usr/bin/env bash
# Makes sure Debian's Chromium is present for the browser check (tests/test_webui_browser.py), which drives it with
# Playwright's Python API (no browser download). Installs the `chromium` package with apt-get when missing and when
# running as root; otherwise prints why not and leaves the browser test to skip with that reason.
set -uo pipefail
if [ -x /usr/bin/chromium ]; then
  exit 0
fi
if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null; then
  echo "setup_browser: /usr/bin/chromium missing and not root with apt-get; the browser test will skip" >&2
  exit 0
fi
echo "setup_browser: installing Debian chromium (once)..." >&2
export DEBIAN_FRONTEND=noninteractive
if ! apt-get install -y -q --no-install-recommends chromium >/tmp/lib_lora_apt.log 2>&1; then
  apt-get update -q >/tmp/lib_lora_apt.log 2>&1 && \
    apt-get install -y -q --no-install-recommends chromium >>/tmp/lib_lora_apt.log 2>&1 || \
    echo "setup_browser: apt-get install chromium failed (see /tmp/lib_lora_apt.log); the browser test will skip" >&2
fi
exit 0
