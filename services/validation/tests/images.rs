//! The validation service on port 0 with real mTLS, fed real DICOM files (from pydicom's test
//! set), generated PNG/JPEG images, and broken input.

use std::io::Cursor;

use medai_proto::common::v1::ImageFormat;
use medai_proto::validation::v1::ValidateImageRequest;
use medai_proto::validation::v1::validation_service_client::ValidationServiceClient;
use medai_runtime::errors::reason_of;
use medai_testkit::{Assets, TestPki, TestServer, test_process_config, wait_until_serving};
use medai_validation::frame_policy::FramePolicies;
use medai_validation::{FramePolicy, ImageLimits, ValidationConfig};
use tonic::Code;

struct Validation {
    pki: TestPki,
    server: TestServer,
}

impl Validation {
    async fn start(limits: ImageLimits) -> Self {
        Self::start_with_frames(limits, FramePolicies::default()).await
    }

    async fn start_with_frames(limits: ImageLimits, frames: FramePolicies) -> Self {
        let pki = TestPki::new();
        let config = ValidationConfig {
            process: test_process_config(),
            tls: pki.files("validation"),
            limits,
            quality: Default::default(),
            frames,
            patient_key_secret: Some(medai_runtime::config::Secret::new(
                "test patient-key secret",
            )),
            max_concurrent_decodes: 2,
            decode_memory_budget_bytes:
                medai_validation::config::default_decode_memory_budget_bytes(),
        };
        let server = TestServer::start(|listener, shutdown| {
            medai_validation::serve(config, listener, shutdown)
        })
        .await;
        wait_until_serving(&pki, server.address, "validation").await;
        Self { pki, server }
    }

    fn client_as(&self, identity: &str) -> ValidationServiceClient<tonic::transport::Channel> {
        ValidationServiceClient::new(self.pki.channel_as(
            identity,
            self.server.address,
            "validation",
        ))
        .max_decoding_message_size(128 * 1024 * 1024)
        .max_encoding_message_size(128 * 1024 * 1024)
    }
}

fn request(image: Vec<u8>) -> ValidateImageRequest {
    ValidateImageRequest {
        image: image.into(),
        format: ImageFormat::Unspecified.into(),
        model_name: String::new(),
        model_input_size: None,
    }
}

fn encoded(image: image::DynamicImage, format: image::ImageFormat) -> Vec<u8> {
    let mut bytes = Vec::new();
    image
        .write_to(&mut Cursor::new(&mut bytes), format)
        .expect("encode");
    bytes
}

#[tokio::test]
async fn a_real_mr_dicom_decodes_with_safe_metadata_only() {
    let service = Validation::start(ImageLimits::default()).await;
    let assets = Assets::locate();
    let response = service
        .client_as("gateway")
        .validate_image(request(assets.dicom("MR_small.dcm")))
        .await
        .expect("valid");
    let image = response.into_inner().image.expect("image");
    assert_eq!(
        (image.width, image.height, image.channels, image.bit_depth),
        (64, 64, 1, 8)
    );
    assert_eq!(image.photometric_interpretation, "MONOCHROME2");
    assert_eq!(image.pixels.len(), 64 * 64);
    assert!(
        image.pixels.iter().any(|&value| value > 0),
        "real pixels, not a blank buffer"
    );
    let metadata = image.metadata.expect("metadata");
    assert_eq!(metadata.modality, "MR");
    assert_eq!(metadata.transfer_syntax_uid, "1.2.840.10008.1.2.1");
    assert_eq!((metadata.rows, metadata.columns), (64, 64));
}

#[tokio::test]
async fn uncompressed_dicom_variants_decode_to_the_same_pixels() {
    let service = Validation::start(ImageLimits::default()).await;
    let assets = Assets::locate();
    let mut gateway = service.client_as("gateway");
    let mut decoded = Vec::new();
    for name in [
        "MR_small.dcm",
        "MR_small_implicit.dcm",
        "MR_small_bigendian.dcm",
    ] {
        let image = gateway
            .validate_image(request(assets.dicom(name)))
            .await
            .expect(name)
            .into_inner()
            .image
            .expect("image");
        decoded.push(image.pixels);
    }
    assert_eq!(
        decoded[0], decoded[1],
        "implicit VR little endian matches explicit"
    );
    assert_eq!(decoded[0], decoded[2], "big endian matches little endian");
}

#[tokio::test]
async fn png_and_jpeg_decode_to_canonical_buffers() {
    let service = Validation::start(ImageLimits::default()).await;
    let mut gateway = service.client_as("gateway");
    let grey = image::DynamicImage::ImageLuma8(image::GrayImage::from_fn(100, 80, |x, _| {
        image::Luma([x as u8])
    }));
    let png = gateway
        .validate_image(request(encoded(grey, image::ImageFormat::Png)))
        .await
        .expect("png")
        .into_inner();
    let png = png.image.expect("image");
    assert_eq!((png.width, png.height, png.channels), (100, 80, 1));
    assert_eq!(png.pixels[99], 99);

    let colour = image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(128, 96, |x, y| {
        image::Rgb([x as u8, y as u8, 128])
    }));
    let jpeg = gateway
        .validate_image(request(encoded(colour, image::ImageFormat::Jpeg)))
        .await
        .expect("jpeg")
        .into_inner();
    let jpeg = jpeg.image.expect("image");
    assert_eq!(
        (
            jpeg.width,
            jpeg.height,
            jpeg.channels,
            jpeg.photometric_interpretation.as_str()
        ),
        (128, 96, 3, "RGB")
    );
    assert_eq!(jpeg.pixels.len(), 128 * 96 * 3);
}

async fn refusal(service: &Validation, image: Vec<u8>) -> String {
    let status = service
        .client_as("gateway")
        .validate_image(request(image))
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    reason_of(&status).expect("a machine-readable reason")
}

#[tokio::test]
async fn bad_input_gets_a_stable_code_and_never_a_panic() {
    let limits = ImageLimits {
        max_bytes: 300_000,
        min_side: 64,
        max_side: 1024,
        ..ImageLimits::default()
    };
    let service = Validation::start(limits).await;
    let assets = Assets::locate();
    assert_eq!(refusal(&service, Vec::new()).await, "IMAGE_EMPTY");
    assert_eq!(refusal(&service, vec![7; 300_001]).await, "IMAGE_TOO_LARGE");
    assert_eq!(
        refusal(&service, b"these bytes are no image at all".to_vec()).await,
        "IMAGE_UNDECODABLE"
    );
    let tiny = image::DynamicImage::ImageLuma8(image::GrayImage::new(32, 32));
    assert_eq!(
        refusal(&service, encoded(tiny, image::ImageFormat::Png)).await,
        "IMAGE_DIMENSIONS_OUT_OF_RANGE"
    );
    let huge = image::DynamicImage::ImageLuma8(image::GrayImage::new(2048, 70));
    assert_eq!(
        refusal(&service, encoded(huge, image::ImageFormat::Png)).await,
        "IMAGE_DIMENSIONS_OUT_OF_RANGE"
    );
    // A real DICOM file cut short, and a DICOM object with no image in it.
    // Cut short: its pixel data declares more bytes than remain.
    assert_eq!(
        refusal(&service, assets.dicom("MR_truncated.dcm")).await,
        "DICOM_DECLARED_LENGTH_EXCEEDS_INPUT"
    );
    assert_eq!(
        refusal(&service, assets.dicom("rtplan.dcm")).await,
        "DICOM_NO_PIXEL_DATA"
    );
    // Every byte of a real file flipped in turn, at a stride: each gets an answer.
    let original = assets.dicom("MR_small.dcm");
    let mut gateway = service.client_as("gateway");
    for position in (0..original.len()).step_by(97) {
        let mut damaged = original.clone();
        damaged[position] ^= 0xFF;
        match gateway.validate_image(request(damaged)).await {
            Ok(_) => {}
            Err(status) => {
                assert_eq!(
                    status.code(),
                    Code::InvalidArgument,
                    "byte {position}: {status:?}"
                );
                assert!(reason_of(&status).is_some());
            }
        }
    }
    // The service is still up after all of that.
    assert!(gateway.validate_image(request(original)).await.is_ok());
}

#[tokio::test]
async fn only_the_gateway_may_submit_images() {
    let service = Validation::start(ImageLimits::default()).await;
    let assets = Assets::locate();
    for identity in ["inference", "audit", "stranger"] {
        let status = service
            .client_as(identity)
            .validate_image(request(assets.dicom("MR_small.dcm")))
            .await
            .expect_err("refused");
        assert_eq!(status.code(), Code::PermissionDenied, "{identity}");
    }
}

#[tokio::test]
async fn lossless_transfer_syntaxes_of_one_image_decode_to_the_same_pixels() {
    let service = Validation::start(ImageLimits::default()).await;
    let assets = Assets::locate();
    let gateway = service.client_as("gateway");
    let decode = |name: &'static str| {
        let bytes = assets.dicom(name);
        let mut client = gateway.clone();
        async move {
            client
                .validate_image(request(bytes))
                .await
                .expect(name)
                .into_inner()
                .image
                .expect("image")
        }
    };
    let reference = decode("MR_small.dcm").await;
    for (name, syntax) in [
        ("MR_small_RLE.dcm", "1.2.840.10008.1.2.5"),
        ("MR_small_jp2klossless.dcm", "1.2.840.10008.1.2.4.90"),
        ("MR_small_jpeg_ls_lossless.dcm", "1.2.840.10008.1.2.4.80"),
    ] {
        let image = decode(name).await;
        assert_eq!(
            image
                .metadata
                .as_ref()
                .expect("metadata")
                .transfer_syntax_uid,
            syntax
        );
        assert_eq!(
            image.pixels, reference.pixels,
            "{name} decodes exactly like the uncompressed original"
        );
    }
    // Lossy JPEG baseline against the lossless JPEG of the same colour image: close, not exact.
    let lossless = decode("SC_rgb_jpeg_gdcm.dcm").await;
    let lossy = decode("SC_rgb_jpeg_lossy_gdcm.dcm").await;
    assert_eq!(lossless.pixels.len(), lossy.pixels.len());
    let mean_error = lossless
        .pixels
        .iter()
        .zip(&lossy.pixels)
        .map(|(a, b)| f64::from(a.abs_diff(*b)))
        .sum::<f64>()
        / lossless.pixels.len() as f64;
    assert!(
        mean_error < 4.0,
        "lossy JPEG stays within tolerance of the lossless original: {mean_error}"
    );
}

#[tokio::test]
async fn headers_that_promise_too_much_are_refused_before_decompression() {
    let assets = Assets::locate();
    let frames = Validation::start(ImageLimits {
        max_frames: 1,
        ..ImageLimits::default()
    })
    .await;
    assert_eq!(
        refusal(&frames, assets.dicom("SC_rgb_rle_2frame.dcm")).await,
        "DICOM_TOO_MANY_FRAMES"
    );
    let size = Validation::start(ImageLimits {
        max_decoded_bytes: 100_000,
        ..ImageLimits::default()
    })
    .await;
    // 512 × 512 × 16 bits = 524,288 bytes declared.
    assert_eq!(
        refusal(&size, assets.dicom("693_J2KI.dcm")).await,
        "IMAGE_DECODED_SIZE_TOO_LARGE"
    );
    // JPEG XL is a transfer syntax dicom-rs knows but this build does not decode.
    let unsupported = Validation::start(ImageLimits::default()).await;
    assert_eq!(
        refusal(&unsupported, jpeg_xl_dicom()).await,
        "DICOM_UNSUPPORTED_TRANSFER_SYNTAX"
    );
    // 12-bit JPEG decodes (tests/reference.rs), but not progressive coding: its own code.
    let mut progressive = assets.dicom("JPGExtended.dcm");
    let frame_header = progressive
        .windows(4)
        .position(|window| window == [0xFF, 0xD8, 0xFF, 0xC1])
        .expect("a 12-bit sequential frame header");
    progressive[frame_header + 3] = 0xC2;
    assert_eq!(
        refusal(&unsupported, progressive).await,
        "DICOM_UNSUPPORTED_TRANSFER_SYNTAX"
    );
    // Pixel encodings no model takes, refused from the header before any decoding.
    for name in [
        "liver_1frame.dcm",
        "SC_rgb_rle_32bit.dcm",
        "examples_palette.dcm",
    ] {
        assert_eq!(
            refusal(&unsupported, assets.dicom(name)).await,
            "DICOM_UNSUPPORTED_PIXEL_FORMAT",
            "{name}"
        );
    }
}

fn for_model(image: Vec<u8>, model: &str) -> ValidateImageRequest {
    ValidateImageRequest {
        model_name: model.to_owned(),
        ..request(image)
    }
}

/// Issue 15: a multi-frame object is refused under the default policy, and judged on the frame
/// its model's policy names otherwise, which the answer states. pydicom's SC_rgb_rle_2frame.dcm
/// (RLE, lossless) holds a colour frame and then its exact inverse, so which frame was judged
/// shows in the pixels; examples_ybr_color.dcm is a 30-frame ultrasound loop (JPEG baseline).
#[tokio::test]
async fn a_multi_frame_dicom_is_refused_or_judged_on_the_frame_its_model_s_policy_names() {
    let frames = FramePolicies {
        by_model: [
            ("first".to_owned(), FramePolicy::FirstFrame),
            ("middle".to_owned(), FramePolicy::MiddleFrame),
        ]
        .into(),
        ..FramePolicies::default()
    };
    let service = Validation::start_with_frames(ImageLimits::default(), frames).await;
    let assets = Assets::locate();
    let mut gateway = service.client_as("gateway");
    let two_frames = assets.dicom("SC_rgb_rle_2frame.dcm");
    let ultrasound_loop = assets.dicom("examples_ybr_color.dcm");
    for (image, model) in [
        (two_frames.clone(), ""),
        (two_frames.clone(), "a model without a policy"),
        (ultrasound_loop.clone(), ""),
    ] {
        let status = gateway
            .validate_image(for_model(image, model))
            .await
            .expect_err("refused by default");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert_eq!(
            reason_of(&status).as_deref(),
            Some("DICOM_MULTI_FRAME_NOT_SUPPORTED"),
            "model {model:?}"
        );
    }
    let judged = |model: &'static str, image: Vec<u8>| {
        let mut gateway = gateway.clone();
        async move {
            let image = gateway
                .validate_image(for_model(image, model))
                .await
                .unwrap_or_else(|status| panic!("{model}: {status:?}"))
                .into_inner()
                .image
                .expect("image");
            let frame = image
                .metadata
                .as_ref()
                .and_then(|metadata| metadata.frame.clone())
                .expect("the judged frame is named");
            (
                (frame.frame_number, frame.number_of_frames, frame.policy),
                image.pixels,
            )
        }
    };
    let (first_frame, first) = judged("first", two_frames.clone()).await;
    let (middle_frame, middle) = judged("middle", two_frames).await;
    assert_eq!(first_frame, (1, 2, "FIRST_FRAME".to_owned()));
    assert_eq!(middle_frame, (2, 2, "MIDDLE_FRAME".to_owned()));
    assert_eq!(first.len(), 100 * 100 * 3);
    assert_eq!(&first[..3], &[255, 0, 0], "frame 1 starts red");
    assert_eq!(first.len(), middle.len());
    assert!(
        first.iter().zip(&middle).all(|(a, b)| *b == 255 - *a),
        "frame 2 (the middle of 2) is frame 1 inverted, as the file holds it"
    );
    let (loop_first, loop_first_pixels) = judged("first", ultrasound_loop.clone()).await;
    let (loop_middle, loop_middle_pixels) = judged("middle", ultrasound_loop).await;
    assert_eq!(loop_first, (1, 30, "FIRST_FRAME".to_owned()));
    assert_eq!(loop_middle, (16, 30, "MIDDLE_FRAME".to_owned()));
    assert_eq!(loop_middle_pixels.len(), 320 * 240 * 3);
    assert_ne!(
        loop_first_pixels, loop_middle_pixels,
        "frame 16 of the loop is another image than frame 1"
    );
    // A single-frame object is frame 1 of 1 under every policy, the default refusal included.
    let (single, _) = judged("", assets.dicom("MR_small.dcm")).await;
    assert_eq!(single, (1, 1, "REFUSE".to_owned()));
    // The frame limit counts every declared frame whichever is judged, and is checked first.
    let few_frames = Validation::start_with_frames(
        ImageLimits {
            max_frames: 29,
            ..ImageLimits::default()
        },
        FramePolicies {
            default: FramePolicy::MiddleFrame,
            ..FramePolicies::default()
        },
    )
    .await;
    assert_eq!(
        refusal(&few_frames, assets.dicom("examples_ybr_color.dcm")).await,
        "DICOM_TOO_MANY_FRAMES"
    );
}

/// MR_small.dcm re-labelled as JPEG XL Lossless, its pixels one opaque fragment.
fn jpeg_xl_dicom() -> Vec<u8> {
    use dicom_core::value::{PixelFragmentSequence, Value};
    use dicom_core::{DataElement, VR};
    use dicom_dictionary_std::tags;
    use dicom_encoding::TransferSyntaxIndex;
    let assets = Assets::locate();
    let mut object = dicom_object::OpenFileOptions::new()
        .from_reader(std::io::Cursor::new(assets.dicom("MR_small.dcm")))
        .expect("MR_small");
    let jpeg_xl = dicom_transfer_syntax_registry::TransferSyntaxRegistry
        .get("1.2.840.10008.1.2.4.110")
        .expect("JPEG XL is a known transfer syntax");
    object.meta_mut().set_transfer_syntax(jpeg_xl);
    object.meta_mut().update_information_group_length();
    let fragments: PixelFragmentSequence<Vec<u8>> =
        PixelFragmentSequence::new(Vec::<u32>::new(), vec![vec![0xFF, 0x0A, 0, 0]]);
    object.put(DataElement::new(
        tags::PIXEL_DATA,
        VR::OB,
        Value::PixelSequence(fragments),
    ));
    let mut bytes = Vec::new();
    object.write_all(&mut bytes).expect("write");
    bytes
}

#[tokio::test]
async fn every_image_comes_with_a_quality_report_and_a_strict_profile_refuses() {
    use medai_proto::validation::v1::Verdict;
    use medai_validation::quality::{QualityPolicy, QualityThresholds};
    let assets = Assets::locate();
    let lenient = Validation::start(ImageLimits::default()).await;
    let response = lenient
        .client_as("gateway")
        .validate_image(request(assets.dicom("MR_small.dcm")))
        .await
        .expect("valid");
    let report = response.into_inner().quality.expect("quality report");
    assert_eq!(report.profile, "default");
    let codes: Vec<&str> = report
        .checks
        .iter()
        .map(|check| check.code.as_str())
        .collect();
    assert_eq!(
        codes,
        [
            "QUALITY_BRIGHTNESS_LOW",
            "QUALITY_BRIGHTNESS_HIGH",
            "QUALITY_CONTRAST_LOW",
            "QUALITY_NOISE_HIGH",
            "QUALITY_BLUR",
            "QUALITY_SATURATION_HIGH"
        ]
    );
    assert!(
        report
            .checks
            .iter()
            .all(|check| check.value.is_finite() && check.verdict() != Verdict::Unspecified)
    );
    assert!(report.passed, "{report:?}");

    let strict = QualityThresholds {
        min_contrast: 0.99,
        refuse_on_failure: true,
        ..QualityThresholds::default()
    };
    let pki = TestPki::new();
    let config = ValidationConfig {
        process: test_process_config(),
        tls: pki.files("validation"),
        limits: ImageLimits::default(),
        quality: QualityPolicy {
            by_modality: [("MR".to_owned(), strict)].into(),
            ..QualityPolicy::default()
        },
        frames: Default::default(),
        patient_key_secret: None,
        max_concurrent_decodes: 2,
        decode_memory_budget_bytes: medai_validation::config::default_decode_memory_budget_bytes(),
    };
    let server =
        TestServer::start(|listener, shutdown| medai_validation::serve(config, listener, shutdown))
            .await;
    wait_until_serving(&pki, server.address, "validation").await;
    let strict_service = Validation { pki, server };
    assert_eq!(
        refusal(&strict_service, assets.dicom("MR_small.dcm")).await,
        "IMAGE_QUALITY_INSUFFICIENT"
    );
    // The strict profile is the MR one: a CT image is judged by the default profile.
    strict_service
        .client_as("gateway")
        .validate_image(request(assets.dicom("CT_small.dcm")))
        .await
        .expect("CT passes");
}

#[tokio::test]
async fn a_declared_length_beyond_the_input_is_refused_before_parsing() {
    // Found by scripts/fuzz.sh: a 9 KB deflated file whose inflated data set declares a ~3 GB
    // element. Parsers reserve (and zero) a declared length before reading it, so lengths are
    // now checked against the bytes that follow them, after a capped inflate, before parsing.
    let bytes = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/fuzz-huge-declared-element.dcm"
    ))
    .expect("reproducer");
    let service = Validation::start(ImageLimits::default()).await;
    assert_eq!(
        refusal(&service, bytes).await,
        "DICOM_DECLARED_LENGTH_EXCEEDS_INPUT"
    );
    // The fuzzer's third finding: an element with an unknown VR ("\0\0"), which dicom-rs reads
    // as UN with a 32-bit length (here 2,966,619,392 bytes in a 6 KB file).
    let bytes = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/fuzz-unknown-vr-huge-length.dcm"
    ))
    .expect("reproducer");
    assert_eq!(
        refusal(&service, bytes).await,
        "DICOM_DECLARED_LENGTH_EXCEEDS_INPUT"
    );
    // The fourth: a 902-byte deflated file whose meta group holds an element of group 0003.
    // dicom-rs ends the meta group by its group length and inflates a data set declaring a
    // huge OB value (2.5 GB reserved); the length walk ended it at the foreign element and
    // inflated garbage from there. It now ends the group where dicom-rs does, and inflating
    // the real data set as a stream, under the cap, finds its deflate stream corrupt.
    let bytes = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/fuzz-deflate-after-meta-group-length.dcm"
    ))
    .expect("reproducer");
    assert_eq!(refusal(&service, bytes).await, "IMAGE_UNDECODABLE");
}

#[tokio::test]
async fn a_codec_panic_becomes_a_refusal_and_the_service_stays_up() {
    // Found by scripts/fuzz.sh: this input makes dicom-rs 0.10's RLE decoder panic. The RLE
    // frame check now refuses it before the codec; were a codec to panic anyway, decoding runs
    // on the blocking pool, so the caller gets IMAGE_UNDECODABLE and the service stays up.
    let bytes = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/fuzz-rle-decoder-panic.dcm"
    ))
    .expect("reproducer");
    let service = Validation::start(ImageLimits {
        min_side: 1,
        ..ImageLimits::default()
    })
    .await;
    assert_eq!(refusal(&service, bytes).await, "IMAGE_UNDECODABLE");
    // The fuzzer's fourth finding: dicom-rs 0.10's JPEG 2000 adapter indexes past a buffer on
    // this frame. Nothing checks it beforehand; the panic is contained.
    let bytes = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/fuzz-jpeg2000-decoder-panic.dcm"
    ))
    .expect("reproducer");
    assert_eq!(refusal(&service, bytes).await, "IMAGE_UNDECODABLE");
    let assets = Assets::locate();
    service
        .client_as("gateway")
        .validate_image(request(assets.dicom("MR_small.dcm")))
        .await
        .expect("still serving");
}

/// Issue 14: with the model's input size named, the image is checked at full resolution (the
/// same quality report, the same safe metadata) and returned resized to that size by the shared
/// resize inference runs, in its own sample type, marked as resized. Without a size, or at the
/// image's own size, it is returned whole as before; an impossible size gets a stable code.
#[tokio::test]
async fn a_named_model_input_size_returns_the_checked_image_at_that_size() {
    use medai_imaging::model_input::{ModelInputSize as Size, resize_canonical};
    use medai_proto::validation::v1::ModelInputSize;
    let service = Validation::start(ImageLimits::default()).await;
    let assets = Assets::locate();
    let mut gateway = service.client_as("gateway");
    let noise = image::DynamicImage::ImageLuma8(image::GrayImage::from_fn(256, 256, |x, y| {
        image::Luma([((x * 7919 + y * 104_729) % 251) as u8])
    }));
    let colour = image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(200, 150, |x, y| {
        image::Rgb([x as u8, y as u8, (x * y % 256) as u8])
    }));
    let inputs = [
        ("noise PNG", encoded(noise, image::ImageFormat::Png)),
        ("RGB PNG", encoded(colour, image::ImageFormat::Png)),
        ("MR_small.dcm", assets.dicom("MR_small.dcm")),
        ("CT_small.dcm", assets.dicom("CT_small.dcm")),
    ];
    for (name, bytes) in inputs {
        let full = gateway
            .validate_image(request(bytes.clone()))
            .await
            .expect(name)
            .into_inner();
        let full_image = full.image.clone().expect("image");
        assert!(!full_image.resized_for_model_input, "{name}");
        // Sizes other than the image's own (MR_small.dcm is 64×64: that case is the one below).
        let sizes = [(64, 64), (240, 240), (100, 37)]
            .into_iter()
            .filter(|&size| size != (full_image.width, full_image.height));
        for (width, height) in sizes {
            let mut sized = request(bytes.clone());
            sized.model_input_size = Some(ModelInputSize { width, height });
            let answer = gateway
                .validate_image(sized)
                .await
                .expect(name)
                .into_inner();
            assert_eq!(answer.quality, full.quality, "{name}: checked at full size");
            let image = answer.image.expect("image");
            let expected = resize_canonical(
                &full_image.pixels,
                (full_image.width, full_image.height),
                (full_image.channels, full_image.bit_depth),
                Size { width, height },
            )
            .expect("a model-input layout");
            assert_eq!(
                (image.width, image.height, image.channels, image.bit_depth),
                (width, height, full_image.channels, full_image.bit_depth),
                "{name} → {width}×{height}"
            );
            assert!(image.resized_for_model_input, "{name}");
            assert_eq!(image.pixels, expected, "{name} → {width}×{height}");
            assert_eq!(
                image.photometric_interpretation,
                full_image.photometric_interpretation
            );
            // The metadata still gives the source's size.
            assert_eq!(image.metadata, full_image.metadata, "{name}");
        }
        // Already at the model's size: returned as it is.
        let mut same = request(bytes.clone());
        same.model_input_size = Some(ModelInputSize {
            width: full_image.width,
            height: full_image.height,
        });
        let same = gateway
            .validate_image(same)
            .await
            .expect(name)
            .into_inner()
            .image
            .expect("image");
        assert_eq!(same, full_image, "{name}");
    }

    for (width, height) in [(0, 64), (64, 0), (4097, 64), (64, u32::MAX)] {
        let mut bad = request(assets.dicom("MR_small.dcm"));
        bad.model_input_size = Some(ModelInputSize { width, height });
        let status = gateway.validate_image(bad).await.expect_err("refused");
        assert_eq!(
            (status.code(), reason_of(&status).as_deref()),
            (Code::InvalidArgument, Some("MODEL_INPUT_SIZE_INVALID")),
            "{width}×{height}"
        );
    }
}
