//! The gRPC edge of the validation service.

use medai_proto::common::v1 as common;
use medai_proto::validation::v1 as pb;
use medai_proto::validation::v1::validation_service_server::ValidationService;
use medai_proto::validation::v1::{ValidateImageRequest, ValidateImageResponse};
use tonic::{Request, Response, Status};

use crate::decode_slots::SlotError;
use crate::error::ValidationError;
use crate::quality::{Comparison, QualityPolicy, QualityReport, Verdict, assess};
use medai_imaging::decode::{
    CanonicalImage, DecodePlan, SourceFormat, decode_planned, plan_decode,
};
use medai_imaging::model_input::{ModelInputSize, resize_canonical};
use medai_imaging::{FramePolicy, ImageError, ImageLimits};

pub struct ValidationApi {
    pub decode_slots: crate::decode_slots::DecodeSlots,
    pub limits: ImageLimits,
    /// Shared, not copied per request.
    pub quality: std::sync::Arc<QualityPolicy>,
    pub frames: crate::frame_policy::FramePolicies,
    pub patient_key_secret: Option<std::sync::Arc<Vec<u8>>>,
}

impl From<QualityReport> for pb::QualityReport {
    fn from(report: QualityReport) -> Self {
        let passed = report.passed();
        let checks = report
            .checks
            .into_iter()
            .map(|check| pb::QualityCheck {
                code: check.code.to_owned(),
                value: check.value,
                threshold: check.threshold,
                comparison: match check.comparison {
                    Comparison::AtLeast => pb::Comparison::AtLeast,
                    Comparison::AtMost => pb::Comparison::AtMost,
                }
                .into(),
                verdict: match check.verdict {
                    Verdict::Pass => pb::Verdict::Pass,
                    Verdict::Fail => pb::Verdict::Fail,
                    Verdict::NotMeasurable => pb::Verdict::NotMeasurable,
                }
                .into(),
            })
            .collect();
        Self {
            profile: report.profile,
            passed,
            checks,
        }
    }
}

fn declared_format(format: i32) -> Option<SourceFormat> {
    match common::ImageFormat::try_from(format).ok()? {
        common::ImageFormat::Png => Some(SourceFormat::Png),
        common::ImageFormat::Jpeg => Some(SourceFormat::Jpeg),
        common::ImageFormat::Dicom => Some(SourceFormat::Dicom),
        common::ImageFormat::Unspecified => None,
    }
}

/// The model input size a request names, checked: each side from 1 to the largest side an
/// image may have.
fn model_input_size(
    requested: Option<pb::ModelInputSize>,
    limits: &ImageLimits,
) -> Result<Option<ModelInputSize>, ValidationError> {
    let Some(requested) = requested else {
        return Ok(None);
    };
    let in_range = |side: u32| (1..=limits.max_side).contains(&side);
    if !in_range(requested.width) || !in_range(requested.height) {
        return Err(ValidationError::ModelInputSizeInvalid {
            width: requested.width,
            height: requested.height,
            max: limits.max_side,
        });
    }
    Ok(Some(ModelInputSize {
        width: requested.width,
        height: requested.height,
    }))
}

/// `image` resized to the model's input size, in its own sample type, after every check ran on
/// the full image; `None` when it is already that size or in a layout no model input is made
/// from (inference then answers it as it always has).
fn resized_to(image: &CanonicalImage, size: ModelInputSize) -> Option<CanonicalImage> {
    if (image.width, image.height) == (size.width, size.height) {
        return None;
    }
    let pixels = resize_canonical(
        &image.pixels,
        (image.width, image.height),
        (image.channels, image.bit_depth),
        size,
    )?;
    Some(CanonicalImage {
        width: size.width,
        height: size.height,
        pixels,
        photometric_interpretation: image.photometric_interpretation,
        channels: image.channels,
        bit_depth: image.bit_depth,
        source_format: image.source_format,
        metadata: image.metadata.clone(),
    })
}

/// The decoded image as the mesh carries it.
fn canonical_message(
    image: CanonicalImage,
    resized_for_model_input: bool,
) -> common::CanonicalImage {
    {
        let source_format = match image.source_format {
            SourceFormat::Png => common::ImageFormat::Png,
            SourceFormat::Jpeg => common::ImageFormat::Jpeg,
            SourceFormat::Dicom => common::ImageFormat::Dicom,
        };
        common::CanonicalImage {
            width: image.width,
            height: image.height,
            channels: image.channels,
            bit_depth: image.bit_depth,
            photometric_interpretation: image.photometric_interpretation.to_owned(),
            pixels: image.pixels.into(),
            metadata: Some(common::SafeMetadata {
                source_format: source_format.into(),
                patient_key: image.metadata.patient_key,
                modality: image.metadata.modality,
                body_part_examined: image.metadata.body_part_examined,
                transfer_syntax_uid: image.metadata.transfer_syntax_uid,
                rows: image.metadata.rows,
                columns: image.metadata.columns,
                frame: image.metadata.frame.map(|frame| common::JudgedFrame {
                    frame_number: frame.frame_number,
                    number_of_frames: frame.number_of_frames,
                    policy: frame.policy.code().to_owned(),
                }),
            }),
            resized_for_model_input,
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
        let policy = std::sync::Arc::clone(&self.quality);
        let frame_policy = self.frames.for_model(&request.model_name);
        let model = request.model_name;
        let model_input = match model_input_size(request.model_input_size, &limits) {
            Ok(size) => size,
            Err(error) => {
                metrics::counter!("medai_validation_images_total", "outcome" => error.reason_label()).increment(1);
                return Err(error.into());
            }
        };
        let secret = self.patient_key_secret.clone();
        // A view of the received buffer, shared with the decode thread without a copy.
        let image = request.image;
        // The decode and the quality checks run on the blocking pool: each is a child span of
        // the call, so a trace shows where a slow validation spent its time.
        let call = tracing::Span::current();
        let outcome = self
            .admit_and_decode(image, declared, limits, frame_policy, move |image, plan| {
                let image =
                    tracing::info_span!(parent: &call, "validation.decode").in_scope(|| {
                        decode_planned(
                            &image,
                            &plan,
                            &limits,
                            secret.as_deref().map(Vec::as_slice),
                            frame_policy,
                        )
                    })?;
                let report = tracing::info_span!(parent: &call, "validation.quality")
                    .in_scope(|| assess(&image, &policy, &model));
                if report.refuse_on_failure && !report.passed() {
                    return Err(ValidationError::QualityInsufficient {
                        failed: report.failed_codes().join(", "),
                    });
                }
                // Only the model-sized image leaves: the checks above needed full resolution,
                // the model does not.
                let resized = model_input.and_then(|size| {
                    tracing::info_span!(parent: &call, "validation.resize_to_model_input")
                        .in_scope(|| resized_to(&image, size))
                });
                Ok(match resized {
                    Some(resized) => (resized, true, report),
                    None => (image, false, report),
                })
            })
            .await;
        match outcome {
            Ok((image, resized, report)) => {
                if resized {
                    metrics::counter!(crate::metric_catalog::RESIZED_TO_MODEL_INPUT).increment(1);
                }
                metrics::counter!("medai_validation_images_total", "outcome" => "accepted")
                    .increment(1);
                for code in report.failed_codes() {
                    metrics::counter!("medai_validation_quality_failures_total", "code" => code)
                        .increment(1);
                }
                Ok(Response::new(ValidateImageResponse {
                    image: Some(canonical_message(image, resized)),
                    quality: Some(report.into()),
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

/// Inputs up to this size are planned on the calling task: reading a PNG or JPEG header, or
/// walking a DICOM data set of this size, costs a few microseconds, less than a round trip
/// through the blocking pool. A panic while planning is still a refusal.
const PLAN_INLINE_BYTES: usize = 256 * 1024;

/// A decode of a small input whose decoded pixels take at most this much (a 256×256 image, a
/// model-sized one) runs on the calling task when no other decode is running: its whole decode,
/// de-identification and quality pass take a few hundred microseconds, and the hand-off to the
/// blocking pool and back two thread wake-ups (issue 14). Larger ones, and any decode beside
/// another, stay on the pool.
const DECODE_INLINE_BYTES: u64 = 256 * 1024;

impl ValidationApi {
    /// Decoding and measuring are CPU-bound and run third-party codecs: they run on the
    /// blocking pool, where a codec panic becomes a refusal rather than a crash. First the
    /// headers are read (the plan: every check that needs no pixel; inline for small inputs,
    /// see [`PLAN_INLINE_BYTES`]), then the decode is admitted
    /// against the memory budget for what its header declares, and only then does it run. A
    /// multi-frame object the model's frame policy refuses is refused from the plan, without
    /// waiting for memory.
    async fn admit_and_decode<T: Send + 'static>(
        &self,
        image: bytes::Bytes,
        declared: Option<SourceFormat>,
        limits: ImageLimits,
        frame_policy: FramePolicy,
        decode: impl FnOnce(bytes::Bytes, DecodePlan) -> Result<T, ValidationError> + Send + 'static,
    ) -> Result<T, ValidationError> {
        let panicked = |_| {
            ValidationError::from(ImageError::Undecodable {
                format: "the declared format",
            })
        };
        let plan = if image.len() <= PLAN_INLINE_BYTES {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                plan_decode(&image, declared, &limits)
            }))
            .map_err(|_| panicked(SlotError::Panicked))?
            .map_err(ValidationError::from)?
        } else {
            let image = image.clone();
            self.decode_slots
                .run(0, move || plan_decode(&image, declared, &limits))
                .await
                .map_err(panicked)?
                .map_err(ValidationError::from)?
        };
        frame_policy.frame_index(plan.frames())?;
        let memory_bytes = plan.memory_bytes();
        let small = image.len() <= PLAN_INLINE_BYTES && memory_bytes <= DECODE_INLINE_BYTES;
        let decoded = if small {
            self.decode_slots
                .run_small_inline(memory_bytes, move || decode(image, plan))
                .await
        } else {
            self.decode_slots
                .run(memory_bytes, move || decode(image, plan))
                .await
        };
        decoded.map_err(|error| match error {
            SlotError::OverBudget { needed, budget } => {
                ValidationError::from(ImageError::DecodedSizeTooLarge {
                    declared: needed,
                    limit: budget,
                })
            }
            SlotError::Panicked => panicked(error),
        })?
    }
}

impl ValidationError {
    fn reason_label(&self) -> &'static str {
        medai_runtime::ServiceError::reason(self)
    }
}
