#!/usr/bin/env bash
# The fault harness of issue 17 (loopback only, bounded in time): the whole mesh on a
# PostgreSQL primary with a synchronous standby and a Redis of its own, a steady load through
# the gateway (predictions, study streams, logins, signatures), and in turn: kill -9 and SIGTERM
# of each service, a PostgreSQL restart, a Redis stop, latency and dropped connections between
# the gateway and the inference service (a TCP proxy in the harness: this kernel has no
# sch_netem for `tc netem`), the ledger's disk (a 16 MiB tmpfs tablespace; needs root) filled,
# and a PostgreSQL failover (kill -9 of the primary, promotion of the standby). Prints one line
# per fault and a table; writes target/bench/chaos.json.
#
#   scripts/chaos.sh            every fault (about 3-6 min on 2 cores)
#   scripts/chaos.sh soak 30    the soak: 30 min at half the measured peak (figures in
#                               target/bench/soak.json)
#
# Debug binaries by default (what the suite runs); MEDAI_CHAOS_PROFILE=release for release.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
profile="${MEDAI_CHAOS_PROFILE:-dev}"
bash scripts/fetch-assets.sh >/dev/null
cargo build --profile "$profile" --workspace --bins --quiet
# shellcheck source=scripts/test-servers.sh
source scripts/test-servers.sh
trap stop_test_servers EXIT
cargo bench --profile "$profile" --workspace --bench chaos -- "$@"
