#!/bin/sh
# Browser tests drive Debian's Chromium (a test tool's own browser download fails here) and run
# axe-core (from the npm registry, pinned in tests/browser/axe/package-lock.json) in every page.
set -e
cd "$(dirname "$0")/.."
if [ ! -x /usr/bin/chromium ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "installing Debian's chromium for the browser tests"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 || {
      apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null
    }
  else
    echo "warning: /usr/bin/chromium is missing and cannot be installed here; browser tests will fail" >&2
  fi
fi
AXE=tests/browser/axe
if [ ! -f "$AXE/node_modules/axe-core/axe.min.js" ] || [ "$AXE/package-lock.json" -nt "$AXE/node_modules/.package-lock.json" ]; then
  if command -v npm >/dev/null 2>&1; then
    echo "installing axe-core for the browser tests"
    npm ci --prefix "$AXE" --no-audit --no-fund --silent
  else
    echo "warning: npm is missing; the browser tests' accessibility checks will fail" >&2
  fi
fi
