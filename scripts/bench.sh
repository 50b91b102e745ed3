#!/usr/bin/env bash
# Builds the release binaries and runs the benchmark programs; each prints its figures and
# writes them as JSON under target/bench/.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/build-prerequisites.sh
bash scripts/fetch-assets.sh
bash scripts/monolith.sh
cargo build --release --workspace --bins --quiet
# shellcheck source=scripts/test-servers.sh
source scripts/test-servers.sh
trap stop_test_servers EXIT
cargo bench -p medai-e2e --bench prediction_latency
cargo bench -p medai-e2e --bench token_check
cargo bench -p medai-e2e --bench ledger
cargo bench -p medai-inference --bench throughput
cargo bench -p medai-e2e --bench gateway_throughput
cargo bench -p medai-e2e --bench versus_monolith
cargo bench -p medai-validation --bench throughput
