use medai_runtime::errors::{ErrorKind, ServiceError, to_status};

#[derive(Debug, thiserror::Error)]
pub enum InferenceError {
    #[error("no active model is named {name}")]
    ModelNotFound { name: String },
    #[error("model {name} is not serving version {version}")]
    VersionNotServed { name: String, version: String },
    #[error("an image is required")]
    ImageMissing,
    #[error("{0}")]
    ImageInconsistent(String),
    #[error("inference failed: {0}")]
    Failed(String),
}

impl ServiceError for InferenceError {
    const DOMAIN: &'static str = "medai.inference";

    fn kind(&self) -> ErrorKind {
        match self {
            Self::ModelNotFound { .. } | Self::VersionNotServed { .. } => ErrorKind::NotFound,
            Self::ImageMissing | Self::ImageInconsistent(_) => ErrorKind::InvalidArgument,
            Self::Failed(_) => ErrorKind::Internal,
        }
    }

    fn reason(&self) -> &'static str {
        match self {
            Self::ModelNotFound { .. } => "MODEL_NOT_FOUND",
            Self::VersionNotServed { .. } => "MODEL_VERSION_NOT_SERVED",
            Self::ImageMissing => "IMAGE_MISSING",
            Self::ImageInconsistent(_) => "IMAGE_INCONSISTENT",
            Self::Failed(_) => "INFERENCE_FAILED",
        }
    }
}

impl From<InferenceError> for tonic::Status {
    fn from(error: InferenceError) -> Self {
        to_status(&error)
    }
}
