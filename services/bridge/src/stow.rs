//! DICOMweb STOW-RS in (PS3.18 10.5, "Store Instances"): `POST /studies` and
//! `POST /studies/{study}` with a `multipart/related; type="application/dicom"` body, one Part 10
//! instance per part. Each instance goes through the same outbox as a C-STORE (the same UID
//! checks, the same accepted SOP classes and transfer syntaxes, the same instance size limit) and
//! the answer is given only once every stored instance is committed.
//!
//! Who may store: a PACS presenting the configured bearer token (`Authorization: Bearer …`);
//! what it sends is recorded as coming from the configured client name, as a C-STORE records the
//! calling AE title. Everything is bounded before it is buffered: concurrent requests, the
//! declared and the received request size, the number of parts and each part's size (checked
//! while the body arrives), the time a request may take. A malformed request is answered 400 with
//! a stable code and nothing of it is stored.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use dicom_object::meta::FileMetaTable;
use futures::StreamExt;
use medai_runtime::config::{Secret, from_str_or_native};
use medai_runtime::connections::{self, BoundedListener, ConnectionLimits, ConnectionSlots};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::outbox::{NewInstance, Outbox};
use crate::scp::{ABSTRACT_SYNTAXES, TRANSFER_SYNTAXES, part10_instance};

/// What a part may hold beyond the instance's data set: its headers, the preamble and the file
/// meta group.
pub const PART_OVERHEAD_BYTES: usize = 64 * 1024;
/// A part's headers larger than this are not headers.
const MAX_PART_HEADER_BYTES: usize = 16 * 1024;
/// RFC 2046 says 1 to 70 characters, but Orthanc's DICOMweb plugin sends 73 (two UUIDs); a
/// boundary is taken up to this length.
const MAX_BOUNDARY_LENGTH: usize = 200;

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StowSettings {
    /// Where the STOW-RS HTTP server listens.
    pub listen_addr: SocketAddr,
    /// Recorded as the sender of what arrives over STOW-RS (AE title rules: 1 to 16 characters).
    pub client_name: String,
    /// The token the PACS sends as `Authorization: Bearer <token>`; at least 32 characters.
    pub bearer_token: Secret,
    /// Instances in one request.
    #[serde(default = "default_max_parts", deserialize_with = "from_str_or_native")]
    pub max_parts: usize,
    /// Bytes in one request body (the body is held in memory while it is checked).
    #[serde(
        default = "default_max_request_bytes",
        deserialize_with = "from_str_or_native"
    )]
    pub max_request_bytes: usize,
    /// Requests served at once; more are answered 503.
    #[serde(
        default = "default_max_concurrent_requests",
        deserialize_with = "from_str_or_native"
    )]
    pub max_concurrent_requests: usize,
    /// Time for a request body to arrive in full.
    #[serde(
        default = "default_request_timeout_seconds",
        deserialize_with = "from_str_or_native"
    )]
    pub request_timeout_seconds: u64,
    /// Connections open at once; one more is closed as it is accepted (and counted in
    /// `medai_connections_refused_total`).
    #[serde(
        default = "default_max_connections",
        deserialize_with = "from_str_or_native"
    )]
    pub max_connections: usize,
    /// A connection on which nothing is read or written for this long is closed (an idle
    /// keep-alive connection between requests, or a peer that went silent).
    #[serde(
        default = "default_idle_seconds",
        deserialize_with = "from_str_or_native"
    )]
    pub idle_seconds: u64,
}

fn default_max_parts() -> usize {
    1000
}
fn default_max_request_bytes() -> usize {
    256 * 1024 * 1024
}
fn default_max_concurrent_requests() -> usize {
    4
}
fn default_request_timeout_seconds() -> u64 {
    300
}
fn default_max_connections() -> usize {
    64
}
fn default_idle_seconds() -> u64 {
    120
}

impl StowSettings {
    pub fn validate(&self) -> Result<(), &'static str> {
        if !crate::config::is_valid_ae_title(&self.client_name) {
            return Err("stow.client_name must follow the AE title rules (1 to 16 characters)");
        }
        if self.bearer_token.expose().len() < 32 {
            return Err("stow.bearer_token must be at least 32 characters");
        }
        if self.max_parts == 0 || self.max_concurrent_requests == 0 {
            return Err("stow.max_parts and stow.max_concurrent_requests must be at least 1");
        }
        if self.max_connections == 0 || self.idle_seconds == 0 {
            return Err("stow.max_connections and stow.idle_seconds must be at least 1");
        }
        if self.max_request_bytes < 4096 {
            return Err("stow.max_request_bytes must be at least 4096");
        }
        Ok(())
    }
}

/// Why a whole request is refused (nothing of it is stored). Each has one HTTP status and one
/// stable code, answered as `{"code": …, "message": …}`.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone, Copy)]
pub enum StowRefusal {
    #[error("too many requests at once")]
    Busy,
    #[error("a valid bearer token is required")]
    Unauthenticated,
    #[error("the body must be multipart/related with type=\"application/dicom\"")]
    UnsupportedMediaType,
    #[error("the multipart boundary is missing or invalid")]
    BoundaryMissing,
    #[error("the request body is larger than allowed")]
    RequestTooLarge,
    #[error("the request holds more parts than allowed")]
    TooManyParts,
    #[error("a part is larger than the instance size limit")]
    PartTooLarge,
    #[error("the request body did not arrive in time")]
    Timeout,
    #[error("the request body could not be read")]
    BodyUnreadable,
    #[error("the body has no multipart delimiter")]
    MultipartMalformed,
    #[error("the body ends before its closing delimiter")]
    MultipartUnterminated,
    #[error("the body holds no part")]
    MultipartEmpty,
    #[error("a part's headers are malformed or too large")]
    PartHeadersMalformed,
    #[error("a part is not application/dicom")]
    PartNotDicom,
    #[error("the study in the path is not a valid UID")]
    StudyUidInvalid,
}

impl StowRefusal {
    pub fn status(self) -> StatusCode {
        match self {
            Self::Busy => StatusCode::SERVICE_UNAVAILABLE,
            Self::Unauthenticated => StatusCode::UNAUTHORIZED,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::RequestTooLarge | Self::TooManyParts | Self::PartTooLarge => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            Self::Timeout => StatusCode::REQUEST_TIMEOUT,
            Self::BoundaryMissing
            | Self::BodyUnreadable
            | Self::MultipartMalformed
            | Self::MultipartUnterminated
            | Self::MultipartEmpty
            | Self::PartHeadersMalformed
            | Self::PartNotDicom
            | Self::StudyUidInvalid => StatusCode::BAD_REQUEST,
        }
    }

    pub fn code(self) -> &'static str {
        match self {
            Self::Busy => "STOW_BUSY",
            Self::Unauthenticated => "STOW_UNAUTHENTICATED",
            Self::UnsupportedMediaType => "STOW_UNSUPPORTED_MEDIA_TYPE",
            Self::BoundaryMissing => "STOW_MULTIPART_BOUNDARY_MISSING",
            Self::RequestTooLarge => "STOW_REQUEST_TOO_LARGE",
            Self::TooManyParts => "STOW_TOO_MANY_PARTS",
            Self::PartTooLarge => "STOW_PART_TOO_LARGE",
            Self::Timeout => "STOW_REQUEST_TIMEOUT",
            Self::BodyUnreadable => "STOW_BODY_UNREADABLE",
            Self::MultipartMalformed => "STOW_MULTIPART_MALFORMED",
            Self::MultipartUnterminated => "STOW_MULTIPART_UNTERMINATED",
            Self::MultipartEmpty => "STOW_MULTIPART_EMPTY",
            Self::PartHeadersMalformed => "STOW_PART_HEADERS_MALFORMED",
            Self::PartNotDicom => "STOW_PART_NOT_APPLICATION_DICOM",
            Self::StudyUidInvalid => "STOW_STUDY_UID_INVALID",
        }
    }
}

impl IntoResponse for StowRefusal {
    fn into_response(self) -> Response {
        metrics::counter!("medai_bridge_stow_requests_refused_total", "code" => self.code())
            .increment(1);
        let body = serde_json::json!({ "code": self.code(), "message": self.to_string() });
        let mut response = (
            self.status(),
            [(header::CONTENT_TYPE, "application/json")],
            body.to_string(),
        )
            .into_response();
        match self {
            Self::Unauthenticated => {
                response.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"medai-bridge\""),
                );
            }
            Self::Busy => {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            _ => {}
        }
        response
    }
}

/// Why one instance of a request was not stored: the Failure Reason (0008,1197) answered for it
/// in the Failed SOP Sequence (PS3.18 table 10.5.3-2, codes of PS3.4 annex B).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstanceFailure {
    /// 0xC000: not a readable Part 10 instance, or its UIDs are missing or invalid.
    CannotUnderstand,
    /// 0x0122: a SOP class the bridge does not take (the same list as its Storage SCP).
    SopClassNotSupported,
    /// 0xC122: a transfer syntax the bridge does not take.
    TransferSyntaxNotSupported,
    /// 0xA900: the data set does not match its file meta group or the study in the path.
    DataSetDoesNotMatch,
    /// 0xA700: the outbox could not store it.
    OutOfResources,
}

impl InstanceFailure {
    pub fn reason(self) -> u16 {
        match self {
            Self::CannotUnderstand => 0xC000,
            Self::SopClassNotSupported => 0x0122,
            Self::TransferSyntaxNotSupported => 0xC122,
            Self::DataSetDoesNotMatch => 0xA900,
            Self::OutOfResources => 0xA700,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Self::CannotUnderstand => "unreadable",
            Self::SopClassNotSupported => "sop_class",
            Self::TransferSyntaxNotSupported => "transfer_syntax",
            Self::DataSetDoesNotMatch => "mismatch",
            Self::OutOfResources => "out_of_resources",
        }
    }
}

/// What became of one part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PartOutcome {
    Stored {
        sop_class_uid: String,
        sop_instance_uid: String,
    },
    Failed {
        /// Empty when the part was too broken to name it.
        sop_class_uid: String,
        sop_instance_uid: String,
        failure: InstanceFailure,
    },
}

/// The bounds a request is checked against.
#[derive(Debug, Clone, Copy)]
pub struct StowLimits {
    pub max_parts: usize,
    pub max_part_bytes: usize,
    pub max_request_bytes: usize,
}

/// The parameters of a `multipart/related` Content-Type header.
fn boundary_of(content_type: &str) -> Result<String, StowRefusal> {
    let mut pieces = content_type.split(';');
    let media_type = pieces.next().unwrap_or("").trim();
    if !media_type.eq_ignore_ascii_case("multipart/related") {
        return Err(StowRefusal::UnsupportedMediaType);
    }
    let mut boundary = None;
    for parameter in pieces {
        let Some((name, value)) = parameter.split_once('=') else {
            continue;
        };
        let value = value.trim().trim_matches('"');
        match name.trim().to_ascii_lowercase().as_str() {
            // PS3.18 8.6.1.1: the root part's type; only whole Part 10 instances are taken.
            "type" if !value.eq_ignore_ascii_case("application/dicom") => {
                return Err(StowRefusal::UnsupportedMediaType);
            }
            "boundary" => boundary = Some(value.to_owned()),
            _ => {}
        }
    }
    match boundary {
        Some(boundary)
            if !boundary.is_empty()
                && boundary.len() <= MAX_BOUNDARY_LENGTH
                && boundary
                    .bytes()
                    .all(|byte| byte.is_ascii_graphic() || byte == b' ') =>
        {
            Ok(boundary)
        }
        _ => Err(StowRefusal::BoundaryMissing),
    }
}

/// Collects a multipart body chunk by chunk, counting parts and measuring the open part as the
/// bytes arrive, so a request over its bounds is refused before more of it is held.
pub struct MultipartCollector {
    /// The body after a synthetic CRLF, so the first delimiter reads like every other one.
    body: Vec<u8>,
    finder: memchr::memmem::Finder<'static>,
    delimiter_length: usize,
    /// Where the next search for a delimiter starts.
    searched: usize,
    /// Offsets of every delimiter found (`CRLF--boundary`).
    delimiters: Vec<usize>,
    limits: StowLimits,
}

impl MultipartCollector {
    pub fn new(boundary: &str, limits: StowLimits) -> Self {
        let delimiter = format!("\r\n--{boundary}").into_bytes();
        Self {
            body: b"\r\n".to_vec(),
            delimiter_length: delimiter.len(),
            finder: memchr::memmem::Finder::new(&delimiter).into_owned(),
            searched: 0,
            delimiters: Vec::new(),
            limits,
        }
    }

    fn open_part_start(&self) -> usize {
        self.delimiters
            .last()
            .map_or(0, |offset| offset + self.delimiter_length)
    }

    pub fn push(&mut self, chunk: &[u8]) -> Result<(), StowRefusal> {
        if self.body.len() - 2 + chunk.len() > self.limits.max_request_bytes {
            return Err(StowRefusal::RequestTooLarge);
        }
        self.body.extend_from_slice(chunk);
        let largest_part = self.limits.max_part_bytes + PART_OVERHEAD_BYTES;
        let mut from = self.searched;
        while let Some(found) = self.finder.find(&self.body[from..]) {
            let offset = from + found;
            if offset - self.open_part_start() > largest_part {
                return Err(StowRefusal::PartTooLarge);
            }
            self.delimiters.push(offset);
            // One delimiter opens each part and one closes the body.
            if self.delimiters.len() > self.limits.max_parts + 1 {
                return Err(StowRefusal::TooManyParts);
            }
            from = offset + self.delimiter_length;
        }
        // A delimiter may straddle the next chunk: search its possible start again then.
        self.searched = from.max(
            self.body
                .len()
                .saturating_sub(self.delimiter_length.saturating_sub(1)),
        );
        if self.body.len() - self.open_part_start() > largest_part + self.delimiter_length {
            return Err(StowRefusal::PartTooLarge);
        }
        Ok(())
    }

    /// The parts' contents (after their headers), once the whole body has arrived.
    pub fn parts(&self) -> Result<Vec<&[u8]>, StowRefusal> {
        if self.delimiters.is_empty() {
            return Err(StowRefusal::MultipartMalformed);
        }
        let mut parts = Vec::new();
        for (index, &offset) in self.delimiters.iter().enumerate() {
            let after = offset + self.delimiter_length;
            let rest = &self.body[after..];
            if rest.starts_with(b"--") {
                if parts.is_empty() {
                    return Err(StowRefusal::MultipartEmpty);
                }
                return Ok(parts);
            }
            // Transport padding, then the line break that ends the delimiter line.
            let padding = rest
                .iter()
                .take_while(|byte| **byte == b' ' || **byte == b'\t')
                .count();
            if !rest[padding..].starts_with(b"\r\n") {
                return Err(StowRefusal::MultipartMalformed);
            }
            let Some(&next) = self.delimiters.get(index + 1) else {
                return Err(StowRefusal::MultipartUnterminated);
            };
            let part = &self.body[after + padding + 2..next];
            parts.push(self.content_of(part)?);
        }
        Err(StowRefusal::MultipartUnterminated)
    }

    fn content_of<'a>(&self, part: &'a [u8]) -> Result<&'a [u8], StowRefusal> {
        // A part without headers starts with the empty line; its type would be text/plain.
        if part.starts_with(b"\r\n") {
            return Err(StowRefusal::PartNotDicom);
        }
        let end = memchr::memmem::find(part, b"\r\n\r\n")
            .filter(|end| *end <= MAX_PART_HEADER_BYTES)
            .ok_or(StowRefusal::PartHeadersMalformed)?;
        let headers =
            std::str::from_utf8(&part[..end]).map_err(|_| StowRefusal::PartHeadersMalformed)?;
        let mut media_type = None;
        for line in headers.split("\r\n") {
            let (name, value) = line
                .split_once(':')
                .ok_or(StowRefusal::PartHeadersMalformed)?;
            if name.trim().eq_ignore_ascii_case("content-type") {
                media_type = Some(value.split(';').next().unwrap_or("").trim().to_owned());
            }
        }
        if !media_type
            .is_some_and(|media_type| media_type.eq_ignore_ascii_case("application/dicom"))
        {
            return Err(StowRefusal::PartNotDicom);
        }
        let content = &part[end + 4..];
        if content.len() > self.limits.max_part_bytes + PART_OVERHEAD_BYTES {
            return Err(StowRefusal::PartTooLarge);
        }
        Ok(content)
    }
}

/// One part as an outbox instance, with the same checks a C-STORE gets.
pub fn instance_from_part(
    part: &[u8],
    client_name: &str,
    target_study: Option<&str>,
    max_instance_bytes: usize,
) -> Result<NewInstance, PartOutcome> {
    let failed = |sop_class_uid: &str, sop_instance_uid: &str, failure| PartOutcome::Failed {
        sop_class_uid: sop_class_uid.to_owned(),
        sop_instance_uid: sop_instance_uid.to_owned(),
        failure,
    };
    if part.len() < 132 || &part[128..132] != b"DICM" {
        return Err(failed("", "", InstanceFailure::CannotUnderstand));
    }
    let mut data_set = &part[128..];
    let meta = FileMetaTable::from_reader(&mut data_set)
        .map_err(|_| failed("", "", InstanceFailure::CannotUnderstand))?;
    let sop_class_uid = meta.media_storage_sop_class_uid();
    let sop_instance_uid = meta.media_storage_sop_instance_uid();
    if !crate::uids::is_valid_uid(sop_class_uid) || !crate::uids::is_valid_uid(sop_instance_uid) {
        return Err(failed("", "", InstanceFailure::CannotUnderstand));
    }
    // The Storage SCP's list, less Verification (not a storage class).
    if sop_class_uid == dicom_dictionary_std::uids::VERIFICATION
        || !ABSTRACT_SYNTAXES.contains(&sop_class_uid)
    {
        return Err(failed(
            sop_class_uid,
            sop_instance_uid,
            InstanceFailure::SopClassNotSupported,
        ));
    }
    if !TRANSFER_SYNTAXES.contains(&meta.transfer_syntax()) {
        return Err(failed(
            sop_class_uid,
            sop_instance_uid,
            InstanceFailure::TransferSyntaxNotSupported,
        ));
    }
    if data_set.len() > max_instance_bytes {
        return Err(failed(
            sop_class_uid,
            sop_instance_uid,
            InstanceFailure::OutOfResources,
        ));
    }
    let instance = part10_instance(meta.transfer_syntax(), data_set.to_vec(), client_name)
        .map_err(|_| {
            failed(
                sop_class_uid,
                sop_instance_uid,
                InstanceFailure::CannotUnderstand,
            )
        })?;
    let matches_meta =
        instance.sop_instance_uid == sop_instance_uid && instance.sop_class_uid == sop_class_uid;
    let matches_target = target_study.is_none_or(|study| study == instance.study_instance_uid);
    if !matches_meta || !matches_target {
        return Err(failed(
            sop_class_uid,
            sop_instance_uid,
            InstanceFailure::DataSetDoesNotMatch,
        ));
    }
    Ok(instance)
}

/// The Store Instances response (PS3.18 10.5.3): 200 when every instance is stored, 409 when
/// none is, 202 otherwise; a DICOM JSON object with the Referenced and Failed SOP Sequences.
pub fn store_response(outcomes: &[PartOutcome]) -> (StatusCode, serde_json::Value) {
    let uid = |value: &str| -> serde_json::Value {
        if value.is_empty() {
            serde_json::json!({ "vr": "UI" })
        } else {
            serde_json::json!({ "vr": "UI", "Value": [value] })
        }
    };
    let mut referenced = Vec::new();
    let mut failed = Vec::new();
    for outcome in outcomes {
        match outcome {
            PartOutcome::Stored {
                sop_class_uid,
                sop_instance_uid,
            } => referenced.push(serde_json::json!({
                "00081150": uid(sop_class_uid),
                "00081155": uid(sop_instance_uid),
            })),
            PartOutcome::Failed {
                sop_class_uid,
                sop_instance_uid,
                failure,
            } => failed.push(serde_json::json!({
                "00081150": uid(sop_class_uid),
                "00081155": uid(sop_instance_uid),
                "00081197": { "vr": "US", "Value": [failure.reason()] },
            })),
        }
    }
    let status = match (referenced.is_empty(), failed.is_empty()) {
        (false, true) => StatusCode::OK,
        (true, _) => StatusCode::CONFLICT,
        (false, false) => StatusCode::ACCEPTED,
    };
    let mut answer = serde_json::Map::new();
    if !referenced.is_empty() {
        answer.insert(
            "00081199".to_owned(),
            serde_json::json!({ "vr": "SQ", "Value": referenced }),
        );
    }
    if !failed.is_empty() {
        answer.insert(
            "00081198".to_owned(),
            serde_json::json!({ "vr": "SQ", "Value": failed }),
        );
    }
    (status, serde_json::Value::Object(answer))
}

#[derive(Clone)]
struct StowState {
    settings: Arc<StowSettings>,
    token_digest: [u8; 32],
    limits: StowLimits,
    max_instance_bytes: usize,
    outbox: Outbox,
    requests: Arc<Semaphore>,
}

/// The STOW-RS HTTP server.
pub struct StowServer {
    state: StowState,
}

impl StowServer {
    /// `max_instance_bytes` is the Storage SCP's limit, applied to each part's data set.
    pub fn new(settings: StowSettings, max_instance_bytes: usize, outbox: Outbox) -> Self {
        let token_digest = Sha256::digest(settings.bearer_token.expose().as_bytes()).into();
        let limits = StowLimits {
            max_parts: settings.max_parts,
            max_part_bytes: max_instance_bytes,
            max_request_bytes: settings.max_request_bytes,
        };
        let requests = Arc::new(Semaphore::new(settings.max_concurrent_requests));
        Self {
            state: StowState {
                settings: Arc::new(settings),
                token_digest,
                limits,
                max_instance_bytes,
                outbox,
                requests,
            },
        }
    }

    /// Serves until `shutdown` completes, then finishes the requests under way.
    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let slots = ConnectionSlots::new(
            &ConnectionLimits {
                max_open: self.state.settings.max_connections,
                idle_seconds: self.state.settings.idle_seconds,
                ..ConnectionLimits::default()
            },
            connections::STOW,
        );
        let router = Router::new()
            .route("/studies", post(store_instances))
            .route("/studies/{study}", post(store_study_instances))
            .with_state(self.state);
        axum::serve(BoundedListener::new(listener, slots), router)
            .with_graceful_shutdown(shutdown)
            .await
    }
}

async fn store_instances(
    State(state): State<StowState>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    match store(&state, None, &headers, body).await {
        Ok(response) => response,
        Err(refusal) => refusal.into_response(),
    }
}

async fn store_study_instances(
    State(state): State<StowState>,
    Path(study): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    match store(&state, Some(study), &headers, body).await {
        Ok(response) => response,
        Err(refusal) => refusal.into_response(),
    }
}

fn authenticated(state: &StowState, headers: &HeaderMap) -> bool {
    let Some(presented) = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
    else {
        return false;
    };
    // Digests are compared, so the time taken says nothing about the token's characters.
    let digest: [u8; 32] = Sha256::digest(presented.trim().as_bytes()).into();
    digest
        .iter()
        .zip(state.token_digest.iter())
        .fold(0u8, |difference, (left, right)| difference | (left ^ right))
        == 0
}

async fn store(
    state: &StowState,
    target_study: Option<String>,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, StowRefusal> {
    let _permit = state
        .requests
        .clone()
        .try_acquire_owned()
        .map_err(|_| StowRefusal::Busy)?;
    if !authenticated(state, headers) {
        return Err(StowRefusal::Unauthenticated);
    }
    if let Some(study) = &target_study
        && !crate::uids::is_valid_uid(study)
    {
        return Err(StowRefusal::StudyUidInvalid);
    }
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .ok_or(StowRefusal::UnsupportedMediaType)?;
    let boundary = boundary_of(content_type)?;
    let declared_length = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.trim().parse::<u64>().ok());
    if declared_length.is_some_and(|length| {
        length > u64::try_from(state.limits.max_request_bytes).unwrap_or(u64::MAX)
    }) {
        return Err(StowRefusal::RequestTooLarge);
    }

    let mut collector = MultipartCollector::new(&boundary, state.limits);
    let mut stream = body.into_data_stream();
    let timeout = Duration::from_secs(state.settings.request_timeout_seconds);
    let collected = tokio::time::timeout(timeout, async {
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|_| StowRefusal::BodyUnreadable)?;
            collector.push(&chunk)?;
        }
        Ok::<(), StowRefusal>(())
    })
    .await;
    match collected {
        Err(_) => return Err(StowRefusal::Timeout),
        Ok(Err(refusal)) => return Err(refusal),
        Ok(Ok(())) => {}
    }
    let parts = collector.parts()?;

    let mut outcomes = Vec::with_capacity(parts.len());
    for part in parts {
        let outcome = match instance_from_part(
            part,
            &state.settings.client_name,
            target_study.as_deref(),
            state.max_instance_bytes,
        ) {
            Err(failed) => failed,
            Ok(instance) => {
                let sop_class_uid = instance.sop_class_uid.clone();
                let sop_instance_uid = instance.sop_instance_uid.clone();
                match state.outbox.store(instance).await {
                    Ok(stored_now) => {
                        metrics::counter!("medai_bridge_instances_received_total").increment(1);
                        tracing::info!(duplicate = !stored_now, "instance stored (STOW-RS)");
                        PartOutcome::Stored {
                            sop_class_uid,
                            sop_instance_uid,
                        }
                    }
                    Err(error) => {
                        tracing::error!(error = %error, "instance not stored; failed with out of resources");
                        PartOutcome::Failed {
                            sop_class_uid,
                            sop_instance_uid,
                            failure: InstanceFailure::OutOfResources,
                        }
                    }
                }
            }
        };
        if let PartOutcome::Failed { failure, .. } = &outcome {
            metrics::counter!("medai_bridge_instances_refused_total", "reason" => failure.label())
                .increment(1);
            tracing::warn!(reason = failure.reason(), "instance refused (STOW-RS)");
        }
        outcomes.push(outcome);
    }
    let (status, answer) = store_response(&outcomes);
    Ok((
        status,
        [(header::CONTENT_TYPE, "application/dicom+json")],
        answer.to_string(),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: StowLimits = StowLimits {
        max_parts: 2,
        max_part_bytes: 1024,
        max_request_bytes: 1 << 20,
    };

    fn body(parts: &[&[u8]]) -> Vec<u8> {
        let mut body = b"preamble to ignore\r\n".to_vec();
        for part in parts {
            body.extend_from_slice(b"--b0und\r\nContent-Type: application/dicom\r\n\r\n");
            body.extend_from_slice(part);
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(b"--b0und--\r\n");
        body
    }

    #[test]
    fn parts_are_found_whatever_the_chunking_even_when_a_delimiter_straddles_two_chunks() {
        let whole = body(&[b"first part", b"second\r\n--b0un part"]);
        for chunk_size in [1, 3, 7, whole.len()] {
            let mut collector = MultipartCollector::new("b0und", LIMITS);
            for chunk in whole.chunks(chunk_size) {
                collector.push(chunk).expect("within bounds");
            }
            assert_eq!(
                collector.parts().expect("well formed"),
                [&b"first part"[..], &b"second\r\n--b0un part"[..]],
                "chunks of {chunk_size}"
            );
        }
    }

    #[test]
    fn counts_and_sizes_are_refused_while_the_body_arrives() {
        // Ten parts against a limit of two: refused long before the body has arrived.
        let mut collector = MultipartCollector::new("b0und", LIMITS);
        let many = body(&[&b"a part"[..]; 10]);
        let mut taken = 0;
        let refusal = many
            .chunks(8)
            .find_map(|chunk| {
                taken += chunk.len();
                collector.push(chunk).err()
            })
            .expect("refused");
        assert_eq!(refusal, StowRefusal::TooManyParts);
        assert!(taken < many.len() / 2, "took {taken} of {}", many.len());

        // An open part growing past the limit is refused before its end arrives.
        let mut collector = MultipartCollector::new("b0und", LIMITS);
        collector
            .push(b"--b0und\r\nContent-Type: application/dicom\r\n\r\n")
            .expect("headers");
        let big = vec![7u8; 1024 + PART_OVERHEAD_BYTES + 64];
        assert_eq!(collector.push(&big), Err(StowRefusal::PartTooLarge));

        let mut collector = MultipartCollector::new(
            "b0und",
            StowLimits {
                max_request_bytes: 100,
                ..LIMITS
            },
        );
        assert_eq!(
            collector.push(&[0u8; 101]),
            Err(StowRefusal::RequestTooLarge)
        );
    }

    #[test]
    fn malformed_bodies_get_their_stable_reason() {
        let cases: [(&[u8], StowRefusal); 5] = [
            (b"no delimiter at all", StowRefusal::MultipartMalformed),
            (b"--b0und--\r\n", StowRefusal::MultipartEmpty),
            (
                b"--b0und\r\nContent-Type: application/dicom\r\n\r\nunterminated",
                StowRefusal::MultipartUnterminated,
            ),
            (
                b"--b0und\r\nContent-Type: text/plain\r\n\r\nx\r\n--b0und--",
                StowRefusal::PartNotDicom,
            ),
            (
                b"--b0und\r\nno colon here\r\n\r\nx\r\n--b0und--",
                StowRefusal::PartHeadersMalformed,
            ),
        ];
        for (body, expected) in cases {
            let mut collector = MultipartCollector::new("b0und", LIMITS);
            collector.push(body).expect("within bounds");
            assert_eq!(
                collector.parts().err(),
                Some(expected),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn the_content_type_must_be_multipart_related_of_application_dicom_with_a_boundary() {
        assert_eq!(
            boundary_of("multipart/related; type=\"application/dicom\"; boundary=\"a b\""),
            Ok("a b".to_owned())
        );
        assert_eq!(
            boundary_of("Multipart/Related; boundary=xyz"),
            Ok("xyz".to_owned())
        );
        // What Orthanc's DICOMweb plugin sends: two UUIDs, 73 characters.
        let orthanc = "51f5d282-7e22-4d47-bb3e-8f4e42e69545-51f5d282-7e22-4d47-bb3e-8f4e42e69545";
        assert_eq!(
            boundary_of(&format!(
                "multipart/related; type=\"application/dicom\"; boundary={orthanc}"
            )),
            Ok(orthanc.to_owned())
        );
        assert_eq!(
            boundary_of("application/dicom"),
            Err(StowRefusal::UnsupportedMediaType)
        );
        assert_eq!(
            boundary_of("multipart/related; type=\"application/dicom+json\"; boundary=x"),
            Err(StowRefusal::UnsupportedMediaType)
        );
        assert_eq!(
            boundary_of("multipart/related; type=\"application/dicom\""),
            Err(StowRefusal::BoundaryMissing)
        );
        assert_eq!(
            boundary_of(&format!("multipart/related; boundary={}", "x".repeat(201))),
            Err(StowRefusal::BoundaryMissing)
        );
    }

    #[test]
    fn the_response_is_200_202_or_409_with_the_referenced_and_failed_sequences() {
        let stored = PartOutcome::Stored {
            sop_class_uid: "1.2.840.10008.5.1.4.1.1.4".to_owned(),
            sop_instance_uid: "1.2.3.4".to_owned(),
        };
        let failed = PartOutcome::Failed {
            sop_class_uid: String::new(),
            sop_instance_uid: String::new(),
            failure: InstanceFailure::CannotUnderstand,
        };
        let (status, answer) = store_response(std::slice::from_ref(&stored));
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            answer["00081199"]["Value"][0]["00081155"]["Value"][0],
            "1.2.3.4"
        );
        assert!(answer.get("00081198").is_none());
        let (status, answer) = store_response(&[stored, failed.clone()]);
        assert_eq!(status, StatusCode::ACCEPTED);
        assert_eq!(
            answer["00081198"]["Value"][0]["00081197"]["Value"][0],
            0xC000
        );
        let (status, _) = store_response(&[failed]);
        assert_eq!(status, StatusCode::CONFLICT);
    }
}
