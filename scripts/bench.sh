#!/usr/bin/env bash
# Builds the release binaries and runs the benchmark programs; each prints its figures and
# writes them as JSON under target/bench/.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/build-prerequisites.sh
bash scripts/fetch-assets.sh
bash scripts/monolith.sh
# inference's `throughput` bench: KServe's Python model server as its baseline, and Triton's
# perf_analyzer driving the service
bash scripts/kserve-python.sh
bash scripts/kserve-clients.sh
# One build for binaries and benches: `--workspace` everywhere, so cargo unifies features the
# same way for both and builds each crate once (with -p it rebuilt ~100 crates per bench).
# `--bench '*'`, not `--benches`: the latter also builds every workspace library and binary as
# a release test harness: 25 of its 566 units, all of them workspace crates, which no benchmark runs.
cargo build --release --workspace --bins --bench '*' --quiet
# shellcheck source=scripts/test-servers.sh
source scripts/test-servers.sh
trap stop_test_servers EXIT
cargo bench --workspace --bench prediction_latency
cargo bench --workspace --bench token_check
cargo bench --workspace --bench ledger
# inference's and validation's `throughput` benches, both; inference's includes the comparison
# with KServe's Python model server and perf_analyzer's figures (only those sections of it:
# `cargo bench --workspace --bench throughput -- kserve-python perf-analyzer`; validation's
# bench ignores the arguments)
cargo bench --workspace --bench throughput
cargo bench --workspace --bench gateway_throughput
cargo bench --workspace --bench versus_monolith
