//! What the token check costs per request: the gateway's own `TokenAuthLayer` (EdDSA
//! verification against the published keys, then the revocation lookup in Redis) in front of
//! a trivial gRPC method, against the same method and the same request with no check, in one
//! run. Also with the short "not revoked" cache, and the two parts measured alone.
//! Needs the suite's Redis (scripts/bench.sh starts one). Prints figures and writes
//! target/bench/token_check.json.

#![allow(clippy::print_stdout)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use medai_e2e::{MeshUnderTest, Storage, authorised, suite_redis_url};
use medai_gateway::revocation_check::RevocationSource;
use medai_gateway::signing_keys::SigningKeyCache;
use medai_gateway::token_auth::{RolePolicy, TokenAuthLayer, TokenChecks};
use medai_proto::auth::v1::auth_service_client::AuthServiceClient;
use medai_revocation::{Mode, RevocationSettings, RevocationStore, TokenFacts};
use medai_runtime::ServiceIdentity;
use medai_runtime::tls::TlsMaterial;
use medai_tokens::Role;
use tokio::net::TcpListener;
use tonic::transport::{Channel, Server};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

const REQUESTS: usize = 3000;
const WARM_UP: usize = 200;

struct Figures {
    mean_us: f64,
    p50_us: f64,
    p99_us: f64,
}

fn figures(mut samples: Vec<Duration>) -> Figures {
    samples.sort();
    let micros = |duration: Duration| duration.as_secs_f64() * 1e6;
    let mean_us = samples.iter().map(|sample| micros(*sample)).sum::<f64>() / samples.len() as f64;
    Figures {
        mean_us,
        p50_us: micros(samples[samples.len() / 2]),
        p99_us: micros(samples[samples.len() * 99 / 100]),
    }
}

/// A plain (no TLS) server on port 0 with only the health service, optionally behind the layer.
async fn health_server(layer: Option<TokenAuthLayer>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    match layer {
        Some(layer) => {
            tokio::spawn(
                Server::builder()
                    .layer(layer)
                    .add_service(health)
                    .serve_with_incoming(incoming),
            );
        }
        None => {
            tokio::spawn(
                Server::builder()
                    .add_service(health)
                    .serve_with_incoming(incoming),
            );
        }
    }
    format!("http://{address}")
}

async fn drive(endpoint: &str, token: &str) -> Figures {
    let channel = Channel::from_shared(endpoint.to_owned())
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut client = HealthClient::new(channel);
    let mut samples = Vec::with_capacity(REQUESTS);
    for index in 0..WARM_UP + REQUESTS {
        let started = Instant::now();
        client
            .check(authorised(
                HealthCheckRequest {
                    service: String::new(),
                },
                token,
            ))
            .await
            .expect("check");
        if index >= WARM_UP {
            samples.push(started.elapsed());
        }
    }
    figures(samples)
}

#[tokio::main]
async fn main() {
    let redis_url = suite_redis_url();
    let mesh = MeshUnderTest::start(Storage::Sqlite).await;
    let token = mesh.admin_token().await;
    let pki = mesh.mesh.pki_layout();
    let gateway_identity = TlsMaterial::load(&medai_runtime::TlsFiles {
        ca_cert: pki.ca_certificate(),
        cert: pki.certificate("gateway"),
        key: pki.key("gateway"),
    })
    .expect("gateway identity");
    let channel_to = |service: &str| {
        let address = mesh.mesh.address(service).expect("address");
        gateway_identity
            .mesh_channel(
                &format!("https://{address}"),
                &ServiceIdentity::new(service),
            )
            .expect("channel")
    };
    let auth = AuthServiceClient::new(channel_to("auth"));
    let ledger = medai_ledger_client::LedgerClient::new(channel_to("audit"));
    let policy = || RolePolicy::default().allow("/grpc.health.v1.Health/Check", &[Role::Admin]);
    let store = |cache_ms: u64| {
        let settings = RevocationSettings {
            mode: Mode::Production,
            redis_url: Some(redis_url.clone()),
            not_revoked_cache_ms: cache_ms,
        };
        Arc::new(RevocationStore::connect(&settings).expect("revocation store"))
    };
    let layer = |cache_ms: u64| {
        TokenAuthLayer::new(
            TokenChecks {
                keys: Arc::new(SigningKeyCache::new(
                    auth.clone(),
                    "medai-auth".to_owned(),
                    "medai".to_owned(),
                )),
                revocations: Arc::new(RevocationSource::Shared(store(cache_ms))),
                ledger: ledger.clone(),
            },
            policy(),
        )
    };

    // The mesh's auth runs without Redis here, so it does not seed it; stand in for it, or a
    // verifier treats the unseeded Redis as one that lost its data and fails closed.
    store(0)
        .seed(&[], &[])
        .await
        .expect("seed the revocation store");
    let unchecked = health_server(None).await;
    let checked = health_server(Some(layer(0))).await;
    let checked_cached = health_server(Some(layer(250))).await;
    let baseline = drive(&unchecked, &token).await;
    let with_check = drive(&checked, &token).await;
    let with_cache = drive(&checked_cached, &token).await;

    // The two parts alone.
    let keys = SigningKeyCache::new(auth.clone(), "medai-auth".to_owned(), "medai".to_owned());
    let claims = keys.verify(&token).await.expect("verify");
    let started = Instant::now();
    for _ in 0..REQUESTS {
        keys.verify(&token).await.expect("verify");
    }
    let verify_us = started.elapsed().as_secs_f64() * 1e6 / REQUESTS as f64;
    let lookups = store(0);
    let facts = TokenFacts {
        jti: &claims.jti,
        subject: &claims.sub,
        generation: claims.generation,
    };
    let started = Instant::now();
    for _ in 0..REQUESTS {
        assert!(!lookups.is_revoked(facts).await.expect("lookup"));
    }
    let lookup_us = started.elapsed().as_secs_f64() * 1e6 / REQUESTS as f64;
    mesh.stop().await;

    println!(
        "token check cost per request, {REQUESTS} sequential gRPC calls each (loopback, plain HTTP/2)"
    );
    for (name, figures) in [
        ("no check", &baseline),
        ("check, no cache", &with_check),
        ("check, 250 ms cache", &with_cache),
    ] {
        println!(
            "  {name:<22} mean {:8.1} µs  p50 {:8.1} µs  p99 {:8.1} µs  (+{:.1} µs mean over no check)",
            figures.mean_us,
            figures.p50_us,
            figures.p99_us,
            figures.mean_us - baseline.mean_us
        );
    }
    println!(
        "  parts alone: EdDSA verification {verify_us:.1} µs, Redis revocation lookup {lookup_us:.1} µs"
    );
    println!(
        "  ratio check/no check: {:.2}x (no cache), {:.2}x (cache)",
        with_check.mean_us / baseline.mean_us,
        with_cache.mean_us / baseline.mean_us
    );

    let figure = |figures: &Figures| serde_json::json!({ "mean_us": figures.mean_us, "p50_us": figures.p50_us, "p99_us": figures.p99_us });
    let report = serde_json::json!({
        "benchmark": "token_check",
        "requests": REQUESTS,
        "no_check": figure(&baseline),
        "check_no_cache": figure(&with_check),
        "check_cache_250ms": figure(&with_cache),
        "added_mean_us_no_cache": with_check.mean_us - baseline.mean_us,
        "added_mean_us_cache": with_cache.mean_us - baseline.mean_us,
        "verify_alone_us": verify_us,
        "redis_lookup_alone_us": lookup_us,
    });
    let directory = medai_testkit::workspace_root().join("target/bench");
    std::fs::create_dir_all(&directory).expect("bench folder");
    std::fs::write(
        directory.join("token_check.json"),
        serde_json::to_string_pretty(&report).expect("json"),
    )
    .expect("write");
}
