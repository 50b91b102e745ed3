#!/usr/bin/env bash
# Prepares .cache/monolith-venv: the Python monolith the mesh is compared with in
# tests/benches/versus_monolith.rs (FastAPI, uvicorn with uvloop/httptools, ONNX Runtime,
# Pillow, psycopg with a pool, PyJWT for EdDSA tokens). Idempotent.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.cache/monolith-venv"
if [ ! -f "$venv/.complete" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --only-binary=:all: fastapi==0.115.12 "uvicorn[standard]==0.34.2" \
    onnxruntime==1.31.1 numpy==2.4.6 pillow==11.2.1 "psycopg[binary,pool]==3.2.9" \
    "pyjwt[crypto]==2.10.1"
  touch "$venv/.complete"
fi
