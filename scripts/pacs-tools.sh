#!/usr/bin/env bash
# Installs what the PACS tests (tests/tests/pacs.rs) drive the bridge with, from Debian's
# packages, if missing: Orthanc (a real PACS, run by the tests as a throwaway process with its
# own configuration; the system service is never started) with its DICOMweb plugin (STOW-RS both
# ways, issue 15), stunnel (Orthanc's https front in the STOW-RS-over-https test), and dcmtk (storescu as a modality, dsrdump to check the Structured Reports);
# and from PyPI, pinned, highdicom in .cache/pacs-venv (reads the reports back as an AI result
# producer's toolkit would). Idempotent.
set -euo pipefail
missing=()
command -v Orthanc >/dev/null 2>&1 || [ -x /usr/sbin/Orthanc ] || missing+=(orthanc)
[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || missing+=(orthanc-dicomweb)
# stunnel: the https front of Orthanc in services/bridge/tests/scp.rs (STOW-RS out over https).
command -v stunnel4 >/dev/null 2>&1 || missing+=(stunnel4)
for tool in storescu echoscu dsrdump dcmdump; do
  if ! command -v "$tool" >/dev/null 2>&1; then missing+=(dcmtk); break; fi
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing ${missing[*]}" >&2
  apt-get update -qq >&2
  # policy-rc.d may refuse to start Orthanc's system service; the tests never use it.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.cache/pacs-venv"
if ! "$venv/bin/python" -c 'import highdicom' >/dev/null 2>&1; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --only-binary=:all: highdicom==0.28.2 pydicom==3.0.1 \
    numpy==2.4.6 pillow==13.0.0 pyjpegls==1.5.1 typing_extensions==4.16.0 packaging==26.4 >&2
fi
