#!/usr/bin/env bash
# Installs promtool (Prometheus' own checker: `check metrics` for every service's exposition
# in tests/tests/metrics_conventions.rs, `check rules` for the chart's PrometheusRule in
# scripts/chart-checks.sh) into .cache/tools/, pinned: the binary of Debian's prometheus
# package at the version below, downloaded and unpacked, never installed system-wide.
# Idempotent; prints the binary's path.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
version="2.42.0+ds-5+deb12u1"
target="$root/.cache/tools/promtool-2.42.0"
if [ ! -x "$target/promtool" ]; then
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  (cd "$work" && apt-get download "prometheus=$version" >/dev/null 2>&1) || {
    apt-get update -qq >&2
    (cd "$work" && apt-get download "prometheus=$version" >&2)
  }
  dpkg-deb -x "$work"/prometheus_*.deb "$work/unpacked"
  mkdir -p "$target"
  install -m 0755 "$work/unpacked/usr/bin/promtool" "$target/promtool"
fi
"$target/promtool" --version >/dev/null
echo "$target/promtool"
