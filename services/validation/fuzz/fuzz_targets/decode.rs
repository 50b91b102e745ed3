//! Any bytes, as any format: every decoder must answer with an image or a stable refusal.
//! A panic is a finding (the service would turn it into IMAGE_UNDECODABLE, but a decoder that
//! panics is a decoder to fix); so are aborts, overflows and memory errors.

#![no_main]

use libfuzzer_sys::fuzz_target;
use medai_validation::ImageLimits;
use medai_validation::decode::{SourceFormat, decode_image, decode_stored_samples};

fuzz_target!(|data: &[u8]| {
    // Small limits keep each input cheap; the limits themselves are what is being exercised.
    let limits = ImageLimits {
        max_bytes: 1 << 20,
        min_side: 1,
        max_side: 1024,
        max_frames: 4,
        max_decoded_bytes: 16 << 20,
    };
    let _ = decode_image(data, None, &limits);
    let _ = decode_image(data, Some(SourceFormat::Dicom), &limits);
    let _ = decode_stored_samples(data, &limits);
});
