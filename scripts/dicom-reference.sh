#!/usr/bin/env bash
# Prepares the reference decoder's output for the validation tests: a Python venv with pinned
# pydicom, numpy and pylibjpeg (from PyPI) decodes every DICOM test file into
# .cache/dicom-reference/. Idempotent.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.cache/dicom-reference-venv"
out="$root/.cache/dicom-reference"
# The reference is made again whenever the script that makes it changes.
stamp="$(sha256sum "$root/scripts/dicom-reference.py" | cut -c1-16)"
if [ "$(cat "$out/.complete" 2>/dev/null)" = "$stamp" ]; then exit 0; fi
rm -rf "$out"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --only-binary=:all: pydicom==3.0.1 numpy==2.4.6 pylibjpeg==2.1.0 \
    pylibjpeg-libjpeg==2.5.0 pylibjpeg-openjpeg==2.6.0
fi
"$venv/bin/python" -W ignore "$root/scripts/dicom-reference.py" "$out" "$root"/.cache/dicom/*.dcm
echo "$stamp" > "$out/.complete"
