//! Validation throughput: images/s for the whole validation path (decode, de-identification
//! with the keyed patient key, quality measures) against the bare decoder call on the same
//! input, in one run, for a 512×512 16-bit DICOM, a JPEG-compressed DICOM and a 1024×1024 PNG;
//! and the gateway's job (issue 14): the 256×256 textured 8-bit PNG every mesh benchmark sends
//! ([`medai_testkit::bench_images::textured_png`]: Paeth-filtered and deflated as real exports
//! are) validated and resized to a 64×64 grey model input, as the gateway asks for it, against
//! the bare PNG decoder; then that request through the service itself (`service` selects it
//! alone): a validation server in this process over mTLS, called as the gateway by 1 caller
//! (the latency case: every call wakes the server) and by 16 concurrent callers for a few
//! seconds each, with the CPU time of the server's own threads (its runtime's workers and
//! blocking pool) per request.
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
use medai_imaging::decode::{decode_planned, plan_decode};
use medai_imaging::model_input::{ModelInputSize, resize_canonical};
use medai_testkit::Assets;
use medai_testkit::bench_images::textured_png;
use medai_validation::FramePolicy;
use medai_validation::ImageLimits;
use medai_validation::decode::decode_image_with_key;
use medai_validation::quality::{QualityPolicy, assess};

const MINIMUM_TIME: Duration = Duration::from_secs(2);

/// Runs `work` until at least MINIMUM_TIME has passed (and at least 5 times); images/s. With
/// `MEDAI_BENCH_RUNS=n`, exactly n times after the warm-up run instead: a profile then covers a
/// known number of images (under callgrind, instructions per image whatever the load).
fn rate(mut work: impl FnMut()) -> f64 {
    let fixed_runs = std::env::var("MEDAI_BENCH_RUNS")
        .ok()
        .and_then(|runs| runs.parse::<u32>().ok());
    work();
    let started = Instant::now();
    let mut runs = 0u32;
    while match fixed_runs {
        Some(wanted) => runs < wanted,
        None => runs < 5 || started.elapsed() < MINIMUM_TIME,
    } {
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

/// The light model's input, as the gateway names it to validation.
const MODEL_INPUT: ModelInputSize = ModelInputSize {
    width: 64,
    height: 64,
};

/// What the service's handler runs for one image on the blocking pool: the plan (header
/// checks), the planned decode, the quality report, then the resize to the model input.
fn gateway_job(bytes: &[u8], limits: &ImageLimits, policy: &QualityPolicy, secret: &[u8]) {
    let plan = plan_decode(bytes, None, limits).expect("plan");
    let image = decode_planned(bytes, &plan, limits, Some(secret), FramePolicy::Refuse)
        .expect("validation decode");
    let report = assess(&image, policy, "synthetic-light");
    let resized = resize_canonical(
        &image.pixels,
        (image.width, image.height),
        (image.channels, image.bit_depth),
        MODEL_INPUT,
    )
    .expect("resized");
    std::hint::black_box((report, resized));
}

/// The CPU time (user + system, in seconds) of this process's threads whose name starts with
/// `prefix`, from /proc.
fn threads_cpu_seconds(prefix: &str) -> f64 {
    let ticks_per_second = 100.0; // USER_HZ on Linux
    let mut ticks = 0_u64;
    for task in std::fs::read_dir("/proc/self/task").expect("/proc/self/task") {
        let stat =
            std::fs::read_to_string(task.expect("task").path().join("stat")).unwrap_or_default();
        // pid (comm) state ppid ...: utime and stime are the 14th and 15th fields.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        if !stat[open + 1..close].starts_with(prefix) {
            continue;
        }
        let fields: Vec<&str> = stat[close + 2..].split(' ').collect();
        let field = |index: usize| {
            fields
                .get(index)
                .and_then(|f| f.parse::<u64>().ok())
                .unwrap_or(0)
        };
        ticks += field(11) + field(12);
    }
    ticks as f64 / ticks_per_second
}

/// Concurrent callers of the service section: one (each call finds the server idle, as at
/// concurrency 1 through the gateway) and sixteen.
const SERVICE_CALLERS: [usize; 2] = [1, 16];

/// The gateway's request through a real validation server (mTLS, its tower layers, the
/// blocking pool): for each count of [`SERVICE_CALLERS`], requests/s and the server threads'
/// CPU per request.
fn service_cpu_per_request(png: &[u8]) -> Vec<(usize, f64, f64)> {
    use medai_proto::common::v1::ImageFormat;
    use medai_proto::validation::v1 as pb;
    use medai_proto::validation::v1::validation_service_client::ValidationServiceClient;
    use medai_testkit::{TestPki, TestServer, test_process_config, wait_until_serving};
    use medai_validation::ValidationConfig;
    const WINDOW: Duration = Duration::from_secs(4);
    // The server's threads carry a name of their own, so their CPU time is told apart from
    // the callers'.
    let server_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("valsrv")
        .enable_all()
        .build()
        .expect("server runtime");
    let client_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("valcli")
        .enable_all()
        .build()
        .expect("client runtime");
    let pki = TestPki::new();
    let config = ValidationConfig {
        process: test_process_config(),
        tls: pki.files("validation"),
        limits: ImageLimits::default(),
        quality: QualityPolicy::default(),
        frames: Default::default(),
        patient_key_secret: Some(medai_runtime::config::Secret::new(
            "a benchmark patient-key secret",
        )),
        max_concurrent_decodes: 2,
        decode_memory_budget_bytes: medai_validation::config::default_decode_memory_budget_bytes(),
    };
    let server = server_runtime.block_on(TestServer::start(|listener, shutdown| {
        medai_validation::serve(config, listener, shutdown)
    }));
    let address = server.address;
    client_runtime.block_on(wait_until_serving(&pki, address, "validation"));
    let client = {
        let _inside = client_runtime.enter();
        ValidationServiceClient::new(pki.channel_as("gateway", address, "validation"))
    };
    let request = pb::ValidateImageRequest {
        image: png.to_vec().into(),
        format: ImageFormat::Png.into(),
        model_name: "synthetic-light".to_owned(),
        model_input_size: Some(pb::ModelInputSize {
            width: MODEL_INPUT.width,
            height: MODEL_INPUT.height,
        }),
    };
    let run = |callers: usize, window: Duration| {
        client_runtime.block_on(async {
            let started = Instant::now();
            let callers: Vec<_> = (0..callers)
                .map(|_| {
                    let (mut client, request) = (client.clone(), request.clone());
                    tokio::spawn(async move {
                        let mut done = 0_u64;
                        while started.elapsed() < window {
                            let answer = client
                                .validate_image(request.clone())
                                .await
                                .expect("validated");
                            assert!(
                                answer
                                    .into_inner()
                                    .image
                                    .is_some_and(|image| image.resized_for_model_input)
                            );
                            done += 1;
                        }
                        done
                    })
                })
                .collect();
            let mut done = 0;
            for caller in callers {
                done += caller.await.expect("caller");
            }
            (done, started.elapsed())
        })
    };
    let figures = SERVICE_CALLERS
        .iter()
        .map(|&callers| {
            run(callers, Duration::from_millis(500)); // connections, pools and caches warm
            let cpu_before = threads_cpu_seconds("valsrv");
            let (requests, wall) = run(callers, WINDOW);
            let server_cpu = threads_cpu_seconds("valsrv") - cpu_before;
            (
                callers,
                requests as f64 / wall.as_secs_f64(),
                server_cpu / requests as f64,
            )
        })
        .collect();
    drop(server);
    figures
}

// Never inlined, so that a profile shows the bare decoder's cost as one function's.
#[inline(never)]
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
    // Issue 14's gateway path: what validation does per prediction, the resize included.
    let gateway_png = textured_png();
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
    let gateway_name = "gateway path: PNG 256x256 textured grey, resized to 64x64";
    if filter
        .as_deref()
        .is_none_or(|wanted| gateway_name.contains(wanted))
    {
        let full = rate(|| gateway_job(&gateway_png, &limits, &policy, &secret));
        let baseline = rate(|| bare_png(&gateway_png));
        println!(
            "  {gateway_name:<54} {full:>8.1} images/s ({:.1} µs each)  bare decoder {baseline:>8.1} \
             images/s  ratio {:.3}x",
            1e6 / full,
            full / baseline
        );
        report.insert(
            gateway_name.to_owned(),
            serde_json::json!({
                "bytes": gateway_png.len(),
                "validation_images_per_second": full,
                "bare_decoder_images_per_second": baseline,
                "ratio": full / baseline,
            }),
        );
    }
    if filter
        .as_deref()
        .is_none_or(|wanted| "service".contains(wanted))
    {
        for (callers, rate, cpu) in service_cpu_per_request(&gateway_png) {
            println!(
                "  service (mTLS, {callers:>2} caller{}), the gateway-path request {rate:>8.1} \
                 requests/s  server CPU {:.1} µs per request",
                if callers == 1 { " " } else { "s" },
                cpu * 1e6
            );
            report.insert(
                format!("service: gateway-path request over mTLS, {callers} callers"),
                serde_json::json!({
                    "callers": callers,
                    "requests_per_second": rate,
                    "server_cpu_seconds_per_request": cpu,
                }),
            );
        }
    }
    let directory = medai_testkit::workspace_root().join("target/bench");
    std::fs::create_dir_all(&directory).expect("bench folder");
    std::fs::write(
        directory.join("validation_throughput.json"),
        serde_json::to_string_pretty(&serde_json::Value::Object(report)).expect("json"),
    )
    .expect("write report");
}
