//! Decoding PNG, JPEG and DICOM into the canonical pixel buffer. Limits are checked in the
//! cheapest order: byte count, then declared dimensions (from headers, before any pixel is
//! decompressed), then the decode itself under an allocation limit.

use std::io::Cursor;

use dicom_dictionary_std::tags;
use dicom_encoding::TransferSyntaxIndex;
use dicom_object::file::ReadPreamble;
use dicom_object::{DefaultDicomObject, OpenFileOptions};
use dicom_pixeldata::{
    ConvertOptions, DecodedPixelData, ModalityLutOption, PhotometricInterpretation, PixelDecoder,
    PixelRepresentation, VoiLutFunction,
};
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;
use image::{
    DynamicImage, GrayImage, ImageDecoder, ImageFormat as RasterFormat, ImageReader, Limits,
    RgbImage,
};

use crate::display::{GreySamples, GreyTransform, VoiFunction, Window, normalise_stored};
use crate::error::ImageError;
use crate::frames::{FramePolicy, JudgedFrame};
use crate::limits::ImageLimits;
use crate::pixel_rewrite::PixelHeader;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceFormat {
    Png,
    Jpeg,
    Dicom,
}

impl SourceFormat {
    fn name(self) -> &'static str {
        match self {
            Self::Png => "PNG",
            Self::Jpeg => "JPEG",
            Self::Dicom => "DICOM",
        }
    }
}

/// Metadata that identifies no one and may travel with the pixels.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SafeMetadata {
    /// HMAC-SHA-256 (hex, first 128 bits) of the patient identifier and its issuer, under the
    /// service's secret; empty without a secret or an identifier. Not reversible without the key.
    pub patient_key: String,
    pub modality: String,
    pub body_part_examined: String,
    pub transfer_syntax_uid: String,
    pub rows: u32,
    pub columns: u32,
    /// DICOM only: which frame of how many the pixels are, and the policy that chose it.
    pub frame: Option<JudgedFrame>,
}

/// The canonical pixel buffer: row-major, channels interleaved, 16-bit samples little-endian.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CanonicalImage {
    pub width: u32,
    pub height: u32,
    pub channels: u32,
    pub bit_depth: u32,
    pub photometric_interpretation: &'static str,
    pub pixels: Vec<u8>,
    pub source_format: SourceFormat,
    pub metadata: SafeMetadata,
}

/// Identifies the format from magic bytes: PNG and JPEG signatures, or "DICM" after the
/// 128-byte preamble.
pub fn sniff_format(bytes: &[u8]) -> Option<SourceFormat> {
    if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        return Some(SourceFormat::Png);
    }
    if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        return Some(SourceFormat::Jpeg);
    }
    if bytes.len() >= 132 && &bytes[128..132] == b"DICM" {
        return Some(SourceFormat::Dicom);
    }
    None
}

/// Validates and decodes `bytes`. `declared` is the caller's claim, if any; the bytes decide.
/// The pseudonymous patient key: a keyed hash, so the same patient groups together while the
/// identifier itself never leaves this service.
pub fn patient_key(secret: &[u8], patient_id: &str, issuer: &str) -> String {
    if patient_id.is_empty() {
        return String::new();
    }
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let mut context = ring::hmac::Context::with_key(&key);
    context.update(b"medai-patient-key-v1\x00");
    context.update(issuer.as_bytes());
    context.update(b"\x00");
    context.update(patient_id.as_bytes());
    hex::encode(&context.sign().as_ref()[..16])
}

pub fn decode_image(
    bytes: &[u8],
    declared: Option<SourceFormat>,
    limits: &ImageLimits,
) -> Result<CanonicalImage, ImageError> {
    decode_image_with_key(bytes, declared, limits, None)
}

/// As [`decode_image`], deriving the patient key under `patient_key_secret` when given. A
/// multi-frame DICOM object is judged on its first frame ([`FramePolicy::FirstFrame`]), and the
/// image says so ([`SafeMetadata::frame`]); the service applies each model's own policy through
/// [`decode_planned`].
pub fn decode_image_with_key(
    bytes: &[u8],
    declared: Option<SourceFormat>,
    limits: &ImageLimits,
    patient_key_secret: Option<&[u8]>,
) -> Result<CanonicalImage, ImageError> {
    let plan = plan_decode(bytes, declared, limits)?;
    decode_planned(
        bytes,
        &plan,
        limits,
        patient_key_secret,
        FramePolicy::FirstFrame,
    )
}

/// What decoding an image will cost, known from its header alone: every check that needs no
/// pixel has passed, and [`DecodePlan::memory_bytes`] says how much memory the decode may hold,
/// so a server can admit it against a memory budget before anything is inflated or decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodePlan {
    format: SourceFormat,
    /// The bytes the (top-level) pixel data decodes to as declared, for DICOM.
    pixel_bytes: Option<u64>,
    memory_bytes: u64,
    /// The frames the header declares (1 for PNG and JPEG).
    frames: u32,
}

impl DecodePlan {
    pub fn format(&self) -> SourceFormat {
        self.format
    }

    /// The frames the header declares, checked against the frame limit (1 for PNG and JPEG).
    pub fn frames(&self) -> u32 {
        self.frames
    }

    /// The memory the decode may hold at its peak: the declared pixel data (or the parsed data
    /// set, if larger) plus working copies of one frame.
    pub fn memory_bytes(&self) -> u64 {
        self.memory_bytes
    }
}

/// Checks `bytes` as far as its headers go: byte count, format, and for DICOM the structure walk
/// (declared lengths, nesting, element count, deflate cap) and the image attributes; for PNG and
/// JPEG the dimensions their headers declare.
pub fn plan_decode(
    bytes: &[u8],
    declared: Option<SourceFormat>,
    limits: &ImageLimits,
) -> Result<DecodePlan, ImageError> {
    if bytes.is_empty() {
        return Err(ImageError::Empty);
    }
    if bytes.len() > limits.max_bytes {
        return Err(ImageError::TooLarge {
            actual: bytes.len(),
            limit: limits.max_bytes,
        });
    }
    let format = sniff_format(bytes)
        .or(declared)
        .ok_or(ImageError::Undecodable {
            format: "a known format",
        })?;
    match format {
        SourceFormat::Png => plan_raster(bytes, RasterFormat::Png, SourceFormat::Png, limits),
        SourceFormat::Jpeg => plan_raster(bytes, RasterFormat::Jpeg, SourceFormat::Jpeg, limits),
        SourceFormat::Dicom => {
            let walk = crate::dicom_lengths::check_declared_lengths(bytes, limits)?;
            let declared = walk.declared;
            // Only a checked header says what a frame holds; without pixel data nothing is
            // decoded.
            let frame_values = walk.pixel_bytes.map_or(0, |_| {
                u64::from(declared.rows.unwrap_or(0))
                    * u64::from(declared.columns.unwrap_or(0))
                    * u64::from(declared.samples_per_pixel.unwrap_or(1).max(1))
            });
            // The frame as decoded (up to 16 bits), its stored values (32 bits) and the 8-bit
            // display and canonical buffers.
            let working = frame_values * (2 + 4 + 1 + 1);
            Ok(DecodePlan {
                format,
                frames: declared.frames.unwrap_or(1).max(1),
                pixel_bytes: walk.pixel_bytes,
                memory_bytes: walk
                    .pixel_bytes
                    .unwrap_or(0)
                    .max(walk.data_set_bytes)
                    .saturating_add(working),
            })
        }
    }
}

/// Decodes an image whose [`plan_decode`] passed, with that plan; of a multi-frame DICOM
/// object, the frame `frame_policy` names, or its refusal before anything is parsed.
pub fn decode_planned(
    bytes: &[u8],
    plan: &DecodePlan,
    limits: &ImageLimits,
    patient_key_secret: Option<&[u8]>,
    frame_policy: FramePolicy,
) -> Result<CanonicalImage, ImageError> {
    match plan.format {
        SourceFormat::Png => decode_raster(bytes, RasterFormat::Png, SourceFormat::Png, limits),
        SourceFormat::Jpeg => decode_raster(bytes, RasterFormat::Jpeg, SourceFormat::Jpeg, limits),
        SourceFormat::Dicom => {
            let frame_index = frame_policy.frame_index(plan.frames)?;
            let frame = JudgedFrame {
                frame_number: frame_index + 1,
                number_of_frames: plan.frames,
                policy: frame_policy,
            };
            decode_dicom(bytes, plan, limits, patient_key_secret, frame)
        }
    }
}

/// Reads a PNG or JPEG header only: the declared sides are checked before a pixel is decoded,
/// and the decoded size (from the declared sides and colour type) becomes the plan's memory.
fn plan_raster(
    bytes: &[u8],
    raster_format: RasterFormat,
    format: SourceFormat,
    limits: &ImageLimits,
) -> Result<DecodePlan, ImageError> {
    let undecodable = || ImageError::Undecodable {
        format: format.name(),
    };
    let mut reader = ImageReader::with_format(Cursor::new(bytes), raster_format);
    // Reading the header may allocate too (metadata chunks), never more than an image may.
    let mut header_limits = Limits::default();
    header_limits.max_alloc = Some(limits.max_canonical_bytes() as u64 * 2);
    reader.limits(header_limits);
    let decoder = reader.into_decoder().map_err(|_| undecodable())?;
    let (width, height) = decoder.dimensions();
    check_dimensions(width, height, limits)?;
    // The decoded image and its canonical conversion.
    let memory_bytes = decoder.total_bytes().saturating_mul(2);
    Ok(DecodePlan {
        format,
        pixel_bytes: None,
        memory_bytes,
        frames: 1,
    })
}

fn check_dimensions(width: u32, height: u32, limits: &ImageLimits) -> Result<(), ImageError> {
    let in_range = |side: u32| (limits.min_side..=limits.max_side).contains(&side);
    if in_range(width) && in_range(height) {
        return Ok(());
    }
    Err(ImageError::DimensionsOutOfRange {
        width,
        height,
        min: limits.min_side,
        max: limits.max_side,
    })
}

fn decode_raster(
    bytes: &[u8],
    raster_format: RasterFormat,
    format: SourceFormat,
    limits: &ImageLimits,
) -> Result<CanonicalImage, ImageError> {
    let undecodable = || ImageError::Undecodable {
        format: format.name(),
    };
    let mut reader = ImageReader::with_format(Cursor::new(bytes), raster_format);
    let mut decode_limits = Limits::default();
    decode_limits.max_image_width = Some(limits.max_side);
    decode_limits.max_image_height = Some(limits.max_side);
    decode_limits.max_alloc = Some(limits.max_canonical_bytes() as u64 * 2);
    reader.limits(decode_limits);
    let image = reader.decode().map_err(|_| undecodable())?;
    check_dimensions(image.width(), image.height(), limits)?;
    let metadata = SafeMetadata {
        rows: image.height(),
        columns: image.width(),
        ..SafeMetadata::default()
    };
    Ok(canonicalise(image, format, metadata))
}

/// A DICOM object that passed every check that needs no decompression.
struct CheckedDicom {
    object: DefaultDicomObject,
    transfer_syntax_uid: String,
    rows: u32,
    columns: u32,
    /// The frame to decode from `object`: the chosen one, or 0 when it was rewritten as the
    /// object's only frame.
    decode_index: u32,
}

// `get`, not `element_opt`: the latter builds an access error (capturing a backtrace when
// backtraces are enabled) for every absent attribute before answering `None`.
fn read_text(object: &DefaultDicomObject, tag: dicom_object::Tag) -> String {
    object
        .get(tag)
        .and_then(|element| element.to_str().ok())
        .map(|text| text.trim().to_owned())
        .unwrap_or_default()
}

fn read_u32(object: &DefaultDicomObject, tag: dicom_object::Tag) -> Option<u32> {
    object
        .get(tag)
        .and_then(|element| element.to_int::<u32>().ok())
}

const RLE_LOSSLESS: &str = "1.2.840.10008.1.2.5";

/// Parses the object and checks, from its header alone, everything that can be checked before
/// decompression: pixel data present, no burned-in annotation, dimensions, frames, declared
/// decoded size, a transfer syntax this build decodes, pixel data holding the declared frames.
/// `frame_index` (0-based, below the declared frames) is the frame that will be decoded.
fn open_checked_dicom(
    bytes: &[u8],
    plan: &DecodePlan,
    limits: &ImageLimits,
    frame_index: u32,
) -> Result<CheckedDicom, ImageError> {
    // The structure walk of `plan_decode` ran before any parser reserved memory for what the
    // header promises; the parser below reads what it walked.
    let undecodable = || ImageError::Undecodable { format: "DICOM" };
    let mut object: DefaultDicomObject = OpenFileOptions::new()
        .read_preamble(ReadPreamble::Auto)
        .from_reader(Cursor::new(bytes))
        .map_err(|_| undecodable())?;
    let transfer_syntax_uid = object
        .meta()
        .transfer_syntax()
        .trim_end_matches('\0')
        .trim()
        .to_owned();
    if object.get(tags::PIXEL_DATA).is_none() {
        return Err(ImageError::DicomNoPixelData);
    }
    // Pixels that carry identifying text cannot be de-identified by dropping attributes.
    if read_text(&object, tags::BURNED_IN_ANNOTATION).eq_ignore_ascii_case("YES") {
        return Err(ImageError::DicomBurnedInAnnotation);
    }
    let declared_pixels = crate::dicom_lengths::DeclaredPixels {
        rows: read_u32(&object, tags::ROWS),
        columns: read_u32(&object, tags::COLUMNS),
        frames: read_u32(&object, tags::NUMBER_OF_FRAMES),
        samples_per_pixel: read_u32(&object, tags::SAMPLES_PER_PIXEL),
        bits_allocated: read_u32(&object, tags::BITS_ALLOCATED),
    };
    let declared = check_declared_pixels(&declared_pixels, limits)?;
    // The memory admitted for this decode was planned from the walk's reading of the header;
    // a parser reading more (a repeated attribute, say) gets no more than was admitted.
    if declared > plan.pixel_bytes.unwrap_or(0) {
        return Err(undecodable());
    }
    let (rows, columns) = (
        declared_pixels.rows.unwrap_or(0),
        declared_pixels.columns.unwrap_or(0),
    );
    let frames = declared_pixels.frames.unwrap_or(1).max(1);
    let samples = u64::from(declared_pixels.samples_per_pixel.unwrap_or(1).max(1));
    let bits = u64::from(declared_pixels.bits_allocated.unwrap_or(8).max(1));
    let photometric = read_text(&object, tags::PHOTOMETRIC_INTERPRETATION);
    let bits_stored = read_u32(&object, tags::BITS_STORED).map_or(bits, u64::from);
    check_pixel_format(samples, bits, bits_stored, &photometric)?;
    let Some(syntax) = TransferSyntaxRegistry
        .get(&transfer_syntax_uid)
        .filter(|syntax| syntax.can_decode_all())
    else {
        return Err(ImageError::DicomUnsupportedTransferSyntax {
            uid: transfer_syntax_uid,
        });
    };
    let codec_free = syntax.is_codec_free();
    // The frame's plan was made from the walk's reading of Number of Frames; the parser's
    // reading must agree, and the frame must lie within it.
    if frames != plan.frames || frame_index >= frames {
        return Err(undecodable());
    }
    check_frames_held(&object, &photometric, planar_configuration(&object), frames)?;
    if transfer_syntax_uid == RLE_LOSSLESS {
        // Each RLE frame is one fragment (PS3.5 G.2), checked above for a multi-frame object.
        let fragment = object
            .element(tags::PIXEL_DATA)
            .ok()
            .and_then(|element| element.value().fragments())
            .and_then(|fragments| fragments.get(frame_index as usize));
        let segments = (samples * bits.div_ceil(8)) as usize;
        let pixels = rows as usize * columns as usize;
        let sound = fragment.is_some_and(|fragment| {
            crate::rle_check::rle_frame_is_sound(fragment, segments, pixels)
        });
        if !sound {
            return Err(undecodable());
        }
    }
    let header = PixelHeader {
        transfer_syntax_uid: &transfer_syntax_uid,
        codec_free,
        rows,
        columns,
        frames,
        samples,
        bits_allocated: bits,
        bits_stored,
        photometric: &photometric,
        planar_configuration: planar_configuration(&object),
        frame_index,
    };
    let rewritten = crate::pixel_rewrite::prepare(&mut object, &header)?;
    Ok(CheckedDicom {
        object,
        transfer_syntax_uid,
        rows,
        columns,
        decode_index: if rewritten { 0 } else { frame_index },
    })
}

fn planar_configuration(object: &DefaultDicomObject) -> u32 {
    read_u32(object, tags::PLANAR_CONFIGURATION).unwrap_or(0)
}

/// Refuses pixel data that does not hold the frames the header declares (see
/// [`crate::frames`]), before a frame is located in it: a decoder given a frame number past the
/// data must never be asked for it.
fn check_frames_held(
    object: &DefaultDicomObject,
    photometric: &str,
    planar_configuration: u32,
    frames: u32,
) -> Result<(), ImageError> {
    let undecodable = || ImageError::Undecodable { format: "DICOM" };
    let element = object
        .element(tags::PIXEL_DATA)
        .map_err(|_| undecodable())?;
    let value = element.value();
    if let Some(fragments) = value.fragments() {
        let offsets = value.offset_table().map_or(0, <[u32]>::len);
        return crate::frames::check_encapsulated_frames(fragments.len(), offsets, frames);
    }
    let byte_length = value
        .primitive()
        .map(|primitive| primitive.calculate_byte_len() as u64)
        .ok_or_else(undecodable)?;
    let rows = read_u32(object, tags::ROWS).unwrap_or(0);
    let columns = read_u32(object, tags::COLUMNS).unwrap_or(0);
    let samples = read_u32(object, tags::SAMPLES_PER_PIXEL)
        .unwrap_or(1)
        .max(1);
    let bits = read_u32(object, tags::BITS_ALLOCATED).unwrap_or(8).max(1);
    let stored_as_is =
        u64::from(rows) * u64::from(columns) * u64::from(samples) * u64::from(bits.div_ceil(8));
    // Colour as stored: 4:2:2 holds two samples a pixel. A layout the rewrite does not know is
    // refused there, with its own code.
    let layout = (samples == 3 && bits == 8)
        .then(|| crate::native_colour::ColourLayout::of(photometric, planar_configuration))
        .flatten();
    let frame_bytes = match layout {
        Some(layout) => layout.frame_bytes(rows, columns).ok_or_else(undecodable)? as u64,
        None => stored_as_is,
    };
    crate::frames::check_native_frames(byte_length, frame_bytes, frames)
}

/// Checks the image attributes a DICOM header declares against the limits, in this order:
/// rows and columns present, each side in range, frames, then rows × columns × samples × bits
/// × frames; answers that decoded size. Runs before any pixel is read (by the structure walk)
/// and again on what the parser read.
pub(crate) fn check_declared_pixels(
    declared: &crate::dicom_lengths::DeclaredPixels,
    limits: &ImageLimits,
) -> Result<u64, ImageError> {
    let undecodable = || ImageError::Undecodable { format: "DICOM" };
    let rows = declared.rows.ok_or_else(undecodable)?;
    let columns = declared.columns.ok_or_else(undecodable)?;
    check_dimensions(columns, rows, limits)?;
    let frames = declared.frames.unwrap_or(1).max(1);
    if frames > limits.max_frames {
        return Err(ImageError::TooManyFrames {
            frames,
            limit: limits.max_frames,
        });
    }
    let samples = u64::from(declared.samples_per_pixel.unwrap_or(1).max(1));
    let bits = u64::from(declared.bits_allocated.unwrap_or(8).max(1));
    let size =
        u64::from(rows) * u64::from(columns) * samples * bits.div_ceil(8) * u64::from(frames);
    if size > limits.max_decoded_bytes {
        return Err(ImageError::DecodedSizeTooLarge {
            declared: size,
            limit: limits.max_decoded_bytes,
        });
    }
    Ok(size)
}

/// Refuses, from the header, pixel encodings no model input comes in: 1-bit masks, 32-bit
/// dose grids and floats, palette colour (a lookup table, not intensities) and the rest.
fn check_pixel_format(
    samples: u64,
    bits: u64,
    bits_stored: u64,
    photometric: &str,
) -> Result<(), ImageError> {
    let unsupported = |what| Err(ImageError::DicomUnsupportedPixelFormat { what });
    if !matches!(bits, 8 | 16) {
        return unsupported("bits allocated other than 8 or 16");
    }
    // More significant bits than allocated, or none, is a broken header, not a format.
    if !(1..=bits).contains(&bits_stored) {
        return Err(ImageError::Undecodable { format: "DICOM" });
    }
    match (samples, photometric) {
        (1, "MONOCHROME1" | "MONOCHROME2") => Ok(()),
        (3, "RGB") => Ok(()),
        (3, "YBR_FULL" | "YBR_FULL_422" | "YBR_ICT" | "YBR_RCT") if bits == 8 => Ok(()),
        (1, "PALETTE COLOR") => unsupported("palette colour"),
        (1 | 3, _) => unsupported("this photometric interpretation"),
        _ => unsupported("samples per pixel other than 1 or 3"),
    }
}

/// The first frame's stored values as the header defines them (see [`normalise_stored`]).
fn stored_values(decoded: &DecodedPixelData<'_>) -> Result<Vec<i32>, ImageError> {
    if let Some(values) = grey_stored_values(decoded) {
        return Ok(values);
    }
    let options = ConvertOptions::new().with_modality_lut(ModalityLutOption::None);
    let mut values = decoded
        .to_vec_frame_with_options::<i32>(0, &options)
        .map_err(|_| ImageError::Undecodable { format: "DICOM" })?;
    normalise_stored(
        &mut values,
        decoded.bits_stored(),
        decoded.pixel_representation() == PixelRepresentation::Signed,
    );
    Ok(values)
}

/// The stored values of a grey frame of 8 or 16 bits allocated, read straight from the decoded
/// bytes: what dicom-pixeldata's conversion without a modality LUT followed by
/// [`normalise_stored`] gives (it reads the samples as native-endian 16-bit or as bytes, and
/// only the `bits_stored` low bits, sign-extended, survive the normalisation, so reading them
/// as unsigned changes nothing), without its intermediate copy and per-sample checked cast.
/// `None` for anything else, which takes the general conversion.
fn grey_stored_values(decoded: &DecodedPixelData<'_>) -> Option<Vec<i32>> {
    grey_samples(decoded).map(|samples| samples.to_vec())
}

/// The first frame's samples of a grey frame of 8 or 16 bits allocated, as its decoded bytes
/// hold them; `None` for anything else.
fn grey_samples<'a>(decoded: &'a DecodedPixelData<'_>) -> Option<GreySamples<'a>> {
    let bits_stored = decoded.bits_stored();
    let bits_allocated = decoded.bits_allocated();
    if decoded.samples_per_pixel() != 1
        || !matches!(bits_allocated, 8 | 16)
        || !(1..=bits_allocated).contains(&bits_stored)
    {
        return None;
    }
    Some(GreySamples {
        data: decoded.frame_data(0).ok()?,
        bits_allocated,
        bits_stored,
        signed: decoded.pixel_representation() == PixelRepresentation::Signed,
    })
}

/// The 8-bit display image of a grey frame (see [`crate::display`]).
fn grey_display(decoded: &DecodedPixelData<'_>) -> Result<DynamicImage, ImageError> {
    let undecodable = || ImageError::Undecodable { format: "DICOM" };
    let rescale = decoded
        .rescale()
        .ok()
        .and_then(|rescale| rescale.first().copied())
        .ok_or_else(undecodable)?;
    let function = match decoded
        .voi_lut_function()
        .ok()
        .flatten()
        .and_then(|functions| functions.first().copied())
    {
        Some(VoiLutFunction::LinearExact) => VoiFunction::LinearExact,
        Some(VoiLutFunction::Sigmoid) => VoiFunction::Sigmoid,
        _ => VoiFunction::Linear,
    };
    // A malformed window is no reason to refuse the image: its own range is shown instead.
    let window = decoded
        .window()
        .ok()
        .flatten()
        .and_then(|windows| windows.first().copied())
        .map(|window| Window {
            center: window.center,
            width: window.width,
            function,
        });
    let transform = GreyTransform {
        slope: rescale.slope,
        intercept: rescale.intercept,
        window,
        invert: *decoded.photometric_interpretation() == PhotometricInterpretation::Monochrome1,
    };
    // Straight from the frame's bytes when they are plain grey samples: no full-size buffer of
    // stored values between the decoded frame and the display image.
    let shown = match grey_samples(decoded).and_then(|samples| transform.apply_samples(&samples)) {
        Some(shown) => shown,
        None => transform.apply(&stored_values(decoded)?),
    };
    GrayImage::from_raw(decoded.columns(), decoded.rows(), shown)
        .map(DynamicImage::ImageLuma8)
        .ok_or_else(undecodable)
}

fn decode_dicom(
    bytes: &[u8],
    plan: &DecodePlan,
    limits: &ImageLimits,
    patient_key_secret: Option<&[u8]>,
    frame: JudgedFrame,
) -> Result<CanonicalImage, ImageError> {
    let undecodable = || ImageError::Undecodable { format: "DICOM" };
    let CheckedDicom {
        object,
        transfer_syntax_uid,
        rows,
        columns,
        decode_index,
    } = open_checked_dicom(bytes, plan, limits, frame.frame_number - 1)?;
    let patient_key = patient_key_secret
        .map(|secret| {
            patient_key(
                secret,
                &read_text(&object, tags::PATIENT_ID),
                &read_text(&object, tags::ISSUER_OF_PATIENT_ID),
            )
        })
        .unwrap_or_default();
    let metadata = SafeMetadata {
        patient_key,
        modality: read_text(&object, tags::MODALITY),
        body_part_examined: read_text(&object, tags::BODY_PART_EXAMINED),
        transfer_syntax_uid,
        rows,
        columns,
        frame: Some(frame),
    };
    // The frame the model's policy chose (see crate::frames); it is named in the metadata.
    let decoded = object
        .decode_pixel_data_frame(decode_index)
        .map_err(|_| undecodable())?;
    let image = if decoded.samples_per_pixel() == 1 {
        grey_display(&decoded)?
    } else {
        // What dicom-pixeldata's image conversion gave (see crate::colour).
        let rgb = crate::colour::rgb8_of(&decoded)?;
        RgbImage::from_raw(decoded.columns(), decoded.rows(), rgb)
            .map(DynamicImage::ImageRgb8)
            .ok_or_else(undecodable)?
    };
    Ok(canonicalise(image, SourceFormat::Dicom, metadata))
}

/// The first frame's stored sample values, before any modality or VOI transformation, as the
/// DICOM standard defines them; what a reference decoder's raw output is compared with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredSamples {
    pub rows: u32,
    pub columns: u32,
    pub samples_per_pixel: u32,
    /// Row-major, samples interleaved.
    pub values: Vec<i32>,
}

pub fn decode_stored_samples(
    bytes: &[u8],
    limits: &ImageLimits,
) -> Result<StoredSamples, ImageError> {
    let undecodable = || ImageError::Undecodable { format: "DICOM" };
    let plan = plan_decode(bytes, Some(SourceFormat::Dicom), limits)?;
    if plan.format != SourceFormat::Dicom {
        return Err(undecodable());
    }
    let CheckedDicom {
        object,
        rows,
        columns,
        decode_index,
        ..
    } = open_checked_dicom(bytes, &plan, limits, 0)?;
    let decoded = object
        .decode_pixel_data_frame(decode_index)
        .map_err(|_| undecodable())?;
    Ok(StoredSamples {
        rows,
        columns,
        samples_per_pixel: decoded.samples_per_pixel().into(),
        values: stored_values(&decoded)?,
    })
}

/// Grey images stay grey (8 or 16 bit); everything else becomes 8-bit RGB. Alpha is dropped.
fn canonicalise(
    image: DynamicImage,
    source_format: SourceFormat,
    metadata: SafeMetadata,
) -> CanonicalImage {
    let (width, height) = (image.width(), image.height());
    let (channels, bit_depth, photometric_interpretation, pixels) = match image {
        DynamicImage::ImageLuma8(grey) => (1, 8, "MONOCHROME2", grey.into_raw()),
        DynamicImage::ImageLumaA8(_) => (1, 8, "MONOCHROME2", image.to_luma8().into_raw()),
        DynamicImage::ImageLuma16(_) | DynamicImage::ImageLumaA16(_) => {
            let samples = image.to_luma16().into_raw();
            (
                1,
                16,
                "MONOCHROME2",
                samples
                    .iter()
                    .flat_map(|sample| sample.to_le_bytes())
                    .collect(),
            )
        }
        DynamicImage::ImageRgb8(rgb) => (3, 8, "RGB", rgb.into_raw()),
        other => (3, 8, "RGB", other.to_rgb8().into_raw()),
    };
    CanonicalImage {
        width,
        height,
        channels,
        bit_depth,
        photometric_interpretation,
        pixels,
        source_format,
        metadata,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png_of(width: u32, height: u32) -> Vec<u8> {
        let image =
            image::GrayImage::from_fn(width, height, |x, y| image::Luma([((x + y) % 256) as u8]));
        let mut bytes = Vec::new();
        image
            .write_to(&mut Cursor::new(&mut bytes), RasterFormat::Png)
            .expect("encode");
        bytes
    }

    #[test]
    fn the_patient_key_is_stable_keyed_and_not_the_identifier() {
        let key = patient_key(b"secret one", "12345", "HOSPITAL");
        assert_eq!(key.len(), 32);
        assert_eq!(key, patient_key(b"secret one", "12345", "HOSPITAL"));
        assert_ne!(
            key,
            patient_key(b"secret two", "12345", "HOSPITAL"),
            "another key, another pseudonym"
        );
        assert_ne!(
            key,
            patient_key(b"secret one", "12345", "OTHER"),
            "the issuer is part of the identity"
        );
        assert!(!key.contains("12345"));
        assert_eq!(patient_key(b"secret one", "", "HOSPITAL"), "");
    }

    #[test]
    fn a_grey_png_decodes_to_its_pixels() {
        let decoded = decode_image(&png_of(80, 70), None, &ImageLimits::default()).expect("decode");
        assert_eq!(
            (
                decoded.width,
                decoded.height,
                decoded.channels,
                decoded.bit_depth
            ),
            (80, 70, 1, 8)
        );
        assert_eq!(decoded.pixels.len(), 80 * 70);
        assert_eq!(decoded.pixels[81], 2, "pixel (1,1) is 1+1");
    }

    #[test]
    fn limits_are_enforced_with_stable_errors() {
        let limits = ImageLimits {
            max_bytes: 100,
            ..ImageLimits::default()
        };
        assert_eq!(decode_image(&[], None, &limits), Err(ImageError::Empty));
        assert!(matches!(
            decode_image(&[0; 101], None, &limits),
            Err(ImageError::TooLarge {
                actual: 101,
                limit: 100
            })
        ));
        let small = decode_image(&png_of(32, 100), None, &ImageLimits::default());
        assert!(matches!(
            small,
            Err(ImageError::DimensionsOutOfRange { width: 32, .. })
        ));
        let garbage = decode_image(b"definitely not an image", None, &ImageLimits::default());
        assert!(matches!(garbage, Err(ImageError::Undecodable { .. })));
    }

    #[test]
    fn pixel_formats_are_checked_from_the_header() {
        assert_eq!(check_pixel_format(1, 16, 12, "MONOCHROME1"), Ok(()));
        assert_eq!(check_pixel_format(3, 8, 8, "YBR_FULL_422"), Ok(()));
        for (samples, bits, stored, photometric) in [
            (1, 32, 32, "MONOCHROME2"),
            (1, 1, 1, "MONOCHROME2"),
            (1, 8, 8, "PALETTE COLOR"),
            (3, 16, 16, "YBR_FULL"),
            (4, 8, 8, "CMYK"),
        ] {
            assert!(
                matches!(
                    check_pixel_format(samples, bits, stored, photometric),
                    Err(ImageError::DicomUnsupportedPixelFormat { .. })
                ),
                "{samples} × {bits} bits {photometric}"
            );
        }
        for stored in [0, 17] {
            assert_eq!(
                check_pixel_format(1, 16, stored, "MONOCHROME2"),
                Err(ImageError::Undecodable { format: "DICOM" }),
                "{stored} bits stored of 16"
            );
        }
    }

    #[test]
    fn a_truncated_png_is_undecodable_not_a_panic() {
        let bytes = png_of(100, 100);
        let truncated = &bytes[..bytes.len() / 2];
        assert!(matches!(
            decode_image(truncated, None, &ImageLimits::default()),
            Err(ImageError::Undecodable { .. })
        ));
    }
}
