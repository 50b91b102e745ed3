//! The mesh against the Python monolith it replaces, measured side by side in one run on one
//! machine (issue 14's table): the same light model (64×64 grey, ONNX Runtime, one intra-op
//! thread on both sides), the same 256×256 PNG, every request authenticated (an EdDSA bearer
//! token on both sides) and durably recorded in the same PostgreSQL (fsync and
//! synchronous_commit on: one result row and one hash-chained ledger entry per request on the
//! monolith; result, ledger record and delivery note on the mesh). The mesh is driven by a
//! compiled gRPC client over TLS; the monolith (scripts/monolith/app.py: FastAPI + uvicorn
//! with one worker per core) by a compiled HTTP/1.1 keep-alive client. Rounds alternate
//! between the two so that a noisy neighbour hurts both alike.
//!
//! With the suite's Redis (`MEDAI_TEST_REDIS_URL`, which `scripts/bench.sh` starts) the mesh
//! runs as the chart deploys it: auth and the gateway check revocations in Redis (production
//! mode, failing closed), and the gateway charges every call to its rate limits in Redis (one
//! round trip a call), with limits high enough to refuse nothing (the monolith has none, and
//! the chart's 200/s per user would refuse a one-user benchmark). Redis's CPU is reported.
//!
//! It also reports CPU time per prediction by process (from /proc), which is where the
//! overhead budget is spent, and the WAL flushes (fsyncs) per prediction on each side: the
//! durable commits a prediction waits for or queues behind (`pg_stat_wal.wal_sync`, the whole
//! cluster, read once the round's statistics have reached it). Run with `scripts/bench.sh`;
//! writes target/bench/versus_monolith.json.
//! `MEDAI_BENCH_LEVELS=1,64` runs only those concurrency levels;
//! `MEDAI_BENCH_SERVICE_ENV=TOKIO_WORKER_THREADS=1,…` gives every service those variables too.
//!
//! After the levels it drives the mesh open-loop at half the highest rate it reached (issue 14:
//! p99 ≤ 20 ms at half of peak) for `MEDAI_BENCH_HALF_PEAK_SECONDS` (default 15; 0 skips it),
//! printing each hop's mean time and calls over 10 and 25 ms as the services' own histograms
//! timed them; then the monolith the same way at half of its own peak (the baseline for that
//! p99), and the mesh again at that same rate (both sides at one load).

#![allow(clippy::print_stdout)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use medai_e2e::bench_images::{TEXTURED_PNG_DESCRIPTION, textured_png as png};
use medai_e2e::process_cpu::cpu_per_prediction;
use medai_e2e::{MeshUnderTest, Storage, authorised};
use medai_proto::common::v1::ImageFormat;
use medai_proto::gateway::v1 as gw;
use medai_testkit::bench::{Throughput as Figures, write_report};
use medai_testkit::{fresh_postgres_database, workspace_root};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

const MODEL: &str = "synthetic-light";
const LEVELS: [usize; 4] = [1, 4, 16, 64];
const ROUNDS: usize = 2;

fn requests_at(concurrency: usize) -> usize {
    if concurrency == 1 { 512 } else { 1536 }
}

fn cpu_seconds_by_process() -> BTreeMap<String, f64> {
    medai_e2e::process_cpu::cpu_seconds_by_process("monolith (python)")
}

/// WAL flushes of the suite's PostgreSQL cluster so far. Each backend reports its share when
/// it goes idle, at most once a second (later when the shared statistics are busy), so the
/// count is read once it has stopped moving for a second (at most 15 s).
async fn wal_flushes() -> f64 {
    use sea_orm::{ConnectionTrait, Database, DatabaseBackend, Statement};
    let cluster = Database::connect(medai_testkit::suite_postgres_url().as_str())
        .await
        .expect("connect to the suite's PostgreSQL");
    let read = || async {
        let row = cluster
            .query_one_raw(Statement::from_string(
                DatabaseBackend::Postgres,
                "SELECT wal_sync::float8 AS flushes FROM pg_stat_wal",
            ))
            .await
            .expect("pg_stat_wal")
            .expect("one row");
        row.try_get::<f64>("", "flushes").expect("wal_sync")
    };
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let mut flushes = read().await;
    for _ in 0..14 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = read().await;
        if now == flushes {
            break;
        }
        flushes = now;
    }
    cluster.close().await.expect("close");
    flushes
}

/// The bench's prediction: the PNG for the light model.
fn prediction_request(image: &[u8]) -> gw::InferRequest {
    gw::InferRequest {
        image: image.to_vec().into(),
        format: ImageFormat::Png.into(),
        model_name: MODEL.to_owned(),
        ..Default::default()
    }
}

async fn mesh_round(
    mesh: &MeshUnderTest,
    token: &str,
    concurrency: usize,
    total: usize,
) -> Figures {
    let image = png();
    let per_client = total / concurrency;
    let mut channels = Vec::new();
    for _ in 0..concurrency.min(8) {
        channels.push(mesh.gateway().await);
    }
    let started = Instant::now();
    let mut clients = Vec::new();
    for index in 0..concurrency {
        let mut gateway = channels[index % channels.len()].clone();
        let token = token.to_owned();
        let image = image.clone();
        clients.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(per_client);
            for _ in 0..per_client {
                let request = prediction_request(&image);
                let one = Instant::now();
                gateway
                    .infer(authorised(request, &token))
                    .await
                    .expect("prediction through the gateway");
                latencies.push(one.elapsed());
            }
            latencies
        }));
    }
    let mut latencies = Vec::new();
    for client in clients {
        latencies.extend(client.await.expect("client"));
    }
    Figures::measure(latencies, started.elapsed())
}

/// Issue 14's latency bar: p99 at half of the peak rate.
const HALF_PEAK_P99_GOAL_MS: f64 = 20.0;

/// The mesh driven open-loop at `rate` predictions/s for `duration`: prediction `i` is due
/// `i / rate` seconds after the start whatever the earlier ones are doing, and its latency counts
/// from when it was due, so a stall shows in every prediction it delays (a closed-loop client
/// would wait it out and under-report). Returns the figures and the slowest latency in ms.
async fn mesh_open_loop(
    mesh: &MeshUnderTest,
    token: &str,
    rate: f64,
    duration: Duration,
) -> (Figures, f64) {
    let image = png();
    let mut channels = Vec::new();
    for _ in 0..8 {
        channels.push(mesh.gateway().await);
    }
    open_loop(rate, duration, |index| {
        let mut gateway = channels[index % channels.len()].clone();
        let request = prediction_request(&image);
        let token = token.to_owned();
        async move {
            gateway
                .infer(authorised(request, &token))
                .await
                .expect("prediction through the gateway");
        }
    })
    .await
}

/// The monolith driven open-loop like [`mesh_open_loop`]: each due prediction takes a free
/// keep-alive connection from a pool (waiting for one counts in its latency, as a queue in
/// front of the monolith would), so its p99 at half its own peak is the baseline the mesh's
/// is read against.
async fn monolith_open_loop(
    address: SocketAddr,
    token: &str,
    rate: f64,
    duration: Duration,
) -> (Figures, f64) {
    const CONNECTIONS: usize = 64;
    let image = std::sync::Arc::new(png());
    let (free_sender, free) = tokio::sync::mpsc::channel(CONNECTIONS);
    for _ in 0..CONNECTIONS {
        let connection = MonolithConnection::open(address, token, image.len())
            .await
            .expect("connect to the monolith");
        free_sender.send(connection).await.expect("pool");
    }
    let free = std::sync::Arc::new(tokio::sync::Mutex::new(free));
    open_loop(rate, duration, |_| {
        let (free, free_sender, image) = (free.clone(), free_sender.clone(), image.clone());
        async move {
            let mut connection = free.lock().await.recv().await.expect("a pooled connection");
            connection
                .predict(&image)
                .await
                .expect("prediction by the monolith");
            free_sender.send(connection).await.expect("pool");
        }
    })
    .await
}

/// Starts `call(i)` when it is due, `i / rate` seconds after the start, for `duration`
/// whatever the earlier calls are doing; each latency counts from when its call was due.
/// Returns the figures and the slowest latency in ms.
async fn open_loop<F>(
    rate: f64,
    duration: Duration,
    mut call: impl FnMut(usize) -> F,
) -> (Figures, f64)
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let total = (rate * duration.as_secs_f64()).round().max(1.0) as usize;
    let started = Instant::now();
    let mut calls = Vec::with_capacity(total);
    for index in 0..total {
        let due = started + Duration::from_secs_f64(index as f64 / rate);
        tokio::time::sleep_until(tokio::time::Instant::from_std(due)).await;
        let made = call(index);
        calls.push(tokio::spawn(async move {
            made.await;
            due.elapsed()
        }));
    }
    let mut latencies = Vec::with_capacity(total);
    for call in calls {
        latencies.push(call.await.expect("call"));
    }
    let slowest = latencies
        .iter()
        .max()
        .map_or(0.0, |latency| latency.as_secs_f64() * 1000.0);
    (Figures::measure(latencies, started.elapsed()), slowest)
}

/// Calls of one gRPC method as one process saw them: all, their total time, and those over
/// 10 and 25 ms.
#[derive(Clone, Copy, Debug, Default)]
struct SlowCalls {
    all: f64,
    seconds: f64,
    over_10_ms: f64,
    over_25_ms: f64,
}

impl SlowCalls {
    fn mean_ms(&self) -> f64 {
        1000.0 * self.seconds / self.all.max(1.0)
    }
}

/// The gRPC handling-time histograms (server side, and client side for the calls a service
/// makes) of every mesh service, keyed by "process side service/method".
async fn handling_histograms(mesh: &MeshUnderTest) -> BTreeMap<String, SlowCalls> {
    let mut calls = BTreeMap::new();
    for (side, family) in [
        ("server", "grpc_server_handling_seconds"),
        ("client", "grpc_client_handling_seconds"),
    ] {
        for sample in medai_e2e::handling_samples(mesh, family).await {
            let entry: &mut SlowCalls = calls
                .entry(format!("{} {side} {}", sample.process, sample.call))
                .or_default();
            let count = sample.value;
            match (sample.part.as_str(), sample.le.as_str()) {
                ("sum", _) => entry.seconds += count,
                ("bucket", "+Inf") => {
                    entry.all += count;
                    entry.over_10_ms += count;
                    entry.over_25_ms += count;
                }
                ("bucket", "0.01") => entry.over_10_ms -= count,
                ("bucket", "0.025") => entry.over_25_ms -= count,
                _ => {}
            }
        }
    }
    calls
}

/// The calls made between two readings of [`handling_histograms`], busiest first.
fn slow_calls_between(
    before: &BTreeMap<String, SlowCalls>,
    after: &BTreeMap<String, SlowCalls>,
) -> Vec<(String, SlowCalls)> {
    let mut between: Vec<(String, SlowCalls)> = after
        .iter()
        .map(|(key, later)| {
            let earlier = before.get(key).copied().unwrap_or_default();
            let calls = SlowCalls {
                all: later.all - earlier.all,
                seconds: later.seconds - earlier.seconds,
                over_10_ms: later.over_10_ms - earlier.over_10_ms,
                over_25_ms: later.over_25_ms - earlier.over_25_ms,
            };
            (key.clone(), calls)
        })
        .filter(|(_, calls)| calls.all > 0.0)
        .collect();
    between.sort_by(|a, b| b.1.over_10_ms.total_cmp(&a.1.over_10_ms));
    between
}

/// Where an open loop's time went: each hop as the process timed it (a server's time includes
/// the hops it calls; a client's adds the wire and the wait for the callee's CPU).
fn print_hops(slow_calls: &[(String, SlowCalls)]) {
    println!("    by process: mean ms, calls over 10 ms / over 25 ms / all");
    for (hop, calls) in slow_calls {
        println!(
            "      {hop:<58} {:>6.2}  {:>6.0} / {:>6.0} / {:>7.0}",
            calls.mean_ms(),
            calls.over_10_ms,
            calls.over_25_ms,
            calls.all
        );
    }
}

fn half_peak_seconds() -> u64 {
    std::env::var("MEDAI_BENCH_HALF_PEAK_SECONDS")
        .ok()
        .and_then(|seconds| seconds.trim().parse().ok())
        .unwrap_or(15)
}

/// One keep-alive HTTP/1.1 connection to the monolith.
struct MonolithConnection {
    reader: BufReader<tokio::net::TcpStream>,
    head: Vec<u8>,
}

impl MonolithConnection {
    async fn open(address: SocketAddr, token: &str, body_length: usize) -> std::io::Result<Self> {
        let stream = tokio::net::TcpStream::connect(address).await?;
        stream.set_nodelay(true)?;
        let head = format!(
            "POST /predict HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {token}\r\nContent-Type: image/png\r\nContent-Length: {body_length}\r\n\r\n"
        )
        .into_bytes();
        Ok(Self {
            reader: BufReader::new(stream),
            head,
        })
    }

    /// Sends one prediction and reads the whole answer; the status must be 200.
    async fn predict(&mut self, body: &[u8]) -> std::io::Result<Vec<u8>> {
        let stream = self.reader.get_mut();
        stream.write_all(&self.head).await?;
        stream.write_all(body).await?;
        let mut status = String::new();
        self.reader.read_line(&mut status).await?;
        if !status.starts_with("HTTP/1.1 200") {
            return Err(std::io::Error::other(format!(
                "monolith answered {}",
                status.trim()
            )));
        }
        let mut length = 0usize;
        loop {
            let mut line = String::new();
            self.reader.read_line(&mut line).await?;
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().map_err(std::io::Error::other)?;
            }
        }
        let mut answer = vec![0; length];
        self.reader.read_exact(&mut answer).await?;
        Ok(answer)
    }
}

async fn monolith_round(
    address: SocketAddr,
    token: &str,
    concurrency: usize,
    total: usize,
) -> Figures {
    let image = png();
    let per_client = total / concurrency;
    let started = Instant::now();
    let mut clients = Vec::new();
    for _ in 0..concurrency {
        let token = token.to_owned();
        let image = image.clone();
        clients.push(tokio::spawn(async move {
            let mut connection = MonolithConnection::open(address, &token, image.len())
                .await
                .expect("connect to the monolith");
            let mut latencies = Vec::with_capacity(per_client);
            for _ in 0..per_client {
                let one = Instant::now();
                connection
                    .predict(&image)
                    .await
                    .expect("prediction by the monolith");
                latencies.push(one.elapsed());
            }
            latencies
        }));
    }
    let mut latencies = Vec::new();
    for client in clients {
        latencies.extend(client.await.expect("client"));
    }
    Figures::measure(latencies, started.elapsed())
}

struct Monolith {
    process: tokio::process::Child,
    address: SocketAddr,
    token: String,
    _keys: tempfile::TempDir,
}

impl Monolith {
    async fn start(root: &Path) -> Self {
        let python = root.join(".cache/monolith-venv/bin/python");
        assert!(
            python.exists(),
            "run scripts/monolith.sh first (scripts/bench.sh does)"
        );
        let keys = tempfile::tempdir().expect("key folder");
        let key_pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("ed25519 key");
        let public_key = keys.path().join("public.pem");
        std::fs::write(&public_key, key_pair.public_key_pem()).expect("public key");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs();
        let claims = serde_json::json!({
            "sub": "bench-user", "iss": "medai-monolith", "aud": "medai-monolith",
            "iat": now, "exp": now + 3600,
        });
        let token = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA),
            &claims,
            &jsonwebtoken::EncodingKey::from_ed_der(&key_pair.serialize_der()),
        )
        .expect("token");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("free port")
            .port();
        let address: SocketAddr = ([127, 0, 0, 1], port).into();
        let process = tokio::process::Command::new(python)
            .arg(root.join("scripts/monolith/run.py"))
            .env("MONOLITH_DATABASE_URL", fresh_postgres_database().await)
            .env(
                "MONOLITH_MODEL",
                root.join("models/synthetic-light/1/model.onnx"),
            )
            .env("MONOLITH_PUBLIC_KEY", &public_key)
            .env("MONOLITH_PORT", port.to_string())
            .env("MONOLITH_WORKERS", "2")
            .kill_on_drop(true)
            .spawn()
            .expect("start the monolith");
        let image = png();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(mut connection) = MonolithConnection::open(address, &token, image.len()).await
                && connection.predict(&image).await.is_ok()
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the monolith did not answer within 60 s"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Self {
            process,
            address,
            token,
            _keys: keys,
        }
    }
}

/// A benchmark that panics still stops the monolith's workers: dropped, it is sent SIGTERM, as
/// [`Monolith::stop`] does, instead of the SIGKILL `kill_on_drop` gives uvicorn's master alone
/// (its workers then kept running, holding the benchmark's output open).
impl Drop for Monolith {
    fn drop(&mut self) {
        if let Some(pid) = self.process.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
    }
}

impl Monolith {
    /// SIGTERM lets uvicorn stop its workers too (a kill would leave them running).
    async fn stop(mut self) {
        if let Some(pid) = self.process.id() {
            let _ = tokio::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), self.process.wait()).await;
    }
}

fn cell(figures: &Figures) -> String {
    format!(
        "{:>6.0}/s p50 {:>6.2} ms p99 {:>7.2} ms",
        figures.per_second, figures.p50_ms, figures.p99_ms
    )
}

/// The mean rate of the rounds and the latency quantiles of the slower round.
fn combine(rounds: &[Figures]) -> Figures {
    let per_second =
        rounds.iter().map(|figures| figures.per_second).sum::<f64>() / rounds.len() as f64;
    let worst = rounds
        .iter()
        .copied()
        .max_by(|a, b| a.p99_ms.total_cmp(&b.p99_ms))
        .expect("rounds");
    Figures {
        per_second,
        ..worst
    }
}

/// `MEDAI_BENCH_SERVICE_ENV`: `NAME=value` pairs, comma separated, for every service.
fn service_environment() -> Vec<(String, String)> {
    std::env::var("MEDAI_BENCH_SERVICE_ENV")
        .unwrap_or_default()
        .split(',')
        .filter_map(|pair| pair.split_once('='))
        .map(|(name, value)| (name.trim().to_owned(), value.trim().to_owned()))
        .collect()
}

#[tokio::main]
async fn main() {
    let root = workspace_root();
    let redis = std::env::var("MEDAI_TEST_REDIS_URL").ok();
    let quiet = |service: &str| {
        let prefix = format!("MEDAI_{}_", service.to_ascii_uppercase());
        let mut variables = vec![(format!("{prefix}PROCESS__LOG_FILTER"), "warn".to_owned())];
        let mut set = |name: &str, value: &str| {
            variables.push((format!("{prefix}{name}"), value.to_owned()));
        };
        if service == "gateway" {
            // With Redis every call is charged to limits it never reaches; without, none is.
            let rate = if redis.is_some() { "1000000" } else { "0" };
            for name in ["PER_USER", "PER_CLIENT"] {
                set(&format!("LOAD_CONTROL__{name}_PER_SECOND"), rate);
                set(&format!("LOAD_CONTROL__{name}_BURST"), "1000000");
            }
            set("LOAD_CONTROL__MAX_IN_FLIGHT", "100000");
            if let Some(url) = &redis {
                set("LOAD_CONTROL__REDIS_URL", url);
            }
        }
        if let Some(url) = redis
            .as_ref()
            .filter(|_| ["gateway", "auth"].contains(&service))
        {
            set("REVOCATION__MODE", "production");
            set("REVOCATION__REDIS_URL", url);
        }
        variables.extend(service_environment());
        (service.to_owned(), variables)
    };
    let extra = ["gateway", "auth", "validation", "inference", "audit"]
        .map(quiet)
        .into_iter()
        .collect();
    let levels = medai_e2e::bench_levels(&LEVELS);
    let mesh = MeshUnderTest::start_with(Storage::Postgres, extra).await;
    let token = mesh.admin_token().await;
    let monolith = Monolith::start(&root).await;
    // Warm-up: connections, sessions, caches, the JIT-less Python import paths.
    mesh_round(&mesh, &token, 4, 256).await;
    monolith_round(monolith.address, &monolith.token, 4, 256).await;

    println!(
        "mesh vs Python monolith: {MODEL}, {TEXTURED_PNG_DESCRIPTION}, every request authenticated and durably recorded in PostgreSQL, {ROUNDS} alternating rounds per level; the mesh's revocations and rate limits {}",
        if redis.is_some() {
            "in Redis, as the chart deploys them"
        } else {
            "in each process (no Redis)"
        }
    );
    println!(
        "  {:>11}  {:>38}  {:>38}  {:>8}",
        "concurrency",
        "mesh (gateway, mTLS every hop)",
        "monolith (FastAPI + ORT + PG)",
        "mesh/mono"
    );
    let mut report = serde_json::Map::new();
    let mut cpu_report = serde_json::Map::new();
    let mut flush_report = serde_json::Map::new();
    let (mut peak, mut monolith_peak): (f64, f64) = (0.0, 0.0);
    for level in levels {
        let total = requests_at(level);
        let (mut mesh_rounds, mut monolith_rounds) = (Vec::new(), Vec::new());
        let mut mesh_cpu = BTreeMap::new();
        let mut monolith_cpu = BTreeMap::new();
        let (mut mesh_flushes, mut monolith_flushes) = (0.0, 0.0);
        for _ in 0..ROUNDS {
            let flushes_before = wal_flushes().await;
            let before = cpu_seconds_by_process();
            mesh_rounds.push(mesh_round(&mesh, &token, level, total).await);
            let middle = cpu_seconds_by_process();
            let flushes_middle = wal_flushes().await;
            let middle_after_pause = cpu_seconds_by_process();
            monolith_rounds
                .push(monolith_round(monolith.address, &monolith.token, level, total).await);
            let after = cpu_seconds_by_process();
            let flushes_after = wal_flushes().await;
            mesh_cpu = cpu_per_prediction(&before, &middle, total);
            monolith_cpu = cpu_per_prediction(&middle_after_pause, &after, total);
            mesh_flushes = (flushes_middle - flushes_before) / total as f64;
            monolith_flushes = (flushes_after - flushes_middle) / total as f64;
        }
        let (ours, theirs) = (combine(&mesh_rounds), combine(&monolith_rounds));
        peak = peak.max(ours.per_second);
        monolith_peak = monolith_peak.max(theirs.per_second);
        let ratio = ours.per_second / theirs.per_second;
        println!(
            "  {level:>11}  {}  {}  {ratio:>7.2}x",
            cell(&ours),
            cell(&theirs)
        );
        let describe = |figures: &BTreeMap<String, f64>| {
            figures
                .iter()
                .map(|(name, micros)| format!("{name} {micros:.0}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        println!(
            "  {:>11}  CPU µs/prediction, mesh: {}",
            "",
            describe(&mesh_cpu)
        );
        println!(
            "  {:>11}  CPU µs/prediction, monolith: {}",
            "",
            describe(&monolith_cpu)
        );
        println!(
            "  {:>11}  WAL flushes/prediction: mesh {mesh_flushes:.2}, monolith {monolith_flushes:.2}",
            ""
        );
        report.insert(
            level.to_string(),
            serde_json::json!({
                "mesh": ours.to_json(),
                "monolith": theirs.to_json(),
                "ratio_mesh_over_monolith": ratio,
            }),
        );
        cpu_report.insert(
            level.to_string(),
            serde_json::json!({ "mesh": mesh_cpu, "monolith": monolith_cpu }),
        );
        flush_report.insert(
            level.to_string(),
            serde_json::json!({ "mesh": mesh_flushes, "monolith": monolith_flushes }),
        );
    }
    let seconds = half_peak_seconds();
    if seconds > 0 && peak > 0.0 {
        let rate = peak / 2.0;
        let histograms_before = handling_histograms(&mesh).await;
        let (figures, slowest) =
            mesh_open_loop(&mesh, &token, rate, Duration::from_secs(seconds)).await;
        let slow_calls = slow_calls_between(&histograms_before, &handling_histograms(&mesh).await);
        let verdict = if figures.p99_ms <= HALF_PEAK_P99_GOAL_MS {
            "within"
        } else {
            "over"
        };
        println!(
            "  open loop at half the mesh's peak ({rate:.0}/s for {seconds} s): {:.0}/s p50 {:.2} ms p99 {:.2} ms max {slowest:.2} ms, {verdict} the {HALF_PEAK_P99_GOAL_MS:.0} ms p99 goal",
            figures.per_second, figures.p50_ms, figures.p99_ms
        );
        print_hops(&slow_calls);
        // The baseline: the monolith open-loop at half of its own peak, in the same run.
        let monolith_rate = monolith_peak / 2.0;
        let (theirs, theirs_slowest) = monolith_open_loop(
            monolith.address,
            &monolith.token,
            monolith_rate,
            Duration::from_secs(seconds),
        )
        .await;
        println!(
            "  open loop at half the monolith's peak ({monolith_rate:.0}/s for {seconds} s): {:.0}/s p50 {:.2} ms p99 {:.2} ms max {theirs_slowest:.2} ms; mesh p99 at half its peak / monolith p99 at half its peak {:.2}",
            theirs.per_second,
            theirs.p50_ms,
            theirs.p99_ms,
            figures.p99_ms / theirs.p99_ms
        );
        // And the mesh at that same offered rate: both sides at one load.
        let histograms_before = handling_histograms(&mesh).await;
        let (ours_at_theirs, ours_at_theirs_slowest) =
            mesh_open_loop(&mesh, &token, monolith_rate, Duration::from_secs(seconds)).await;
        println!(
            "  the mesh open-loop at that rate ({monolith_rate:.0}/s): {:.0}/s p50 {:.2} ms p99 {:.2} ms max {ours_at_theirs_slowest:.2} ms; mesh p99 / monolith p99 at one load {:.2}",
            ours_at_theirs.per_second,
            ours_at_theirs.p50_ms,
            ours_at_theirs.p99_ms,
            ours_at_theirs.p99_ms / theirs.p99_ms
        );
        print_hops(&slow_calls_between(
            &histograms_before,
            &handling_histograms(&mesh).await,
        ));
        report.insert(
            "half_peak_open_loop".to_owned(),
            serde_json::json!({
                "offered_per_second": rate,
                "seconds": seconds,
                "figures": figures.to_json(),
                "max_ms": slowest,
                "p99_goal_ms": HALF_PEAK_P99_GOAL_MS,
                "slow_calls_by_process": slow_calls
                    .iter()
                    .map(|(hop, calls)| (hop.clone(), serde_json::json!({
                        "all": calls.all,
                        "mean_ms": calls.mean_ms(),
                        "over_10_ms": calls.over_10_ms,
                        "over_25_ms": calls.over_25_ms,
                    })))
                    .collect::<serde_json::Map<_, _>>(),
                "monolith_at_half_its_peak": {
                    "offered_per_second": monolith_rate,
                    "figures": theirs.to_json(),
                    "max_ms": theirs_slowest,
                },
                "mesh_at_half_the_monoliths_peak": {
                    "offered_per_second": monolith_rate,
                    "figures": ours_at_theirs.to_json(),
                    "max_ms": ours_at_theirs_slowest,
                },
            }),
        );
    }
    monolith.stop().await;
    mesh.stop().await;
    report.insert(
        "cpu_micros_per_prediction".to_owned(),
        serde_json::Value::Object(cpu_report),
    );
    report.insert(
        "wal_flushes_per_prediction".to_owned(),
        serde_json::Value::Object(flush_report),
    );
    write_report("versus_monolith", serde_json::Value::Object(report));
}
