//! Clinical decision support on one prediction (issue 18): calibrated probabilities, how
//! uncertain the model is (normalised entropy, top-2 margin, a confidence band from the
//! manifest's calibration data), and whether the input lies outside the model's domain (an
//! unusual case, with stable reasons). Pure functions of the probabilities, the manifest and
//! what validation said about the image, so every figure can be recomputed by anyone.

use serde::{Deserialize, Serialize};

pub const IMAGE_QUALITY: &str = "IMAGE_QUALITY";
pub const MODALITY_OUTSIDE_INTENDED_USE: &str = "MODALITY_OUTSIDE_INTENDED_USE";
pub const BODY_PART_OUTSIDE_INTENDED_USE: &str = "BODY_PART_OUTSIDE_INTENDED_USE";
pub const OUT_OF_DISTRIBUTION: &str = "OUT_OF_DISTRIBUTION";

/// The manifest's `[decision_support]` table: the model's intended use in machine terms and
/// figures from its validation report. Every field is optional; an absent one checks nothing.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DecisionSupport {
    /// DICOM Modality (0008,0060) values the model is meant for, such as `["MR"]`.
    #[serde(default)]
    pub modalities: Vec<String>,
    /// DICOM Body Part Examined (0018,0015) values the model is meant for.
    #[serde(default)]
    pub body_parts: Vec<String>,
    /// Temperature from the validation report; probabilities become `p^(1/T)` renormalised
    /// (temperature scaling of the log-probabilities).
    #[serde(default)]
    pub temperature: Option<f32>,
    /// A prediction whose out-of-distribution score (1 - top probability) is above this is
    /// flagged OUT_OF_DISTRIBUTION.
    #[serde(default)]
    pub ood_threshold: Option<f32>,
    /// Reliability bins from the validation report: the accuracy range observed for cases whose
    /// top (calibrated) probability fell in `[confidence_from, confidence_to)`.
    #[serde(default)]
    pub calibration: Vec<CalibrationBin>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CalibrationBin {
    pub confidence_from: f32,
    pub confidence_to: f32,
    pub accuracy_lower: f32,
    pub accuracy_upper: f32,
}

impl DecisionSupport {
    pub fn check(&self) -> Result<(), String> {
        if self.temperature.is_some_and(|temperature| {
            !(temperature.is_finite() && temperature > 0.0 && temperature <= 100.0)
        }) {
            return Err("decision_support.temperature must lie in (0, 100]".to_owned());
        }
        if self
            .ood_threshold
            .is_some_and(|threshold| !(threshold > 0.0 && threshold <= 1.0))
        {
            return Err("decision_support.ood_threshold must lie in (0, 1]".to_owned());
        }
        let unit = |value: f32| (0.0..=1.0).contains(&value);
        for bin in &self.calibration {
            if !(unit(bin.confidence_from)
                && unit(bin.confidence_to)
                && bin.confidence_from < bin.confidence_to
                && unit(bin.accuracy_lower)
                && unit(bin.accuracy_upper)
                && bin.accuracy_lower <= bin.accuracy_upper)
            {
                return Err(
                    "decision_support.calibration bins need 0 <= confidence_from < confidence_to <= 1 and 0 <= accuracy_lower <= accuracy_upper <= 1"
                        .to_owned(),
                );
            }
        }
        Ok(())
    }
}

/// How uncertain one prediction is.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Uncertainty {
    pub normalized_entropy: f32,
    pub top2_margin: f32,
    pub temperature: f32,
    /// (lower, upper) accuracy of the calibration bin the top probability falls in.
    pub confidence_band: Option<(f32, f32)>,
    pub ood_score: f32,
    /// 0 when the manifest names none.
    pub ood_threshold: f32,
}

/// What is known about the input besides its pixels.
#[derive(Clone, Debug, Default)]
pub struct InputDomain {
    /// Empty when unknown (PNG, JPEG): nothing to compare.
    pub modality: String,
    pub body_part: String,
    /// Codes of failed quality checks.
    pub quality_findings: Vec<String>,
}

/// Temperature-scaled probabilities: softmax(ln p / T) = p^(1/T) / Σ p^(1/T). The model's own
/// output when `temperature` is absent or 1.
pub fn calibrate(probabilities: &[f32], temperature: Option<f32>) -> Vec<f32> {
    let Some(temperature) = temperature.filter(|value| (*value - 1.0).abs() > f32::EPSILON) else {
        return probabilities.to_vec();
    };
    let exponent = 1.0 / f64::from(temperature);
    let scaled: Vec<f64> = probabilities
        .iter()
        .map(|probability| f64::from(probability.max(0.0)).powf(exponent))
        .collect();
    let total: f64 = scaled.iter().sum();
    if total <= 0.0 || !total.is_finite() {
        return probabilities.to_vec();
    }
    scaled.iter().map(|value| (value / total) as f32).collect()
}

/// Shannon entropy of `probabilities` over ln(count), in [0, 1].
pub fn normalized_entropy(probabilities: &[f32]) -> f32 {
    if probabilities.len() < 2 {
        return 0.0;
    }
    let entropy: f64 = probabilities
        .iter()
        .map(|probability| f64::from(*probability))
        .filter(|probability| *probability > 0.0)
        .map(|probability| -probability * probability.ln())
        .sum();
    (entropy / (probabilities.len() as f64).ln()).clamp(0.0, 1.0) as f32
}

/// Top probability minus the second.
pub fn top2_margin(probabilities: &[f32]) -> f32 {
    let mut sorted = probabilities.to_vec();
    sorted.sort_by(|a, b| b.total_cmp(a));
    match sorted.as_slice() {
        [first, second, ..] => first - second,
        [first] => *first,
        [] => 0.0,
    }
}

/// The uncertainty figures of calibrated `probabilities`.
pub fn uncertainty(probabilities: &[f32], support: &DecisionSupport) -> Uncertainty {
    let top = probabilities.iter().copied().fold(0.0f32, f32::max);
    let confidence_band = support
        .calibration
        .iter()
        .find(|bin| {
            top >= bin.confidence_from
                && (top < bin.confidence_to || (bin.confidence_to >= 1.0 && top <= 1.0))
        })
        .map(|bin| (bin.accuracy_lower, bin.accuracy_upper));
    Uncertainty {
        normalized_entropy: normalized_entropy(probabilities),
        top2_margin: top2_margin(probabilities),
        temperature: support.temperature.unwrap_or(1.0),
        confidence_band,
        ood_score: 1.0 - top,
        ood_threshold: support.ood_threshold.unwrap_or(0.0),
    }
}

fn listed(allowed: &[String], value: &str) -> bool {
    allowed
        .iter()
        .any(|entry| entry.trim().eq_ignore_ascii_case(value.trim()))
}

/// Why the input is outside the model's domain, in a fixed order; empty when it is not.
pub fn unusual_case_reasons(
    domain: &InputDomain,
    uncertainty: &Uncertainty,
    support: &DecisionSupport,
) -> Vec<String> {
    let mut reasons = Vec::new();
    if !domain.quality_findings.is_empty() {
        reasons.push(IMAGE_QUALITY.to_owned());
    }
    if !support.modalities.is_empty()
        && !domain.modality.trim().is_empty()
        && !listed(&support.modalities, &domain.modality)
    {
        reasons.push(MODALITY_OUTSIDE_INTENDED_USE.to_owned());
    }
    if !support.body_parts.is_empty()
        && !domain.body_part.trim().is_empty()
        && !listed(&support.body_parts, &domain.body_part)
    {
        reasons.push(BODY_PART_OUTSIDE_INTENDED_USE.to_owned());
    }
    if support
        .ood_threshold
        .is_some_and(|threshold| uncertainty.ood_score > threshold)
    {
        reasons.push(OUT_OF_DISTRIBUTION.to_owned());
    }
    reasons
}

#[cfg(test)]
mod tests {
    use super::*;

    fn support() -> DecisionSupport {
        DecisionSupport {
            modalities: vec!["MR".to_owned()],
            body_parts: vec!["BRAIN".to_owned(), "HEAD".to_owned()],
            temperature: None,
            ood_threshold: Some(0.5),
            calibration: vec![
                CalibrationBin {
                    confidence_from: 0.0,
                    confidence_to: 0.5,
                    accuracy_lower: 0.1,
                    accuracy_upper: 0.4,
                },
                CalibrationBin {
                    confidence_from: 0.5,
                    confidence_to: 1.0,
                    accuracy_lower: 0.6,
                    accuracy_upper: 0.9,
                },
            ],
        }
    }

    #[test]
    fn entropy_margin_band_and_calibration_follow_their_definitions() {
        assert_eq!(normalized_entropy(&[1.0, 0.0, 0.0, 0.0]), 0.0);
        assert!((normalized_entropy(&[0.25; 4]) - 1.0).abs() < 1e-6);
        let probabilities = [0.7, 0.2, 0.1, 0.0];
        let expected = -(0.7f64 * 0.7f64.ln() + 0.2 * 0.2f64.ln() + 0.1 * 0.1f64.ln()) / 4f64.ln();
        assert!((f64::from(normalized_entropy(&probabilities)) - expected).abs() < 1e-6);
        assert!((top2_margin(&probabilities) - 0.5).abs() < 1e-6);
        let figures = uncertainty(&probabilities, &support());
        assert_eq!(figures.confidence_band, Some((0.6, 0.9)));
        assert!((figures.ood_score - 0.3).abs() < 1e-6);
        assert_eq!(figures.temperature, 1.0);
        // Top probability exactly 1 falls in the last bin; no calibration data, no band.
        assert_eq!(
            uncertainty(&[1.0, 0.0], &support()).confidence_band,
            Some((0.6, 0.9))
        );
        assert_eq!(
            uncertainty(&probabilities, &DecisionSupport::default()).confidence_band,
            None
        );
        // A temperature above 1 softens, keeps the order, and sums to 1.
        let softened = calibrate(&probabilities, Some(2.0));
        let total: f32 = softened.iter().sum();
        assert!((total - 1.0).abs() < 1e-6);
        assert!(softened[0] < 0.7 && softened[0] > softened[1] && softened[1] > softened[2]);
        let expected_top = 0.7f64.sqrt() / (0.7f64.sqrt() + 0.2f64.sqrt() + 0.1f64.sqrt());
        assert!((f64::from(softened[0]) - expected_top).abs() < 1e-6);
        assert_eq!(calibrate(&probabilities, None), probabilities.to_vec());
    }

    #[test]
    fn inputs_outside_the_intended_use_are_flagged_with_stable_reasons() {
        let support = support();
        let confident = uncertainty(&[0.9, 0.05, 0.05, 0.0], &support);
        let brain_mr = InputDomain {
            modality: "MR".to_owned(),
            body_part: "brain".to_owned(),
            quality_findings: Vec::new(),
        };
        assert!(unusual_case_reasons(&brain_mr, &confident, &support).is_empty());
        // Unknown modality and body part (a PNG) are not evidence of anything.
        assert!(unusual_case_reasons(&InputDomain::default(), &confident, &support).is_empty());
        let chest_ct = InputDomain {
            modality: "CT".to_owned(),
            body_part: "CHEST".to_owned(),
            quality_findings: vec!["QUALITY_BLUR".to_owned()],
        };
        let unsure = uncertainty(&[0.3, 0.3, 0.2, 0.2], &support);
        assert_eq!(
            unusual_case_reasons(&chest_ct, &unsure, &support),
            [
                IMAGE_QUALITY,
                MODALITY_OUTSIDE_INTENDED_USE,
                BODY_PART_OUTSIDE_INTENDED_USE,
                OUT_OF_DISTRIBUTION
            ]
        );
        // Without intended-use fields nothing but quality is checked.
        assert_eq!(
            unusual_case_reasons(&chest_ct, &unsure, &DecisionSupport::default()),
            [IMAGE_QUALITY]
        );
    }

    #[test]
    fn bad_decision_support_figures_are_refused() {
        let mut bad = support();
        bad.temperature = Some(0.0);
        assert!(bad.check().is_err());
        let mut bad = support();
        bad.ood_threshold = Some(1.5);
        assert!(bad.check().is_err());
        let mut bad = support();
        bad.calibration[0].accuracy_lower = 0.9;
        assert!(bad.check().is_err());
        assert!(support().check().is_ok());
    }
}
