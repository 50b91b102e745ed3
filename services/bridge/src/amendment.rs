//! The amended report: when a result is signed (the gateway's `SignResult`) after its
//! preliminary SR went out, the bridge sends a second SR for the same image: a new SOP Instance
//! UID in the same report series, the same content plus the signature, Preliminary Flag FINAL,
//! Verification Flag VERIFIED with the signer as Verifying Observer, and the preliminary report
//! in its Predecessor Documents Sequence (PS3.3 C.17.2).

use dicom_core::VR;
use dicom_dictionary_std::{tags, uids};
use dicom_object::InMemDicomObject;
use serde::{Deserialize, Serialize};

use crate::outcome::InferenceOutcome;
use crate::report::{
    CODING_SCHEME, MANUFACTURER, Report, ReportError, SourceInstance, build_report, code,
    put_sequence, put_str, text_item, truncate,
};
use crate::uids::derived_uid;

/// A result's electronic signature as the gateway's results API reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignatureOutcome {
    pub signer_name: String,
    /// REVIEWED, APPROVED or REJECTED.
    pub meaning: String,
    pub reason: String,
    /// RFC 3339 UTC.
    pub signed_at: String,
    pub ledger_seq: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum AmendmentError {
    #[error(transparent)]
    Report(#[from] ReportError),
    #[error("the signature time is not RFC 3339")]
    SignedAt,
}

/// The amended report of `source` whose preliminary report was `preliminary_uid`.
pub fn build_amended_report(
    uid_root: &str,
    source: &SourceInstance<'_>,
    outcome: &InferenceOutcome,
    signature: &SignatureOutcome,
    preliminary_uid: &str,
    created_at: time::OffsetDateTime,
) -> Result<Report, AmendmentError> {
    let signed_at = time::OffsetDateTime::parse(
        &signature.signed_at,
        &time::format_description::well_known::Rfc3339,
    )
    .map_err(|_| AmendmentError::SignedAt)?
    .to_offset(time::UtcOffset::UTC);
    let Report {
        sop_instance_uid: _,
        mut dataset,
    } = build_report(uid_root, source, outcome, created_at)?;
    let sop_instance_uid = derived_uid(
        uid_root,
        "sr-amended",
        &[
            source.sop_instance_uid,
            &outcome.result_id,
            &signature.ledger_seq.to_string(),
        ],
    );
    put_str(
        &mut dataset,
        tags::SOP_INSTANCE_UID,
        VR::UI,
        &sop_instance_uid,
    );
    put_str(&mut dataset, tags::INSTANCE_NUMBER, VR::IS, "2");
    put_str(&mut dataset, tags::PRELIMINARY_FLAG, VR::CS, "FINAL");
    put_str(&mut dataset, tags::VERIFICATION_FLAG, VR::CS, "VERIFIED");
    let verified_at = format!(
        "{:04}{:02}{:02}{:02}{:02}{:02}",
        signed_at.year(),
        u8::from(signed_at.month()),
        signed_at.day(),
        signed_at.hour(),
        signed_at.minute(),
        signed_at.second()
    );
    let mut observer = InMemDicomObject::new_empty();
    put_str(
        &mut observer,
        tags::VERIFYING_OBSERVER_NAME,
        VR::PN,
        &truncate(&signature.signer_name, 64),
    );
    put_sequence(
        &mut observer,
        tags::VERIFYING_OBSERVER_IDENTIFICATION_CODE_SEQUENCE,
        Vec::new(),
    );
    put_str(
        &mut observer,
        tags::VERIFYING_ORGANIZATION,
        VR::LO,
        MANUFACTURER,
    );
    put_str(
        &mut observer,
        tags::VERIFICATION_DATE_TIME,
        VR::DT,
        &verified_at,
    );
    put_sequence(
        &mut dataset,
        tags::VERIFYING_OBSERVER_SEQUENCE,
        vec![observer],
    );
    // The preliminary report this one amends: same study, the bridge's report series.
    let series_instance_uid = derived_uid(uid_root, "sr-series", &[source.study_instance_uid]);
    let mut referenced = InMemDicomObject::new_empty();
    put_str(
        &mut referenced,
        tags::REFERENCED_SOP_CLASS_UID,
        VR::UI,
        uids::COMPREHENSIVE_SR_STORAGE,
    );
    put_str(
        &mut referenced,
        tags::REFERENCED_SOP_INSTANCE_UID,
        VR::UI,
        preliminary_uid,
    );
    let mut series = InMemDicomObject::new_empty();
    put_str(
        &mut series,
        tags::SERIES_INSTANCE_UID,
        VR::UI,
        &series_instance_uid,
    );
    put_sequence(&mut series, tags::REFERENCED_SOP_SEQUENCE, vec![referenced]);
    let mut study = InMemDicomObject::new_empty();
    put_str(
        &mut study,
        tags::STUDY_INSTANCE_UID,
        VR::UI,
        source.study_instance_uid,
    );
    put_sequence(&mut study, tags::REFERENCED_SERIES_SEQUENCE, vec![series]);
    put_sequence(
        &mut dataset,
        tags::PREDECESSOR_DOCUMENTS_SEQUENCE,
        vec![study],
    );
    // The signature itself, readable in the document.
    let mut statement = format!(
        "{} by {} at {} (ledger seq {})",
        signature.meaning, signature.signer_name, signature.signed_at, signature.ledger_seq
    );
    if !signature.reason.is_empty() {
        statement.push_str(&format!(": {}", signature.reason));
    }
    if let Some(mut items) = dataset
        .get(tags::CONTENT_SEQUENCE)
        .and_then(|element| element.items())
        .map(<[InMemDicomObject]>::to_vec)
    {
        items.push(text_item(
            "CONTAINS",
            code("SIGNATURE", CODING_SCHEME, "Electronic signature"),
            &statement,
        ));
        put_sequence(&mut dataset, tags::CONTENT_SEQUENCE, items);
    }
    Ok(Report {
        sop_instance_uid,
        dataset,
    })
}
