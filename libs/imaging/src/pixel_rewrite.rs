//! Pixel data that dicom-pixeldata cannot take as stored is decoded or rearranged here and put
//! back into the object as native pixel data of the chosen frame alone (explicit VR little
//! endian),
//! so that one path turns every object into stored values and display pixels:
//! - uncompressed colour by plane, or in YBR (full or 4:2:2), becomes interleaved RGB;
//! - 12-bit JPEG (process 4) is decoded by [`crate::jpeg_extended`];
//! - an RGB JPEG that carries neither a JFIF nor an Adobe marker is decoded without the
//!   YCbCr transform that jpeg-decoder would otherwise assume: the dataset's RGB says the
//!   samples were not transformed (PS3.5 8.2.1), as GDCM and pydicom read it.

use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use dicom_object::DefaultDicomObject;
use dicom_transfer_syntax_registry::entries::EXPLICIT_VR_LITTLE_ENDIAN;

use crate::error::ImageError;
use crate::jpeg_extended::{self, JpegError};
use crate::native_colour::{ColourLayout, to_interleaved_rgb};

const JPEG_BASELINE: &str = "1.2.840.10008.1.2.4.50";
const JPEG_EXTENDED: &str = "1.2.840.10008.1.2.4.51";

/// What the header says about the pixel data, read before anything is decoded.
pub struct PixelHeader<'a> {
    pub transfer_syntax_uid: &'a str,
    pub codec_free: bool,
    pub rows: u32,
    pub columns: u32,
    pub frames: u32,
    pub samples: u64,
    pub bits_allocated: u64,
    pub bits_stored: u64,
    pub photometric: &'a str,
    pub planar_configuration: u32,
    /// The frame to be decoded (0-based); the frame count was checked against the pixel data.
    pub frame_index: u32,
}

/// Rewrites the chosen frame where needed; answers whether it did (the object then holds that
/// frame alone, as frame 0).
pub fn prepare(
    object: &mut DefaultDicomObject,
    header: &PixelHeader<'_>,
) -> Result<bool, ImageError> {
    let undecodable = || ImageError::Undecodable { format: "DICOM" };
    let is_jpeg = matches!(header.transfer_syntax_uid, JPEG_BASELINE | JPEG_EXTENDED);
    if header.codec_free && header.samples == 3 && header.bits_allocated == 8 {
        let layout = ColourLayout::of(header.photometric, header.planar_configuration).ok_or(
            ImageError::DicomUnsupportedPixelFormat {
                what: "this colour photometric interpretation",
            },
        )?;
        if !layout.is_interleaved_rgb() {
            let stored = object
                .element(tags::PIXEL_DATA)
                .ok()
                .and_then(|element| element.to_bytes().ok())
                .ok_or_else(undecodable)?;
            let frame_bytes = layout
                .frame_bytes(header.rows, header.columns)
                .ok_or_else(undecodable)?;
            let frame = stored
                .get(frame_bytes * header.frame_index as usize..)
                .ok_or_else(undecodable)?;
            let rgb = to_interleaved_rgb(frame, layout, header.rows, header.columns)
                .ok_or_else(undecodable)?;
            put_native_rgb(object, rgb);
            return Ok(true);
        }
    } else if is_jpeg && header.bits_stored > 8 {
        let unsupported = || ImageError::DicomUnsupportedTransferSyntax {
            uid: header.transfer_syntax_uid.to_owned(),
        };
        if header.samples != 1 || header.bits_allocated != 16 {
            return Err(unsupported());
        }
        let stream = frame_stream(object, header).ok_or_else(undecodable)?;
        let pixels = u64::from(header.rows) * u64::from(header.columns);
        let image = jpeg_extended::decode(&stream, pixels).map_err(|error| match error {
            JpegError::Unsupported(_) => unsupported(),
            JpegError::Malformed => undecodable(),
        })?;
        if (image.width, image.height) != (header.columns, header.rows) {
            return Err(undecodable());
        }
        put_native(
            object,
            DataElement::new(
                tags::PIXEL_DATA,
                VR::OW,
                PrimitiveValue::U16(image.samples.into()),
            ),
        );
        return Ok(true);
    } else if is_jpeg && header.samples == 3 && header.photometric == "RGB" {
        let stream = frame_stream(object, header).ok_or_else(undecodable)?;
        if !declares_colour_transform(&stream) {
            put_native_rgb(object, decode_untransformed_rgb(&stream, header)?);
            return Ok(true);
        }
    }
    Ok(false)
}

/// The chosen frame's JPEG stream: its one fragment in a multi-frame object (each frame is one
/// fragment there, checked before), otherwise the single frame's fragments joined.
fn frame_stream(object: &DefaultDicomObject, header: &PixelHeader<'_>) -> Option<Vec<u8>> {
    let fragments = object.element(tags::PIXEL_DATA).ok()?.value().fragments()?;
    if header.frames > 1 {
        return fragments.get(header.frame_index as usize).cloned();
    }
    Some(fragments.concat())
}

/// Whether the JPEG header carries a JFIF (APP0) or Adobe (APP14) marker, which say how its
/// colour components are to be read.
fn declares_colour_transform(stream: &[u8]) -> bool {
    let mut at = 2; // after SOI
    while let (Some(0xFF), Some(&marker)) = (stream.get(at), stream.get(at + 1)) {
        let Some(length) = stream.get(at + 2..at + 4) else {
            return false;
        };
        let payload = stream.get(at + 4..).unwrap_or_default();
        match marker {
            0xE0 if payload.starts_with(b"JFIF\0") => return true,
            0xEE if payload.starts_with(b"Adobe") => return true,
            0xDA => return false,
            _ => at += 2 + usize::from(u16::from_be_bytes([length[0], length[1]])),
        }
    }
    false
}

fn decode_untransformed_rgb(
    stream: &[u8],
    header: &PixelHeader<'_>,
) -> Result<Vec<u8>, ImageError> {
    let undecodable = || ImageError::Undecodable { format: "DICOM" };
    let mut decoder = jpeg_decoder::Decoder::new(stream);
    decoder.set_color_transform(jpeg_decoder::ColorTransform::RGB);
    let pixels = header.rows as usize * header.columns as usize;
    decoder.set_max_decoding_buffer_size(pixels * 3);
    decoder.read_info().map_err(|_| undecodable())?;
    let info = decoder.info().ok_or_else(undecodable)?;
    if (u32::from(info.width), u32::from(info.height)) != (header.columns, header.rows)
        || info.pixel_format != jpeg_decoder::PixelFormat::RGB24
    {
        return Err(undecodable());
    }
    decoder.decode().map_err(|_| undecodable())
}

fn put_native_rgb(object: &mut DefaultDicomObject, rgb: Vec<u8>) {
    put_native(
        object,
        DataElement::new(tags::PIXEL_DATA, VR::OB, PrimitiveValue::from(rgb)),
    );
    object.put(DataElement::new(
        tags::PHOTOMETRIC_INTERPRETATION,
        VR::CS,
        PrimitiveValue::from("RGB"),
    ));
    object.put(DataElement::new(
        tags::PLANAR_CONFIGURATION,
        VR::US,
        PrimitiveValue::from(0_u16),
    ));
}

/// Replaces the pixel data with one native frame.
fn put_native(
    object: &mut DefaultDicomObject,
    pixel_data: DataElement<dicom_object::InMemDicomObject>,
) {
    object.put(pixel_data);
    object.put(DataElement::new(
        tags::NUMBER_OF_FRAMES,
        VR::IS,
        PrimitiveValue::from("1"),
    ));
    object
        .meta_mut()
        .set_transfer_syntax(&EXPLICIT_VR_LITTLE_ENDIAN);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_markers_are_found_before_the_scan_only() {
        let jfif = [
            0xFF, 0xD8, 0xFF, 0xE0, 0x00, 0x07, b'J', b'F', b'I', b'F', 0x00,
        ];
        assert!(declares_colour_transform(&jfif));
        let adobe = [
            0xFF, 0xD8, 0xFF, 0xDB, 0x00, 0x02, 0xFF, 0xEE, 0x00, 0x07, b'A', b'd', b'o', b'b',
            b'e',
        ];
        assert!(declares_colour_transform(&adobe));
        let neither = [
            0xFF, 0xD8, 0xFF, 0xDA, 0x00, 0x07, b'J', b'F', b'I', b'F', 0x00,
        ];
        assert!(!declares_colour_transform(&neither));
        assert!(!declares_colour_transform(&[0xFF, 0xD8, 0xFF]));
    }
}
