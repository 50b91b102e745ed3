#!/usr/bin/env bash
# Prepares the Python venv with Triton's own KServe v2 client (tritonclient[grpc] from PyPI),
# used by the inference service's conformance test, and the onnx package that builds the light
# model (scripts/light-model.py). Idempotent.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.cache/kserve-venv"
if [ -f "$venv/.complete" ]; then exit 0; fi
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --only-binary=:all: "tritonclient[grpc]==2.73.0" numpy==2.4.6 \
  onnx==1.23.2
touch "$venv/.complete"
