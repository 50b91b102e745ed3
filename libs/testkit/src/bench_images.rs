//! The images the benchmarks send, made in one place so every benchmark that compares figures
//! sends the same bytes.

/// What [`textured_png`] is, for a benchmark's output.
pub const TEXTURED_PNG_DESCRIPTION: &str =
    "256x256 8-bit grey PNG with texture (synthetic), decoded and resized to the model's 64x64";

/// A 256×256 grey PNG with texture (synthetic), so decoding and resizing to the light model's
/// 64×64 input do real work: the image issue 14's comparison with the Python monolith sends.
pub fn textured_png() -> Vec<u8> {
    let pixels: Vec<u8> = (0..256u32 * 256)
        .map(|index| {
            let (x, y) = (index % 256, index / 256);
            ((x * 7 + y * 13 + (x * y) % 29) % 251) as u8
        })
        .collect();
    grey_png(256, pixels)
}

/// A grey PNG of pseudo-random noise (so it does not compress away).
pub fn noise_png(side: u32, seed: u32) -> Vec<u8> {
    let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    let pixels: Vec<u8> = (0..side * side)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            (state >> 24) as u8
        })
        .collect();
    grey_png(side, pixels)
}

/// A 64×64 grey PNG (synthetic), already the light model's input size; `seed` varies its bytes.
pub fn light_png(seed: u8) -> Vec<u8> {
    let side = 64u32;
    let pixels: Vec<u8> = (0..side * side)
        .map(|index| (index as u8).wrapping_mul(31).wrapping_add(seed))
        .collect();
    grey_png(side, pixels)
}

/// `pixels` (row by row, one byte each) as a `side`×`side` grey PNG, encoded as the `image`
/// crate does by default.
fn grey_png(side: u32, pixels: Vec<u8>) -> Vec<u8> {
    let image = image::GrayImage::from_raw(side, side, pixels).expect("image");
    let mut png = std::io::Cursor::new(Vec::new());
    image
        .write_to(&mut png, image::ImageFormat::Png)
        .expect("encode png");
    png.into_inner()
}
