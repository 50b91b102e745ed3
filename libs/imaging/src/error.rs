/// Why an image was refused. Each variant's `reason` is a stable code documented in
/// proto/medai/validation/v1/validation.proto. Messages never echo image content or tags.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ImageError {
    #[error("no image bytes were sent")]
    Empty,
    #[error("the image has {actual} bytes; the limit is {limit}")]
    TooLarge { actual: usize, limit: usize },
    #[error("the image could not be decoded as {format}")]
    Undecodable { format: &'static str },
    #[error("the image is {width}×{height} px; each side must be {min}–{max} px")]
    DimensionsOutOfRange {
        width: u32,
        height: u32,
        min: u32,
        max: u32,
    },
    #[error("the DICOM object has no pixel data")]
    DicomNoPixelData,
    #[error("the DICOM object declares {frames} frames; the limit is {limit}")]
    TooManyFrames { frames: u32, limit: u32 },
    /// The model's frame policy refuses objects of more than one frame.
    #[error(
        "the DICOM object has {frames} frames; this model's frame policy refuses multi-frame objects"
    )]
    DicomMultiFrameNotSupported { frames: u32 },
    /// The pixel data does not hold the frames the header declares.
    #[error("the DICOM object declares {declared} frames; its pixel data holds {held}")]
    DicomFrameCountMismatch { declared: u32, held: u32 },
    #[error("the pixel data would decode to {declared} bytes; the limit is {limit}")]
    DecodedSizeTooLarge { declared: u64, limit: u64 },
    #[error("the DICOM transfer syntax {uid} cannot be decoded by this service")]
    DicomUnsupportedTransferSyntax { uid: String },
    #[error("the DICOM pixel data uses {what}, which this service does not decode")]
    DicomUnsupportedPixelFormat { what: &'static str },
    #[error("the DICOM object declares an element longer than the bytes that follow it")]
    DicomDeclaredLengthExceedsInput,
    #[error("the DICOM object nests sequences more than {limit} deep")]
    DicomNestingTooDeep { limit: usize },
    #[error("the DICOM object holds more than {limit} data elements and items")]
    DicomTooManyElements { limit: u32 },
    /// Identifying text may be drawn into the pixels; they cannot be de-identified here.
    #[error("the DICOM object declares burned-in annotation")]
    DicomBurnedInAnnotation,
}

impl ImageError {
    /// The stable code the refusal is answered with.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Empty => "IMAGE_EMPTY",
            Self::TooLarge { .. } => "IMAGE_TOO_LARGE",
            Self::Undecodable { .. } => "IMAGE_UNDECODABLE",
            Self::DimensionsOutOfRange { .. } => "IMAGE_DIMENSIONS_OUT_OF_RANGE",
            Self::DicomNoPixelData => "DICOM_NO_PIXEL_DATA",
            Self::TooManyFrames { .. } => "DICOM_TOO_MANY_FRAMES",
            Self::DicomMultiFrameNotSupported { .. } => "DICOM_MULTI_FRAME_NOT_SUPPORTED",
            Self::DicomFrameCountMismatch { .. } => "DICOM_FRAME_COUNT_MISMATCH",
            Self::DecodedSizeTooLarge { .. } => "IMAGE_DECODED_SIZE_TOO_LARGE",
            Self::DicomUnsupportedTransferSyntax { .. } => "DICOM_UNSUPPORTED_TRANSFER_SYNTAX",
            Self::DicomBurnedInAnnotation => "DICOM_BURNED_IN_ANNOTATION",
            Self::DicomDeclaredLengthExceedsInput => "DICOM_DECLARED_LENGTH_EXCEEDS_INPUT",
            Self::DicomNestingTooDeep { .. } => "DICOM_NESTING_TOO_DEEP",
            Self::DicomTooManyElements { .. } => "DICOM_TOO_MANY_ELEMENTS",
            Self::DicomUnsupportedPixelFormat { .. } => "DICOM_UNSUPPORTED_PIXEL_FORMAT",
        }
    }
}
