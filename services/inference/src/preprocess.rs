//! Turns a canonical image into a model's input tensor, as its manifest prescribes.

use image::imageops::FilterType;
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
    let dynamic = to_dynamic_image(image)?;
    let resized = if dynamic.width() == plan.width && dynamic.height() == plan.height {
        dynamic
    } else {
        dynamic.resize_exact(plan.width, plan.height, FilterType::CatmullRom)
    };
    let (height, width) = (plan.height as usize, plan.width as usize);
    let tensor = match plan.color.as_str() {
        "GREY" => {
            let grey = resized.to_luma8();
            Array4::from_shape_fn((1, height, width, 1), |(_, y, x, _)| {
                f32::from(grey.get_pixel(x as u32, y as u32).0[0]) * plan.scale
            })
        }
        _ => {
            let rgb = resized.to_rgb8();
            Array4::from_shape_fn((1, height, width, 3), |(_, y, x, c)| {
                f32::from(rgb.get_pixel(x as u32, y as u32).0[c]) * plan.scale
            })
        }
    };
    Ok(tensor)
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
