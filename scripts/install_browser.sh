#!/usr/bin/env bash
# Installs Debian's chromium for the report's browser test (tests/test_report_site.py drives it through
# Playwright with executable_path: no browser download). Root on Debian only; otherwise the test skips and
# says how to get it. Skipped when a chromium is already on PATH.
set -u
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "note: no chromium: the report's browser test will skip (install it with 'sudo apt-get install chromium')" >&2
  exit 0
fi
echo "installing Debian package chromium (for the report's browser test) ..."
APT="apt-get -o DPkg::Lock::Timeout=300 -o Acquire::Retries=3"
$APT install -y -q --no-install-recommends chromium >/dev/null 2>&1 || \
  { $APT update -q >/dev/null 2>&1 && $APT install -y -q --no-install-recommends chromium >/dev/null; } || \
  echo "warning: apt-get could not install chromium; the report's browser test will skip" >&2
exit 0
