#!/usr/bin/env bash
# What one gRPC call costs a mesh service in CPU instructions, load-independently: the
# validation service's real binary (its `main`: Prometheus recorder on the admin port, JSON logs
# and OpenTelemetry spans as configured by default) runs under callgrind; a Python client
# outside valgrind opens one mTLS connection as `gateway`, makes WARM_UP calls, zeroes the
# counters, makes CALLS calls, and dumps them. Instructions per call = the dump's total / CALLS;
# the inclusive share of each layer is in the annotate output.
#
#   scripts/callgrind-rpc.sh [BINARY] [CALLS] [CALL]
#     BINARY  default target/release/medai-validation
#     CALLS   default 2000
#     CALL    health (Health/Check: every shared layer, answered by the health layer; default)
#             or validate-empty (ValidateImage with no image: to the handler, INVALID_ARGUMENT)
#   OUT=dir   where the profile and the annotate output go (default target/callgrind-rpc)
#   MODE=cpu  no valgrind: the binary runs natively and the server's utime+stime per call is
#             read from /proc over CALLS calls from CONCURRENCY (default 16) callers.
set -euo pipefail

cd "$(dirname "$0")/.."
BINARY=${1:-target/release/medai-validation}
CALLS=${2:-2000}
CALL=${3:-health}
MODE=${MODE:-callgrind}
CONCURRENCY=${CONCURRENCY:-16}
OUT=${OUT:-target/callgrind-rpc}
PYTHON=${PYTHON:-.cache/kserve-venv/bin/python}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

work=$(mktemp -d)
server_pid=
cleanup() {
    if [[ -n "$server_pid" ]]; then kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

# A throwaway mesh PKI as medai-devpki issues it: ECDSA P-256, SPIFFE URI and DNS SANs.
pki=$work/pki
mkdir -p "$pki"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -subj "/O=MedAI Flow development/CN=MedAI Flow development CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -keyout "$pki/ca-key.pem" -out "$pki/ca.pem" 2>/dev/null
issue() {
    local name=$1
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
        -subj "/O=MedAI Flow development/CN=medai-$name" \
        -keyout "$pki/$name-key.pem" -out "$work/$name.csr" 2>/dev/null
    printf '%s\n' "subjectAltName=URI:spiffe://medai/$name,DNS:medai-$name,DNS:localhost,IP:127.0.0.1" \
        "keyUsage=critical,digitalSignature,keyEncipherment" "extendedKeyUsage=serverAuth,clientAuth" \
        "basicConstraints=critical,CA:FALSE" >"$work/$name.ext"
    openssl x509 -req -in "$work/$name.csr" -CA "$pki/ca.pem" -CAkey "$pki/ca-key.pem" \
        -CAcreateserial -days 2 -extfile "$work/$name.ext" -out "$pki/$name.pem" 2>/dev/null
}
issue validation
issue gateway

export MEDAI_VALIDATION_PROCESS__LISTEN_ADDR=127.0.0.1:0
export MEDAI_VALIDATION_PROCESS__ADMIN_ADDR=127.0.0.1:0
export MEDAI_VALIDATION_PROCESS__ADDRESS_FILE=$work/addresses.json
export MEDAI_VALIDATION_TLS__CA_CERT=$pki/ca.pem
export MEDAI_VALIDATION_TLS__CERT=$pki/validation.pem
export MEDAI_VALIDATION_TLS__KEY=$pki/validation-key.pem

if [[ "$MODE" == callgrind ]]; then
    valgrind --tool=callgrind --callgrind-out-file="$OUT/callgrind.out.%p" \
        "$BINARY" 2>"$OUT/server.log" &
    ready_seconds=300
else
    "$BINARY" 2>"$OUT/server.log" &
    ready_seconds=30
fi
server_pid=$!
for _ in $(seq $((ready_seconds * 10))); do
    [[ -s "$work/addresses.json" ]] && break
    kill -0 "$server_pid" 2>/dev/null || { cat "$OUT/server.log" >&2; exit 1; }
    sleep 0.1
done
address=$("$PYTHON" -c 'import json,sys; print(json.load(open(sys.argv[1]))["grpc"])' "$work/addresses.json")

if [[ "$MODE" == callgrind ]]; then
    rm -f "$OUT"/callgrind.out.*
    # callgrind_control reaches the valgrind process, not a child: same pid here.
    "$PYTHON" scripts/rpc-driver.py "$address" "$pki" medai-validation "$CALLS" \
        --call "$CALL" --callgrind-pid "$server_pid"
    kill "$server_pid"
    wait "$server_pid" 2>/dev/null || true
    server_pid=
    # The dump taken after the calls (the .1 part); the final one at exit is shutdown only.
    profile=$(ls "$OUT"/callgrind.out.*.1 2>/dev/null | head -1)
    total=$(callgrind_annotate "$profile" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1; exit}')
    echo "instructions=$total calls=$CALLS per_call=$((total / CALLS)) call=$CALL binary=$BINARY"
    callgrind_annotate --inclusive=yes --threshold=99.5 "$profile" >"$OUT/inclusive.txt" 2>/dev/null
    callgrind_annotate --threshold=99 "$profile" >"$OUT/self.txt" 2>/dev/null
    echo "profile: $profile; inclusive: $OUT/inclusive.txt; self: $OUT/self.txt"
else
    uptime
    "$PYTHON" scripts/rpc-driver.py "$address" "$pki" medai-validation "$CALLS" \
        --call "$CALL" --concurrency "$CONCURRENCY" --warm-up 500 --cpu-pid "$server_pid"
fi
