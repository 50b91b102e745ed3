//! Model rollout (issue 18): the canary and shadow roles beside the active version, the
//! deterministic canary split, validation reports, and the per-version figures and drift
//! (population stability index) exported as metrics.
//!
//! The split: a request that names no version goes to the canary when
//! `SHA-256("medai-canary-v1\0" ‖ model ‖ "\0" ‖ routing key)`, its first eight bytes read as a
//! big-endian u64, modulo 100 is below the canary's share. The routing key is the request's
//! idempotency key, else its image's SHA-256, so a resend of the same request routes the same
//! way on every replica.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::InferenceError;
use crate::manifest::ModelManifest;

/// Which role of a model answered (or shadowed) a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Route {
    Active,
    Canary,
    Shadow,
}

impl Route {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "ACTIVE",
            Self::Canary => "CANARY",
            Self::Shadow => "SHADOW",
        }
    }
}

/// A model's rollout roles besides its active version, as the lifecycle store keeps them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rollout {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<Canary>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Canary {
    pub version: String,
    /// 1 to 99.
    pub share_percent: u32,
}

impl Rollout {
    /// The role `version` holds, if any.
    pub fn role_of(&self, version: &str) -> Option<Route> {
        if self
            .canary
            .as_ref()
            .is_some_and(|canary| canary.version == version)
        {
            return Some(Route::Canary);
        }
        (self.shadow.as_deref() == Some(version)).then_some(Route::Shadow)
    }

    /// Drops whatever role `version` holds.
    pub fn without(mut self, version: &str) -> Self {
        if self
            .canary
            .as_ref()
            .is_some_and(|canary| canary.version == version)
        {
            self.canary = None;
        }
        if self.shadow.as_deref() == Some(version) {
            self.shadow = None;
        }
        self
    }
}

/// The bucket (0..100) a routing key falls in for `model`.
pub fn canary_bucket(model: &str, routing_key: &[u8]) -> u32 {
    let mut hasher = Sha256::new();
    hasher.update(b"medai-canary-v1\0");
    hasher.update(model.as_bytes());
    hasher.update([0u8]);
    hasher.update(routing_key);
    let digest = hasher.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u32::try_from(u64::from_be_bytes(first) % 100).unwrap_or(0)
}

/// Whether a request with `routing_key` goes to a canary holding `share_percent`.
pub fn routes_to_canary(model: &str, routing_key: &[u8], share_percent: u32) -> bool {
    canary_bucket(model, routing_key) < share_percent
}

/// Confidence bins of the reference and of the drift figures: [0, 0.1), …, [0.9, 1.0].
pub const CONFIDENCE_BINS: usize = 10;

/// A version's validation report: what it was validated on, how well it did, what for, and
/// the distributions its predictions had there (the reference drift is measured against).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ValidationReport {
    pub dataset: String,
    pub metrics: BTreeMap<String, f64>,
    pub intended_use: String,
    pub reference: ReferenceDistributions,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ReferenceDistributions {
    /// Fraction of the validation predictions per top label; the model's labels only.
    pub labels: BTreeMap<String, f64>,
    /// Fraction of the validation predictions per confidence bin ([`CONFIDENCE_BINS`]).
    pub confidence: Vec<f64>,
}

/// A report read and checked: its parsed content and its SHA-256.
#[derive(Clone, Debug, PartialEq)]
pub struct CheckedReport {
    pub report: ValidationReport,
    pub sha256: String,
}

fn report_invalid(name: &str, version: &str, reason: impl std::fmt::Display) -> InferenceError {
    InferenceError::ValidationReportInvalid(format!(
        "the validation report of {name} version {version} {reason}"
    ))
}

/// Reads the report the manifest names (none: `Ok(None)`), refusing a hash mismatch or a
/// report that does not describe this model.
pub fn read_validation_report(
    manifest: &ModelManifest,
    folder: &Path,
) -> Result<Option<CheckedReport>, InferenceError> {
    let Some(named) = &manifest.validation_report else {
        return Ok(None);
    };
    let (name, version) = (manifest.name.as_str(), manifest.version.as_str());
    let bytes = std::fs::read(folder.join(&named.file))
        .map_err(|error| report_invalid(name, version, format_args!("is unreadable: {error}")))?;
    let actual = hex::encode(Sha256::digest(&bytes));
    if !actual.eq_ignore_ascii_case(&named.sha256) {
        return Err(InferenceError::ValidationReportMismatch {
            name: name.to_owned(),
            version: version.to_owned(),
        });
    }
    let report: ValidationReport = serde_json::from_slice(&bytes)
        .map_err(|error| report_invalid(name, version, format_args!("is malformed: {error}")))?;
    check_reference(&report.reference, &manifest.labels)
        .map_err(|reason| report_invalid(name, version, reason))?;
    Ok(Some(CheckedReport {
        report,
        sha256: actual,
    }))
}

fn check_reference(reference: &ReferenceDistributions, labels: &[String]) -> Result<(), String> {
    if reference.confidence.len() != CONFIDENCE_BINS {
        return Err(format!(
            "has {} confidence bins, not {CONFIDENCE_BINS}",
            reference.confidence.len()
        ));
    }
    if let Some(unknown) = reference
        .labels
        .keys()
        .find(|label| !labels.contains(label))
    {
        return Err(format!("names a label the model does not have: {unknown}"));
    }
    for (what, fractions) in [
        (
            "label",
            reference.labels.values().copied().collect::<Vec<_>>(),
        ),
        ("confidence", reference.confidence.clone()),
    ] {
        let sum: f64 = fractions.iter().sum();
        if fractions
            .iter()
            .any(|fraction| !fraction.is_finite() || *fraction < 0.0)
            || (sum - 1.0).abs() > 0.01
        {
            return Err(format!(
                "{what} fractions must be non-negative and sum to 1"
            ));
        }
    }
    Ok(())
}

/// What activating (or starting a canary of) a version needs: its validation report, unless
/// its manifest says research use only.
pub fn require_validation_report(
    manifest: &ModelManifest,
    folder: &Path,
) -> Result<Option<CheckedReport>, InferenceError> {
    match read_validation_report(manifest, folder)? {
        Some(report) => Ok(Some(report)),
        None if manifest.research_use_only => Ok(None),
        None => Err(InferenceError::ValidationReportMissing {
            name: manifest.name.clone(),
            version: manifest.version.clone(),
        }),
    }
}

/// Fractions below this count as this, so an empty bin does not make the index infinite.
const PSI_FLOOR: f64 = 1e-4;

/// The population stability index of observed `counts` against `expected` fractions (same
/// order): Σ (a − e) · ln(a / e). 0 when nothing was observed.
pub fn population_stability_index(counts: &[u64], expected: &[f64]) -> f64 {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return 0.0;
    }
    counts
        .iter()
        .zip(expected)
        .map(|(count, expected)| {
            let actual = (*count as f64 / total as f64).max(PSI_FLOOR);
            let expected = expected.max(PSI_FLOOR);
            (actual - expected) * (actual / expected).ln()
        })
        .sum()
}

pub fn confidence_bin(confidence: f64) -> usize {
    if confidence.is_nan() || confidence <= 0.0 {
        return 0;
    }
    ((confidence * CONFIDENCE_BINS as f64).floor() as usize).min(CONFIDENCE_BINS - 1)
}

/// (label PSI, confidence PSI) of observed top-label counts (by label) and confidence-bin
/// counts against a reference.
pub fn drift(
    reference: &ReferenceDistributions,
    labels: &[String],
    label_counts: &BTreeMap<String, u64>,
    confidence_counts: &[u64; CONFIDENCE_BINS],
) -> (f64, f64) {
    let observed: Vec<u64> = labels
        .iter()
        .map(|label| label_counts.get(label).copied().unwrap_or(0))
        .collect();
    let expected: Vec<f64> = labels
        .iter()
        .map(|label| reference.labels.get(label).copied().unwrap_or(0.0))
        .collect();
    (
        population_stability_index(&observed, &expected),
        population_stability_index(confidence_counts, &reference.confidence),
    )
}

/// A version's figures over its stored results (see [`summarize`]).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct VersionSummary {
    pub predictions: u64,
    /// Results per route, in ACTIVE, CANARY, SHADOW order (routes with none left out).
    pub routes: Vec<(String, u64)>,
    /// Top labels in the model's label order.
    pub labels: Vec<(String, u64)>,
    pub mean_confidence: f64,
    pub latency_p50_ms: f64,
    pub latency_p99_ms: f64,
    pub shadow_compared: u64,
    pub shadow_agreements: u64,
    /// (label PSI, confidence PSI) against the reference, when there is one.
    pub psi: Option<(f64, f64)>,
}

/// Summarises (route, top label, confidence, latency ms, shadow agreement) rows of one
/// version, as [`crate::results::ResultsStore::version_figures`] returns them.
pub fn summarize(
    rows: &[(String, String, f64, f64, String)],
    labels: &[String],
    reference: Option<&ReferenceDistributions>,
) -> VersionSummary {
    let mut routes: BTreeMap<&str, u64> = BTreeMap::new();
    let mut label_counts: BTreeMap<String, u64> = BTreeMap::new();
    let mut confidence_counts = [0u64; CONFIDENCE_BINS];
    let mut latencies: Vec<f64> = Vec::with_capacity(rows.len());
    let mut confidence_sum = 0.0;
    let mut summary = VersionSummary::default();
    for (route, label, confidence, latency, agreement) in rows {
        *routes.entry(route.as_str()).or_default() += 1;
        *label_counts.entry(label.clone()).or_default() += 1;
        confidence_counts[confidence_bin(*confidence)] += 1;
        confidence_sum += confidence;
        latencies.push(*latency);
        if !agreement.is_empty() {
            summary.shadow_compared += 1;
            summary.shadow_agreements += u64::from(agreement == "AGREES");
        }
    }
    summary.predictions = rows.len() as u64;
    summary.routes = [Route::Active, Route::Canary, Route::Shadow]
        .into_iter()
        .filter_map(|route| {
            routes
                .get(route.as_str())
                .map(|count| (route.as_str().to_owned(), *count))
        })
        .collect();
    summary.labels = labels
        .iter()
        .map(|label| (label.clone(), label_counts.get(label).copied().unwrap_or(0)))
        .collect();
    if !rows.is_empty() {
        summary.mean_confidence = confidence_sum / rows.len() as f64;
        latencies.sort_by(f64::total_cmp);
        let at = |quantile: f64| {
            let index = ((latencies.len() - 1) as f64 * quantile).round() as usize;
            latencies[index.min(latencies.len() - 1)]
        };
        summary.latency_p50_ms = at(0.5);
        summary.latency_p99_ms = at(0.99);
    }
    summary.psi =
        reference.map(|reference| drift(reference, labels, &label_counts, &confidence_counts));
    summary
}

#[derive(Default)]
struct DriftCounts {
    labels: BTreeMap<String, u64>,
    confidence: [u64; CONFIDENCE_BINS],
}

/// Per-version figures of this process, as metrics: predictions by label and route, confidence
/// and latency histograms, shadow agreement and drops, and the drift gauges. Labels are
/// bounded: model, version, route, and the model's own labels.
#[derive(Default)]
pub struct RolloutFigures {
    drift: Mutex<HashMap<(String, String), DriftCounts>>,
}

impl RolloutFigures {
    pub fn record_prediction(
        &self,
        manifest: &ModelManifest,
        route: Route,
        top_label: &str,
        confidence: f32,
        latency: Duration,
    ) {
        let labels = [
            ("model", manifest.name.clone()),
            ("version", manifest.version.clone()),
            ("route", route.as_str().to_owned()),
        ];
        let label = if manifest.labels.iter().any(|known| known == top_label) {
            top_label.to_owned()
        } else {
            "other".to_owned()
        };
        let mut with_label = labels.to_vec();
        with_label.push(("label", label.clone()));
        metrics::counter!("medai_model_predictions_total", &with_label).increment(1);
        metrics::histogram!("medai_model_confidence", &labels).record(f64::from(confidence));
        metrics::histogram!("medai_model_prediction_seconds", &labels)
            .record(latency.as_secs_f64());
        // Drift is about what the version answers in production: the active and canary roles
        // and the shadow all count, each under its own version.
        let Some(reference) = manifest.validation.as_ref() else {
            return;
        };
        let (label_psi, confidence_psi) = {
            let mut tracked = self
                .drift
                .lock()
                .unwrap_or_else(|poison| poison.into_inner());
            let counts = tracked
                .entry((manifest.name.clone(), manifest.version.clone()))
                .or_default();
            *counts.labels.entry(label).or_default() += 1;
            counts.confidence[confidence_bin(f64::from(confidence))] += 1;
            drift(
                &reference.report.reference,
                &manifest.labels,
                &counts.labels,
                &counts.confidence,
            )
        };
        let version_labels = [
            ("model", manifest.name.clone()),
            ("version", manifest.version.clone()),
        ];
        for (distribution, value) in [("label", label_psi), ("confidence", confidence_psi)] {
            let mut series = version_labels.to_vec();
            series.push(("distribution", distribution.to_owned()));
            metrics::gauge!("medai_model_drift_psi", &series).set(value);
        }
    }

    pub fn record_agreement(&self, model: &str, version: &str, agrees: bool) {
        metrics::counter!(
            "medai_model_shadow_comparisons_total",
            "model" => model.to_owned(),
            "version" => version.to_owned(),
            "agreement" => if agrees { "agrees" } else { "disagrees" },
        )
        .increment(1);
    }

    pub fn record_shadow_dropped(&self, model: &str, version: &str) {
        metrics::counter!(
            "medai_model_shadow_dropped_total",
            "model" => model.to_owned(),
            "version" => version.to_owned(),
        )
        .increment(1);
    }
}

/// Describes the rollout families.
pub fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "medai_model_predictions_total",
        "Predictions per model, version, route (ACTIVE, CANARY, SHADOW) and top label."
    );
    describe_histogram!(
        "medai_model_confidence",
        "Top probability of each prediction, per model, version and route (its mean is sum / count)."
    );
    describe_histogram!(
        "medai_model_prediction_seconds",
        Unit::Seconds,
        "Time of one prediction (queue and compute), per model, version and route."
    );
    describe_counter!(
        "medai_model_shadow_comparisons_total",
        "Shadow results compared with the active answer, per model, shadow version and agreement."
    );
    describe_counter!(
        "medai_model_shadow_dropped_total",
        "Request copies not run by the shadow because its queue was full, per model and version."
    );
    describe_gauge!(
        "medai_model_drift_psi",
        "Population stability index of the version's top-label or confidence distribution (this process's predictions) against its validation report's reference."
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_split_is_deterministic_and_near_the_share() {
        let keys: Vec<String> = (0..10_000).map(|index| format!("{index:064x}")).collect();
        let canary = keys
            .iter()
            .filter(|key| routes_to_canary("m", key.as_bytes(), 20))
            .count();
        assert!((1_900..=2_100).contains(&canary), "{canary} of 10000");
        for key in keys.iter().take(100) {
            assert_eq!(
                canary_bucket("m", key.as_bytes()),
                canary_bucket("m", key.as_bytes())
            );
        }
        assert!(!routes_to_canary("m", b"any", 0));
        assert!(routes_to_canary("m", b"any", 100));
    }

    #[test]
    fn a_summary_counts_routes_labels_agreement_and_drift() {
        let labels = vec!["a".to_owned(), "b".to_owned()];
        let row = |route: &str, label: &str, confidence: f64, agreement: &str| {
            (
                route.to_owned(),
                label.to_owned(),
                confidence,
                10.0,
                agreement.to_owned(),
            )
        };
        let rows = vec![
            row("ACTIVE", "a", 0.95, ""),
            row("CANARY", "a", 0.55, ""),
            row("SHADOW", "b", 0.75, "DISAGREES"),
            row("SHADOW", "a", 0.95, "AGREES"),
        ];
        let reference = ReferenceDistributions {
            labels: [("a".to_owned(), 0.75), ("b".to_owned(), 0.25)].into(),
            confidence: vec![0.0, 0.0, 0.0, 0.0, 0.0, 0.25, 0.0, 0.25, 0.0, 0.5],
        };
        let summary = summarize(&rows, &labels, Some(&reference));
        assert_eq!(summary.predictions, 4);
        assert_eq!(
            summary.routes,
            vec![
                ("ACTIVE".to_owned(), 1),
                ("CANARY".to_owned(), 1),
                ("SHADOW".to_owned(), 2)
            ]
        );
        assert_eq!(
            summary.labels,
            vec![("a".to_owned(), 3), ("b".to_owned(), 1)]
        );
        assert!((summary.mean_confidence - 0.8).abs() < 1e-12);
        assert_eq!((summary.shadow_compared, summary.shadow_agreements), (2, 1));
        // Exactly the reference's distributions: no drift.
        let (label_psi, confidence_psi) = summary.psi.expect("a reference");
        assert!(label_psi.abs() < 1e-12 && confidence_psi.abs() < 1e-12);
        assert_eq!(summarize(&rows, &labels, None).psi, None);
    }

    #[test]
    fn the_index_is_zero_on_the_reference_and_grows_with_the_shift() {
        let reference = [0.5, 0.5];
        assert!(population_stability_index(&[50, 50], &reference).abs() < 1e-12);
        let small = population_stability_index(&[60, 40], &reference);
        let large = population_stability_index(&[95, 5], &reference);
        assert!(small > 0.0 && large > small, "{small} {large}");
        // (0.6 − 0.5)·ln(1.2) + (0.4 − 0.5)·ln(0.8)
        let expected = 0.1 * 1.2f64.ln() - 0.1 * 0.8f64.ln();
        assert!((small - expected).abs() < 1e-12);
        assert_eq!(population_stability_index(&[0, 0], &reference), 0.0);
        assert_eq!(confidence_bin(1.0), 9);
        assert_eq!(confidence_bin(0.05), 0);
        assert_eq!(confidence_bin(f64::NAN), 0);
    }
}
