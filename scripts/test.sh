#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: fetches ONNX Runtime, the model, the DICOM
# test files and Triton's Python client if missing, lints the protos, starts its own PostgreSQL and Redis on free ports,
# checks formatting and lints, builds every binary, and runs every test.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
# Each phase is announced with the seconds since the start, so a slow CI run says where it went.
phase() { echo "== [+${SECONDS}s] $*" >&2; }

phase "prerequisites and assets"
bash scripts/build-prerequisites.sh
bash scripts/fetch-assets.sh
bash scripts/dicom-reference.sh
bash scripts/kserve-clients.sh
bash scripts/pacs-tools.sh
# promtool: tests/tests/metrics_conventions.rs runs `promtool check metrics` on every service.
bash scripts/promtool.sh >/dev/null

phase "buf lint"
if ! buf_output=$(npx --yes @bufbuild/buf@1.75.0 lint 2>&1); then
  echo "$buf_output" | grep -v '^npm warn' >&2
  echo "buf lint failed" >&2
  exit 1
fi

# helm lint --strict, kubernetes-validate, hadolint, k8s/ rendered from the chart.
phase "chart checks"
bash scripts/chart-checks.sh

phase "cargo fmt --check"
cargo fmt --all -- --check

# shellcheck source=scripts/test-servers.sh
source scripts/test-servers.sh
trap stop_test_servers EXIT

phase "cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings

# The binaries the whole-mesh tests start and the test binaries, in one build so both cores stay
# busy across the boundary; nextest then finds every test binary fresh.
phase "cargo build (the binaries the whole-mesh tests start, and every test binary)"
cargo build --workspace --bins --tests --quiet

phase "cargo nextest run (each test in its own process; .config/nextest.toml)"
command -v cargo-nextest >/dev/null 2>&1 || cargo install cargo-nextest --locked --quiet
cargo nextest run --workspace --no-fail-fast "$@"
phase "suite done"
