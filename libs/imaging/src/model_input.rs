//! The resize of a canonical image to a model's input size: bicubic (Catmull-Rom), in the
//! image's own sample type. One implementation for the whole mesh: validation runs it when the
//! gateway names the model's input size (so only the model-sized image crosses the mesh), and
//! inference runs it on an image that arrives at another size. Either way a model sees the same
//! samples.
//!
//! It is a separable filter over the image's real channels and gives exactly the samples
//! `image`'s `resize_exact(.., CatmullRom)` gives (the same weights, sums in the same order, the
//! same rounding), without that routine's per-pixel four-channel float conversions.

use image::{DynamicImage, GrayImage, ImageBuffer, Luma, RgbImage};

/// The width and height a model takes its input at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModelInputSize {
    pub width: u32,
    pub height: u32,
}

/// A canonical buffer (row-major, channels interleaved, 16-bit samples little-endian) as an
/// image, for the layouts a model input is made from: grey 8-bit, RGB 8-bit, grey 16-bit.
/// `None` for any other layout or a buffer that does not match its declared size.
pub fn canonical_to_image(
    width: u32,
    height: u32,
    channels: u32,
    bit_depth: u32,
    pixels: Vec<u8>,
) -> Option<DynamicImage> {
    match (channels, bit_depth) {
        (1, 8) => GrayImage::from_raw(width, height, pixels).map(DynamicImage::ImageLuma8),
        (3, 8) => RgbImage::from_raw(width, height, pixels).map(DynamicImage::ImageRgb8),
        (1, 16) => {
            if !pixels.len().is_multiple_of(2) {
                return None;
            }
            ImageBuffer::<Luma<u16>, Vec<u16>>::from_raw(width, height, little_endian(&pixels))
                .map(DynamicImage::ImageLuma16)
        }
        _ => None,
    }
}

/// `pixels` (a canonical `width × height` buffer of `channels` samples at `bit_depth`) resized
/// to `to`, in the same layout. `None` for a layout [`canonical_to_image`] does not take or a
/// buffer that does not match its declared size.
pub fn resize_canonical(
    pixels: &[u8],
    (width, height): (u32, u32),
    (channels, bit_depth): (u32, u32),
    to: ModelInputSize,
) -> Option<Vec<u8>> {
    let expected =
        u64::from(width) * u64::from(height) * u64::from(channels) * u64::from(bit_depth / 8);
    if width == 0 || height == 0 || to.width == 0 || to.height == 0 {
        return None;
    }
    if u64::try_from(pixels.len()).ok()? != expected {
        return None;
    }
    let from = (width, height);
    let to = (to.width, to.height);
    match (channels, bit_depth) {
        (1 | 3, 8) => Some(resize_samples::<u8>(
            rows_of(pixels, channels as usize, width, f32::from),
            channels as usize,
            from,
            to,
        )),
        (1, 16) => {
            // Each row's samples straight from their little-endian bytes: no copy of the image
            // as 16-bit samples first.
            let row_bytes = width as usize * 2;
            let input_row = |y: usize, into: &mut [f32]| {
                let bytes = &pixels[y * row_bytes..(y + 1) * row_bytes];
                for (value, pair) in into.iter_mut().zip(bytes.as_chunks::<2>().0) {
                    *value = f32::from(u16::from_le_bytes(*pair));
                }
            };
            let resized = resize_samples::<u16>(input_row, 1, from, to);
            Some(
                resized
                    .iter()
                    .flat_map(|sample| sample.to_le_bytes())
                    .collect(),
            )
        }
        _ => None,
    }
}

/// The function that fills a row's floats from `samples` (`width` pixels of `channels`
/// samples a row), for [`resize_samples`].
fn rows_of<T: Copy>(
    samples: &[T],
    channels: usize,
    width: u32,
    to_f32: impl Fn(T) -> f32,
) -> impl Fn(usize, &mut [f32]) {
    let row = width as usize * channels;
    move |y, into| {
        for (value, &sample) in into.iter_mut().zip(&samples[y * row..(y + 1) * row]) {
            *value = to_f32(sample);
        }
    }
}

/// `image` resized to `new_width × new_height` with the Catmull-Rom filter, in its own colour
/// type.
pub fn resize_catmull_rom(image: &DynamicImage, new_width: u32, new_height: u32) -> DynamicImage {
    let from = (image.width(), image.height());
    let to = (new_width, new_height);
    let resized = match image {
        DynamicImage::ImageLuma8(grey) => GrayImage::from_raw(
            new_width,
            new_height,
            resize_samples::<u8>(rows_of(grey.as_raw(), 1, from.0, f32::from), 1, from, to),
        )
        .map(DynamicImage::ImageLuma8),
        DynamicImage::ImageRgb8(rgb) => RgbImage::from_raw(
            new_width,
            new_height,
            resize_samples::<u8>(rows_of(rgb.as_raw(), 3, from.0, f32::from), 3, from, to),
        )
        .map(DynamicImage::ImageRgb8),
        DynamicImage::ImageLuma16(grey) => ImageBuffer::<Luma<u16>, Vec<u16>>::from_raw(
            new_width,
            new_height,
            resize_samples::<u16>(rows_of(grey.as_raw(), 1, from.0, f32::from), 1, from, to),
        )
        .map(DynamicImage::ImageLuma16),
        _ => None,
    };
    resized.unwrap_or_else(|| {
        image.resize_exact(
            new_width,
            new_height,
            image::imageops::FilterType::CatmullRom,
        )
    })
}

fn little_endian(bytes: &[u8]) -> Vec<u16> {
    bytes
        .chunks_exact(2)
        .map(|pair| u16::from_le_bytes([pair[0], pair[1]]))
        .collect()
}

/// A sample type the resize reads and writes.
trait Sample: Copy {
    const LARGEST: f32;
    /// Clamped to the type's range and rounded half away from zero, as `image` rounds.
    fn from_f32(value: f32) -> Self;
}

impl Sample for u8 {
    const LARGEST: f32 = 255.0;
    fn from_f32(value: f32) -> Self {
        round_clamped(value, Self::LARGEST) as u8
    }
}

impl Sample for u16 {
    const LARGEST: f32 = 65535.0;
    fn from_f32(value: f32) -> Self {
        round_clamped(value, Self::LARGEST) as u16
    }
}

/// `value.clamp(0.0, largest).round()` (half away from zero) as an integer, inline instead of
/// a call to libm's `roundf`: on `0..=largest` (at most 65535) the integer part is exact and so
/// is the fraction `value − integer part`, so comparing that fraction with one half rounds
/// exactly as `round` does. NaN becomes 0, as `round(NaN) as u8` does.
///
/// The integer part is taken through `i32` (exact on that range, NaN again 0): a conversion
/// SSE2 does four lanes at a time, where one to `u32` is a sequence per lane.
#[inline]
fn round_clamped(value: f32, largest: f32) -> u32 {
    let value = value.clamp(0.0, largest);
    let whole = value as i32;
    (whole + i32::from(value - whole as f32 >= 0.5)) as u32
}

/// The Catmull-Rom cubic (Mitchell–Netravali B = 0, C = 0.5), as `image` computes it.
fn catmull_rom(x: f32) -> f32 {
    let (b, c) = (0.0f32, 0.5f32);
    let a = x.abs();
    let k = if a < 1.0 {
        (12.0 - 9.0 * b - 6.0 * c) * a.powi(3)
            + (-18.0 + 12.0 * b + 6.0 * c) * a.powi(2)
            + (6.0 - 2.0 * b)
    } else if a < 2.0 {
        (-b - 6.0 * c) * a.powi(3)
            + (6.0 * b + 30.0 * c) * a.powi(2)
            + (-12.0 * b - 48.0 * c) * a
            + (8.0 * b + 24.0 * c)
    } else {
        0.0
    };
    k / 6.0
}

/// For each output position along one axis: the first input position and the normalised
/// weights of the inputs it reads.
fn axis_weights(input: u32, output: u32) -> Vec<(usize, Vec<f32>)> {
    const SUPPORT: f32 = 2.0;
    let ratio = input as f32 / output as f32;
    let scale = if ratio < 1.0 { 1.0 } else { ratio };
    let reach = SUPPORT * scale;
    (0..output)
        .map(|out| {
            let centre = (out as f32 + 0.5) * ratio;
            let left = ((centre - reach).floor() as i64).clamp(0, i64::from(input) - 1);
            let right = ((centre + reach).ceil() as i64).clamp(left + 1, i64::from(input));
            let centre = centre - 0.5;
            let mut weights: Vec<f32> = (left..right)
                .map(|position| catmull_rom((position as f32 - centre) / scale))
                .collect();
            let sum: f32 = weights.iter().sum();
            for weight in &mut weights {
                *weight /= sum;
            }
            (left as usize, weights)
        })
        .collect()
}

/// `sums[i] = 0.0 + input(0)[i] * weights[0] + input(1)[i] * weights[1] + …`, each sum taking
/// its products one at a time from 0.0 and the first tap to the last (so exactly the additions
/// of a plain loop over the taps, as `image` sums), four taps per pass over `sums`: a quarter
/// of the loads and stores of the sums, and none of their old values read.
#[inline(always)]
fn sum_taps<'a>(sums: &mut [f32], weights: &[f32], input: impl Fn(usize) -> &'a [f32]) {
    let n = sums.len();
    let mut tap = 0;
    while tap + 4 <= weights.len() {
        let (a, b, c, d) = (
            &input(tap)[..n],
            &input(tap + 1)[..n],
            &input(tap + 2)[..n],
            &input(tap + 3)[..n],
        );
        let (wa, wb, wc, wd) = (
            weights[tap],
            weights[tap + 1],
            weights[tap + 2],
            weights[tap + 3],
        );
        let sums = sums.iter_mut().zip(a.iter().zip(b).zip(c).zip(d));
        if tap == 0 {
            for (sum, (((&a, &b), &c), &d)) in sums {
                *sum = (((0.0 + a * wa) + b * wb) + c * wc) + d * wd;
            }
        } else {
            for (sum, (((&a, &b), &c), &d)) in sums {
                *sum = (((*sum + a * wa) + b * wb) + c * wc) + d * wd;
            }
        }
        tap += 4;
    }
    if tap == 0 {
        sums.fill(0.0);
    }
    while tap < weights.len() {
        let (a, wa) = (&input(tap)[..n], weights[tap]);
        for (sum, &a) in sums.iter_mut().zip(a) {
            *sum += a * wa;
        }
        tap += 1;
    }
}

/// Resizes a `width × height` image of `channels` interleaved samples, whose row `y`
/// `input_row(y, floats)` writes as floats: vertically into floats, then horizontally into
/// clamped, rounded samples, as `image` does, each output sample summed over its taps in the
/// same order from 0.0.
///
/// Each input row is converted to floats once, into a ring of as many rows as an output row
/// has taps (the rows a window reads are consecutive and the windows only move down), rather
/// than at every tap that reads it: about a quarter of the conversions for a 4× reduction,
/// and no float copy of the whole image.
///
/// The vertical pass's floats are kept column by column (each input sample position's
/// `new_height` floats together), so that the horizontal pass sums a whole output column at
/// once: `new_height` independent sums, each tap one vectorised multiply-add over contiguous
/// floats, instead of one output sample at a time as a chain of dependent additions; the
/// column is rounded as a whole too, then stored down the output's column.
fn resize_samples<S: Sample>(
    input_row: impl Fn(usize, &mut [f32]),
    channels: usize,
    (width, height): (u32, u32),
    (new_width, new_height): (u32, u32),
) -> Vec<S> {
    let row = width as usize * channels;
    let output_rows = new_height as usize;
    // Output rows are summed a few at a time, then stored column by column: each column takes
    // a run of contiguous floats rather than one float a cache line.
    const ROWS_AT_ONCE: usize = 8;
    let row_weights = axis_weights(height, new_height);
    let own_column_weights;
    let column_weights = if (width, new_width) == (height, new_height) {
        &row_weights
    } else {
        own_column_weights = axis_weights(width, new_width);
        &own_column_weights
    };
    let ring_rows = row_weights
        .iter()
        .map(|(_, weights)| weights.len())
        .max()
        .unwrap_or(1);
    let mut ring = vec![0.0f32; ring_rows * row];
    let mut ring_holds = vec![usize::MAX; ring_rows];
    let mut vertical = vec![0.0f32; row * output_rows];
    let mut sums = vec![0.0f32; row * ROWS_AT_ONCE];
    for (block, block_weights) in row_weights.chunks(ROWS_AT_ONCE).enumerate() {
        for (sums, (top, weights)) in sums.chunks_exact_mut(row).zip(block_weights) {
            for y in *top..top + weights.len() {
                let slot = y % ring_rows;
                if ring_holds[slot] != y {
                    input_row(y, &mut ring[slot * row..(slot + 1) * row]);
                    ring_holds[slot] = y;
                }
            }
            let input_row = |offset: usize| {
                let slot = (top + offset) % ring_rows;
                &ring[slot * row..(slot + 1) * row]
            };
            sum_taps(sums, weights, input_row);
        }
        let first = block * ROWS_AT_ONCE;
        let rows_here = block_weights.len();
        for (position, column) in vertical.chunks_exact_mut(output_rows).enumerate() {
            for (index, value) in column[first..first + rows_here].iter_mut().enumerate() {
                *value = sums[index * row + position];
            }
        }
    }
    let new_row = new_width as usize * channels;
    let mut output = vec![S::from_f32(0.0); new_row * output_rows];
    let mut column_sums = vec![0.0f32; output_rows];
    let mut column = vec![S::from_f32(0.0); output_rows];
    for (out_x, (left, weights)) in column_weights.iter().enumerate() {
        for channel in 0..channels {
            let input_column = |offset: usize| {
                let position = (left + offset) * channels + channel;
                &vertical[position * output_rows..(position + 1) * output_rows]
            };
            sum_taps(&mut column_sums, weights, input_column);
            for (sample, sum) in column.iter_mut().zip(&column_sums) {
                *sample = S::from_f32(*sum);
            }
            let at = out_x * channels + channel;
            for (sample, value) in output[at..].iter_mut().step_by(new_row).zip(&column) {
                *sample = *value;
            }
        }
    }
    output
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(index: usize) -> u16 {
        ((index * 7919 + index / 13 * 31) % 65536) as u16
    }

    fn canonical(width: u32, height: u32, channels: u32, bit_depth: u32) -> Vec<u8> {
        let samples = (width * height * channels) as usize;
        if bit_depth == 16 {
            (0..samples)
                .flat_map(|index| pattern(index).to_le_bytes())
                .collect()
        } else {
            (0..samples).map(|index| pattern(index) as u8).collect()
        }
    }

    /// The image as `image`'s own `resize_exact(.., CatmullRom)` gives it, as canonical bytes.
    fn reference(image: DynamicImage, to: ModelInputSize) -> Vec<u8> {
        match image.resize_exact(to.width, to.height, image::imageops::FilterType::CatmullRom) {
            DynamicImage::ImageLuma16(grey) => grey
                .into_raw()
                .iter()
                .flat_map(|sample| sample.to_le_bytes())
                .collect(),
            other => other.into_bytes(),
        }
    }

    #[test]
    fn the_resize_gives_exactly_what_the_image_crate_gives() {
        let cases: [(u32, u32, u32, u32); 6] = [
            (512, 512, 1, 16),
            (300, 200, 1, 8),
            (97, 131, 3, 8),
            (33, 20, 1, 8),
            (240, 240, 3, 8),
            (256, 256, 1, 8),
        ];
        for (width, height, channels, bit_depth) in cases {
            let pixels = canonical(width, height, channels, bit_depth);
            let image = canonical_to_image(width, height, channels, bit_depth, pixels.clone())
                .expect("a model-input layout");
            for side in [240, 64, 250] {
                let to = ModelInputSize {
                    width: side,
                    height: side,
                };
                let expected = reference(image.clone(), to);
                let resized = resize_canonical(&pixels, (width, height), (channels, bit_depth), to)
                    .expect("resized");
                assert_eq!(
                    resized, expected,
                    "{width}×{height}×{channels}@{bit_depth} → {side}"
                );
                let through_image = match resize_catmull_rom(&image, side, side) {
                    DynamicImage::ImageLuma16(grey) => grey
                        .into_raw()
                        .iter()
                        .flat_map(|sample| sample.to_le_bytes())
                        .collect(),
                    other => other.into_bytes(),
                };
                assert_eq!(through_image, expected, "{width}×{height} as an image");
            }
        }
    }

    #[test]
    fn the_inline_rounding_rounds_as_round_does() {
        let mut compared = 0;
        // Every float from −2 to 65537 in steps of 1/64 (halves included), and the floats
        // just either side of each half.
        for step in -128..=65537 * 64 {
            let value = step as f32 / 64.0;
            for value in [value, value.next_down(), value.next_up()] {
                assert_eq!(
                    u16::from_f32(value),
                    value.clamp(0.0, 65535.0).round() as u16,
                    "{value}"
                );
                assert_eq!(
                    u8::from_f32(value),
                    value.clamp(0.0, 255.0).round() as u8,
                    "{value}"
                );
                compared += 1;
            }
        }
        for value in [
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            0.499_999_97,
            254.5,
        ] {
            assert_eq!(u8::from_f32(value), value.clamp(0.0, 255.0).round() as u8);
        }
        assert!(compared > 12_000_000);
    }

    #[test]
    fn layouts_no_model_takes_and_inconsistent_buffers_are_not_resized() {
        let to = ModelInputSize {
            width: 8,
            height: 8,
        };
        // RGB at 16 bits is not a model-input layout: inference refuses it, so it is not resized.
        assert_eq!(
            resize_canonical(&canonical(16, 16, 3, 16), (16, 16), (3, 16), to),
            None
        );
        assert_eq!(resize_canonical(&[0; 10], (16, 16), (1, 8), to), None);
        assert_eq!(resize_canonical(&[], (0, 0), (1, 8), to), None);
        let zero = ModelInputSize {
            width: 0,
            height: 8,
        };
        assert_eq!(
            resize_canonical(&canonical(16, 16, 1, 8), (16, 16), (1, 8), zero),
            None
        );
        assert!(canonical_to_image(16, 16, 1, 16, vec![0; 511]).is_none());
        assert!(canonical_to_image(16, 16, 3, 16, canonical(16, 16, 3, 16)).is_none());
    }
}
