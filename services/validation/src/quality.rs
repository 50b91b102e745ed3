//! Image quality measured from the pixels themselves, on luminance scaled to 0–1:
//! - mean brightness;
//! - RMS contrast (the standard deviation of luminance);
//! - noise: Immerkær's estimate of the noise standard deviation (a Laplacian-difference mask
//!   that cancels image structure), "Fast Noise Variance Estimation", CVIU 1996;
//! - sharpness: the variance of the 4-neighbour Laplacian (low for blurred or smeared images);
//! - saturated fraction: pixels clipped at black or white.
//!
//! Each is compared with a threshold from a profile chosen per model, else per modality, else the
//! default; every check reports its value, threshold, verdict and a stable code. Images too small
//! for a 3×3 mask report those checks as not measurable instead of a made-up value.

use std::collections::BTreeMap;

use medai_runtime::config::from_str_or_native;
use serde::{Deserialize, Serialize};

use medai_imaging::decode::CanonicalImage;

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct QualityThresholds {
    #[serde(
        default = "defaults::min_brightness",
        deserialize_with = "from_str_or_native"
    )]
    pub min_brightness: f64,
    #[serde(
        default = "defaults::max_brightness",
        deserialize_with = "from_str_or_native"
    )]
    pub max_brightness: f64,
    #[serde(
        default = "defaults::min_contrast",
        deserialize_with = "from_str_or_native"
    )]
    pub min_contrast: f64,
    #[serde(
        default = "defaults::max_noise",
        deserialize_with = "from_str_or_native"
    )]
    pub max_noise: f64,
    #[serde(
        default = "defaults::min_sharpness",
        deserialize_with = "from_str_or_native"
    )]
    pub min_sharpness: f64,
    #[serde(
        default = "defaults::max_saturated_fraction",
        deserialize_with = "from_str_or_native"
    )]
    pub max_saturated_fraction: f64,
    /// Refuse (IMAGE_QUALITY_INSUFFICIENT) instead of only reporting when a check fails.
    #[serde(default)]
    pub refuse_on_failure: bool,
}

mod defaults {
    pub fn min_brightness() -> f64 {
        0.02
    }
    pub fn max_brightness() -> f64 {
        0.98
    }
    pub fn min_contrast() -> f64 {
        0.02
    }
    pub fn max_noise() -> f64 {
        0.2
    }
    pub fn min_sharpness() -> f64 {
        0.0001
    }
    pub fn max_saturated_fraction() -> f64 {
        0.5
    }
}

impl Default for QualityThresholds {
    fn default() -> Self {
        Self {
            min_brightness: defaults::min_brightness(),
            max_brightness: defaults::max_brightness(),
            min_contrast: defaults::min_contrast(),
            max_noise: defaults::max_noise(),
            min_sharpness: defaults::min_sharpness(),
            max_saturated_fraction: defaults::max_saturated_fraction(),
            refuse_on_failure: false,
        }
    }
}

/// Threshold profiles: per model (the strictest say), then per modality, then the default.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct QualityPolicy {
    #[serde(default)]
    pub default: QualityThresholds,
    #[serde(default)]
    pub by_modality: BTreeMap<String, QualityThresholds>,
    #[serde(default)]
    pub by_model: BTreeMap<String, QualityThresholds>,
}

impl QualityPolicy {
    /// The profile for a model and modality, and its name for the report.
    pub fn profile(&self, model: &str, modality: &str) -> (String, &QualityThresholds) {
        if let Some(thresholds) = self.by_model.get(model) {
            return (format!("model:{model}"), thresholds);
        }
        if let Some(thresholds) = self.by_modality.get(modality) {
            return (format!("modality:{modality}"), thresholds);
        }
        ("default".to_owned(), &self.default)
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct QualityMeasures {
    pub mean_brightness: f64,
    pub rms_contrast: f64,
    /// `None` when the image is too small for the 3×3 masks.
    pub noise: Option<f64>,
    pub sharpness: Option<f64>,
    pub saturated_fraction: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Comparison {
    AtLeast,
    AtMost,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Fail,
    NotMeasurable,
}

#[derive(Clone, Debug, PartialEq)]
pub struct QualityCheck {
    /// Stable code of the failure this check guards against, for example QUALITY_BLUR.
    pub code: &'static str,
    pub value: f64,
    pub threshold: f64,
    pub comparison: Comparison,
    pub verdict: Verdict,
}

#[derive(Clone, Debug, PartialEq)]
pub struct QualityReport {
    pub profile: String,
    pub measures: QualityMeasures,
    pub checks: Vec<QualityCheck>,
    pub refuse_on_failure: bool,
}

impl QualityReport {
    pub fn passed(&self) -> bool {
        self.checks
            .iter()
            .all(|check| check.verdict != Verdict::Fail)
    }

    pub fn failed_codes(&self) -> Vec<&'static str> {
        self.checks
            .iter()
            .filter(|check| check.verdict == Verdict::Fail)
            .map(|check| check.code)
            .collect()
    }
}

/// Luminance in 0–1, row-major.
fn luminance(image: &CanonicalImage) -> Vec<f64> {
    let channels = image.channels as usize;
    match (channels, image.bit_depth) {
        (1, 16) => image
            .pixels
            .chunks_exact(2)
            .map(|pair| f64::from(u16::from_le_bytes([pair[0], pair[1]])) / 65535.0)
            .collect(),
        (1, _) => image
            .pixels
            .iter()
            .map(|value| f64::from(*value) / 255.0)
            .collect(),
        (_, _) => image
            .pixels
            .chunks_exact(channels.max(1))
            .map(|rgb| {
                let component =
                    |index: usize| f64::from(rgb.get(index).copied().unwrap_or(0)) / 255.0;
                0.299 * component(0) + 0.587 * component(1) + 0.114 * component(2)
            })
            .collect(),
    }
}

pub fn measure(image: &CanonicalImage) -> QualityMeasures {
    let (width, height) = (image.width as usize, image.height as usize);
    // Converted once: the neighbourhood pass below reads each sample nine times.
    let values = luminance(image);
    let count = values.len().max(1) as f64;
    // One pass for brightness, contrast and saturation.
    let (mut sum, mut squares, mut saturated) = (0.0_f64, 0.0_f64, 0_usize);
    for &value in &values {
        sum += value;
        squares += value * value;
        saturated += usize::from(value <= 0.0 || value >= 1.0);
    }
    let mean = sum / count;
    let variance = (squares / count - mean * mean).max(0.0);
    let masks_apply = width >= 3 && height >= 3 && values.len() == width * height;
    let (noise, sharpness) = if masks_apply {
        // One pass over 3×3 neighbourhoods, three rows at a time, for Immerkær's noise
        // estimate and the variance of the Laplacian.
        let (mut immerkaer, mut laplacian_sum, mut laplacian_squares) = (0.0_f64, 0.0_f64, 0.0_f64);
        let rows: Vec<&[f64]> = values.chunks_exact(width).collect();
        for three in rows.windows(3) {
            let (above, row, below) = (three[0], three[1], three[2]);
            for ((up, centre), down) in above.windows(3).zip(row.windows(3)).zip(below.windows(3)) {
                let edges = up[1] + centre[0] + centre[2] + down[1];
                let corners = up[0] + up[2] + down[0] + down[2];
                immerkaer += (4.0 * centre[1] - 2.0 * edges + corners).abs();
                let laplacian = edges - 4.0 * centre[1];
                laplacian_sum += laplacian;
                laplacian_squares += laplacian * laplacian;
            }
        }
        let inner = ((width - 2) * (height - 2)) as f64;
        let noise = (std::f64::consts::PI / 2.0).sqrt() * immerkaer / (6.0 * inner);
        let laplacian_mean = laplacian_sum / inner;
        let sharpness = (laplacian_squares / inner - laplacian_mean * laplacian_mean).max(0.0);
        (Some(noise), Some(sharpness))
    } else {
        (None, None)
    };
    QualityMeasures {
        mean_brightness: mean,
        rms_contrast: variance.sqrt(),
        noise,
        sharpness,
        saturated_fraction: saturated as f64 / count,
    }
}

fn check(
    code: &'static str,
    value: Option<f64>,
    threshold: f64,
    comparison: Comparison,
) -> QualityCheck {
    let verdict = match value {
        None => Verdict::NotMeasurable,
        Some(value) if !value.is_finite() => Verdict::Fail,
        Some(value) => {
            let passes = match comparison {
                Comparison::AtLeast => value >= threshold,
                Comparison::AtMost => value <= threshold,
            };
            if passes { Verdict::Pass } else { Verdict::Fail }
        }
    };
    QualityCheck {
        code,
        value: value.filter(|value| value.is_finite()).unwrap_or(0.0),
        threshold,
        comparison,
        verdict,
    }
}

pub fn assess(image: &CanonicalImage, policy: &QualityPolicy, model: &str) -> QualityReport {
    let (profile, thresholds) = policy.profile(model, &image.metadata.modality);
    let measures = measure(image);
    let checks = vec![
        check(
            "QUALITY_BRIGHTNESS_LOW",
            Some(measures.mean_brightness),
            thresholds.min_brightness,
            Comparison::AtLeast,
        ),
        check(
            "QUALITY_BRIGHTNESS_HIGH",
            Some(measures.mean_brightness),
            thresholds.max_brightness,
            Comparison::AtMost,
        ),
        check(
            "QUALITY_CONTRAST_LOW",
            Some(measures.rms_contrast),
            thresholds.min_contrast,
            Comparison::AtLeast,
        ),
        check(
            "QUALITY_NOISE_HIGH",
            measures.noise,
            thresholds.max_noise,
            Comparison::AtMost,
        ),
        check(
            "QUALITY_BLUR",
            measures.sharpness,
            thresholds.min_sharpness,
            Comparison::AtLeast,
        ),
        check(
            "QUALITY_SATURATION_HIGH",
            Some(measures.saturated_fraction),
            thresholds.max_saturated_fraction,
            Comparison::AtMost,
        ),
    ];
    QualityReport {
        profile,
        measures,
        checks,
        refuse_on_failure: thresholds.refuse_on_failure,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use medai_imaging::decode::{SafeMetadata, SourceFormat};

    fn grey(width: u32, height: u32, pixel: impl Fn(u32, u32) -> u8) -> CanonicalImage {
        let pixels = (0..height)
            .flat_map(|y| (0..width).map(move |x| (x, y)))
            .map(|(x, y)| pixel(x, y))
            .collect();
        CanonicalImage {
            width,
            height,
            channels: 1,
            bit_depth: 8,
            photometric_interpretation: "MONOCHROME2",
            pixels,
            source_format: SourceFormat::Png,
            metadata: SafeMetadata {
                modality: "MR".to_owned(),
                ..SafeMetadata::default()
            },
        }
    }

    /// A deterministic pseudo-random sequence, so the tests need no RNG crate.
    fn noise(x: u32, y: u32) -> i32 {
        let mut state = x.wrapping_mul(73_856_093) ^ y.wrapping_mul(19_349_663);
        state ^= state >> 13;
        state = state.wrapping_mul(0x5bd1_e995);
        (state >> 24) as i32 % 41 - 20
    }

    fn pattern(x: u32, y: u32) -> i32 {
        if (x / 8 + y / 8).is_multiple_of(2) {
            70
        } else {
            180
        }
    }

    fn blurred(image: &CanonicalImage) -> CanonicalImage {
        let (width, height) = (image.width as usize, image.height as usize);
        let mut pixels = image.pixels.clone();
        for y in 2..height - 2 {
            for x in 2..width - 2 {
                let mut sum = 0u32;
                for dy in 0..5 {
                    for dx in 0..5 {
                        sum += u32::from(image.pixels[(y + dy - 2) * width + (x + dx - 2)]);
                    }
                }
                pixels[y * width + x] = (sum / 25) as u8;
            }
        }
        CanonicalImage {
            pixels,
            ..image.clone()
        }
    }

    #[test]
    fn a_constant_image_is_measurable_and_fails_contrast_and_sharpness() {
        let report = assess(&grey(64, 64, |_, _| 128), &QualityPolicy::default(), "m");
        assert!((report.measures.mean_brightness - 128.0 / 255.0).abs() < 1e-9);
        assert!(report.measures.rms_contrast < 1e-12);
        assert!(report.measures.noise.expect("measurable") < 1e-12);
        assert_eq!(
            report.failed_codes(),
            vec!["QUALITY_CONTRAST_LOW", "QUALITY_BLUR"]
        );
    }

    #[test]
    fn added_noise_raises_the_noise_estimate_and_blur_lowers_sharpness() {
        let clean = grey(96, 96, |x, y| pattern(x, y) as u8);
        let noisy = grey(96, 96, |x, y| {
            (pattern(x, y) + noise(x, y)).clamp(0, 255) as u8
        });
        let (clean_measures, noisy_measures) = (measure(&clean), measure(&noisy));
        assert!(noisy_measures.noise.expect("noise") > 3.0 * clean_measures.noise.expect("noise"));
        let soft = measure(&blurred(&clean));
        assert!(
            soft.sharpness.expect("sharpness") < clean_measures.sharpness.expect("sharpness") / 2.0
        );
    }

    #[test]
    fn saturation_and_brightness_are_reported_with_their_thresholds() {
        let white = assess(
            &grey(64, 64, |x, _| if x < 48 { 255 } else { 200 }),
            &QualityPolicy::default(),
            "m",
        );
        let saturation = white
            .checks
            .iter()
            .find(|check| check.code == "QUALITY_SATURATION_HIGH")
            .expect("check");
        assert!((saturation.value - 0.75).abs() < 1e-9);
        assert_eq!(
            (saturation.threshold, saturation.verdict),
            (0.5, Verdict::Fail)
        );
        assert!(white.failed_codes().contains(&"QUALITY_SATURATION_HIGH"));
    }

    #[test]
    fn tiny_images_report_masks_as_not_measurable() {
        let report = assess(
            &grey(2, 2, |x, y| (x * 100 + y * 50) as u8),
            &QualityPolicy::default(),
            "m",
        );
        let blur = report
            .checks
            .iter()
            .find(|check| check.code == "QUALITY_BLUR")
            .expect("check");
        assert_eq!(blur.verdict, Verdict::NotMeasurable);
        assert!(report.checks.iter().all(|check| check.value.is_finite()));
    }

    #[test]
    fn profiles_are_chosen_per_model_then_modality_then_default() {
        let strict = QualityThresholds {
            min_contrast: 0.9,
            ..QualityThresholds::default()
        };
        let policy = QualityPolicy {
            default: QualityThresholds::default(),
            by_modality: BTreeMap::from([("MR".to_owned(), strict.clone())]),
            by_model: BTreeMap::from([("brain".to_owned(), QualityThresholds::default())]),
        };
        assert_eq!(policy.profile("brain", "MR").0, "model:brain");
        assert_eq!(policy.profile("other", "MR").0, "modality:MR");
        assert_eq!(policy.profile("other", "CT").0, "default");
    }
}
