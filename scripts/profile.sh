#!/usr/bin/env bash
# Flame graphs of every hot process of a prediction (issue 14): runs `versus_monolith` (the mesh
# and the Python monolith, alternated in one run) under a system-wide `perf record` with DWARF
# call stacks, then splits the samples by process and writes under target/profile/:
#   <process>.folded  folded stacks (inferno's format; `inferno-diff-folded` compares two runs)
#   <process>.svg     the flame graph
#   summary.txt       CPU-seconds per process and each one's hottest functions (self time)
# Processes: each service by its binary, PostgreSQL's backends together, the monolith, the load
# client (`versus_monolith` itself); `idle` is the CPUs' idle time. Tokio names every worker thread alike, so samples are told
# apart by process id, mapped to a name from the process table polled while the bench runs.
#
# Usage: scripts/profile.sh [CONCURRENCY]   (default 64; one level, no half-peak loop)
# Not part of CI: it needs perf (Debian's linux-perf), builds the release binaries once, and
# writes a few hundred MB of samples.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
level="${1:-64}"
frequency="${MEDAI_PROFILE_HZ:-499}"

command -v perf >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq linux-perf >/dev/null; }
command -v inferno-flamegraph >/dev/null 2>&1 || cargo install inferno --locked --quiet
bash scripts/build-prerequisites.sh
bash scripts/fetch-assets.sh
bash scripts/monolith.sh
# The same unified build as scripts/bench.sh, so the two share every artefact.
cargo build --release --workspace --bins --bench '*' --quiet
bench="$(find target/release/deps -maxdepth 1 -type f -executable -name 'versus_monolith-*' -printf '%T@ %p\n' | sort -n | tail -1 | cut -d' ' -f2)"
[ -n "$bench" ] || { echo "versus_monolith was not built" >&2; exit 1; }

# shellcheck source=scripts/test-servers.sh
source scripts/test-servers.sh
out="target/profile"
rm -rf "$out"
mkdir -p "$out"
poller=""
cleanup() {
  [ -n "$poller" ] && kill "$poller" 2>/dev/null
  stop_test_servers
}
trap cleanup EXIT

( while true; do ps -eo pid=,args= >>"$out/processes.raw"; sleep 0.5; done ) &
poller=$!
perf record --quiet -a -F "$frequency" --call-graph dwarf,8192 -o "$out/perf.data" -- \
  env MEDAI_BENCH_LEVELS="$level" MEDAI_BENCH_HALF_PEAK_SECONDS=0 "$bench" | tee "$out/bench.txt"
kill "$poller"
poller=""
sort -u "$out/processes.raw" >"$out/processes.txt"
rm "$out/processes.raw"

perf script -i "$out/perf.data" -F comm,pid,tid,period,event,ip,sym,dso 2>/dev/null |
  inferno-collapse-perf --pid --all >"$out/all.folded"

python3 - "$out" "$frequency" <<'PYTHON'
import collections, os, re, sys

out, frequency = sys.argv[1], int(sys.argv[2])

def name_of(args):
    program = os.path.basename(args.split()[0]) if args else ""
    if program.startswith("medai-"):
        return program
    if args.startswith("postgres"):
        return "postgres"
    if "versus_monolith" in program:
        return "bench-client"
    if "monolith" in args or "uvicorn" in args:
        return "python-monolith"
    return None

names = {}
for line in open(f"{out}/processes.txt"):
    pid, _, args = line.strip().partition(" ")
    name = name_of(args.strip())
    if name:
        names[pid] = name

stacks = collections.defaultdict(list)
for line in open(f"{out}/all.folded"):
    stack, _, count = line.rstrip("\n").rpartition(" ")
    head, _, frames = stack.partition(";")
    comm, _, pid = head.rpartition("-")
    name = names.get(pid) or {"postgres": "postgres", "swapper": "idle"}.get(comm, "other")
    stacks[name].append((frames, int(count)))

total = sum(count for lines in stacks.values() for _, count in lines)
with open(f"{out}/summary.txt", "w") as summary:
    print(f"{total} samples at {frequency} Hz on every CPU", file=summary)
    for name, lines in sorted(stacks.items(), key=lambda item: -sum(c for _, c in item[1])):
        samples = sum(count for _, count in lines)
        with open(f"{out}/{name}.folded", "w") as folded:
            for frames, count in lines:
                print(f"{frames} {count}", file=folded)
        print(f"\n{name}: {samples / frequency:.1f} CPU-s ({100 * samples / total:.1f} % of samples)",
              file=summary)
        leaves = collections.Counter()
        for frames, count in lines:
            leaf = frames.rsplit(";", 1)[-1]
            leaves[re.sub(r"_\[[kj]\]$", "", leaf)] += count
        for leaf, count in leaves.most_common(12):
            print(f"  {100 * count / samples:5.1f} %  {leaf[:110]}", file=summary)
PYTHON

for folded in "$out"/*.folded; do
  name="$(basename "$folded" .folded)"
  [ "$name" = all ] && continue
  inferno-flamegraph --title "$name ($level concurrent predictions, versus_monolith)" \
    <"$folded" >"$out/$name.svg"
done
cat "$out/summary.txt"
echo "flame graphs: $out/*.svg" >&2
