//! The gateway against the five real services (separate processes over mTLS) with PostgreSQL:
//! streaming ingestion with backpressure, size limits enforced as bytes arrive, idempotent
//! retries, results views and electronic sign-off.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use medai_e2e::{MeshUnderTest, Storage, authorised};
use medai_proto::common::v1::ImageFormat;
use medai_proto::gateway::v1 as gw;
use medai_proto::gateway::v1::study_stream_response::Outcome;
use medai_proto::gateway::v1::upload_image_request::Part;
use medai_runtime::errors::reason_of;
use sea_orm::{ConnectionTrait, Database, DatabaseBackend, Statement};
use sha2::{Digest, Sha256};
use tokio_stream::StreamExt;
use tonic::Code;

const LIGHT: &str = "synthetic-light";

/// A grey PNG of pseudo-random noise (so it does not compress away).
fn noise_png(side: u32, seed: u32) -> Vec<u8> {
    let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    let pixels: Vec<u8> = (0..side * side)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            (state >> 24) as u8
        })
        .collect();
    let image = image::GrayImage::from_raw(side, side, pixels).expect("image");
    let mut png = std::io::Cursor::new(Vec::new());
    image
        .write_to(&mut png, image::ImageFormat::Png)
        .expect("encode png");
    png.into_inner()
}

fn infer(image: Vec<u8>, key: &str) -> gw::InferRequest {
    gw::InferRequest {
        image,
        format: ImageFormat::Unspecified.into(),
        model_name: LIGHT.to_owned(),
        model_version: String::new(),
        idempotency_key: key.to_owned(),
    }
}

/// (action, resource, outcome, context) of every ledger entry.
async fn ledger(mesh: &MeshUnderTest) -> Vec<(String, String, String, serde_json::Value)> {
    let database = Database::connect(mesh.settings.audit_database_url.as_str())
        .await
        .expect("connect to the ledger");
    database
        .query_all_raw(Statement::from_string(
            DatabaseBackend::Postgres,
            "SELECT action, resource, outcome, context FROM ledger_entries ORDER BY seq",
        ))
        .await
        .expect("query the ledger")
        .into_iter()
        .map(|row| {
            let context: String = row.try_get("", "context").expect("context");
            (
                row.try_get("", "action").expect("action"),
                row.try_get("", "resource").expect("resource"),
                row.try_get("", "outcome").expect("outcome"),
                serde_json::from_str(&context).expect("json"),
            )
        })
        .collect()
}

async fn user_token(mesh: &MeshUnderTest, admin_token: &str, username: &str, role: &str) -> String {
    let mut gateway = mesh.gateway().await;
    let password = format!("{username} password 123");
    gateway
        .create_user(authorised(
            gw::CreateUserRequest {
                username: username.to_owned(),
                password: password.clone(),
                role: role.to_owned(),
            },
            admin_token,
        ))
        .await
        .expect("create user");
    gateway
        .login(gw::LoginRequest {
            username: username.to_owned(),
            password,
        })
        .await
        .expect("login")
        .into_inner()
        .grant
        .expect("tokens")
        .access_token
}

/// Peak resident memory of a process (VmHWM), in bytes.
fn peak_memory(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|value| {
            value
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .expect("VmHWM")
        * 1024
}

#[tokio::test]
async fn a_slow_reader_slows_a_200_image_study_stream_and_gets_200_tagged_results() {
    let mesh = MeshUnderTest::start(Storage::Postgres).await;
    let token = mesh.admin_token().await;
    let gateway_pid = mesh.mesh.pid("gateway").expect("gateway pid");
    // Warm up, so allocator growth from the first requests is not counted.
    let mut gateway = mesh.gateway().await;
    for seed in 0..4 {
        gateway
            .infer(authorised(infer(noise_png(512, 10_000 + seed), ""), &token))
            .await
            .expect("warm-up");
    }
    let memory_before = peak_memory(gateway_pid);

    const IMAGES: usize = 200;
    let images: Vec<Vec<u8>> = (0..IMAGES as u32)
        .map(|seed| noise_png(512, seed))
        .collect();
    let total_bytes: usize = images.iter().map(Vec::len).sum();
    let sent = Arc::new(AtomicUsize::new(0));
    let (sender, outgoing) = tokio::sync::mpsc::channel::<gw::StudyStreamRequest>(1);
    let sent_by_client = sent.clone();
    let producer = tokio::spawn(async move {
        for (index, image) in images.into_iter().enumerate() {
            let request = gw::StudyStreamRequest {
                tag: format!("img-{index:03}"),
                image,
                format: ImageFormat::Png.into(),
                model_name: LIGHT.to_owned(),
                ..Default::default()
            };
            if sender.send(request).await.is_err() {
                return;
            }
            sent_by_client.fetch_add(1, Ordering::SeqCst);
        }
    });
    let mut answers = gateway
        .study_stream(authorised(
            tokio_stream::wrappers::ReceiverStream::new(outgoing),
            &token,
        ))
        .await
        .expect("study stream")
        .into_inner();

    let mut tags = BTreeSet::new();
    let mut most_ahead = 0usize;
    let mut results = 0usize;
    while let Some(answer) = answers.next().await {
        let answer = answer.expect("answer");
        // A slow reader: the gateway must stop taking images rather than buffer them.
        tokio::time::sleep(Duration::from_millis(15)).await;
        assert!(tags.insert(answer.tag.clone()), "tag {} twice", answer.tag);
        match answer.outcome.expect("outcome") {
            Outcome::Result(result) => {
                assert!(result.ledger_seq > 0);
                assert_eq!(result.prediction.expect("prediction").model_name, LIGHT);
                results += 1;
            }
            Outcome::Error(error) => panic!("{}: {error:?}", answer.tag),
        }
        let ahead = sent.load(Ordering::SeqCst).saturating_sub(tags.len());
        most_ahead = most_ahead.max(ahead);
    }
    producer.await.expect("producer");
    assert_eq!(results, IMAGES);
    let expected: BTreeSet<String> = (0..IMAGES).map(|index| format!("img-{index:03}")).collect();
    assert_eq!(tags, expected);
    // The client could never get far ahead of what it had read back: a few in flight, a few
    // answers waiting, and what HTTP/2 windows hold.
    assert!(
        most_ahead <= 40,
        "the client got {most_ahead} images ahead of its reading"
    );
    let growth = peak_memory(gateway_pid).saturating_sub(memory_before);
    eprintln!(
        "study stream: {IMAGES} images, {total_bytes} bytes; client at most {most_ahead} ahead; gateway peak memory +{growth} bytes"
    );
    assert!(
        growth < (total_bytes as u64) / 4,
        "the gateway's peak memory grew by {growth} bytes for {total_bytes} bytes of images"
    );

    // One bad image fails alone; the stream goes on.
    let mixed = vec![
        gw::StudyStreamRequest {
            tag: "good".to_owned(),
            image: noise_png(64, 1),
            model_name: LIGHT.to_owned(),
            ..Default::default()
        },
        gw::StudyStreamRequest {
            tag: "garbage".to_owned(),
            image: b"not an image at all".to_vec(),
            model_name: LIGHT.to_owned(),
            ..Default::default()
        },
        gw::StudyStreamRequest {
            tag: String::new(),
            image: noise_png(64, 2),
            model_name: LIGHT.to_owned(),
            ..Default::default()
        },
        gw::StudyStreamRequest {
            tag: "also-good".to_owned(),
            image: noise_png(64, 3),
            model_name: LIGHT.to_owned(),
            ..Default::default()
        },
    ];
    let mut mixed_request = authorised(tokio_stream::iter(mixed), &token);
    mixed_request.metadata_mut().insert(
        "x-correlation-id",
        tonic::metadata::MetadataValue::from_static("pacs-study-0007"),
    );
    let answers: Vec<gw::StudyStreamResponse> = gateway
        .study_stream(mixed_request)
        .await
        .expect("stream")
        .into_inner()
        .map(|answer| answer.expect("answer"))
        .collect()
        .await;
    let by_tag: BTreeMap<String, Outcome> = answers
        .into_iter()
        .map(|answer| (answer.tag, answer.outcome.expect("outcome")))
        .collect();
    assert!(matches!(by_tag["good"], Outcome::Result(_)));
    assert!(matches!(by_tag["also-good"], Outcome::Result(_)));
    match &by_tag["garbage"] {
        Outcome::Error(error) => {
            assert_eq!(error.code, Code::InvalidArgument as i32);
            assert_eq!(error.reason, "IMAGE_UNDECODABLE");
        }
        other => panic!("garbage was accepted: {other:?}"),
    }
    match &by_tag[""] {
        Outcome::Error(error) => assert_eq!(error.reason, "TAG_MISSING"),
        other => panic!("an untagged image was accepted: {other:?}"),
    }
    // The stream's work, done after its handler returned, still logs under its correlation id.
    let gateway_log =
        std::fs::read_to_string(mesh.mesh.log_file("gateway").expect("log")).expect("gateway log");
    assert!(
        gateway_log
            .lines()
            .any(|line| line.contains("prediction delivered") && line.contains("pacs-study-0007")),
        "no log line of the stream names its correlation id"
    );
    mesh.stop().await;
}

fn upload_stream(
    header: gw::UploadHeader,
    chunks: impl Iterator<Item = Vec<u8>> + Send + 'static,
    pulled: Arc<AtomicUsize>,
) -> impl tokio_stream::Stream<Item = gw::UploadImageRequest> + Send + 'static {
    let header = tokio_stream::iter([gw::UploadImageRequest {
        part: Some(Part::Header(header)),
    }]);
    let chunks = tokio_stream::iter(chunks).map(move |chunk| {
        pulled.fetch_add(chunk.len(), Ordering::SeqCst);
        gw::UploadImageRequest {
            part: Some(Part::Chunk(chunk)),
        }
    });
    header.chain(chunks)
}

#[tokio::test]
async fn uploads_are_hashed_as_they_arrive_and_an_oversized_one_is_refused_before_its_end() {
    const LIMIT: usize = 1024 * 1024;
    let gateway_settings = vec![(
        "MEDAI_GATEWAY_MAX_IMAGE_BYTES".to_owned(),
        LIMIT.to_string(),
    )];
    let mesh = MeshUnderTest::start_with(
        Storage::Postgres,
        BTreeMap::from([("gateway".to_owned(), gateway_settings)]),
    )
    .await;
    let token = mesh.admin_token().await;
    let mut gateway = mesh.gateway().await;

    // A normal upload in 16 KiB chunks: one result, the hash of exactly these bytes.
    let image = noise_png(256, 7);
    let header = gw::UploadHeader {
        model_name: LIGHT.to_owned(),
        declared_size: image.len() as u64,
        ..Default::default()
    };
    let chunks: Vec<Vec<u8>> = image.chunks(16 * 1024).map(<[u8]>::to_vec).collect();
    let uploaded = gateway
        .upload_image(authorised(
            upload_stream(header.clone(), chunks.clone().into_iter(), Arc::default()),
            &token,
        ))
        .await
        .expect("upload")
        .into_inner()
        .result
        .expect("result");
    assert_eq!(uploaded.image_sha256, hex::encode(Sha256::digest(&image)));
    assert!(uploaded.ledger_seq > 0);

    // An endless upload is refused once it passes the limit, long before its end.
    let pulled = Arc::new(AtomicUsize::new(0));
    let endless = std::iter::repeat_with(|| vec![0x55u8; 64 * 1024]).take(10_000);
    let status = gateway
        .upload_image(authorised(
            upload_stream(
                gw::UploadHeader {
                    model_name: LIGHT.to_owned(),
                    ..Default::default()
                },
                endless,
                pulled.clone(),
            ),
            &token,
        ))
        .await
        .expect_err("too large");
    assert_eq!(
        (status.code(), reason_of(&status).as_deref()),
        (Code::InvalidArgument, Some("IMAGE_TOO_LARGE"))
    );
    let sent = pulled.load(Ordering::SeqCst);
    assert!(
        sent < 8 * LIMIT,
        "the refusal came after {sent} of 655,360,000 bytes"
    );

    // A declared size above the limit is refused before any chunk is read.
    let pulled = Arc::new(AtomicUsize::new(0));
    let status = gateway
        .upload_image(authorised(
            upload_stream(
                gw::UploadHeader {
                    declared_size: (LIMIT + 1) as u64,
                    ..header.clone()
                },
                std::iter::repeat_with(|| vec![0u8; 64 * 1024]).take(10_000),
                pulled.clone(),
            ),
            &token,
        ))
        .await
        .expect_err("declared too large");
    assert_eq!(reason_of(&status).as_deref(), Some("IMAGE_TOO_LARGE"));

    // More bytes than declared, fewer than declared, and chunks before the header.
    let status = gateway
        .upload_image(authorised(
            upload_stream(
                gw::UploadHeader {
                    declared_size: 1000,
                    ..header.clone()
                },
                chunks.clone().into_iter(),
                Arc::default(),
            ),
            &token,
        ))
        .await
        .expect_err("more than declared");
    assert_eq!(reason_of(&status).as_deref(), Some("IMAGE_TOO_LARGE"));
    let status = gateway
        .upload_image(authorised(
            upload_stream(
                gw::UploadHeader {
                    declared_size: image.len() as u64 + 10,
                    ..header.clone()
                },
                chunks.clone().into_iter(),
                Arc::default(),
            ),
            &token,
        ))
        .await
        .expect_err("fewer than declared");
    assert_eq!(reason_of(&status).as_deref(), Some("UPLOAD_INCOMPLETE"));
    let status = gateway
        .upload_image(authorised(
            tokio_stream::iter([gw::UploadImageRequest {
                part: Some(Part::Chunk(image.clone())),
            }]),
            &token,
        ))
        .await
        .expect_err("no header");
    assert_eq!(reason_of(&status).as_deref(), Some("UPLOAD_OUT_OF_ORDER"));
    mesh.stop().await;
}

#[tokio::test]
async fn a_retried_request_returns_the_stored_result_and_writes_one_ledger_record() {
    let mesh = MeshUnderTest::start(Storage::Postgres).await;
    let admin = mesh.admin_token().await;
    let clinician = user_token(&mesh, &admin, "dr.retry", "clinician").await;
    let mut gateway = mesh.gateway().await;
    let key = "1.2.826.0.1.3680043.8.498.12345+synthetic-light/1";
    let image = noise_png(128, 11);

    let mut request = authorised(infer(image.clone(), key), &admin);
    request.metadata_mut().insert(
        "x-correlation-id",
        tonic::metadata::MetadataValue::from_static("pacs-retry-0001"),
    );
    let first = gateway.infer(request).await.expect("first");
    assert_eq!(
        first
            .metadata()
            .get("x-correlation-id")
            .and_then(|value| value.to_str().ok()),
        Some("pacs-retry-0001"),
        "the caller's correlation id comes back"
    );
    let first = first.into_inner();
    assert!(!first.replayed);
    // Retries, some at once, all get the same stored answer.
    let mut retries = Vec::new();
    for _ in 0..5 {
        let mut client = mesh.gateway().await;
        let request = authorised(infer(image.clone(), key), &admin);
        retries.push(tokio::spawn(async move { client.infer(request).await }));
    }
    for retry in retries {
        let again = retry.await.expect("task").expect("retry").into_inner();
        assert!(again.replayed);
        assert_eq!(again.result_id, first.result_id);
        assert_eq!(again.ledger_seq, first.ledger_seq);
        assert_eq!(
            again.prediction.expect("prediction").probabilities,
            first.prediction.clone().expect("prediction").probabilities
        );
    }
    // The same key from another user is another request.
    let other = gateway
        .infer(authorised(infer(image.clone(), key), &clinician))
        .await
        .expect("other user")
        .into_inner();
    assert!(!other.replayed);
    assert_ne!(other.result_id, first.result_id);

    let entries = ledger(&mesh).await;
    let deliveries = |result_id: &str| {
        entries
            .iter()
            .filter(|(action, resource, outcome, _)| {
                action == "INFERENCE"
                    && outcome == "SUCCESS"
                    && resource == &format!("result/{result_id}")
            })
            .count()
    };
    assert_eq!(deliveries(&first.result_id), 1);
    // The correlation id is in the ledger record and in the log lines of the call.
    let delivery = entries
        .iter()
        .find(|(action, resource, _, _)| {
            action == "INFERENCE" && resource == &format!("result/{}", first.result_id)
        })
        .expect("delivery record");
    assert_eq!(delivery.3["correlation_id"], "pacs-retry-0001");
    let gateway_log =
        std::fs::read_to_string(mesh.mesh.log_file("gateway").expect("log")).expect("gateway log");
    assert!(
        gateway_log
            .lines()
            .any(|line| line.contains("prediction delivered") && line.contains("pacs-retry-0001")),
        "no log line of the call names its correlation id"
    );
    assert_eq!(deliveries(&other.result_id), 1);
    // Neither the key nor any UID in it is recorded anywhere in the ledger.
    let ledger_text = format!("{entries:?}");
    assert!(!ledger_text.contains("1.2.826.0.1.3680043"));
    let status = gateway
        .infer(authorised(infer(image, &"k".repeat(257)), &admin))
        .await
        .expect_err("key too long");
    assert_eq!(
        reason_of(&status).as_deref(),
        Some("IDEMPOTENCY_KEY_TOO_LONG")
    );
    mesh.stop().await;
}

#[tokio::test]
async fn a_signed_result_cannot_change_and_its_signature_verifies_against_the_ledger() {
    let mesh = MeshUnderTest::start(Storage::Postgres).await;
    let admin = mesh.admin_token().await;
    let clinician = user_token(&mesh, &admin, "dr.sign", "clinician").await;
    let viewer = user_token(&mesh, &admin, "viewer.one", "viewer").await;
    let auditor = user_token(&mesh, &admin, "auditor.one", "auditor").await;
    let mut gateway = mesh.gateway().await;

    let delivered = gateway
        .infer(authorised(infer(noise_png(128, 21), ""), &clinician))
        .await
        .expect("prediction")
        .into_inner();
    let result_id = delivered.result_id.clone();
    let get = |token: &str| {
        authorised(
            gw::GetResultRequest {
                result_id: result_id.clone(),
            },
            token,
        )
    };
    let shown = gateway
        .get_result(get(&clinician))
        .await
        .expect("clinician reads")
        .into_inner()
        .result
        .expect("result");
    assert_eq!(shown.status, "PRELIMINARY");
    assert_eq!(shown.ledger_seq, delivered.ledger_seq);
    assert_eq!(
        medai_inference::results::content_sha256_of_message(&shown),
        shown.content_sha256
    );
    // A viewer does not see preliminary results, and an auditor no results at all.
    let status = gateway
        .get_result(get(&viewer))
        .await
        .expect_err("viewer, preliminary");
    assert_eq!(reason_of(&status).as_deref(), Some("RESULT_NOT_FOUND"));
    let status = gateway
        .get_result(get(&auditor))
        .await
        .expect_err("auditor");
    assert_eq!(status.code(), Code::PermissionDenied);

    let ticket = |gateway: &medai_cli::client::GatewayClient| {
        let request = authorised(
            gw::ReauthenticateRequest {
                password: "dr.sign password 123".to_owned(),
            },
            &clinician,
        );
        let mut gateway = gateway.clone();
        async move {
            gateway
                .reauthenticate(request)
                .await
                .expect("reauthenticate")
                .into_inner()
                .signing_ticket
        }
    };
    let sign = |ticket: String, meaning: &str, content: &str| {
        authorised(
            gw::SignResultRequest {
                result_id: result_id.clone(),
                signing_ticket: ticket,
                meaning: meaning.to_owned(),
                reason: String::new(),
                content_sha256: content.to_owned(),
            },
            &clinician,
        )
    };
    // Refusals first: a bad meaning, a rejection without reason, content the signer did not
    // see, a ticket that is not one.
    for (meaning, content, reason) in [
        ("LIKED", shown.content_sha256.as_str(), "SIGNATURE_INVALID"),
        (
            "REJECTED",
            shown.content_sha256.as_str(),
            "SIGNATURE_INVALID",
        ),
    ] {
        let signing_ticket = ticket(&gateway).await;
        let status = gateway
            .sign_result(sign(signing_ticket, meaning, content))
            .await
            .expect_err("refused");
        assert_eq!(reason_of(&status).as_deref(), Some(reason), "{meaning}");
    }
    let signing_ticket = ticket(&gateway).await;
    let status = gateway
        .sign_result(sign(signing_ticket, "APPROVED", &"0".repeat(64)))
        .await
        .expect_err("other content");
    assert_eq!(
        reason_of(&status).as_deref(),
        Some("RESULT_CONTENT_CHANGED")
    );
    let status = gateway
        .sign_result(sign(
            "not-a-ticket".to_owned(),
            "APPROVED",
            &shown.content_sha256,
        ))
        .await
        .expect_err("bad ticket");
    assert!(matches!(
        status.code(),
        Code::Unauthenticated | Code::PermissionDenied | Code::InvalidArgument
    ));

    let fresh_ticket = ticket(&gateway).await;
    let signed = gateway
        .sign_result(sign(
            fresh_ticket.clone(),
            "APPROVED",
            &shown.content_sha256,
        ))
        .await
        .expect("sign")
        .into_inner();
    let result = signed.result.expect("result");
    assert_eq!(result.status, "SIGNED");
    let signature = result.signature.clone().expect("signature");
    assert_eq!(signature.signer_name, "dr.sign");
    assert_eq!(signature.meaning, "APPROVED");
    assert_eq!(signature.ledger_seq, signed.ledger_seq);

    // Signed means final: no second signature, no reuse of the ticket, no change in the
    // database itself.
    let signing_ticket = ticket(&gateway).await;
    let status = gateway
        .sign_result(sign(signing_ticket, "REVIEWED", &shown.content_sha256))
        .await
        .expect_err("second signature");
    assert_eq!(reason_of(&status).as_deref(), Some("RESULT_ALREADY_SIGNED"));
    let status = gateway
        .sign_result(sign(fresh_ticket, "APPROVED", &shown.content_sha256))
        .await
        .expect_err("ticket reused");
    assert_ne!(status.code(), Code::Ok);
    let results_database = Database::connect(mesh.settings.inference_database_url.as_str())
        .await
        .expect("results database");
    let tamper = format!(
        "UPDATE inference_results SET top_label = 'tampered' WHERE result_id = '{result_id}'"
    );
    assert!(results_database.execute_unprepared(&tamper).await.is_err());

    // The signature verifies against the ledger: its entry names the signer, the meaning and
    // the content hash recomputed from the result as shown now, and the chain is intact.
    let now = gateway
        .get_result(get(&viewer))
        .await
        .expect("viewer reads a signed result")
        .into_inner()
        .result
        .expect("result");
    let recomputed = medai_inference::results::content_sha256_of_message(&now);
    let entries = ledger(&mesh).await;
    let (action, resource, outcome, context) = &entries[(signed.ledger_seq - 1) as usize];
    assert_eq!(
        (action.as_str(), resource.as_str(), outcome.as_str()),
        (
            "SIGNATURE",
            format!("result/{result_id}").as_str(),
            "SUCCESS"
        )
    );
    assert_eq!(context["content_sha256"], recomputed.as_str());
    assert_eq!(context["signer_name"], "dr.sign");
    assert_eq!(context["meaning"], "APPROVED");
    assert_eq!(
        context["signed_at"],
        now.signature.expect("signature").signed_at.as_str()
    );
    let verification = gateway
        .verify_ledger(authorised(gw::VerifyLedgerRequest {}, &auditor))
        .await
        .expect("verify")
        .into_inner()
        .verification
        .expect("verification");
    assert!(verification.intact);
    // Every read of a result is itself recorded.
    let reads = entries
        .iter()
        .filter(|(action, resource, _, _)| {
            action == "RESULT_READ" && resource == &format!("result/{result_id}")
        })
        .count();
    assert_eq!(reads, 2, "the clinician's and the viewer's reads");

    // Listing: the viewer sees signed results only.
    let listed = gateway
        .list_results(authorised(gw::ListResultsRequest { filter: None }, &viewer))
        .await
        .expect("viewer lists")
        .into_inner()
        .results;
    assert!(listed.iter().all(|result| result.status == "SIGNED"));
    assert!(listed.iter().any(|result| result.result_id == result_id));
    let status = gateway
        .list_results(authorised(
            gw::ListResultsRequest {
                filter: Some(medai_proto::inference::v1::ListResultsRequest {
                    status: "PRELIMINARY".to_owned(),
                    ..Default::default()
                }),
            },
            &viewer,
        ))
        .await
        .expect_err("viewer asks for preliminary");
    assert_eq!(
        reason_of(&status).as_deref(),
        Some("VIEWER_SEES_SIGNED_ONLY")
    );
    mesh.stop().await;
}
