//! The decoder against a reference decoder (pydicom with pylibjpeg, prepared by
//! scripts/dicom-reference.sh) on every file of pydicom's public DICOM test set: each decodes
//! to the reference's stored sample values (exactly for lossless transfer syntaxes, within a
//! stated bound for lossy ones) or is refused with its stable code. Grey images also match
//! the reference's 8-bit display image (rescale, window, MONOCHROME1), including variants of
//! real files made with pydicom for what the public set lacks.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use medai_testkit::workspace_root;
use medai_validation::ImageLimits;
use medai_validation::decode::{decode_image, decode_stored_samples};

enum Outcome {
    Exact,
    /// Lossy codecs may round differently: the largest difference of any sample allowed.
    Within(u32),
    /// Compared with another file's reference: the reference decoder refuses this file.
    SameAs(&'static str, u32),
    Refused(&'static str),
}
use Outcome::{Exact, Refused, SameAs, Within};

const NO_PIXELS: Outcome = Refused("DICOM_NO_PIXEL_DATA");
const UNDECODABLE: Outcome = Refused("IMAGE_UNDECODABLE");
const OVERRUN: Outcome = Refused("DICOM_DECLARED_LENGTH_EXCEEDS_INPUT");
const PIXEL_FORMAT: Outcome = Refused("DICOM_UNSUPPORTED_PIXEL_FORMAT");

#[rustfmt::skip]
const FILES: [(&str, &str, Outcome); 79] = [
    ("693_J2KI.dcm", "JPEG 2000, 14-bit signed, rescaled", Exact),
    ("CT_small.dcm", "explicit VR little endian, CT, 16-bit signed", Exact),
    ("DICOMDIR-empty.dcm", "a directory, no image", NO_PIXELS),
    ("ExplVR_BigEnd.dcm", "big endian RGB, colour by plane", Exact),
    ("ExplVR_BigEndNoMeta.dcm", "no file meta group: not a DICOM file", UNDECODABLE),
    ("ExplVR_LitEndNoMeta.dcm", "no file meta group: not a DICOM file", UNDECODABLE),
    ("GDCMJ2K_TextGBR.dcm", "JPEG 2000 lossless, YBR_RCT", Exact),
    ("J2K_pixelrep_mismatch.dcm", "JPEG 2000 whose code stream disagrees with the dataset's sign", Exact),
    ("JPEG-lossy.dcm", "12-bit JPEG with a misplaced scan header: JPGExtended's image", SameAs("JPGExtended", 1)),
    ("JPEG2000-embedded-sequence-delimiter.dcm", "a delimiter inside the fragments", UNDECODABLE),
    ("JPEG2000.dcm", "JPEG 2000, part 2 transfer syntax", Exact),
    ("JPEGLSNearLossless_08.dcm", "JPEG-LS near-lossless, 8-bit (decoding is exactly specified)", Exact),
    ("JPEGLSNearLossless_16.dcm", "JPEG-LS near-lossless, 16-bit", Exact),
    ("JPGExtended.dcm", "12-bit extended JPEG (process 4)", Within(1)),
    ("MR_small.dcm", "explicit VR little endian, 16-bit signed", Exact),
    ("MR_small_RLE.dcm", "RLE lossless", Exact),
    ("MR_small_bigendian.dcm", "explicit VR big endian", Exact),
    ("MR_small_expb.dcm", "explicit VR big endian, second encoder", Exact),
    ("MR_small_implicit.dcm", "implicit VR", Exact),
    ("MR_small_jp2klossless.dcm", "JPEG 2000 lossless", Exact),
    ("MR_small_jpeg_ls_lossless.dcm", "JPEG-LS lossless, 16-bit", Exact),
    ("MR_small_padded.dcm", "trailing padding", Exact),
    ("MR_truncated.dcm", "cut short", OVERRUN),
    ("SC_jpeg_no_color_transform.dcm", "RGB JPEG, no colour marker: the dataset's RGB decides", Within(1)),
    ("SC_jpeg_no_color_transform_2.dcm", "RGB JPEG, Adobe marker without transform", Within(1)),
    ("SC_rgb_dcmtk_+eb+cr.dcm", "JPEG baseline, RGB components", Within(1)),
    ("SC_rgb_dcmtk_+eb+cy+n1.dcm", "JPEG baseline, YBR_FULL, 4:2:0", Within(2)),
    ("SC_rgb_dcmtk_+eb+cy+n2.dcm", "JPEG baseline, YBR_FULL", Within(1)),
    ("SC_rgb_dcmtk_+eb+cy+np.dcm", "JPEG baseline, YBR_FULL_422", Within(2)),
    ("SC_rgb_dcmtk_+eb+cy+s2.dcm", "JPEG baseline, YBR_FULL_422", Within(1)),
    ("SC_rgb_dcmtk_+eb+cy+s4.dcm", "JPEG baseline, YBR_FULL", Within(1)),
    ("SC_rgb_gdcm_KY.dcm", "JPEG 2000, RGB", Exact),
    ("SC_rgb_jls_lossy_line.dcm", "RGB JPEG-LS near-lossless, line interleaved", Exact),
    ("SC_rgb_jls_lossy_sample.dcm", "RGB JPEG-LS near-lossless, sample interleaved", Exact),
    ("SC_rgb_jpeg.dcm", "explicit VR file whose pixel data is written as implicit VR", OVERRUN),
    ("SC_rgb_jpeg_app14_dcmd.dcm", "RGB JPEG, Adobe marker", Within(1)),
    ("SC_rgb_jpeg_dcmd.dcm", "uncompressed RGB", Exact),
    ("SC_rgb_jpeg_dcmtk.dcm", "JPEG baseline, YBR_FULL (IDCTs round differently)", Within(1)),
    ("SC_rgb_jpeg_gdcm.dcm", "RGB, JPEG lossless (process 14)", Exact),
    ("SC_rgb_jpeg_lossy_gdcm.dcm", "JPEG baseline, YBR_FULL", Within(2)),
    ("SC_rgb_rle.dcm", "RGB, RLE", Exact),
    ("SC_rgb_rle_16bit.dcm", "RGB 16-bit, RLE", Exact),
    ("SC_rgb_rle_16bit_2frame.dcm", "RGB 16-bit, RLE, two frames", Exact),
    ("SC_rgb_rle_2frame.dcm", "RGB, RLE, two frames", Exact),
    ("SC_rgb_rle_32bit.dcm", "RGB 32-bit", PIXEL_FORMAT),
    ("SC_rgb_rle_32bit_2frame.dcm", "RGB 32-bit, two frames", PIXEL_FORMAT),
    ("SC_rgb_small_odd.dcm", "3×3 RGB", Exact),
    ("SC_rgb_small_odd_big_endian.dcm", "3×3 RGB, big endian", Exact),
    ("SC_rgb_small_odd_jpeg.dcm", "3×3 RGB, JPEG", Exact),
    ("SC_ybr_full_422_uncompressed.dcm", "uncompressed YBR_FULL_422", Exact),
    ("UN_sequence.dcm", "a sequence of unknown VR, no image", OVERRUN),
    ("badVR.dcm", "32-bit grey with a bad VR", PIXEL_FORMAT),
    ("empty_charset_LEI.dcm", "no image", NO_PIXELS),
    ("examples_jpeg2k.dcm", "RGB, JPEG 2000", Exact),
    ("examples_overlay.dcm", "12-bit grey with overlays", Exact),
    ("examples_palette.dcm", "palette colour", PIXEL_FORMAT),
    ("examples_rgb_color.dcm", "uncompressed RGB", Exact),
    ("examples_ybr_color.dcm", "JPEG baseline, YBR_FULL_422, 30 frames", Within(3)),
    ("image_dfl.dcm", "deflated explicit VR", Exact),
    ("liver_1frame.dcm", "1-bit segmentation", PIXEL_FORMAT),
    ("liver_expb_1frame.dcm", "1-bit segmentation, big endian", PIXEL_FORMAT),
    ("meta_missing_tsyntax.dcm", "file meta without a transfer syntax", OVERRUN),
    ("nested_priv_SQ.dcm", "no file meta group", UNDECODABLE),
    ("no_meta.dcm", "no file meta group", UNDECODABLE),
    ("no_meta_group_length.dcm", "file meta without its group length", UNDECODABLE),
    ("priv_SQ.dcm", "no image", NO_PIXELS),
    ("reportsi.dcm", "a structured report", NO_PIXELS),
    ("reportsi_with_empty_number_tags.dcm", "a structured report", NO_PIXELS),
    ("rtdose.dcm", "32-bit dose grid", PIXEL_FORMAT),
    ("rtdose_1frame.dcm", "32-bit dose grid", PIXEL_FORMAT),
    ("rtdose_expb.dcm", "32-bit dose grid, big endian", PIXEL_FORMAT),
    ("rtdose_expb_1frame.dcm", "32-bit dose grid, big endian", PIXEL_FORMAT),
    ("rtdose_rle.dcm", "32-bit dose grid, RLE", PIXEL_FORMAT),
    ("rtdose_rle_1frame.dcm", "32-bit dose grid, RLE", PIXEL_FORMAT),
    ("rtplan.dcm", "a plan, no image", NO_PIXELS),
    ("rtplan_truncated.dcm", "a plan cut short", OVERRUN),
    ("rtstruct.dcm", "no file meta group", UNDECODABLE),
    ("test-SR.dcm", "a structured report", NO_PIXELS),
    ("waveform_ecg.dcm", "a waveform", NO_PIXELS),
];

fn limits() -> ImageLimits {
    ImageLimits {
        min_side: 1,
        ..ImageLimits::default()
    }
}

fn reference_dir() -> PathBuf {
    let reference = workspace_root().join(".cache/dicom-reference");
    assert!(
        reference.join(".complete").exists(),
        "run scripts/dicom-reference.sh (scripts/test.sh does)"
    );
    reference
}

fn reference_samples(reference: &Path, stem: &str) -> (serde_json::Value, Vec<i32>) {
    let shape = serde_json::from_str(
        &std::fs::read_to_string(reference.join(format!("{stem}.json"))).expect("reference shape"),
    )
    .expect("json");
    let samples = std::fs::read(reference.join(format!("{stem}.i32")))
        .expect("reference samples")
        .chunks_exact(4)
        .map(|bytes| i32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
        .collect();
    (shape, samples)
}

#[test]
fn every_public_test_file_decodes_like_the_reference_or_is_refused_with_its_code() {
    let root = workspace_root();
    let reference = reference_dir();
    let listed: BTreeSet<&str> = FILES.iter().map(|(name, ..)| *name).collect();
    let present: BTreeSet<String> = std::fs::read_dir(root.join(".cache/dicom"))
        .expect("test files")
        .map(|entry| {
            entry
                .expect("entry")
                .file_name()
                .into_string()
                .expect("name")
        })
        .filter(|name| name.ends_with(".dcm"))
        .collect();
    assert_eq!(
        listed,
        present.iter().map(String::as_str).collect(),
        "every test file has a stated outcome"
    );
    for (name, what, outcome) in FILES {
        let bytes = std::fs::read(root.join(".cache/dicom").join(name)).expect("DICOM file");
        let (compared_with, bound) = match outcome {
            Refused(code) => {
                let error = decode_image(&bytes, None, &limits())
                    .err()
                    .unwrap_or_else(|| panic!("{name} ({what}) decoded; expected {code}"));
                assert_eq!(error.reason(), code, "{name} ({what}): {error}");
                continue;
            }
            Exact => (name.trim_end_matches(".dcm"), 0),
            Within(bound) => (name.trim_end_matches(".dcm"), bound),
            SameAs(stem, bound) => (stem, bound),
        };
        decode_image(&bytes, None, &limits())
            .unwrap_or_else(|error| panic!("{name} ({what}) for models: {error}"));
        let ours = decode_stored_samples(&bytes, &limits())
            .unwrap_or_else(|error| panic!("{name} ({what}): {error}"));
        let (shape, expected) = reference_samples(&reference, compared_with);
        assert_eq!(
            (
                u64::from(ours.rows),
                u64::from(ours.columns),
                u64::from(ours.samples_per_pixel)
            ),
            (
                shape["rows"].as_u64().expect("rows"),
                shape["columns"].as_u64().expect("columns"),
                shape["samples"].as_u64().expect("samples")
            ),
            "{name} ({what}): shape"
        );
        assert_eq!(
            ours.values.len(),
            expected.len(),
            "{name} ({what}): sample count"
        );
        let largest = ours
            .values
            .iter()
            .zip(&expected)
            .map(|(a, b)| a.abs_diff(*b))
            .max()
            .unwrap_or(0);
        assert!(
            largest <= bound,
            "{name} ({what}): a sample differs from the reference by {largest} (bound {bound})"
        );
    }
}

#[test]
fn grey_display_images_match_the_reference() {
    let root = workspace_root();
    let reference = reference_dir();
    let mut compared = BTreeSet::new();
    for entry in std::fs::read_dir(&reference).expect("reference") {
        let file_name = entry
            .expect("entry")
            .file_name()
            .into_string()
            .expect("name");
        let Some(stem) = file_name.strip_suffix(".display.u8") else {
            continue;
        };
        let path = [root.join(".cache/dicom"), reference.join("derived")]
            .iter()
            .map(|dir| dir.join(format!("{stem}.dcm")))
            .find(|path| path.exists())
            .expect("the file the reference came from");
        let bytes = std::fs::read(path).expect("DICOM file");
        let refused = FILES.iter().any(|(name, _, outcome)| {
            *name == format!("{stem}.dcm") && matches!(outcome, Refused(_))
        });
        if refused {
            continue;
        }
        let image =
            decode_image(&bytes, None, &limits()).unwrap_or_else(|error| panic!("{stem}: {error}"));
        assert_eq!((image.channels, image.bit_depth), (1, 8), "{stem}");
        let expected = std::fs::read(reference.join(&file_name)).expect("reference display");
        assert_eq!(image.pixels.len(), expected.len(), "{stem}: pixel count");
        // Only the lossy 12-bit JPEG may differ, by its stored values' own rounding.
        let bound = if stem == "JPGExtended" { 1 } else { 0 };
        let largest = image
            .pixels
            .iter()
            .zip(&expected)
            .map(|(a, b)| a.abs_diff(*b))
            .max()
            .unwrap_or(0);
        assert!(largest <= bound, "{stem}: a pixel differs by {largest}");
        compared.insert(stem.to_owned());
    }
    for needed in [
        "MR_small",                    // signed, window
        "CT_small",                    // signed, rescale, no window: the image's range
        "693_J2KI",                    // JPEG 2000, rescale and window
        "J2K_pixelrep_mismatch",       // the dataset's sign, several windows
        "examples_overlay",            // 12-bit unsigned with overlay bits
        "JPGExtended",                 // 12-bit JPEG
        "MR_small_monochrome1",        // MONOCHROME1 inverted
        "CT_small_monochrome1_window", // MONOCHROME1 with a window
        "MR_small_rle_monochrome1",    // MONOCHROME1 through a codec
        "MR_small_rescaled",           // a slope other than 1
        "CT_small_linear_exact",       // LINEAR_EXACT
        "CT_small_sigmoid",            // SIGMOID
    ] {
        assert!(compared.contains(needed), "{needed} was compared");
    }
}

/// The stored values of grey frames are read from the decoded bytes directly; on every public
/// file whose first frame dicom-pixeldata's own conversion (no modality LUT) can give, they are
/// exactly that conversion after `normalise_stored`.
#[test]
fn direct_stored_values_equal_the_general_conversion() {
    use dicom_object::OpenFileOptions;
    use dicom_object::file::ReadPreamble;
    use dicom_pixeldata::{ConvertOptions, ModalityLutOption, PixelDecoder, PixelRepresentation};
    use medai_validation::display::normalise_stored;

    let root = workspace_root();
    let mut compared = BTreeSet::new();
    for (name, what, outcome) in FILES {
        if matches!(outcome, Refused(_)) {
            continue;
        }
        let bytes = std::fs::read(root.join(".cache/dicom").join(name)).expect("DICOM file");
        let Ok(ours) = decode_stored_samples(&bytes, &limits()) else {
            continue;
        };
        // Only the first frame is decoded, as the conversion below does.
        let object = OpenFileOptions::new()
            .read_preamble(ReadPreamble::Auto)
            .from_reader(std::io::Cursor::new(&bytes))
            .expect("parses");
        let Ok(decoded) = object.decode_pixel_data_frame(0) else {
            continue; // decoded here only after a rewrite (12-bit JPEG, colour by plane)
        };
        if decoded.samples_per_pixel() != 1 {
            continue;
        }
        let options = ConvertOptions::new().with_modality_lut(ModalityLutOption::None);
        let mut general = decoded
            .to_vec_frame_with_options::<i32>(0, &options)
            .unwrap_or_else(|error| panic!("{name} ({what}): {error}"));
        normalise_stored(
            &mut general,
            decoded.bits_stored(),
            decoded.pixel_representation() == PixelRepresentation::Signed,
        );
        assert!(
            ours.values == general,
            "{name} ({what}): stored values differ"
        );
        compared.insert(name);
    }
    for needed in [
        "CT_small.dcm",              // 16-bit signed
        "MR_small_bigendian.dcm",    // big endian
        "examples_overlay.dcm",      // overlay bits above bits stored
        "JPEGLSNearLossless_08.dcm", // 8-bit
        "J2K_pixelrep_mismatch.dcm", // the dataset's sign against the code stream's
    ] {
        assert!(compared.contains(needed), "{needed} was compared");
    }
}

/// SHA-256 of the 8-bit RGB pixels each colour file of the public set decodes to (frame 1, and
/// the middle frame of multi-frame files), recorded from dicom-pixeldata 0.10.1's own image
/// conversion (`to_dynamic_image_with_options(0, force_8bit)`) before it was replaced by
/// medai-imaging's (which lets the workspace drop dicom-pixeldata's `image` feature).
#[rustfmt::skip]
const COLOUR_RECORDED: [(&str, &str, &str); 32] = [
    ("ExplVR_BigEnd.dcm", "FIRST_FRAME", "1583c4339dd36e91dd2c30d278ef1ed95f3ea9a6de4401868d5712a76036ef2d"),
    ("GDCMJ2K_TextGBR.dcm", "FIRST_FRAME", "bea5673fdd49313fd8c391f115e57ac501f44194aa3915c22293ddb55f1d0b88"),
    ("SC_jpeg_no_color_transform.dcm", "FIRST_FRAME", "926c2f22c0d978a4df3946138e48762baa5ee68f5af0abe4a0609654589eb787"),
    ("SC_jpeg_no_color_transform_2.dcm", "FIRST_FRAME", "71bbe9bdb7807e2ceb32258e4f0644ed3240d425983862c90f8f9efe8f79b11c"),
    ("SC_rgb_dcmtk_+eb+cr.dcm", "FIRST_FRAME", "e414aaca686695163b4fcca90cc4b0bf6aff59d70c036a39a446ebcbb53e3360"),
    ("SC_rgb_dcmtk_+eb+cy+n1.dcm", "FIRST_FRAME", "66de9921436cae0582f3b34e17def736149f35def7fdb750d948ec0db983e83b"),
    ("SC_rgb_dcmtk_+eb+cy+n2.dcm", "FIRST_FRAME", "c339f5e46a7c0defd6759d41b6b5c6506ef388cb4d470951549fca6a80c090d6"),
    ("SC_rgb_dcmtk_+eb+cy+np.dcm", "FIRST_FRAME", "66de9921436cae0582f3b34e17def736149f35def7fdb750d948ec0db983e83b"),
    ("SC_rgb_dcmtk_+eb+cy+s2.dcm", "FIRST_FRAME", "c339f5e46a7c0defd6759d41b6b5c6506ef388cb4d470951549fca6a80c090d6"),
    ("SC_rgb_dcmtk_+eb+cy+s4.dcm", "FIRST_FRAME", "c339f5e46a7c0defd6759d41b6b5c6506ef388cb4d470951549fca6a80c090d6"),
    ("SC_rgb_gdcm_KY.dcm", "FIRST_FRAME", "169e619557b12114a7f0be8602026e9abb3d5045804311736ec14cecb026aca9"),
    ("SC_rgb_jls_lossy_line.dcm", "FIRST_FRAME", "bd5344c0a46bc6c0869921680aa72c1ee344be34079d9b9c5b421336f24d798f"),
    ("SC_rgb_jls_lossy_sample.dcm", "FIRST_FRAME", "bd5344c0a46bc6c0869921680aa72c1ee344be34079d9b9c5b421336f24d798f"),
    ("SC_rgb_jpeg_app14_dcmd.dcm", "FIRST_FRAME", "71bbe9bdb7807e2ceb32258e4f0644ed3240d425983862c90f8f9efe8f79b11c"),
    ("SC_rgb_jpeg_dcmd.dcm", "FIRST_FRAME", "be7aa556b206ac445bc4125d24213bfac8832980138d54ece2b90be6e3d63d74"),
    ("SC_rgb_jpeg_dcmtk.dcm", "FIRST_FRAME", "c339f5e46a7c0defd6759d41b6b5c6506ef388cb4d470951549fca6a80c090d6"),
    ("SC_rgb_jpeg_gdcm.dcm", "FIRST_FRAME", "169e619557b12114a7f0be8602026e9abb3d5045804311736ec14cecb026aca9"),
    ("SC_rgb_jpeg_lossy_gdcm.dcm", "FIRST_FRAME", "2a65b8d414c7bdc496b30514469a3e1880eab51bfacc8f6a607c7540a86ed2b9"),
    ("SC_rgb_rle.dcm", "FIRST_FRAME", "169e619557b12114a7f0be8602026e9abb3d5045804311736ec14cecb026aca9"),
    ("SC_rgb_rle_16bit.dcm", "FIRST_FRAME", "169e619557b12114a7f0be8602026e9abb3d5045804311736ec14cecb026aca9"),
    ("SC_rgb_rle_16bit_2frame.dcm", "FIRST_FRAME", "169e619557b12114a7f0be8602026e9abb3d5045804311736ec14cecb026aca9"),
    ("SC_rgb_rle_16bit_2frame.dcm", "MIDDLE_FRAME", "d9d849600989153e95bbb6d8e5930903d4d407da3313921eee98a5beec2a3008"),
    ("SC_rgb_rle_2frame.dcm", "FIRST_FRAME", "169e619557b12114a7f0be8602026e9abb3d5045804311736ec14cecb026aca9"),
    ("SC_rgb_rle_2frame.dcm", "MIDDLE_FRAME", "d9d849600989153e95bbb6d8e5930903d4d407da3313921eee98a5beec2a3008"),
    ("SC_rgb_small_odd.dcm", "FIRST_FRAME", "ef2df252ba3cd066405c4dd121d0efea1341083ae2f676e1f4c844b5a4838cb8"),
    ("SC_rgb_small_odd_big_endian.dcm", "FIRST_FRAME", "ef2df252ba3cd066405c4dd121d0efea1341083ae2f676e1f4c844b5a4838cb8"),
    ("SC_rgb_small_odd_jpeg.dcm", "FIRST_FRAME", "f750a80478763f97d94bbd9caeaee3dd1e16794fe9a95da34a991bfb7c42d4f5"),
    ("SC_ybr_full_422_uncompressed.dcm", "FIRST_FRAME", "ddb100d8f45a7fbf420e8ce5d1b376a5479f068c5109daac31eb982f662d228f"),
    ("examples_jpeg2k.dcm", "FIRST_FRAME", "e16892020c73095e42ff4cf7368de5206f11012e25feaed53cc2bc614602bb9a"),
    ("examples_rgb_color.dcm", "FIRST_FRAME", "a64f021b9093684b86aa47195ce0f9e3c1b8f1f4c6ce569f8a65b292bd52ec1d"),
    ("examples_ybr_color.dcm", "FIRST_FRAME", "eca9555634034c84e82cbade66ae81cc7bc5b24c8d7c51db811af287691d6ab3"),
    ("examples_ybr_color.dcm", "MIDDLE_FRAME", "3dc7d4de961e95c07a8a06aa5e78418b2c68659664a2cdfc4091c4fff8f2933a"),
];

/// Every colour image of the public set gives exactly the RGB bytes dicom-pixeldata's image
/// conversion gave: 8- and 16-bit, RGB and YBR, by plane, compressed by every codec.
#[test]
fn colour_images_are_exactly_those_of_dicom_pixeldatas_image_conversion() {
    use medai_validation::FramePolicy;
    use medai_validation::decode::{decode_planned, plan_decode};

    let root = workspace_root();
    let sha256_hex = |bytes: &[u8]| -> String {
        ring::digest::digest(&ring::digest::SHA256, bytes)
            .as_ref()
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect()
    };
    let mut ours = Vec::new();
    for (name, ..) in FILES {
        let bytes = std::fs::read(root.join(".cache/dicom").join(name)).expect("DICOM file");
        let Ok(plan) = plan_decode(&bytes, None, &limits()) else {
            continue;
        };
        let mut policies = vec![FramePolicy::FirstFrame];
        if plan.frames() > 1 {
            policies.push(FramePolicy::MiddleFrame);
        }
        for policy in policies {
            let Ok(image) = decode_planned(&bytes, &plan, &limits(), None, policy) else {
                continue;
            };
            if image.channels != 3 {
                continue;
            }
            assert_eq!(
                image.pixels.len(),
                image.width as usize * image.height as usize * 3,
                "{name}"
            );
            ours.push((name, policy.code(), sha256_hex(&image.pixels)));
        }
    }
    let recorded: Vec<(&str, &str, String)> = COLOUR_RECORDED
        .iter()
        .map(|(name, policy, hash)| (*name, *policy, (*hash).to_owned()))
        .collect();
    if ours != recorded {
        for (name, policy, hash) in &ours {
            eprintln!("    (\"{name}\", \"{policy}\", \"{hash}\"),");
        }
    }
    assert_eq!(
        ours, recorded,
        "colour images differ from the recorded conversion"
    );
}
