//! The gateway's answer for one image, as the bridge keeps it in its outbox (JSON) until the
//! report is delivered. Converted from the generated type here, at the edge.

use medai_proto::gateway::v1::InferResponse;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InferenceOutcome {
    pub result_id: String,
    pub ledger_seq: u64,
    pub ledger_hash: String,
    pub image_sha256: String,
    pub replayed: bool,
    pub model_name: String,
    pub model_version: String,
    /// Empty when the gateway did not return it.
    pub model_sha256: String,
    /// In the model's label order.
    pub probabilities: Vec<(String, f32)>,
    pub top_label: String,
    pub top_probability: f32,
    pub decision_threshold: f32,
    pub decision: String,
    pub intended_use: String,
    pub quality: Option<QualitySummary>,
    /// The mesh flagged the input as outside the model's domain (issue 18); absent in
    /// outboxes written before, which read as not flagged.
    #[serde(default)]
    pub unusual_case: bool,
    /// Stable reasons, such as MODALITY_OUTSIDE_INTENDED_USE.
    #[serde(default)]
    pub unusual_case_reasons: Vec<String>,
    /// DICOM only: which frame of how many the model judged, under which frame policy (issue
    /// 15). Absent in a replayed answer (the original answer's ledger record keeps it) and in
    /// outboxes written before the bridge kept it.
    #[serde(default)]
    pub frame: Option<JudgedFrame>,
}

/// The gateway's `InferResponse.frame`: frame `frame_number` (1-based) of `number_of_frames`
/// was judged under `policy` (`FIRST_FRAME`, `MIDDLE_FRAME`; `REFUSE` for a single frame).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JudgedFrame {
    pub frame_number: u32,
    pub number_of_frames: u32,
    pub policy: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QualitySummary {
    pub profile: String,
    pub passed: bool,
    /// (code, measured value, passed)
    pub checks: Vec<(String, f64, bool)>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("the gateway's answer lacks {0}")]
pub struct IncompleteAnswer(pub &'static str);

impl TryFrom<InferResponse> for InferenceOutcome {
    type Error = IncompleteAnswer;

    fn try_from(response: InferResponse) -> Result<Self, Self::Error> {
        let prediction = response.prediction.ok_or(IncompleteAnswer("prediction"))?;
        if response.result_id.is_empty() {
            return Err(IncompleteAnswer("result_id"));
        }
        if response.ledger_seq == 0 {
            return Err(IncompleteAnswer("ledger_seq"));
        }
        let quality = response.quality.map(|report| QualitySummary {
            profile: report.profile,
            passed: report.passed,
            checks: report
                .checks
                .into_iter()
                .map(|check| {
                    let passed = check.verdict() == medai_proto::validation::v1::Verdict::Pass;
                    (check.code, check.value, passed)
                })
                .collect(),
        });
        let unusual_case = prediction.unusual_case.clone().unwrap_or_default();
        let frame = response.frame.map(|frame| JudgedFrame {
            frame_number: frame.frame_number,
            number_of_frames: frame.number_of_frames,
            policy: frame.policy,
        });
        Ok(Self {
            frame,
            unusual_case: unusual_case.flagged,
            unusual_case_reasons: unusual_case.reasons,
            result_id: response.result_id,
            ledger_seq: response.ledger_seq,
            ledger_hash: response.ledger_hash,
            image_sha256: response.image_sha256,
            replayed: response.replayed,
            model_name: prediction.model_name,
            model_version: prediction.model_version,
            model_sha256: prediction.model_sha256,
            probabilities: prediction
                .probabilities
                .into_iter()
                .map(|entry| (entry.label, entry.probability))
                .collect(),
            top_label: prediction.top_label,
            top_probability: prediction.top_probability,
            decision_threshold: prediction.decision_threshold,
            decision: prediction.decision,
            intended_use: prediction.intended_use,
            quality,
        })
    }
}
