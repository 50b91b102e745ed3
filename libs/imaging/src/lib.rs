//! The image decoders the validation service runs: PNG, JPEG and DICOM into the canonical pixel
//! buffer, or a refusal with a stable code. Every size is checked against [`ImageLimits`] from
//! headers before anything is allocated or inflated.
//!
//! A crate of its own so that the fuzz target builds only the decoders (a release
//! AddressSanitizer build of the whole service tree took 11 minutes of every CI run).

mod colour;
pub mod decode;
mod dicom_lengths;
pub mod display;
mod error;
mod frames;
mod jpeg_extended;
mod limits;
pub mod model_input;
mod native_colour;
mod pixel_rewrite;
mod rle_check;
#[cfg(test)]
mod test_support;

pub use error::ImageError;
pub use frames::{FramePolicy, JudgedFrame};
pub use limits::ImageLimits;
