#!/usr/bin/env bash
# Installs what the PACS tests (tests/tests/pacs.rs) drive the bridge with, from Debian's
# packages, if missing: Orthanc (a real PACS, run by the tests as a throwaway process with its
# own configuration; the system service is never started) and dcmtk (storescu as a modality,
# dsrdump to check the Structured Reports). Idempotent.
set -euo pipefail
missing=()
command -v Orthanc >/dev/null 2>&1 || [ -x /usr/sbin/Orthanc ] || missing+=(orthanc)
for tool in storescu echoscu dsrdump dcmdump; do
  if ! command -v "$tool" >/dev/null 2>&1; then missing+=(dcmtk); break; fi
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing ${missing[*]}" >&2
  apt-get update -qq >&2
  # policy-rc.d may refuse to start Orthanc's system service; the tests never use it.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi
