//! Turns a canonical image into a model's input tensor, as its manifest prescribes: bicubic
//! (Catmull-Rom) resize, colour conversion, scaling. The resize is the mesh's one
//! implementation, `medai_imaging::model_input` (validation runs the same one when the gateway
//! asks for the model's input size); an image that arrives at the model's size is not resized
//! again.

use image::DynamicImage;
use medai_imaging::model_input::{canonical_to_image, resize_catmull_rom};
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
    /// Validation already resized it to the input size of the model the gateway expected
    /// (`CanonicalImage.resized_for_model_input`): it is used only at exactly that size, never
    /// resized again, since a second resize would not give what the full image gives.
    pub resized_for_model_input: bool,
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
    #[error(
        "the image was resized to {width}×{height} for a model input; this model takes {wanted_width}×{wanted_height}"
    )]
    ResizedForAnotherInput {
        width: u32,
        height: u32,
        wanted_width: u32,
        wanted_height: u32,
    },
}

/// Pixel bytes up to which an image at the model's size is prepared on the calling task
/// rather than on a blocking thread: 64 KiB (128×128 RGB) converts in tens of microseconds,
/// less than the hand-off to a blocking thread and back costs.
pub const LIGHT_PREPARATION_BYTES: usize = 64 << 10;

/// Whether `image` needs no resize for `plan` and is small enough to convert on the calling
/// task (see [`LIGHT_PREPARATION_BYTES`]).
pub fn is_light_preparation(image: &ImageInput, plan: &Preprocessing) -> bool {
    image.width == plan.width
        && image.height == plan.height
        && image.pixels.len() <= LIGHT_PREPARATION_BYTES
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
    let at_model_size = image.width == plan.width && image.height == plan.height;
    if image.resized_for_model_input && !at_model_size {
        return Err(PreprocessError::ResizedForAnotherInput {
            width: image.width,
            height: image.height,
            wanted_width: plan.width,
            wanted_height: plan.height,
        });
    }
    let dynamic = to_dynamic_image(image)?;
    let resized = if dynamic.width() == plan.width && dynamic.height() == plan.height {
        dynamic
    } else {
        resize_catmull_rom(&dynamic, plan.width, plan.height)
    };
    let (height, width) = (plan.height as usize, plan.width as usize);
    let tensor = match plan.color.as_str() {
        "GREY" => {
            let grey = resized.into_luma8().into_raw();
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
                other => other.into_rgb8().into_raw(),
            };
            let values = rgb.iter().map(|sample| f32::from(*sample) * plan.scale);
            Array4::from_shape_vec((1, height, width, 3), values.collect::<Vec<f32>>())
        }
    };
    tensor.map_err(|_| inconsistent)
}

fn to_dynamic_image(image: ImageInput) -> Result<DynamicImage, PreprocessError> {
    let inconsistent = PreprocessError::Inconsistent {
        width: image.width,
        height: image.height,
        channels: image.channels,
        bit_depth: image.bit_depth,
    };
    canonical_to_image(
        image.width,
        image.height,
        image.channels,
        image.bit_depth,
        image.pixels,
    )
    .ok_or(inconsistent)
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
    fn only_small_images_at_the_model_size_are_prepared_in_place() {
        let image = |width: u32, height: u32, channels: u32| ImageInput {
            width,
            height,
            channels,
            bit_depth: 8,
            pixels: vec![0; (width * height * channels) as usize],
            resized_for_model_input: false,
        };
        let at = |width: u32, height: u32| Preprocessing {
            width,
            height,
            ..plan()
        };
        assert!(is_light_preparation(&image(4, 4, 3), &plan()));
        assert!(is_light_preparation(&image(64, 64, 1), &at(64, 64)));
        assert!(is_light_preparation(&image(128, 128, 3), &at(128, 128)));
        // A resize, or more than 64 KiB of pixels, goes to a blocking thread.
        assert!(!is_light_preparation(&image(8, 8, 1), &plan()));
        assert!(!is_light_preparation(&image(148, 148, 3), &at(148, 148)));
        assert!(!is_light_preparation(&image(512, 512, 1), &at(512, 512)));
    }

    #[test]
    fn grey_images_become_scaled_rgb_tensors() {
        let image = ImageInput {
            width: 8,
            height: 8,
            channels: 1,
            bit_depth: 8,
            pixels: vec![255; 64],
            resized_for_model_input: false,
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
                resized_for_model_input: false,
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

    /// What validation now sends when the gateway names the model's input size: the canonical
    /// image resized by the shared implementation, marked as such. Its tensor is exactly the
    /// tensor of the full image resized here.
    #[test]
    fn an_image_resized_by_validation_gives_the_tensor_of_the_full_image() {
        let pattern = |index: usize| ((index * 7919 + index / 13 * 31) % 65536) as u16;
        let cases: [(u32, u32, u32, u32); 4] = [
            (512, 512, 1, 16),
            (256, 256, 1, 8),
            (97, 131, 3, 8),
            (240, 240, 3, 8),
        ];
        for (width, height, channels, bit_depth) in cases {
            let samples = (width * height * channels) as usize;
            let pixels: Vec<u8> = if bit_depth == 16 {
                (0..samples)
                    .flat_map(|index| pattern(index).to_le_bytes())
                    .collect()
            } else {
                (0..samples)
                    .map(|index| (pattern(index) % 251) as u8)
                    .collect()
            };
            for (side, color) in [(240, "RGB"), (64, "GREY")] {
                let plan = Preprocessing {
                    width: side,
                    height: side,
                    layout: "NHWC".to_owned(),
                    color: color.to_owned(),
                    scale: 1.0 / 255.0,
                };
                let full = ImageInput {
                    width,
                    height,
                    channels,
                    bit_depth,
                    pixels: pixels.clone(),
                    resized_for_model_input: false,
                };
                let resized = ImageInput {
                    width: side,
                    height: side,
                    channels,
                    bit_depth,
                    pixels: medai_imaging::model_input::resize_canonical(
                        &pixels,
                        (width, height),
                        (channels, bit_depth),
                        medai_imaging::model_input::ModelInputSize {
                            width: side,
                            height: side,
                        },
                    )
                    .expect("resized"),
                    resized_for_model_input: true,
                };
                assert_eq!(
                    to_input_tensor(resized, &plan).expect("tensor"),
                    to_input_tensor(full, &plan).expect("tensor"),
                    "{width}×{height}×{channels}@{bit_depth} → {side} {color}"
                );
            }
        }
    }

    /// A model-sized image meant for another input size (a version of another size took the
    /// request after the gateway looked) is refused, not resized a second time.
    #[test]
    fn an_image_resized_for_another_model_input_is_refused() {
        let image = ImageInput {
            width: 64,
            height: 64,
            channels: 1,
            bit_depth: 8,
            pixels: vec![7; 64 * 64],
            resized_for_model_input: true,
        };
        let mut plan = plan();
        plan.width = 240;
        plan.height = 240;
        assert_eq!(
            to_input_tensor(image.clone(), &plan),
            Err(PreprocessError::ResizedForAnotherInput {
                width: 64,
                height: 64,
                wanted_width: 240,
                wanted_height: 240,
            })
        );
        plan.width = 64;
        plan.height = 64;
        assert_eq!(
            to_input_tensor(image, &plan).expect("tensor").shape(),
            &[1, 64, 64, 3]
        );
    }

    #[test]
    fn a_short_buffer_is_refused() {
        let image = ImageInput {
            width: 8,
            height: 8,
            channels: 3,
            bit_depth: 8,
            pixels: vec![0; 10],
            resized_for_model_input: false,
        };
        assert!(matches!(
            to_input_tensor(image, &plan()),
            Err(PreprocessError::Inconsistent { .. })
        ));
    }
}
