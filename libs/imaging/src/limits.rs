use std::fmt::Display;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize};

/// What an image must satisfy before any model sees it.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ImageLimits {
    #[serde(default = "default_max_bytes", deserialize_with = "text_or_native")]
    pub max_bytes: usize,
    #[serde(default = "default_min_side", deserialize_with = "text_or_native")]
    pub min_side: u32,
    #[serde(default = "default_max_side", deserialize_with = "text_or_native")]
    pub max_side: u32,
    /// The most frames a DICOM object may declare.
    #[serde(default = "default_max_frames", deserialize_with = "text_or_native")]
    pub max_frames: u32,
    /// The most bytes its pixel data may decode to, as rows × columns × samples × bits ×
    /// frames declare it; checked before anything is decompressed, so a small file cannot
    /// expand into gigabytes.
    #[serde(
        default = "default_max_decoded_bytes",
        deserialize_with = "text_or_native"
    )]
    pub max_decoded_bytes: u64,
}

fn default_max_frames() -> u32 {
    1000
}

fn default_max_decoded_bytes() -> u64 {
    1 << 30
}

impl Default for ImageLimits {
    fn default() -> Self {
        Self {
            max_bytes: default_max_bytes(),
            min_side: default_min_side(),
            max_side: default_max_side(),
            max_frames: default_max_frames(),
            max_decoded_bytes: default_max_decoded_bytes(),
        }
    }
}

impl ImageLimits {
    pub fn validate(&self) -> Result<(), String> {
        if self.max_bytes == 0 {
            return Err("limits.max_bytes must be positive".to_owned());
        }
        if self.min_side == 0 || self.min_side > self.max_side {
            return Err(format!(
                "limits.min_side ({}) must be positive and at most limits.max_side ({})",
                self.min_side, self.max_side
            ));
        }
        Ok(())
    }

    /// The largest canonical pixel buffer these limits allow (RGB, 16-bit).
    pub fn max_canonical_bytes(&self) -> usize {
        let side = self.max_side as usize;
        side * side * 3 * 2
    }
}

fn default_max_bytes() -> usize {
    50 * 1024 * 1024
}

fn default_min_side() -> u32 {
    64
}

fn default_max_side() -> u32 {
    4096
}

/// A number from a TOML/JSON number or from the text of an environment variable; the same rule
/// as `medai_runtime::config::from_str_or_native`, kept here so the decoders do not depend on the
/// service runtime.
fn text_or_native<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr + Deserialize<'de>,
    T::Err: Display,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either<T> {
        Text(String),
        Native(T),
    }
    match Either::<T>::deserialize(deserializer)? {
        Either::Text(text) => text.trim().parse().map_err(serde::de::Error::custom),
        Either::Native(value) => Ok(value),
    }
}
