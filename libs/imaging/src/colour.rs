//! The 8-bit RGB image of a decoded colour frame: what dicom-pixeldata's image conversion
//! (`DecodedPixelData::to_dynamic_image_with_options` with `force_8bit`, dicom-pixeldata 0.10)
//! gave, sample for sample, without its `image` feature. That feature turned on the `image`
//! crate's EXR, TIFF, WebP, PNM and BMP codecs for this one call; they were a fixed part of
//! every build, the fuzz build's included.
//!
//! The conversion, as dicom-pixeldata does it:
//! - colour by plane (Planar Configuration 1) is interleaved first;
//! - YBR_FULL and YBR_FULL_422 samples (as decoded: three a pixel) become RGB with pydicom's
//!   BT.601 matrix in `f32`, rounded half up and clamped (16-bit samples centred at 32768);
//! - 16-bit samples (native byte order) keep their high byte.
//!
//! Only deflated native YBR reaches the YBR step: uncompressed native colour is rewritten to
//! RGB before decoding ([`crate::native_colour`], with the standard's matrix), and every codec
//! hands colour over as RGB. dicom-pixeldata's green there adds 0.344 × Cb where BT.601 (PS3.3
//! C.7.6.3.1.2, pydicom) subtracts it; it is kept, so that dropping the feature changes no
//! output. Correcting it is a change of output of its own.

use dicom_pixeldata::{DecodedPixelData, PhotometricInterpretation, PlanarConfiguration};

use crate::error::ImageError;

/// How a decoded colour frame's samples are laid out and what they mean.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ColourFrame {
    /// 8 or 16.
    pub bits_allocated: u16,
    /// All first samples, then all second, then all third (Planar Configuration 1).
    pub by_plane: bool,
    /// YBR_FULL or YBR_FULL_422 samples, to be turned into RGB; RGB otherwise.
    pub ybr: bool,
}

/// The first frame of a decoded colour frame as interleaved 8-bit RGB; a layout
/// dicom-pixeldata's conversion refused (another photometric interpretation, samples per
/// pixel other than 3, bits allocated other than 8 or 16) is undecodable.
pub(crate) fn rgb8_of(decoded: &DecodedPixelData<'_>) -> Result<Vec<u8>, ImageError> {
    let undecodable = || ImageError::Undecodable { format: "DICOM" };
    if decoded.samples_per_pixel() != 3 {
        return Err(undecodable());
    }
    let ybr = match decoded.photometric_interpretation() {
        PhotometricInterpretation::Rgb => false,
        PhotometricInterpretation::YbrFull | PhotometricInterpretation::YbrFull422 => true,
        _ => return Err(undecodable()),
    };
    let frame = ColourFrame {
        bits_allocated: decoded.bits_allocated(),
        by_plane: decoded.planar_configuration() == PlanarConfiguration::PixelFirst,
        ybr,
    };
    let data = decoded.frame_data(0).map_err(|_| undecodable())?;
    let pixels = decoded.rows() as usize * decoded.columns() as usize;
    frame
        .to_rgb8(data)
        .filter(|rgb| rgb.len() == pixels * 3)
        .ok_or_else(undecodable)
}

impl ColourFrame {
    /// The frame `data` (a whole number of pixels of three samples) as interleaved 8-bit RGB;
    /// `None` for bits allocated other than 8 or 16, or data that is not whole pixels.
    pub(crate) fn to_rgb8(self, data: &[u8]) -> Option<Vec<u8>> {
        let bytes_per_sample = match self.bits_allocated {
            8 => 1,
            16 => 2,
            _ => return None,
        };
        if !data.len().is_multiple_of(3 * bytes_per_sample) {
            return None;
        }
        let pixels = data.len() / (3 * bytes_per_sample);
        let mut rgb = Vec::with_capacity(pixels * 3);
        if bytes_per_sample == 1 {
            let convert = |[a, b, c]: [u8; 3]| {
                if self.ybr {
                    ybr_to_rgb_u8(a, b, c)
                } else {
                    [a, b, c]
                }
            };
            if self.by_plane {
                let (first, rest) = data.split_at(pixels);
                let (second, third) = rest.split_at(pixels);
                for ((&a, &b), &c) in first.iter().zip(second).zip(third) {
                    rgb.extend_from_slice(&convert([a, b, c]));
                }
            } else {
                for pixel in data.chunks_exact(3) {
                    rgb.extend_from_slice(&convert([pixel[0], pixel[1], pixel[2]]));
                }
            }
        } else {
            let sample = |pair: &[u8]| u16::from_ne_bytes([pair[0], pair[1]]);
            let convert = |[a, b, c]: [u16; 3]| {
                let rgb = if self.ybr {
                    ybr_to_rgb_u16(a, b, c)
                } else {
                    [a, b, c]
                };
                rgb.map(|value| (value >> 8) as u8)
            };
            if self.by_plane {
                let (first, rest) = data.split_at(pixels * 2);
                let (second, third) = rest.split_at(pixels * 2);
                for ((a, b), c) in first
                    .chunks_exact(2)
                    .zip(second.chunks_exact(2))
                    .zip(third.chunks_exact(2))
                {
                    rgb.extend_from_slice(&convert([sample(a), sample(b), sample(c)]));
                }
            } else {
                for pixel in data.chunks_exact(6) {
                    rgb.extend_from_slice(&convert([
                        sample(&pixel[0..2]),
                        sample(&pixel[2..4]),
                        sample(&pixel[4..6]),
                    ]));
                }
            }
        }
        Some(rgb)
    }
}

// The two conversions below are dicom-pixeldata 0.10's `convert_colorspace_u8` and
// `convert_colorspace_u16` (MIT or Apache-2.0), written for one pixel: the same `f32`
// expressions in the same order, so the same roundings. Its matrix is pydicom's.

/// YBR_FULL (8-bit) to RGB.
fn ybr_to_rgb_u8(y: u8, cb: u8, cr: u8) -> [u8; 3] {
    let y = f32::from(y);
    let b = f32::from(cb) - 128.0;
    let r = f32::from(cr) - 128.0;
    let red = (y + 1.402 * r) + 0.5;
    let green = (y + (0.114 * 1.772 / 0.587) * b + (-0.299 * 1.402 / 0.587) * r) + 0.5;
    let blue = (y + 1.772 * b) + 0.5;
    [red, green, blue].map(|value| value.floor().clamp(0.0, f32::from(u8::MAX)) as u8)
}

/// YBR_FULL (16-bit, chroma centred at 32768) to RGB.
fn ybr_to_rgb_u16(y: u16, cb: u16, cr: u16) -> [u16; 3] {
    let y = f32::from(y);
    let b = f32::from(cb) - 32768.0;
    let r = f32::from(cr) - 32768.0;
    let red = (y + 1.402 * r) + 0.5;
    let green = (y + (0.114 * 1.772 / 0.587) * b + (-0.299 * 1.402 / 0.587) * r) + 0.5;
    let blue = (y + 1.772 * b) + 0.5;
    [red, green, blue].map(|value| value.floor().clamp(0.0, f32::from(u16::MAX)) as u16)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::noise_bytes;
    use dicom_core::{DataElement, PrimitiveValue, VR};
    use dicom_dictionary_std::tags;
    use dicom_object::{FileMetaTableBuilder, InMemDicomObject};
    use dicom_pixeldata::PixelDecoder;

    /// A native (explicit VR little endian) colour object holding `pixels` as its one frame.
    fn colour_object(
        rows: u16,
        columns: u16,
        photometric: &str,
        planar: u16,
        bits: u16,
        pixels: Vec<u8>,
    ) -> dicom_object::DefaultDicomObject {
        let us = |tag, value: u16| DataElement::new(tag, VR::US, PrimitiveValue::from(value));
        let object = InMemDicomObject::from_element_iter([
            us(tags::SAMPLES_PER_PIXEL, 3),
            DataElement::new(
                tags::PHOTOMETRIC_INTERPRETATION,
                VR::CS,
                PrimitiveValue::from(photometric),
            ),
            us(tags::PLANAR_CONFIGURATION, planar),
            us(tags::ROWS, rows),
            us(tags::COLUMNS, columns),
            us(tags::BITS_ALLOCATED, bits),
            us(tags::BITS_STORED, bits),
            us(tags::HIGH_BIT, bits - 1),
            us(tags::PIXEL_REPRESENTATION, 0),
            DataElement::new(
                tags::PIXEL_DATA,
                if bits == 8 { VR::OB } else { VR::OW },
                PrimitiveValue::from(pixels),
            ),
        ]);
        object
            .with_meta(
                FileMetaTableBuilder::new()
                    .transfer_syntax("1.2.840.10008.1.2.1")
                    .media_storage_sop_class_uid("1.2.840.10008.5.1.4.1.1.7")
                    .media_storage_sop_instance_uid("2.25.1"),
            )
            .expect("file meta")
    }

    /// Every layout dicom-pixeldata's conversion took: 8 and 16 bits, interleaved or by plane,
    /// RGB, YBR_FULL and YBR_FULL_422; noise, and for 8-bit every luma against every blue
    /// chroma (the red chroma varying with both).
    fn cases() -> Vec<(String, dicom_object::DefaultDicomObject)> {
        let mut cases = Vec::new();
        for bits in [8_u16, 16] {
            for planar in [0_u16, 1] {
                for photometric in ["RGB", "YBR_FULL", "YBR_FULL_422"] {
                    let (rows, columns) = (23_u16, 37_u16);
                    let bytes =
                        usize::from(rows) * usize::from(columns) * 3 * usize::from(bits / 8);
                    let name = format!("{photometric} {bits}-bit planar {planar} noise");
                    let seed =
                        u32::from(bits) * 10 + u32::from(planar) * 3 + photometric.len() as u32;
                    cases.push((
                        name,
                        colour_object(
                            rows,
                            columns,
                            photometric,
                            planar,
                            bits,
                            noise_bytes(bytes, seed),
                        ),
                    ));
                }
            }
        }
        for planar in [0_u16, 1] {
            // 256 × 256 pixels: luma the column, blue chroma the row.
            let mut planes = [Vec::new(), Vec::new(), Vec::new()];
            for cb in 0..=255_u8 {
                for y in 0..=255_u8 {
                    planes[0].push(y);
                    planes[1].push(cb);
                    planes[2].push(y.wrapping_mul(7).wrapping_add(cb.wrapping_mul(13)));
                }
            }
            let pixels = if planar == 1 {
                planes.concat()
            } else {
                (0..planes[0].len())
                    .flat_map(|at| [planes[0][at], planes[1][at], planes[2][at]])
                    .collect()
            };
            cases.push((
                format!("YBR_FULL 8-bit planar {planar} every luma and blue chroma"),
                colour_object(256, 256, "YBR_FULL", planar, 8, pixels),
            ));
        }
        cases
    }

    fn sha256_hex(bytes: &[u8]) -> String {
        ring::digest::digest(&ring::digest::SHA256, bytes)
            .as_ref()
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect()
    }

    /// The SHA-256 of the RGB bytes dicom-pixeldata 0.10.1's `to_dynamic_image_with_options(0,
    /// force_8bit)` gave for each case (recorded with its `image` feature, before the switch).
    const RECORDED: [(&str, &str); 14] = [
        (
            "RGB 8-bit planar 0 noise",
            "80ebc7a3f08cf0f3be3d8aff37d6b924f4995c338113142033f4a6d062079499",
        ),
        (
            "YBR_FULL 8-bit planar 0 noise",
            "dae96ebc4089c872d6ca9f1473405690bd3337b5b34c3e0a4c6001f02f95b55e",
        ),
        (
            "YBR_FULL_422 8-bit planar 0 noise",
            "3fa6dbd14c571fac8f47e4ae7db8e4ff26c9eaecd98759c39da2aaac646e1585",
        ),
        (
            "RGB 8-bit planar 1 noise",
            "6b17b20cdfbbc24071240fa6abfd3080f86ec94c3702efa953dfa22c7ec521e9",
        ),
        (
            "YBR_FULL 8-bit planar 1 noise",
            "4a1dd3aff83bbaede1fb4e84ddf10dbc08cb7fbf212436b49c710cc8d1b0b8c9",
        ),
        (
            "YBR_FULL_422 8-bit planar 1 noise",
            "2cd0a7ccfa0ab2e38f403f37b190f8d934ebc1dcc220be0d866de247f40f41e7",
        ),
        (
            "RGB 16-bit planar 0 noise",
            "13231f890f4cfaf9224be7d73de78d5ac7af4f797e407c83850ca1f7ca6baca4",
        ),
        (
            "YBR_FULL 16-bit planar 0 noise",
            "60ce5b66b0e03d12df320bd877cc9ecb68b2af3ba9625d72a57fedf28ea23f53",
        ),
        (
            "YBR_FULL_422 16-bit planar 0 noise",
            "3a27c063e2a2e75fedb37f37f7c1cf9cbbaaecc7990dd32832b8c9c516ef0af3",
        ),
        (
            "RGB 16-bit planar 1 noise",
            "236aab5227536fb2a1d307402d2307d2294ecfc2c374c006f690f82754be3277",
        ),
        (
            "YBR_FULL 16-bit planar 1 noise",
            "0eeba0ce7ce04ee1f96fe8d9e891eff1d6618537349933d52339be006858e258",
        ),
        (
            "YBR_FULL_422 16-bit planar 1 noise",
            "df5cced2cd33241f5507b59dbf345035d093cd0557df5f109fe4b3ac9ae0f7b5",
        ),
        (
            "YBR_FULL 8-bit planar 0 every luma and blue chroma",
            "3b66ff6a85e46934146e23ddfa25ea387fd22f2a8e5d7bf550d32d411603dbc1",
        ),
        (
            "YBR_FULL 8-bit planar 1 every luma and blue chroma",
            "3b66ff6a85e46934146e23ddfa25ea387fd22f2a8e5d7bf550d32d411603dbc1",
        ),
    ];

    #[test]
    fn the_conversion_gives_exactly_what_dicom_pixeldatas_image_conversion_gave() {
        let ours: Vec<(String, String)> = cases()
            .iter()
            .map(|(name, object)| {
                let decoded = object.decode_pixel_data().expect("decoded");
                (
                    name.clone(),
                    sha256_hex(&rgb8_of(&decoded).expect("converted")),
                )
            })
            .collect();
        let recorded: Vec<(String, String)> = RECORDED
            .iter()
            .map(|(name, hash)| ((*name).to_owned(), (*hash).to_owned()))
            .collect();
        assert_eq!(ours, recorded);
    }

    #[test]
    fn ybr_conversion_is_the_bt601_matrix_rounded_half_up() {
        assert_eq!(
            ybr_to_rgb_u8(100, 128, 128),
            [100, 100, 100],
            "no chroma is grey"
        );
        // Pure red in BT.601 full range: Y 76, Cb 85, Cr 255.
        assert_eq!(ybr_to_rgb_u8(76, 85, 255), [254, 0, 0]);
        assert_eq!(ybr_to_rgb_u8(255, 255, 255), [255, 208, 255], "clamped");
        // Pure blue (Y 29, Cb 255, Cr 107): dicom-pixeldata's green takes +0.344 Cb where
        // BT.601 takes −0.344 Cb (see the module's note), so green is 88, not 0.
        assert_eq!(ybr_to_rgb_u8(29, 255, 107), [0, 88, 254]);
        assert_eq!(ybr_to_rgb_u16(40000, 32768, 32768), [40000; 3]);
    }

    #[test]
    fn layouts_the_conversion_did_not_take_are_refused() {
        let frame = |bits_allocated| ColourFrame {
            bits_allocated,
            by_plane: false,
            ybr: false,
        };
        assert_eq!(frame(32).to_rgb8(&[0; 12]), None);
        assert_eq!(frame(8).to_rgb8(&[0; 4]), None, "not whole pixels");
        assert_eq!(frame(16).to_rgb8(&[0; 9]), None, "not whole pixels");
        assert_eq!(
            frame(16).to_rgb8(&[0x34, 0x12, 0xFF, 0x00, 0x00, 0xAB]),
            Some(vec![0x12, 0x00, 0xAB]),
            "16-bit samples keep their high byte"
        );
        let palette = colour_object(4, 4, "PALETTE COLOR", 0, 8, vec![0; 48]);
        if let Ok(decoded) = palette.decode_pixel_data() {
            assert!(rgb8_of(&decoded).is_err());
        }
    }
}
