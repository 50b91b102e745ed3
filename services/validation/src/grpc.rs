//! The gRPC edge of the validation service.

use medai_proto::common::v1 as common;
use medai_proto::validation::v1::validation_service_server::ValidationService;
use medai_proto::validation::v1::{ValidateImageRequest, ValidateImageResponse};
use tonic::{Request, Response, Status};

use crate::config::ImageLimits;
use crate::decode::{CanonicalImage, SourceFormat, decode_image};
use crate::error::ValidationError;

pub struct ValidationApi {
    pub limits: ImageLimits,
}

fn declared_format(format: i32) -> Option<SourceFormat> {
    match common::ImageFormat::try_from(format).ok()? {
        common::ImageFormat::Png => Some(SourceFormat::Png),
        common::ImageFormat::Jpeg => Some(SourceFormat::Jpeg),
        common::ImageFormat::Dicom => Some(SourceFormat::Dicom),
        common::ImageFormat::Unspecified => None,
    }
}

impl From<CanonicalImage> for common::CanonicalImage {
    fn from(image: CanonicalImage) -> Self {
        let source_format = match image.source_format {
            SourceFormat::Png => common::ImageFormat::Png,
            SourceFormat::Jpeg => common::ImageFormat::Jpeg,
            SourceFormat::Dicom => common::ImageFormat::Dicom,
        };
        Self {
            width: image.width,
            height: image.height,
            channels: image.channels,
            bit_depth: image.bit_depth,
            photometric_interpretation: image.photometric_interpretation.to_owned(),
            pixels: image.pixels,
            metadata: Some(common::SafeMetadata {
                source_format: source_format.into(),
                modality: image.metadata.modality,
                body_part_examined: image.metadata.body_part_examined,
                transfer_syntax_uid: image.metadata.transfer_syntax_uid,
                rows: image.metadata.rows,
                columns: image.metadata.columns,
            }),
        }
    }
}

#[tonic::async_trait]
impl ValidationService for ValidationApi {
    async fn validate_image(
        &self,
        request: Request<ValidateImageRequest>,
    ) -> Result<Response<ValidateImageResponse>, Status> {
        let request = request.into_inner();
        let limits = self.limits;
        let declared = declared_format(request.format);
        // Decoding is CPU-bound and runs third-party codecs: keep it off the async workers, and
        // let a codec panic become a refusal rather than a crash.
        let decoded =
            tokio::task::spawn_blocking(move || decode_image(&request.image, declared, &limits))
                .await
                .unwrap_or(Err(ValidationError::Undecodable {
                    format: "the declared format",
                }));
        match decoded {
            Ok(image) => {
                metrics::counter!("medai_validation_images_total", "outcome" => "accepted")
                    .increment(1);
                Ok(Response::new(ValidateImageResponse {
                    image: Some(image.into()),
                }))
            }
            Err(error) => {
                metrics::counter!("medai_validation_images_total", "outcome" => error.reason_label()).increment(1);
                tracing::info!(reason = error.reason_label(), "image refused");
                Err(error.into())
            }
        }
    }
}

impl ValidationError {
    fn reason_label(&self) -> &'static str {
        medai_runtime::ServiceError::reason(self)
    }
}
