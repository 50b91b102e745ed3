#!/usr/bin/env bash
# Prepares Triton's own KServe v2 clients for the inference service's conformance tests, and
# the onnx package that builds the light model (scripts/light-model.py). Idempotent.
# - .cache/kserve-venv: tritonclient[grpc] 2.73 from PyPI.
# - .cache/perf-analyzer/perf_analyzer: Triton's load generator. The current perf-analyzer
#   wheel (2.60) needs glibc 2.38 and these machines have 2.36, so it comes from the last
#   tritonclient wheel that bundled it (2.41, built for older glibc). It links libcudart.so.12
#   (the PyPI wheel nvidia-cuda-runtime-cu12; no GPU is used) and libb64 (Debian libb64-0d).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.cache/kserve-venv"
tools="$root/.cache/perf-analyzer"
if [ ! -f "$venv/.complete" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --only-binary=:all: "tritonclient[grpc]==2.73.0" numpy==2.4.6 \
    onnx==1.23.2 nvidia-cuda-runtime-cu12==12.9.79
  touch "$venv/.complete"
fi
if ! ldconfig -p | grep -q libb64.so.0d; then
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libb64-0d >&2
fi
if [ ! -x "$tools/perf_analyzer" ]; then
  work=$(mktemp -d)
  "$venv/bin/pip" download --quiet --no-deps --only-binary=:all: tritonclient==2.41.0 -d "$work"
  (cd "$work" && unzip -q tritonclient-2.41.0-*.whl 'tritonclient-2.41.0.data/data/bin/perf_analyzer')
  mkdir -p "$tools"
  mv "$work/tritonclient-2.41.0.data/data/bin/perf_analyzer" "$tools/perf_analyzer"
  chmod +x "$tools/perf_analyzer"
  rm -rf "$work"
fi
