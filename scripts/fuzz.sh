#!/usr/bin/env bash
# Fuzzes the image decoders with cargo-fuzz (libFuzzer + AddressSanitizer) for SECONDS (default
# 60), seeded with real DICOM files. The stable toolchain needs RUSTC_BOOTSTRAP=1 for the
# sanitizer flags. Findings land in services/validation/fuzz/artifacts/.
#
# First finding, now fixed and kept as services/validation/tests/data/fuzz-huge-declared-element.dcm:
# a small deflated file declaring a multi-gigabyte element made the parser reserve it up front.
# Second: a panic in dicom-rs's RLE decoder (tests/data/fuzz-rle-decoder-panic.dcm), now refused
# by a structural check of RLE frames. Third: an element with an unknown VR, which dicom-rs reads
# as UN with a 32-bit length, declaring 3 GB in a 6 KB file (tests/data/fuzz-unknown-vr-huge-
# length.dcm); the length walk now reads VRs as dicom-rs does. Fourth: a panic in dicom-rs's
# JPEG 2000 adapter (tests/data/fuzz-jpeg2000-decoder-panic.dcm), contained as in the service.
# Fifth: a deflated file with a foreign element inside its meta group (tests/data/fuzz-deflate-
# after-meta-group-length.dcm); the length walk ended the group elsewhere than dicom-rs and
# inflated the wrong bytes, while dicom-rs reserved 2.5 GB. The walk now follows the group length.
# Issue 12: sequences nested thousands deep overflowed dicom-rs's recursive parser (an abort);
# deflate bombs were inflated in full before their declared size was refused. Both are now
# refused by the pre-parse walk, and seeded (services/validation/fuzz/hostile_seeds.py).
# Panics inside third-party codecs are contained and listed ("contained third-party codec
# panic at …"), not crashes; panics in this project's code, aborts and OOM are crashes.
# Resident memory is capped at 2 GiB and single allocations at 4 GiB. Leak detection is off:
# jpeg-decoder ends its worker threads after returning, so their thread-locals are still live
# when LeakSanitizer checks; a real leak would show as growth against the memory cap instead.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
seconds="${1:-60}"
bash scripts/build-prerequisites.sh
bash scripts/fetch-assets.sh
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked --quiet
corpus=services/validation/fuzz/corpus/decode
mkdir -p "$corpus"
cp .cache/dicom/MR_small.dcm .cache/dicom/SC_rgb_rle.dcm .cache/dicom/MR_small_jp2klossless.dcm \
   .cache/dicom/SC_rgb_jpeg_gdcm.dcm .cache/dicom/image_dfl.dcm .cache/dicom/CT_small.dcm \
   .cache/dicom/JPGExtended.dcm .cache/dicom/SC_ybr_full_422_uncompressed.dcm \
   .cache/dicom/ExplVR_BigEnd.dcm .cache/dicom/SC_jpeg_no_color_transform.dcm "$corpus"/
# Hostile shapes the service refuses from headers (nesting past the limit, too many elements,
# deflate bombs, PNG/JPEG declaring huge sides), so the run starts next to each check.
python3 services/validation/fuzz/hostile_seeds.py "$corpus" .cache/dicom/SC_jpeg_no_color_transform.dcm
RUSTC_BOOTSTRAP=1 cargo fuzz run --fuzz-dir services/validation/fuzz decode -- \
  -max_total_time="$seconds" -rss_limit_mb=2048 -malloc_limit_mb=4096 -detect_leaks=0
