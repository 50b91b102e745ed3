//! Validation throughput: images/s for the whole validation path (decode, de-identification
//! with the keyed patient key, quality measures) against the bare decoder call on the same
//! input, in one run, for a 512×512 16-bit DICOM, a JPEG-compressed DICOM and a 1024×1024 PNG.
//! Prints the figures and writes target/bench/validation_throughput.json.
//!
//! Run with `scripts/bench.sh`, or `cargo bench -p medai-validation --bench throughput`.

#![allow(clippy::print_stdout)]

use std::io::Cursor;
use std::time::{Duration, Instant};

use dicom_dictionary_std::tags;
use dicom_object::OpenFileOptions;
use dicom_object::file::ReadPreamble;
use dicom_pixeldata::PixelDecoder;
use medai_testkit::Assets;
use medai_validation::ImageLimits;
use medai_validation::decode::decode_image_with_key;
use medai_validation::quality::{QualityPolicy, assess};

const MINIMUM_TIME: Duration = Duration::from_secs(2);

/// Runs `work` until at least MINIMUM_TIME has passed (and at least 5 times); images/s.
fn rate(mut work: impl FnMut()) -> f64 {
    work();
    let started = Instant::now();
    let mut runs = 0u32;
    while runs < 5 || started.elapsed() < MINIMUM_TIME {
        work();
        runs += 1;
    }
    f64::from(runs) / started.elapsed().as_secs_f64()
}

/// CT_small.dcm (128×128, 16-bit) with its pixels tiled to 512×512.
fn ct_512() -> Vec<u8> {
    use dicom_core::{DataElement, PrimitiveValue, VR};
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

fn png_1024() -> Vec<u8> {
    let image = image::GrayImage::from_fn(1024, 1024, |x, y| {
        image::Luma([((x * 7 + y * 13 + (x * y) % 31) % 256) as u8])
    });
    let mut bytes = Cursor::new(Vec::new());
    image
        .write_to(&mut bytes, image::ImageFormat::Png)
        .expect("png");
    bytes.into_inner()
}

fn bare_dicom(bytes: &[u8]) {
    let object = OpenFileOptions::new()
        .read_preamble(ReadPreamble::Auto)
        .from_reader(Cursor::new(bytes))
        .expect("open");
    let decoded = object.decode_pixel_data_frame(0).expect("decode");
    std::hint::black_box(decoded);
}

fn bare_png(bytes: &[u8]) {
    std::hint::black_box(image::load_from_memory(bytes).expect("png"));
}

/// A name, the encoded image, and the bare decoder call for its format.
type Input = (&'static str, Vec<u8>, fn(&[u8]));

fn main() {
    let limits = ImageLimits::default();
    let policy = QualityPolicy::default();
    let secret = b"a benchmark patient-key secret".to_vec();
    let inputs: [Input; 3] = [
        ("DICOM 512x512 16-bit, explicit VR LE", ct_512(), bare_dicom),
        (
            "DICOM JPEG baseline 320x240 RGB (examples_ybr_color)",
            Assets::locate().dicom("examples_ybr_color.dcm"),
            bare_dicom,
        ),
        ("PNG 1024x1024 8-bit grey", png_1024(), bare_png),
    ];
    // An optional argument selects the images whose name contains it (e.g. `16-bit`, for a
    // profile of one case); cargo's own `--bench` flag is ignored.
    let filter = std::env::args()
        .skip(1)
        .find(|argument| !argument.starts_with("--"));
    println!("validation throughput (decode + de-identify + quality) against the bare decoder");
    let mut report = serde_json::Map::new();
    for (name, bytes, bare) in inputs {
        if filter
            .as_deref()
            .is_some_and(|wanted| !name.contains(wanted))
        {
            continue;
        }
        let full = rate(|| {
            let image = decode_image_with_key(&bytes, None, &limits, Some(&secret))
                .expect("validation decode");
            std::hint::black_box(assess(&image, &policy, "brain-mri-tumor"));
        });
        // The same path without the quality measures, to show where the time goes.
        let decode_only = rate(|| {
            std::hint::black_box(
                decode_image_with_key(&bytes, None, &limits, Some(&secret))
                    .expect("validation decode"),
            );
        });
        let baseline = rate(|| bare(&bytes));
        println!(
            "  {name:<54} {full:>8.1} images/s (decode + de-identify alone {decode_only:>8.1})  \
             bare decoder {baseline:>8.1} images/s  ratio {:.3}x",
            full / baseline
        );
        report.insert(
            name.to_owned(),
            serde_json::json!({
                "bytes": bytes.len(),
                "validation_images_per_second": full,
                "decode_and_deidentify_images_per_second": decode_only,
                "bare_decoder_images_per_second": baseline,
                "ratio": full / baseline,
            }),
        );
    }
    let directory = medai_testkit::workspace_root().join("target/bench");
    std::fs::create_dir_all(&directory).expect("bench folder");
    std::fs::write(
        directory.join("validation_throughput.json"),
        serde_json::to_string_pretty(&serde_json::Value::Object(report)).expect("json"),
    )
    .expect("write report");
}
