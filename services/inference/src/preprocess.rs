//! Turns a canonical image into a model's input tensor, as its manifest prescribes: bicubic
//! (Catmull-Rom) resize, colour conversion, scaling. The resize is this module's own separable
//! filter over the image's real channels; it gives exactly the samples `image`'s
//! `resize_exact(.., CatmullRom)` gives (the same weights, sums in the same order, the same
//! rounding), without that routine's per-pixel four-channel float conversions.

use image::{DynamicImage, GrayImage, ImageBuffer, Luma, RgbImage};
use ndarray::Array4;

use crate::manifest::Preprocessing;

/// The decoded image as the inference service receives it from validation.
#[derive(Clone, Debug)]
pub struct ImageInput {
    pub width: u32,
    pub height: u32,
    pub channels: u32,
    pub bit_depth: u32,
    pub pixels: Vec<u8>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PreprocessError {
    #[error(
        "the image buffer does not match its declared {width}×{height}×{channels} at {bit_depth} bits"
    )]
    Inconsistent {
        width: u32,
        height: u32,
        channels: u32,
        bit_depth: u32,
    },
}

/// Builds a `[1, H, W, C]` float tensor: colour conversion, bicubic resize, scaling.
pub fn to_input_tensor(
    image: ImageInput,
    plan: &Preprocessing,
) -> Result<Array4<f32>, PreprocessError> {
    let inconsistent = PreprocessError::Inconsistent {
        width: image.width,
        height: image.height,
        channels: image.channels,
        bit_depth: image.bit_depth,
    };
    let dynamic = to_dynamic_image(image)?;
    let resized = if dynamic.width() == plan.width && dynamic.height() == plan.height {
        dynamic
    } else {
        resize_catmull_rom(&dynamic, plan.width, plan.height)
    };
    let (height, width) = (plan.height as usize, plan.width as usize);
    let tensor = match plan.color.as_str() {
        "GREY" => {
            let grey = resized.to_luma8().into_raw();
            let values = grey.iter().map(|sample| f32::from(*sample) * plan.scale);
            Array4::from_shape_vec((1, height, width, 1), values.collect::<Vec<f32>>())
        }
        _ => {
            let rgb: Vec<u8> = match resized {
                // A grey image becomes RGB by repeating its one sample.
                DynamicImage::ImageLuma8(grey) => grey
                    .into_raw()
                    .iter()
                    .flat_map(|sample| [*sample; 3])
                    .collect(),
                other => other.to_rgb8().into_raw(),
            };
            let values = rgb.iter().map(|sample| f32::from(*sample) * plan.scale);
            Array4::from_shape_vec((1, height, width, 3), values.collect::<Vec<f32>>())
        }
    };
    tensor.map_err(|_| inconsistent)
}

/// A sample type the resize reads and writes.
trait Sample: Copy {
    const LARGEST: f32;
    fn to_f32(self) -> f32;
    /// Clamped to the type's range and rounded half away from zero, as `image` rounds.
    fn from_f32(value: f32) -> Self;
}

impl Sample for u8 {
    const LARGEST: f32 = 255.0;
    fn to_f32(self) -> f32 {
        f32::from(self)
    }
    fn from_f32(value: f32) -> Self {
        value.clamp(0.0, Self::LARGEST).round() as u8
    }
}

impl Sample for u16 {
    const LARGEST: f32 = 65535.0;
    fn to_f32(self) -> f32 {
        f32::from(self)
    }
    fn from_f32(value: f32) -> Self {
        value.clamp(0.0, Self::LARGEST).round() as u16
    }
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

/// Resizes `samples` (`width × height` pixels of `channels` interleaved samples): vertically
/// into floats, then horizontally into clamped, rounded samples, as `image` does.
fn resize_samples<S: Sample>(
    samples: &[S],
    channels: usize,
    (width, height): (u32, u32),
    (new_width, new_height): (u32, u32),
) -> Vec<S> {
    let row = width as usize * channels;
    let mut vertical = vec![0.0f32; row * new_height as usize];
    for (out_row, (top, weights)) in vertical
        .chunks_exact_mut(row)
        .zip(axis_weights(height, new_height))
    {
        for (offset, weight) in weights.iter().enumerate() {
            let start = (top + offset) * row;
            let input = &samples[start..start + row];
            for (sum, sample) in out_row.iter_mut().zip(input) {
                *sum += sample.to_f32() * weight;
            }
        }
    }
    let new_row = new_width as usize * channels;
    let mut output = Vec::with_capacity(new_row * new_height as usize);
    let columns = axis_weights(width, new_width);
    let mut pixel = [0.0f32; 4];
    for input in vertical.chunks_exact(row) {
        for (left, weights) in &columns {
            let pixel = &mut pixel[..channels];
            pixel.fill(0.0);
            for (offset, weight) in weights.iter().enumerate() {
                let start = (left + offset) * channels;
                for (sum, value) in pixel.iter_mut().zip(&input[start..start + channels]) {
                    *sum += value * weight;
                }
            }
            output.extend(pixel.iter().map(|value| S::from_f32(*value)));
        }
    }
    output
}

/// `image` resized to `new_width × new_height` with the Catmull-Rom filter, in its own colour
/// type.
fn resize_catmull_rom(image: &DynamicImage, new_width: u32, new_height: u32) -> DynamicImage {
    let from = (image.width(), image.height());
    let to = (new_width, new_height);
    let resized = match image {
        DynamicImage::ImageLuma8(grey) => GrayImage::from_raw(
            new_width,
            new_height,
            resize_samples(grey.as_raw(), 1, from, to),
        )
        .map(DynamicImage::ImageLuma8),
        DynamicImage::ImageRgb8(rgb) => RgbImage::from_raw(
            new_width,
            new_height,
            resize_samples(rgb.as_raw(), 3, from, to),
        )
        .map(DynamicImage::ImageRgb8),
        DynamicImage::ImageLuma16(grey) => ImageBuffer::<Luma<u16>, Vec<u16>>::from_raw(
            new_width,
            new_height,
            resize_samples(grey.as_raw(), 1, from, to),
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

fn to_dynamic_image(image: ImageInput) -> Result<DynamicImage, PreprocessError> {
    let inconsistent = PreprocessError::Inconsistent {
        width: image.width,
        height: image.height,
        channels: image.channels,
        bit_depth: image.bit_depth,
    };
    let (width, height) = (image.width, image.height);
    match (image.channels, image.bit_depth) {
        (1, 8) => GrayImage::from_raw(width, height, image.pixels)
            .map(DynamicImage::ImageLuma8)
            .ok_or(inconsistent),
        (3, 8) => RgbImage::from_raw(width, height, image.pixels)
            .map(DynamicImage::ImageRgb8)
            .ok_or(inconsistent),
        (1, 16) => {
            if !image.pixels.len().is_multiple_of(2) {
                return Err(inconsistent);
            }
            let samples: Vec<u16> = image
                .pixels
                .chunks_exact(2)
                .map(|pair| u16::from_le_bytes([pair[0], pair[1]]))
                .collect();
            ImageBuffer::<Luma<u16>, Vec<u16>>::from_raw(width, height, samples)
                .map(DynamicImage::ImageLuma16)
                .ok_or(inconsistent)
        }
        _ => Err(inconsistent),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> Preprocessing {
        Preprocessing {
            width: 4,
            height: 4,
            layout: "NHWC".to_owned(),
            color: "RGB".to_owned(),
            scale: 1.0 / 255.0,
        }
    }

    #[test]
    fn grey_images_become_scaled_rgb_tensors() {
        let image = ImageInput {
            width: 8,
            height: 8,
            channels: 1,
            bit_depth: 8,
            pixels: vec![255; 64],
        };
        let tensor = to_input_tensor(image, &plan()).expect("tensor");
        assert_eq!(tensor.shape(), &[1, 4, 4, 3]);
        assert!(tensor.iter().all(|value| (value - 1.0).abs() < 1e-6));
    }

    /// The tensor as this module built it before its own resize: `image`'s resize, then
    /// per-pixel conversion.
    fn reference_tensor(image: ImageInput, plan: &Preprocessing) -> Array4<f32> {
        let dynamic = to_dynamic_image(image).expect("consistent");
        let resized = dynamic.resize_exact(
            plan.width,
            plan.height,
            image::imageops::FilterType::CatmullRom,
        );
        let (height, width) = (plan.height as usize, plan.width as usize);
        if plan.color == "GREY" {
            let grey = resized.to_luma8();
            Array4::from_shape_fn((1, height, width, 1), |(_, y, x, _)| {
                f32::from(grey.get_pixel(x as u32, y as u32).0[0]) * plan.scale
            })
        } else {
            let rgb = resized.to_rgb8();
            Array4::from_shape_fn((1, height, width, 3), |(_, y, x, c)| {
                f32::from(rgb.get_pixel(x as u32, y as u32).0[c]) * plan.scale
            })
        }
    }

    #[test]
    fn the_resize_gives_exactly_what_the_image_crate_gives() {
        let pattern = |index: usize| ((index * 7919 + index / 13 * 31) % 65536) as u16;
        let cases: [(u32, u32, u32, u32); 5] = [
            (512, 512, 1, 16),
            (300, 200, 1, 8),
            (97, 131, 3, 8),
            (33, 20, 1, 8),
            (240, 240, 3, 8),
        ];
        for (width, height, channels, bit_depth) in cases {
            let samples = (width * height * channels) as usize;
            let pixels: Vec<u8> = if bit_depth == 16 {
                (0..samples)
                    .flat_map(|index| pattern(index).to_le_bytes())
                    .collect()
            } else {
                (0..samples).map(|index| pattern(index) as u8).collect()
            };
            let image = ImageInput {
                width,
                height,
                channels,
                bit_depth,
                pixels,
            };
            for (side, color) in [(240, "RGB"), (64, "GREY"), (250, "RGB")] {
                let plan = Preprocessing {
                    width: side,
                    height: side,
                    layout: "NHWC".to_owned(),
                    color: color.to_owned(),
                    scale: 1.0 / 255.0,
                };
                let fast = to_input_tensor(image.clone(), &plan).expect("tensor");
                let reference = reference_tensor(image.clone(), &plan);
                assert_eq!(
                    fast, reference,
                    "{width}×{height}×{channels}@{bit_depth} → {side} {color}"
                );
            }
        }
    }

    #[test]
    fn a_short_buffer_is_refused() {
        let image = ImageInput {
            width: 8,
            height: 8,
            channels: 3,
            bit_depth: 8,
            pixels: vec![0; 10],
        };
        assert!(matches!(
            to_input_tensor(image, &plan()),
            Err(PreprocessError::Inconsistent { .. })
        ));
    }
}
