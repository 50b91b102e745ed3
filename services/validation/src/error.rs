use medai_imaging::ImageError;
use medai_runtime::errors::{ErrorKind, ServiceError, to_status};

/// The validation error catalogue: the decoders' refusals and the service's own. Each `reason`
/// is a stable code documented in proto/medai/validation/v1/validation.proto. Messages never
/// echo image content or tags.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ValidationError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("the image failed quality checks: {failed}")]
    QualityInsufficient { failed: String },
    #[error("the model input size {width}×{height} is invalid; each side must be 1–{max} px")]
    ModelInputSizeInvalid { width: u32, height: u32, max: u32 },
    #[error("validation failed unexpectedly")]
    Internal(String),
}

impl ServiceError for ValidationError {
    const DOMAIN: &'static str = "medai.validation";

    fn kind(&self) -> ErrorKind {
        match self {
            Self::Internal(_) => ErrorKind::Internal,
            _ => ErrorKind::InvalidArgument,
        }
    }

    fn reason(&self) -> &'static str {
        match self {
            Self::Image(refusal) => refusal.reason(),
            Self::QualityInsufficient { .. } => "IMAGE_QUALITY_INSUFFICIENT",
            Self::ModelInputSizeInvalid { .. } => "MODEL_INPUT_SIZE_INVALID",
            Self::Internal(_) => "INTERNAL",
        }
    }
}

impl From<ValidationError> for tonic::Status {
    fn from(error: ValidationError) -> Self {
        to_status(&error)
    }
}
