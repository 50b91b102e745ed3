//! Any bytes, as any format: every decoder must answer with an image or a stable refusal.
//!
//! Findings: aborts, out-of-memory, timeouts, memory errors, and any panic in this project's
//! code. A panic inside a third-party codec is contained exactly as the service contains it
//! (decoding runs on the blocking pool, so the caller gets IMAGE_UNDECODABLE): it is counted
//! and printed once per place, not treated as a crash, so the bounded CI run gates on what would
//! hurt the service. Long runs list those places for reporting upstream.

#![no_main]

use std::collections::BTreeSet;
use std::panic::{self, AssertUnwindSafe};
use std::sync::Mutex;

use libfuzzer_sys::fuzz_target;
use medai_imaging::{FramePolicy, ImageLimits};
use medai_imaging::decode::{
    SourceFormat, decode_image, decode_planned, decode_stored_samples, plan_decode,
};

/// Where third-party codecs panicked so far (file:line), printed when first seen.
static CONTAINED: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());
/// The location of the panic being unwound, set by the hook below.
static LAST_PANIC: Mutex<Option<String>> = Mutex::new(None);

fn decode_all(data: &[u8]) {
    // Small limits keep each input cheap; the limits themselves are what is being exercised.
    // max_bytes leaves room for the element-count limit (200,000 headers of 8 bytes) to be
    // reached inside a deflated data set.
    let limits = ImageLimits {
        max_bytes: 2 << 20,
        min_side: 1,
        max_side: 1024,
        max_frames: 4,
        max_decoded_bytes: 16 << 20,
    };
    // The service's path: the header plan (structure walk, nesting and element bounds, capped
    // inflate, declared sizes), then the decode it admits.
    for declared in [None, Some(SourceFormat::Dicom)] {
        if let Ok(plan) = plan_decode(data, declared, &limits) {
            // Never more than the limits allow: the data set (at most max_bytes besides the
            // pixels), the declared pixels, and working copies of one frame (8 bytes a value).
            let most = limits.max_bytes as u64 + 1 + 9 * limits.max_decoded_bytes;
            assert!(
                plan.memory_bytes() <= most,
                "a plan beyond the limits: {plan:?}"
            );
            // The middle frame too: a declared frame count the pixel data does not hold must be
            // refused before a frame past the data is looked for.
            let _ = decode_planned(
                data,
                &plan,
                &limits,
                Some(b"fuzz patient-key secret".as_slice()),
                FramePolicy::MiddleFrame,
            );
        }
    }
    let _ = decode_image(data, None, &limits);
    let _ = decode_stored_samples(data, &limits);
}

fuzz_target!(|data: &[u8]| {
    // libFuzzer's hook aborts on any panic; for the duration of this input, record where it
    // happened instead, and decide below.
    let abort_hook = panic::take_hook();
    panic::set_hook(Box::new(|info| {
        let place = info
            .location()
            .map(|location| format!("{}:{}", location.file(), location.line()))
            .unwrap_or_default();
        *LAST_PANIC
            .lock()
            .unwrap_or_else(|poison| poison.into_inner()) = Some(place);
    }));
    let outcome = panic::catch_unwind(AssertUnwindSafe(|| decode_all(data)));
    panic::set_hook(abort_hook);
    if outcome.is_err() {
        let place = LAST_PANIC
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .take()
            .unwrap_or_default();
        let third_party = place.contains("/.cargo/registry/") || place.contains("/rustc/");
        if !third_party {
            panic!("panic in this project's code at {place}");
        }
        let mut contained = CONTAINED
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        if contained.insert(place.clone()) {
            eprintln!("contained third-party codec panic at {place}");
        }
    }
});
