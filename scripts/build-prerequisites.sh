#!/usr/bin/env bash
# What building the workspace needs beyond Rust: cmake and a C++ compiler for CharLS (the
# JPEG-LS codec dicom-rs links). Installs cmake from Debian's packages if missing. Idempotent.
set -euo pipefail
if ! command -v cmake >/dev/null 2>&1; then
  echo "installing cmake (CharLS, the JPEG-LS codec, is built from source)" >&2
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cmake >&2
fi
if ! command -v c++ >/dev/null 2>&1; then
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++ >&2
fi
