//! The outputs of the two benchmarked validation jobs pinned to the values they had before
//! their passes were rewritten for speed (issue 14): the gateway's job (a 256×256 textured
//! 8-bit PNG, checked and resized to the light model's 64×64) and a 512×512 16-bit DICOM
//! (CT_small.dcm tiled, as the `throughput` bench builds it). Every quality figure is compared
//! bit for bit, with its verdict, and the pixels by SHA-256: a faster pass that changed a
//! single sample or the last bit of a figure fails here.

use std::io::Cursor;

use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use dicom_object::OpenFileOptions;
use dicom_object::file::ReadPreamble;
use medai_imaging::model_input::{ModelInputSize, resize_canonical};
use medai_testkit::Assets;
use medai_testkit::bench_images::textured_png;
use medai_validation::ImageLimits;
use medai_validation::decode::decode_image_with_key;
use medai_validation::quality::{QualityPolicy, QualityReport, assess};

/// CT_small.dcm (128×128, 16-bit) with its pixels tiled to 512×512, as the bench builds it.
fn ct_512() -> Vec<u8> {
    let source = Assets::locate().dicom("CT_small.dcm");
    let mut object = OpenFileOptions::new()
        .read_preamble(ReadPreamble::Auto)
        .from_reader(Cursor::new(source))
        .expect("CT_small");
    let pixels = object
        .element(tags::PIXEL_DATA)
        .expect("pixels")
        .to_bytes()
        .expect("bytes")
        .to_vec();
    let mut tiled = Vec::with_capacity(512 * 512 * 2);
    for row in 0..512usize {
        for column in 0..512usize {
            let at = ((row % 128) * 128 + (column % 128)) * 2;
            tiled.extend_from_slice(&pixels[at..at + 2]);
        }
    }
    object.put(DataElement::new(
        tags::ROWS,
        VR::US,
        PrimitiveValue::from(512u16),
    ));
    object.put(DataElement::new(
        tags::COLUMNS,
        VR::US,
        PrimitiveValue::from(512u16),
    ));
    object.put(DataElement::new(
        tags::PIXEL_DATA,
        VR::OW,
        PrimitiveValue::from(tiled),
    ));
    let mut bytes = Vec::new();
    object.write_all(&mut bytes).expect("write DICOM");
    bytes
}

fn sha256_hex(bytes: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, bytes)
        .as_ref()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// The report as text: each figure's bits (exact), and each check's value and verdict.
fn report_lines(report: &QualityReport) -> Vec<String> {
    let measures = report.measures;
    let mut lines = vec![
        format!(
            "mean_brightness {:016x}",
            measures.mean_brightness.to_bits()
        ),
        format!("rms_contrast {:016x}", measures.rms_contrast.to_bits()),
        format!("noise {:?}", measures.noise.map(f64::to_bits)),
        format!("sharpness {:?}", measures.sharpness.map(f64::to_bits)),
        format!(
            "saturated_fraction {:016x}",
            measures.saturated_fraction.to_bits()
        ),
    ];
    lines.extend(report.checks.iter().map(|check| {
        format!(
            "{} {:016x} {:?}",
            check.code,
            check.value.to_bits(),
            check.verdict
        )
    }));
    lines
}

fn assert_pinned(what: &str, actual: &[String], pinned: &[&str]) {
    if std::env::var_os("MEDAI_PRINT_PINNED").is_some() {
        eprintln!("{what}: {actual:#?}");
    }
    assert_eq!(actual, pinned, "{what}");
}

#[test]
fn the_gateway_jobs_model_input_and_quality_report_are_pinned() {
    let secret = b"a pinned patient-key secret".to_vec();
    let image = decode_image_with_key(
        &textured_png(),
        None,
        &ImageLimits::default(),
        Some(&secret),
    )
    .expect("decoded");
    let report = assess(&image, &QualityPolicy::default(), "synthetic-light");
    let resized = resize_canonical(
        &image.pixels,
        (image.width, image.height),
        (image.channels, image.bit_depth),
        ModelInputSize {
            width: 64,
            height: 64,
        },
    )
    .expect("resized");
    let mut lines = report_lines(&report);
    lines.push(format!("pixels {}", sha256_hex(&image.pixels)));
    lines.push(format!("model input {}", sha256_hex(&resized)));
    assert_pinned("gateway job", &lines, PINNED_GATEWAY);
}

#[test]
fn the_16_bit_dicoms_display_image_and_quality_report_are_pinned() {
    let secret = b"a pinned patient-key secret".to_vec();
    let image = decode_image_with_key(&ct_512(), None, &ImageLimits::default(), Some(&secret))
        .expect("decoded");
    let report = assess(&image, &QualityPolicy::default(), "brain-mri-tumor");
    let resized = resize_canonical(
        &image.pixels,
        (image.width, image.height),
        (image.channels, image.bit_depth),
        ModelInputSize {
            width: 240,
            height: 240,
        },
    )
    .expect("resized");
    let mut lines = report_lines(&report);
    lines.push(format!("pixels {}", sha256_hex(&image.pixels)));
    lines.push(format!("model input {}", sha256_hex(&resized)));
    assert_pinned("16-bit DICOM", &lines, PINNED_DICOM);
}

const PINNED_GATEWAY: &[&str] = &[
    "mean_brightness 3fdf51b171717171",
    "rms_contrast 3fd22fdff49afd6a",
    "noise Some(4590393081527792730)",
    "sharpness Some(4600446986955412790)",
    "saturated_fraction 3f70f00000000000",
    "QUALITY_BRIGHTNESS_LOW 3fdf51b171717171 Pass",
    "QUALITY_BRIGHTNESS_HIGH 3fdf51b171717171 Pass",
    "QUALITY_CONTRAST_LOW 3fd22fdff49afd6a Pass",
    "QUALITY_NOISE_HIGH 3fb45a2fcbdff45a Pass",
    "QUALITY_BLUR 3fd81229117e5536 Pass",
    "QUALITY_SATURATION_HIGH 3f70f00000000000 Pass",
    "pixels 141c9377686fd8d02f48c8117dcbdf78d9a1be8015950fb8efcdf353e3a2317f",
    "model input 8ccdd81d56ca4f4964c3f5abf1606d59706c3e0cd0c538bf489dd1539e810638",
];

const PINNED_DICOM: &[&str] = &[
    "mean_brightness 3fd81a7b7b7b7b7b",
    "rms_contrast 3fc78fe05f41ddb9",
    "noise Some(4569044426402868819)",
    "sharpness Some(4567885416922411552)",
    "saturated_fraction 3f34000000000000",
    "QUALITY_BRIGHTNESS_LOW 3fd81a7b7b7b7b7b Pass",
    "QUALITY_BRIGHTNESS_HIGH 3fd81a7b7b7b7b7b Pass",
    "QUALITY_CONTRAST_LOW 3fc78fe05f41ddb9 Pass",
    "QUALITY_NOISE_HIGH 3f6881b2aeb8ae53 Pass",
    "QUALITY_BLUR 3f646395c258f220 Pass",
    "QUALITY_SATURATION_HIGH 3f34000000000000 Pass",
    "pixels fac4e57910c51091695d4837d65678c865db98ec971c3b77c16421df5abb7a14",
    "model input 302086d40aca12c6c3d92d161d003a3ca7ab352626dfdf42f5ac9f1743806db1",
];
