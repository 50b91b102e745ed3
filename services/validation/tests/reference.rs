//! The decoder against a reference decoder (pydicom with pylibjpeg, prepared by
//! scripts/dicom-reference.sh): the same stored sample values, exactly for lossless transfer
//! syntaxes and within a stated tolerance for lossy ones, on real DICOM files.

use medai_testkit::workspace_root;
use medai_validation::ImageLimits;
use medai_validation::decode::decode_stored_samples;

enum Expect {
    Exact,
    /// Lossy codecs may round differently: the largest mean absolute difference allowed.
    WithinMean(f64),
}

const CASES: [(&str, &str, Expect); 19] = [
    (
        "MR_small.dcm",
        "explicit VR little endian, 16-bit signed",
        Expect::Exact,
    ),
    ("MR_small_implicit.dcm", "implicit VR", Expect::Exact),
    (
        "MR_small_bigendian.dcm",
        "explicit VR big endian",
        Expect::Exact,
    ),
    ("MR_small_RLE.dcm", "RLE lossless", Expect::Exact),
    (
        "MR_small_jp2klossless.dcm",
        "JPEG 2000 lossless",
        Expect::Exact,
    ),
    ("CT_small.dcm", "CT, 16-bit signed", Expect::Exact),
    (
        "MR_small_expb.dcm",
        "explicit VR big endian, second encoder",
        Expect::Exact,
    ),
    ("image_dfl.dcm", "deflated explicit VR", Expect::Exact),
    ("SC_rgb_rle.dcm", "RGB, RLE", Expect::Exact),
    ("SC_rgb_rle_16bit.dcm", "RGB 16-bit, RLE", Expect::Exact),
    (
        "SC_rgb_jpeg_gdcm.dcm",
        "RGB, JPEG lossless (process 14)",
        Expect::Exact,
    ),
    ("examples_jpeg2k.dcm", "RGB, JPEG 2000", Expect::Exact),
    (
        "JPEG2000.dcm",
        "JPEG 2000, part 2 transfer syntax",
        Expect::Exact,
    ),
    (
        "MR_small_jpeg_ls_lossless.dcm",
        "JPEG-LS lossless, 16-bit",
        Expect::Exact,
    ),
    // Near-lossless JPEG-LS decoding is exactly specified, so decoders agree exactly too.
    (
        "JPEGLSNearLossless_08.dcm",
        "JPEG-LS near-lossless, 8-bit",
        Expect::Exact,
    ),
    (
        "JPEGLSNearLossless_16.dcm",
        "JPEG-LS near-lossless, 16-bit",
        Expect::Exact,
    ),
    (
        "SC_rgb_jls_lossy_line.dcm",
        "RGB JPEG-LS near-lossless, line interleaved",
        Expect::Exact,
    ),
    (
        "SC_rgb_jls_lossy_sample.dcm",
        "RGB JPEG-LS near-lossless, sample interleaved",
        Expect::Exact,
    ),
    (
        "SC_rgb_jpeg_dcmtk.dcm",
        "RGB, JPEG baseline (lossy: IDCTs round differently)",
        Expect::WithinMean(2.0),
    ),
];

#[test]
fn stored_samples_match_the_reference_decoder() {
    let root = workspace_root();
    let reference = root.join(".cache/dicom-reference");
    assert!(
        reference.join(".complete").exists(),
        "run scripts/dicom-reference.sh (scripts/test.sh does)"
    );
    let limits = ImageLimits {
        min_side: 1,
        ..ImageLimits::default()
    };
    for (name, what, expect) in CASES {
        let stem = name.trim_end_matches(".dcm");
        let shape: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(reference.join(format!("{stem}.json")))
                .expect("reference shape"),
        )
        .expect("json");
        let expected: Vec<i32> = std::fs::read(reference.join(format!("{stem}.i32")))
            .expect("reference samples")
            .chunks_exact(4)
            .map(|bytes| i32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
            .collect();
        let bytes = std::fs::read(root.join(".cache/dicom").join(name)).expect("DICOM file");
        let ours = decode_stored_samples(&bytes, &limits)
            .unwrap_or_else(|error| panic!("{name} ({what}): {error}"));
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
        match expect {
            Expect::Exact => assert!(
                ours.values == expected,
                "{name} ({what}) differs from the reference"
            ),
            Expect::WithinMean(limit) => {
                let mean = ours
                    .values
                    .iter()
                    .zip(&expected)
                    .map(|(a, b)| f64::from(a.abs_diff(*b)))
                    .sum::<f64>()
                    / expected.len() as f64;
                assert!(
                    mean <= limit,
                    "{name} ({what}): mean absolute difference {mean} > {limit}"
                );
            }
        }
    }
}
