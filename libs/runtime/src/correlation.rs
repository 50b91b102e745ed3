//! Correlation ids: accepted from the caller in `x-correlation-id` (if it is a short, safe
//! token) or generated, then carried to every downstream call and ledger record.

use tonic::metadata::{MetadataMap, MetadataValue};

pub const CORRELATION_HEADER: &str = "x-correlation-id";
const MAX_LENGTH: usize = 64;

/// The caller's correlation id if it is well formed, otherwise a fresh UUID. Anything that
/// could smuggle data (long values, odd characters) is replaced, not trusted.
pub fn correlation_id(metadata: &MetadataMap) -> String {
    accepted_or_new(
        metadata
            .get(CORRELATION_HEADER)
            .and_then(|value| value.to_str().ok()),
    )
}

/// `value` if it is a well-formed correlation id, otherwise a fresh UUID.
pub fn accepted_or_new(value: Option<&str>) -> String {
    value
        .filter(|value| is_well_formed(value))
        .map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_owned)
}

/// Makes a request's headers carry a well-formed correlation id: the caller's, left as it is,
/// else a fresh UUID written in (replacing a malformed one). Nothing is allocated for a caller's
/// well-formed id, so a second layer settling the same request costs only the check.
pub fn settle_correlation_header(headers: &mut http::HeaderMap) {
    if settled_correlation(headers).is_some() {
        return;
    }
    let mut buffer = uuid::Uuid::encode_buffer();
    let fresh = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut buffer);
    if let Ok(value) = http::HeaderValue::from_str(fresh) {
        headers.insert(CORRELATION_HEADER, value);
    }
}

/// The well-formed correlation id a request's headers carry, if any (after
/// [`settle_correlation_header`], always).
pub fn settled_correlation(headers: &http::HeaderMap) -> Option<&str> {
    headers
        .get(CORRELATION_HEADER)
        .and_then(|value| value.to_str().ok())
        .filter(|value| is_well_formed(value))
}

fn is_well_formed(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= MAX_LENGTH
        && value
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.'))
}

/// Puts `id`, and the current span's W3C trace context, on an outgoing request's metadata.
pub fn propagate(metadata: &mut MetadataMap, id: &str) {
    if let Ok(value) = MetadataValue::try_from(id) {
        metadata.insert(CORRELATION_HEADER, value);
    }
    crate::telemetry::inject_trace_context(metadata);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn well_formed_ids_are_kept_and_others_replaced() {
        let mut metadata = MetadataMap::new();
        metadata.insert(
            CORRELATION_HEADER,
            MetadataValue::from_static("pacs-42_a.b"),
        );
        assert_eq!(correlation_id(&metadata), "pacs-42_a.b");

        metadata.insert(
            CORRELATION_HEADER,
            MetadataValue::from_static("John Doe 1970"),
        );
        let replaced = correlation_id(&metadata);
        assert_ne!(replaced, "John Doe 1970");
        assert!(uuid::Uuid::parse_str(&replaced).is_ok());

        assert!(uuid::Uuid::parse_str(&correlation_id(&MetadataMap::new())).is_ok());
    }

    #[test]
    fn a_settled_header_keeps_a_well_formed_id_and_replaces_others() {
        let mut headers = http::HeaderMap::new();
        headers.insert(
            CORRELATION_HEADER,
            http::HeaderValue::from_static("pacs-42_a.b"),
        );
        settle_correlation_header(&mut headers);
        assert_eq!(settled_correlation(&headers), Some("pacs-42_a.b"));

        headers.insert(
            CORRELATION_HEADER,
            http::HeaderValue::from_static("John Doe 1970"),
        );
        assert_eq!(settled_correlation(&headers), None);
        settle_correlation_header(&mut headers);
        let replaced = settled_correlation(&headers)
            .expect("a fresh id")
            .to_owned();
        assert!(uuid::Uuid::parse_str(&replaced).is_ok());
        assert_eq!(headers.get_all(CORRELATION_HEADER).iter().count(), 1);
        // Settled again (the next layer), it stays.
        settle_correlation_header(&mut headers);
        assert_eq!(settled_correlation(&headers), Some(replaced.as_str()));

        let mut empty = http::HeaderMap::new();
        settle_correlation_header(&mut empty);
        assert!(uuid::Uuid::parse_str(settled_correlation(&empty).expect("an id")).is_ok());
    }
}
