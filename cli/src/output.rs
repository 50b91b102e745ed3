//! What the command prints: a table for people (`-o table`, the default) or one JSON document
//! on stdout for programs (`-o json`). Generated protobuf types are turned into JSON here,
//! field by field, so the JSON names are the proto's and stay stable.

use medai_proto::audit::v1::LedgerEntry;
use medai_proto::gateway::v1::InferResponse;
use medai_proto::inference::v1::{ModelVersionInfo, StoredResult};
use serde_json::{Value, json};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    Table,
    Json,
}

#[allow(clippy::print_stdout)]
pub fn line(text: &str) {
    println!("{text}");
}

#[allow(clippy::print_stdout)]
pub fn json_document(value: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
    );
}

/// One JSON document on one line (for a command that keeps running after printing it, so a
/// program reading stdout line by line gets it whole).
#[allow(clippy::print_stdout)]
pub fn json_line(value: &Value) {
    use std::io::Write;
    println!("{value}");
    let _ = std::io::stdout().flush();
}

/// Prints rows under a header, each column as wide as its widest cell.
pub fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|cell| cell.len()).collect();
    for row in rows {
        for (index, cell) in row.iter().enumerate() {
            if let Some(width) = widths.get_mut(index) {
                *width = (*width).max(cell.chars().count());
            }
        }
    }
    let render = |cells: Vec<String>| {
        cells
            .iter()
            .enumerate()
            .map(|(index, cell)| {
                let width = widths.get(index).copied().unwrap_or(0);
                format!("{cell:<width$}")
            })
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    line(&render(
        header.iter().map(|cell| (*cell).to_owned()).collect(),
    ));
    for row in rows {
        line(&render(row.clone()));
    }
}

pub fn infer_json(response: &InferResponse) -> Value {
    let prediction = response.prediction.clone().unwrap_or_default();
    json!({
        "result_id": response.result_id,
        "model_name": prediction.model_name,
        "model_version": prediction.model_version,
        "top_label": prediction.top_label,
        "top_probability": prediction.top_probability,
        "probabilities": prediction.probabilities.iter()
            .map(|entry| json!({"label": entry.label, "probability": entry.probability}))
            .collect::<Vec<_>>(),
        "decision": prediction.decision,
        "decision_threshold": prediction.decision_threshold,
        "status": "PRELIMINARY",
        "image_sha256": response.image_sha256,
        "ledger_seq": response.ledger_seq,
        "ledger_hash": response.ledger_hash,
        "replayed": response.replayed,
        "quality_passed": response.quality.as_ref().map(|quality| quality.passed),
        "intended_use": prediction.intended_use,
    })
}

pub fn infer_table(response: &InferResponse) {
    let prediction = response.prediction.clone().unwrap_or_default();
    line(&format!("result     {}", response.result_id));
    line(&format!(
        "model      {} version {}",
        prediction.model_name, prediction.model_version
    ));
    line(&format!(
        "label      {} ({:.4})",
        prediction.top_label, prediction.top_probability
    ));
    for entry in &prediction.probabilities {
        line(&format!("  {:<12} {:.4}", entry.label, entry.probability));
    }
    line(&format!(
        "decision   {} (threshold {:.2}), status PRELIMINARY until signed",
        prediction.decision, prediction.decision_threshold
    ));
    line(&format!(
        "ledger     seq {} hash {}",
        response.ledger_seq, response.ledger_hash
    ));
    if response.replayed {
        line("replayed   the stored answer to an earlier request with this idempotency key");
    }
    line(&format!("NOTE       {}", prediction.intended_use));
}

pub fn result_json(result: &StoredResult) -> Value {
    json!({
        "result_id": result.result_id,
        "model_name": result.model_name,
        "model_version": result.model_version,
        "model_sha256": result.model_sha256,
        "image_sha256": result.image_sha256,
        "top_label": result.top_label,
        "confidence": result.confidence,
        "probabilities": result.probabilities.iter()
            .map(|entry| json!({"label": entry.label, "probability": entry.probability}))
            .collect::<Vec<_>>(),
        "decision": result.decision,
        "decision_threshold": result.decision_threshold,
        "status": result.status,
        "created_at": result.created_at,
        "ledger_seq": result.ledger_seq,
        "content_sha256": result.content_sha256,
        "intended_use": result.intended_use,
        "signature": result.signature.as_ref().map(|signature| json!({
            "signer_name": signature.signer_name,
            "signer_subject": signature.signer_subject,
            "meaning": signature.meaning,
            "reason": signature.reason,
            "signed_at": signature.signed_at,
            "ledger_seq": signature.ledger_seq,
        })),
    })
}

pub fn result_row(result: &StoredResult) -> Vec<String> {
    vec![
        result.result_id.clone(),
        format!("{} {}", result.model_name, result.model_version),
        result.top_label.clone(),
        format!("{:.4}", result.confidence),
        result.status.clone(),
        result.created_at.clone(),
    ]
}

pub const RESULT_HEADER: [&str; 6] = [
    "RESULT",
    "MODEL",
    "LABEL",
    "CONFIDENCE",
    "STATUS",
    "CREATED",
];

pub fn result_details(result: &StoredResult) {
    line(&format!("result     {}", result.result_id));
    line(&format!(
        "model      {} version {} (sha256 {})",
        result.model_name, result.model_version, result.model_sha256
    ));
    line(&format!(
        "label      {} ({:.4})",
        result.top_label, result.confidence
    ));
    for entry in &result.probabilities {
        line(&format!("  {:<12} {:.4}", entry.label, entry.probability));
    }
    line(&format!(
        "decision   {} (threshold {:.2})",
        result.decision, result.decision_threshold
    ));
    line(&format!("status     {}", result.status));
    line(&format!("created    {}", result.created_at));
    line(&format!("content    sha256 {}", result.content_sha256));
    if let Some(signature) = &result.signature {
        line(&format!(
            "signed     {} by {} at {} (ledger seq {}){}",
            signature.meaning,
            signature.signer_name,
            signature.signed_at,
            signature.ledger_seq,
            if signature.reason.is_empty() {
                String::new()
            } else {
                format!(": {}", signature.reason)
            }
        ));
    }
    line(&format!("NOTE       {}", result.intended_use));
}

pub fn model_json(version: &ModelVersionInfo) -> Value {
    json!({
        "name": version.name,
        "version": version.version,
        "status": version.status,
        "ready": version.ready,
        "sha256": version.sha256,
        "intended_use": version.intended_use,
    })
}

pub fn model_row(version: &ModelVersionInfo) -> Vec<String> {
    vec![
        version.name.clone(),
        version.version.clone(),
        version.status.clone(),
        if version.ready { "yes" } else { "no" }.to_owned(),
        version.sha256.chars().take(16).collect(),
    ]
}

pub const MODEL_HEADER: [&str; 5] = ["MODEL", "VERSION", "STATUS", "READY", "SHA256"];

pub fn ledger_entry_json(entry: &LedgerEntry) -> Value {
    let context: Value = serde_json::from_str(&entry.context_json)
        .unwrap_or(Value::String(entry.context_json.clone()));
    json!({
        "seq": entry.seq,
        "recorded_at": entry.recorded_at,
        "actor": entry.actor,
        "action": entry.action,
        "resource": entry.resource,
        "outcome": entry.outcome,
        "context": context,
        "prev_hash": entry.prev_hash,
        "hash": entry.hash,
    })
}

pub fn ledger_entry_row(entry: &LedgerEntry) -> Vec<String> {
    vec![
        entry.seq.to_string(),
        entry.recorded_at.clone(),
        entry.actor.clone(),
        entry.action.clone(),
        entry.resource.clone(),
        entry.outcome.clone(),
    ]
}

pub const LEDGER_HEADER: [&str; 6] = ["SEQ", "RECORDED", "ACTOR", "ACTION", "RESOURCE", "OUTCOME"];
