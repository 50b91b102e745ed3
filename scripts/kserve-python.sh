#!/usr/bin/env bash
# Prepares .cache/kserve-python-venv: KServe's own Python model server (PyPI kserve 0.21.0, no
# extras) with ONNX Runtime, the baseline that services/inference/benches/throughput.rs measures
# in the same run as the inference service (scripts/kserve-python/model.py). Every package is
# pinned in scripts/kserve-python/requirements.txt; binary wheels only. Idempotent.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.cache/kserve-python-venv"
requirements="$root/scripts/kserve-python/requirements.txt"
# A changed pin list makes a new venv, so the baseline is always what the file says.
stamp="$(sha256sum "$requirements" | cut -d' ' -f1)"
if [ "$(cat "$venv/.complete" 2>/dev/null)" != "$stamp" ]; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --no-cache-dir --only-binary=:all: -r "$requirements"
  echo "$stamp" > "$venv/.complete"
fi
