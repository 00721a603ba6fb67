#!/bin/sh
# Browser tests drive Debian's Chromium (a test tool's own browser download fails here).
set -e
if [ -x /usr/bin/chromium ]; then exit 0; fi
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "installing Debian's chromium for the browser tests"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 || {
    apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null
  }
else
  echo "warning: /usr/bin/chromium is missing and cannot be installed here; browser tests will fail" >&2
fi
