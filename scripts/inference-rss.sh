#!/usr/bin/env bash
# The inference process's resident memory (issue 14): starts the mesh with `medai up` (embedded
# defaults, a state folder of its own, the gateway on a free port), reads VmRSS of the inference
# process once it serves, sends four predictions of .cache/dicom/MR_small.dcm through the
# gateway one after another, reads it again, then eight at once (batched), reads it again, and
# stops the mesh. Prints one line.
#
#   scripts/inference-rss.sh [BINARY_DIR] [MODEL_REPOSITORY]     (defaults: target/release, models)
#
# Build first (`cargo build --release --workspace --bins`). The launcher gives inference its
# GLIBC_TUNABLES unless the caller's environment names one: `GLIBC_TUNABLES= scripts/…` runs it
# with glibc's defaults. A copy of the repository whose manifests say
# `[execution] cpu_memory_arena = true` shows ONNX Runtime's arena.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-target/release}
repo=${2:-models}
state=$(mktemp -d)
trap 'kill -INT "$launcher" 2>/dev/null; wait "$launcher" 2>/dev/null; rm -rf "$state"' EXIT
"$bin/medai" --state-dir "$state" -o json up --port 0 --model-repository "$repo" \
  > "$state/up.json" 2> "$state/up.err" &
launcher=$!
for _ in $(seq 1 600); do
  [ -s "$state/up.json" ] && break
  kill -0 "$launcher" 2>/dev/null || { cat "$state/up.err" >&2; exit 1; }
  sleep 0.5
done
field() { python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(eval(sys.argv[2]))' "$state/up.json" "$1"; }
pid=$(field 'd["services"]["inference"]["pid"]')
gateway=$(field 'd["gateway"]')
password_file=$(field 'd["admin_password_file"]')
rss() { awk '/^VmRSS/ { printf "%.1f", $2 / 1024 }' "/proc/$pid/status"; }
idle=$(rss)
"$bin/medai" --state-dir "$state" --gateway "$gateway" login --username admin --password-stdin \
  < "$password_file" > /dev/null
for _ in 1 2 3 4; do
  "$bin/medai" --state-dir "$state" --gateway "$gateway" infer .cache/dicom/MR_small.dcm > /dev/null
done
after=$(rss)
# Eight at once: the batcher joins them into batches of up to the manifest's max_batch_size,
# the largest runs the model makes.
burst_pids=()
for _ in 1 2 3 4 5 6 7 8; do
  "$bin/medai" --state-dir "$state" --gateway "$gateway" infer .cache/dicom/MR_small.dcm > /dev/null &
  burst_pids+=($!)
done
wait "${burst_pids[@]}"
burst=$(rss)
# glibc ends each tunable it applies with a NUL written into the environment string itself, so
# /proc shows GLIBC_TUNABLES cut at each `:`; the pieces after it (`glibc.…`) are joined back.
tunables=$(tr '\0' '\n' < "/proc/$pid/environ" | awk '/^GLIBC_TUNABLES=/ { sub(/^GLIBC_TUNABLES=/, ""); t = $0; on = 1; next }
  on && /^glibc\./ { t = t ":" $0; next } { on = 0 } END { print t }')
echo "inference RSS: idle ${idle} MiB, after 4 predictions ${after} MiB, after 8 at once ${burst} MiB (GLIBC_TUNABLES as read back: '${tunables}')"
