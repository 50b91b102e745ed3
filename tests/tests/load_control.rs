//! The gateway's load control against the five real services: rate limits that trip at the
//! configured rate with Redis (shared by replicas), without it, and with Redis down (falling
//! back in-process, with a metric); load shedding with retry advice; deadlines that leave no
//! delivery record; server reflection and health.

use std::collections::BTreeMap;
use std::time::Duration;

use medai_e2e::{MeshUnderTest, Storage, authorised, http_get, suite_redis_url};
use medai_proto::common::v1::ImageFormat;
use medai_proto::gateway::v1 as gw;
use medai_runtime::errors::{reason_of, retry_after_of};
use sea_orm::{ConnectionTrait, Database, DatabaseBackend, Statement};
use tokio_stream::StreamExt;
use tonic::Code;

const RATE: u32 = 5;

fn limits(redis_url: Option<&str>) -> Vec<(String, String)> {
    let mut settings = vec![
        (
            "MEDAI_GATEWAY_LOAD_CONTROL__PER_USER_PER_SECOND".to_owned(),
            RATE.to_string(),
        ),
        (
            "MEDAI_GATEWAY_LOAD_CONTROL__PER_USER_BURST".to_owned(),
            RATE.to_string(),
        ),
    ];
    if let Some(url) = redis_url {
        settings.push((
            "MEDAI_GATEWAY_LOAD_CONTROL__REDIS_URL".to_owned(),
            url.to_owned(),
        ));
    }
    settings
}

/// Sends `calls` cheap authenticated calls back to back; returns how many passed the limiter
/// and the retry advice of the first refusal.
async fn burst(
    gateway: &mut medai_cli::client::GatewayClient,
    token: &str,
    calls: usize,
) -> (usize, Option<Duration>) {
    let (passed, advice, _) = timed_burst(gateway, token, calls).await;
    (passed, advice)
}

/// What a GCRA limiter of RATE per second with a burst of RATE may let through in `elapsed`:
/// the burst, plus what refilled meanwhile (a slow, loaded machine refills during a burst).
fn most_allowed(elapsed: Duration) -> usize {
    RATE as usize + (elapsed.as_secs_f64() * f64::from(RATE)).floor() as usize
}

/// [`burst`], also returning how long the calls took.
async fn timed_burst(
    gateway: &mut medai_cli::client::GatewayClient,
    token: &str,
    calls: usize,
) -> (usize, Option<Duration>, Duration) {
    let started = std::time::Instant::now();
    let mut passed = 0;
    let mut advice = None;
    for _ in 0..calls {
        let request = authorised(
            gw::GetResultRequest {
                result_id: uuid::Uuid::new_v4().to_string(),
            },
            token,
        );
        let status = gateway
            .get_result(request)
            .await
            .expect_err("no such result");
        match reason_of(&status).as_deref() {
            Some("RESULT_NOT_FOUND") => passed += 1,
            Some("RATE_LIMITED") => {
                assert_eq!(status.code(), Code::ResourceExhausted);
                advice = advice.or(retry_after_of(&status));
            }
            other => panic!("unexpected refusal {other:?}: {status:?}"),
        }
    }
    (passed, advice, started.elapsed())
}

#[tokio::test]
async fn rate_limits_trip_at_the_configured_rate_with_redis_without_it_and_with_it_down() {
    let redis = suite_redis_url();
    let mut mesh = MeshUnderTest::start_with(
        Storage::Postgres,
        BTreeMap::from([("gateway".to_owned(), limits(Some(&redis)))]),
    )
    .await;
    let token = mesh.admin_token().await;

    // With Redis: the burst passes, the rest is refused with advice to wait about 1/RATE s.
    let mut gateway = mesh.gateway().await;
    let (passed, advice, elapsed) = timed_burst(&mut gateway, &token, 3 * RATE as usize).await;
    assert!(
        (RATE as usize..=most_allowed(elapsed)).contains(&passed),
        "{passed} passed in {elapsed:?}"
    );
    // A refusal advises waiting about 1/RATE s (a machine slow enough for the refill to keep
    // pace with the calls refuses none, and the bound above is the whole check).
    assert!(advice.is_some() || passed == 3 * RATE as usize);
    if let Some(advice) = advice {
        assert!(
            advice <= Duration::from_millis(1000 / u64::from(RATE)),
            "{advice:?}"
        );
    }
    // A second replica shares the same budget through Redis.
    let settings = mesh.settings.clone();
    let replica = mesh
        .mesh
        .start_another(
            "gateway",
            "gateway-replica",
            &settings,
            limits(Some(&redis)),
        )
        .await
        .expect("replica");
    let mut replica_client = mesh.gateway_at(replica).await;
    // Drain the shared budget through the first gateway, then call the replica at once: with
    // a fresh budget of its own the replica would let RATE through, with the shared one only
    // what refilled since the drain. A machine too slow to tell the two apart tries again.
    let mut judged = false;
    for _ in 0..5 {
        burst(&mut gateway, &token, 2 * RATE as usize).await;
        let drained = std::time::Instant::now();
        let (passed, _) = burst(&mut replica_client, &token, RATE as usize).await;
        let refilled = most_allowed(drained.elapsed()) - RATE as usize;
        if refilled + 1 >= RATE as usize {
            continue;
        }
        assert!(
            passed <= refilled + 1,
            "the replica saw a fresh budget: {passed} of {RATE} passed, {refilled} refilled"
        );
        judged = true;
        break;
    }
    assert!(
        judged,
        "every replica burst took too long to judge the shared budget"
    );
    // The rate refills: after a second, about RATE more pass.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (passed, _, elapsed) = timed_burst(&mut gateway, &token, 3 * RATE as usize).await;
    assert!(
        (RATE as usize..=most_allowed(elapsed) + 1).contains(&passed),
        "{passed} passed in {elapsed:?}"
    );

    // Without Redis, and with Redis unreachable: the same limit, kept in each process.
    let no_redis: Vec<(String, String)> = limits(None)
        .into_iter()
        .chain([(
            "MEDAI_GATEWAY_LOAD_CONTROL__REDIS_URL".to_owned(),
            String::new(),
        )])
        .collect();
    let alone = mesh
        .mesh
        .start_another("gateway", "gateway-alone", &settings, no_redis)
        .await
        .expect("gateway without redis");
    let without_redis: Vec<(String, String)> = limits(None)
        .into_iter()
        .chain([(
            "MEDAI_GATEWAY_LOAD_CONTROL__REDIS_URL".to_owned(),
            "redis://127.0.0.1:9".to_owned(),
        )])
        .collect();
    let redis_down = mesh
        .mesh
        .start_another("gateway", "gateway-redis-down", &settings, without_redis)
        .await
        .expect("gateway with redis down");
    let other_user = {
        let mut admin_gateway = mesh.gateway_at(alone).await;
        admin_gateway
            .create_user(authorised(
                gw::CreateUserRequest {
                    username: "pacs.bridge".to_owned(),
                    password: "pacs bridge password 123".to_owned(),
                    role: "clinician".to_owned(),
                },
                &token,
            ))
            .await
            .expect("create user");
        admin_gateway
            .login(gw::LoginRequest {
                username: "pacs.bridge".to_owned(),
                password: "pacs bridge password 123".to_owned(),
            })
            .await
            .expect("login")
            .into_inner()
            .grant
            .expect("grant")
            .access_token
    };
    for address in [alone, redis_down] {
        let mut client = mesh.gateway_at(address).await;
        let (passed, advice, elapsed) =
            timed_burst(&mut client, &other_user, 3 * RATE as usize).await;
        assert!(
            (RATE as usize..=most_allowed(elapsed)).contains(&passed),
            "{address}: {passed} passed in {elapsed:?}"
        );
        // A refusal carries retry advice; on a machine so slow that the refill kept pace
        // with the calls, none was refused and the bound above is the whole check.
        assert!(advice.is_some() || passed == 3 * RATE as usize);
    }
    let down_admin = *mesh
        .mesh
        .admin_addresses("gateway")
        .last()
        .expect("admin address of the last gateway");
    let metrics = http_get(down_admin, "/metrics").await;
    assert!(
        metrics.lines().any(
            |line| line.starts_with("medai_gateway_rate_limit_fallback_total")
                && !line.ends_with(" 0")
        ),
        "{metrics}"
    );
    mesh.stop().await;
}

#[tokio::test]
async fn calls_beyond_the_in_flight_bound_are_shed_and_deadlines_leave_no_delivery_record() {
    let gateway = vec![(
        "MEDAI_GATEWAY_LOAD_CONTROL__MAX_IN_FLIGHT".to_owned(),
        "2".to_owned(),
    )];
    let mesh = MeshUnderTest::start_with(
        Storage::Postgres,
        BTreeMap::from([("gateway".to_owned(), gateway)]),
    )
    .await;
    let token = mesh.admin_token().await;
    let image = medai_testkit::Assets::locate().dicom("MR_small.dcm");
    let brain = |image: Vec<u8>| gw::InferRequest {
        image: image.into(),
        format: ImageFormat::Unspecified.into(),
        model_name: "brain-mri-tumor".to_owned(),
        model_version: String::new(),
        idempotency_key: String::new(),
    };

    // Twelve slow predictions at once against a bound of two: the excess is shed at once.
    let mut calls = Vec::new();
    for _ in 0..12 {
        let mut client = mesh.gateway().await;
        let request = authorised(brain(image.clone()), &token);
        calls.push(tokio::spawn(async move { client.infer(request).await }));
    }
    let mut served = 0;
    let mut shed = 0;
    for call in calls {
        match call.await.expect("task") {
            Ok(_) => served += 1,
            Err(status) => {
                assert_eq!(
                    (status.code(), reason_of(&status).as_deref()),
                    (Code::ResourceExhausted, Some("OVERLOADED"))
                );
                assert_eq!(retry_after_of(&status), Some(Duration::from_millis(100)));
                shed += 1;
            }
        }
    }
    assert!(served >= 2 && shed >= 1, "served {served}, shed {shed}");

    // A deadline shorter than the model: DEADLINE_EXCEEDED, and the ledger gains no record
    // claiming a delivered prediction.
    let database = Database::connect(mesh.settings.audit_database_url.as_str())
        .await
        .expect("ledger database");
    let deliveries = || async {
        let row = database
            .query_one_raw(Statement::from_string(
                DatabaseBackend::Postgres,
                "SELECT count(*) AS n FROM ledger_entries WHERE action = 'INFERENCE' AND outcome = 'SUCCESS'",
            ))
            .await
            .expect("count")
            .expect("row");
        row.try_get::<i64>("", "n").expect("n")
    };
    let before = deliveries().await;
    let mut client = mesh.gateway().await;
    // tonic's client enforces the same header with its own timer; the server answers 20 ms
    // early, but on a loaded machine the client's timer can still win. Such a call says
    // nothing about the server and is tried again; every server answer must be the refusal.
    let mut server_answers = 0;
    for _ in 0..12 {
        let mut request = authorised(brain(image.clone()), &token);
        request.metadata_mut().insert(
            "grpc-timeout",
            tonic::metadata::MetadataValue::from_static("100m"),
        );
        let status = client.infer(request).await.expect_err("too short");
        let client_timer = status.code() == Code::Cancelled
            && std::error::Error::source(&status)
                .is_some_and(|source| source.downcast_ref::<tonic::transport::Error>().is_some());
        if client_timer {
            continue;
        }
        assert_eq!(
            (status.code(), reason_of(&status).as_deref()),
            (Code::DeadlineExceeded, Some("DEADLINE_EXCEEDED")),
            "{status:?}"
        );
        server_answers += 1;
        if server_answers == 3 {
            break;
        }
    }
    assert!(
        server_answers >= 1,
        "no server answer in 12 calls: the client's timer always won"
    );
    // Give anything still running downstream the time to finish (and, wrongly, record).
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(deliveries().await, before);
    mesh.stop().await;
}

#[tokio::test]
async fn reflection_lists_the_gateway_api_and_health_answers() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let mesh = MeshUnderTest::start(Storage::Sqlite).await;
    let ca = std::fs::read(mesh.mesh.pki_layout().ca_certificate()).expect("ca");
    let channel = tonic::transport::Endpoint::from_shared(mesh.gateway_endpoint())
        .expect("endpoint")
        .tls_config(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(ca))
                .domain_name("medai-gateway"),
        )
        .expect("tls")
        .connect()
        .await
        .expect("connect");
    let mut reflection = ServerReflectionClient::new(channel.clone());
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("reflection")
        .into_inner();
    let answer = answers
        .message()
        .await
        .expect("answer")
        .expect("one answer");
    let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
        panic!("not a service list: {answer:?}");
    };
    let names: Vec<String> = list
        .service
        .into_iter()
        .map(|service| service.name)
        .collect();
    // Exactly what the gateway serves: none of the internal services its messages use.
    let names: std::collections::BTreeSet<String> = names.into_iter().collect();
    let served: std::collections::BTreeSet<String> = [
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
        "medai.gateway.v1.GatewayService",
    ]
    .map(str::to_owned)
    .into();
    assert_eq!(names, served);
    // The gateway's schema still resolves, with the types it borrows from other packages.
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::FileContainingSymbol(
            "medai.gateway.v1.GatewayService".to_owned(),
        )),
    };
    let answer = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("reflection")
        .into_inner()
        .message()
        .await
        .expect("answer")
        .expect("one answer");
    let Some(MessageResponse::FileDescriptorResponse(files)) = answer.message_response else {
        panic!("no descriptor for the gateway: {answer:?}");
    };
    assert!(!files.file_descriptor_proto.is_empty());

    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health")
        .into_inner()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    mesh.stop().await;
}

fn light_image(tag: &str, seed: u8) -> gw::StudyStreamRequest {
    gw::StudyStreamRequest {
        tag: tag.to_owned(),
        image: medai_e2e::bench_images::light_png(seed).into(),
        format: ImageFormat::Png.into(),
        model_name: "synthetic-light".to_owned(),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_study_stream_is_charged_per_image_and_ends_at_its_deadline() {
    // One image a second per user, three at once: slower than the stream can go.
    let no_redis: Vec<(String, String)> = [
        ("MEDAI_GATEWAY_LOAD_CONTROL__PER_USER_PER_SECOND", "1"),
        ("MEDAI_GATEWAY_LOAD_CONTROL__PER_USER_BURST", "3"),
        ("MEDAI_GATEWAY_LOAD_CONTROL__REDIS_URL", ""),
    ]
    .map(|(name, value)| (name.to_owned(), value.to_owned()))
    .into();
    let mesh = MeshUnderTest::start_with(
        Storage::Postgres,
        BTreeMap::from([("gateway".to_owned(), no_redis)]),
    )
    .await;
    let token = mesh.admin_token().await;
    let mut gateway = mesh.gateway().await;

    // The call's grpc-timeout bounds the stream: an image before it is answered, then the
    // stream ends with DEADLINE_EXCEEDED although the client keeps it open.
    let (sender, outgoing) = tokio::sync::mpsc::channel::<gw::StudyStreamRequest>(1);
    let mut request = authorised(
        tokio_stream::wrappers::ReceiverStream::new(outgoing),
        &token,
    );
    request.metadata_mut().insert(
        "grpc-timeout",
        tonic::metadata::MetadataValue::from_static("3S"),
    );
    let mut answers = gateway
        .study_stream(request)
        .await
        .expect("stream")
        .into_inner();
    sender.send(light_image("first", 1)).await.expect("send");
    let answer = answers.message().await.expect("answer").expect("one");
    assert!(
        matches!(
            answer.outcome,
            Some(gw::study_stream_response::Outcome::Result(_))
        ),
        "{answer:?}"
    );
    let ended = tokio::time::timeout(Duration::from_secs(30), answers.message())
        .await
        .expect("the stream outlived its deadline by far");
    let status = ended.expect_err("the stream ends with its deadline");
    assert_eq!(
        (status.code(), reason_of(&status).as_deref()),
        (Code::DeadlineExceeded, Some("DEADLINE_EXCEEDED"))
    );
    drop(sender);

    // Every image is charged against the user's rate (1 a second, burst 3): of ten images
    // sent at once on one stream, only a few pass.
    let images: Vec<gw::StudyStreamRequest> = (0..10u8)
        .map(|index| light_image(&format!("img-{index}"), index + 10))
        .collect();
    let answers: Vec<gw::StudyStreamResponse> = gateway
        .study_stream(authorised(tokio_stream::iter(images), &token))
        .await
        .expect("stream")
        .into_inner()
        .map(|answer| answer.expect("answer"))
        .collect()
        .await;
    assert_eq!(answers.len(), 10);
    let mut passed = 0;
    let mut limited = 0;
    for answer in &answers {
        match &answer.outcome {
            Some(gw::study_stream_response::Outcome::Result(_)) => passed += 1,
            Some(gw::study_stream_response::Outcome::Error(error)) => {
                assert_eq!(
                    (error.code, error.reason.as_str()),
                    (Code::ResourceExhausted as i32, "RATE_LIMITED"),
                    "{}",
                    answer.tag
                );
                limited += 1;
            }
            None => panic!("no outcome"),
        }
    }
    assert!(
        passed >= 1 && limited >= 3,
        "{passed} images passed and {limited} were limited at 1/s"
    );
    mesh.stop().await;
}

// --- connection floods ---

/// An anonymous TLS client of the gateway (its certificate is optional), as a flood would make.
fn anonymous_tls(mesh: &MeshUnderTest) -> tokio_rustls::TlsConnector {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let ca = std::fs::read(mesh.mesh.pki_layout().ca_certificate()).expect("the mesh CA");
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(&ca).expect("CA PEM"))
        .expect("CA");
    let mut config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
}

/// Connections to a listener are bounded: a flood of anonymous TLS connections that then send
/// nothing takes the gateway's `max_open` places and no more (the rest are closed as they are
/// accepted, counted), the silent ones are closed at the idle time, a client that keeps its
/// connection through the flood is not (it answers the server's keep-alive pings), and new
/// clients are served again once the flood is gone.
#[tokio::test]
async fn a_flood_of_silent_connections_is_capped_then_closed_at_the_idle_time_and_clients_are_served_again()
 {
    const MAX_OPEN: usize = 40;
    const IDLE: Duration = Duration::from_secs(3);
    let environment = BTreeMap::from([(
        "gateway".to_owned(),
        vec![
            (
                "MEDAI_GATEWAY_PROCESS__CONNECTIONS__MAX_OPEN".to_owned(),
                MAX_OPEN.to_string(),
            ),
            (
                "MEDAI_GATEWAY_PROCESS__CONNECTIONS__IDLE_SECONDS".to_owned(),
                IDLE.as_secs().to_string(),
            ),
            (
                "MEDAI_GATEWAY_PROCESS__CONNECTIONS__KEEPALIVE_SECONDS".to_owned(),
                "1".to_owned(),
            ),
        ],
    )]);
    let mesh = MeshUnderTest::start_with(Storage::Sqlite, environment).await;
    let admin = mesh.mesh.admin_address("gateway").expect("admin port");
    let figure = |exposition: &str, name: &str| {
        medai_e2e::metric_sum(exposition, name, &[("listener", "grpc")])
    };
    let token = mesh.admin_token().await;
    let unknown_result = || {
        authorised(
            gw::GetResultRequest {
                result_id: uuid::Uuid::new_v4().to_string(),
            },
            &token,
        )
    };
    // A client that keeps one connection through the flood.
    let mut steady = mesh.gateway().await;
    let answered = steady
        .get_result(unknown_result())
        .await
        .expect_err("unknown");
    assert_eq!(reason_of(&answered).as_deref(), Some("RESULT_NOT_FOUND"));
    let before = http_get(admin, "/metrics").await;

    let connector = anonymous_tls(&mesh);
    let server_name = rustls::pki_types::ServerName::try_from("medai-gateway").expect("name");
    let address = mesh.mesh.address("gateway").expect("gateway address");
    let mut silent = Vec::new();
    let mut refused = 0;
    let attempts = 3 * MAX_OPEN;
    for _ in 0..attempts {
        let tcp = tokio::net::TcpStream::connect(address).await.expect("TCP");
        let handshake = tokio::time::timeout(
            Duration::from_secs(5),
            connector.connect(server_name.clone(), tcp),
        )
        .await
        .expect("a refusal is a close, not a wait");
        match handshake {
            Ok(connection) => silent.push(connection),
            Err(_) => refused += 1,
        }
    }
    let flooded_at = std::time::Instant::now();
    let during = http_get(admin, "/metrics").await;
    assert_eq!(
        figure(&during, "medai_connections_open"),
        MAX_OPEN as f64,
        "every place taken, none beyond: {during}"
    );
    assert_eq!(silent.len() + refused, attempts);
    assert!(
        silent.len() >= MAX_OPEN - 4,
        "the flood took the places the clients left ({} of {MAX_OPEN})",
        silent.len()
    );
    assert_eq!(
        figure(&during, "medai_connections_refused_total")
            - figure(&before, "medai_connections_refused_total"),
        refused as f64,
        "each refused connection counted"
    );
    // A new client finds no place while the flood holds them.
    let full = tokio::time::timeout(Duration::from_secs(5), async {
        medai_cli::client::connect_gateway(
            &mesh.gateway_endpoint(),
            &mesh.mesh.pki_layout().ca_certificate(),
        )
        .await
    })
    .await
    .expect("refused at once, not left waiting");
    if let Ok(mut newcomer) = full {
        let status = newcomer
            .get_result(unknown_result())
            .await
            .expect_err("no place for a new connection");
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    }

    // The silent connections are closed by the gateway at the idle time, not before (what they
    // read until then is the server's HTTP/2 SETTINGS and TLS session tickets).
    for mut connection in silent.drain(..) {
        use tokio::io::AsyncReadExt;
        let mut sink = Vec::new();
        let ended = tokio::time::timeout(IDLE * 3, connection.read_to_end(&mut sink)).await;
        assert!(ended.is_ok(), "closed by the gateway within the idle time");
    }
    assert!(
        flooded_at.elapsed() >= IDLE - Duration::from_millis(500),
        "closed at the idle time, not before ({:?})",
        flooded_at.elapsed()
    );
    let after = http_get(admin, "/metrics").await;
    let idle_closed = figure(&after, "medai_connections_idle_closed_total")
        - figure(&before, "medai_connections_idle_closed_total");
    assert_eq!(
        idle_closed,
        (attempts - refused) as f64,
        "the silent connections, and not the steady client's, were closed as idle"
    );

    // The steady client, quiet for longer than the idle time, is still served, and so are new
    // clients.
    let answered = steady
        .get_result(unknown_result())
        .await
        .expect_err("unknown");
    assert_eq!(reason_of(&answered).as_deref(), Some("RESULT_NOT_FOUND"));
    let mut newcomer = mesh.gateway().await;
    let answered = newcomer
        .get_result(unknown_result())
        .await
        .expect_err("unknown");
    assert_eq!(reason_of(&answered).as_deref(), Some("RESULT_NOT_FOUND"));
}

/// Connection bounds that would close live peers or serve no one are refused at start as a
/// configuration error (exit 2, the setting named), by the real binary configured as a pod is.
#[test]
fn connection_bounds_that_would_close_live_peers_are_refused_at_start() {
    let binary = medai_testkit::binaries_dir().join("medai-gateway");
    let run_with = |connections: &[(&str, &str)]| {
        let mut command = std::process::Command::new(&binary);
        command.arg("--print-config").env_clear();
        for (key, value) in [
            ("PROCESS__LISTEN_ADDR", "127.0.0.1:0"),
            ("TLS__CA_CERT", "/pki/ca.pem"),
            ("TLS__CERT", "/pki/service.pem"),
            ("TLS__KEY", "/pki/service-key.pem"),
            ("AUTH_ENDPOINT", "https://medai-auth:50051"),
            ("VALIDATION_ENDPOINT", "https://medai-validation:50051"),
            ("INFERENCE_ENDPOINT", "https://medai-inference:50051"),
            ("AUDIT_ENDPOINT", "https://medai-audit:50051"),
        ]
        .iter()
        .chain(connections)
        {
            command.env(format!("MEDAI_GATEWAY_{key}"), value);
        }
        command.output().expect("run medai-gateway")
    };
    let accepted = run_with(&[("PROCESS__CONNECTIONS__MAX_OPEN", "64")]);
    assert!(accepted.status.success(), "{accepted:?}");
    let printed = String::from_utf8_lossy(&accepted.stdout);
    assert!(
        printed.contains("[process.connections]") && printed.contains("max_open = 64"),
        "{printed}"
    );
    for (settings, said) in [
        (
            &[("PROCESS__CONNECTIONS__KEEPALIVE_SECONDS", "120")][..],
            "keepalive_seconds (120) must be at least 1 and below idle_seconds (120)",
        ),
        (
            &[("PROCESS__CONNECTIONS__MAX_OPEN", "0")][..],
            "max_open must be at least 1",
        ),
    ] {
        let refused = run_with(settings);
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert_eq!(refused.status.code(), Some(2), "{refused:?}");
        assert!(stderr.contains(said), "{stderr}");
    }
}
