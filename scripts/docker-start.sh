#!/bin/sh
# Container entry point: wait for the database, migrate, then serve.
set -eu
tries=0
until salesmsg-connect db current >/dev/null 2>&1; do
  tries=$((tries + 1))
  if [ "$tries" -ge 60 ]; then echo "database not reachable after 60 s" >&2; exit 1; fi
  sleep 1
done
salesmsg-connect db upgrade
# one scrape of /metrics sums every worker process: their files in one directory, emptied at start
export PROMETHEUS_MULTIPROC_DIR="${PROMETHEUS_MULTIPROC_DIR:-/tmp/smc-metrics}"
rm -rf "$PROMETHEUS_MULTIPROC_DIR" && mkdir -p "$PROMETHEUS_MULTIPROC_DIR"
exec salesmsg-connect serve --host 0.0.0.0 --port "${PORT:-8000}" --workers "${WORKERS:-2}"
