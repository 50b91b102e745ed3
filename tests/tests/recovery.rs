//! Disaster recovery end to end (issue 17), with the real binaries on real PostgreSQL: the
//! `medai backup` of a running mesh under a stream of predictions, the loss of the database
//! server, `medai restore` into a fresh PostgreSQL server, and a mesh started on the restored
//! databases. A backup older than the newest signed checkpoint is refused by the restore's
//! verification against the checkpoint log, naming the missing seqs. Prints the measured
//! figures (backup time, RPO window, RTO) that compliance/recovery-playbook.md quotes.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use medai_cli::launcher::{MeshSettings, RunningMesh};
use medai_e2e::authorised;
use medai_proto::common::v1::ImageFormat;
use medai_proto::gateway::v1 as gw;
use medai_testkit::{Assets, PrivatePostgres, binaries_dir, fresh_postgres_database};
use sea_orm::{ConnectionTrait, Database};

const ADMIN_PASSWORD: &str = "an admin password for the recovery test";

/// One acknowledged prediction: when the answer came and the ledger seq it names.
#[derive(Clone, Debug)]
struct Acknowledged {
    at: Instant,
    ledger_seq: u64,
    result_id: String,
}

fn infer_request(image: Vec<u8>) -> gw::InferRequest {
    gw::InferRequest {
        image: image.into(),
        format: ImageFormat::Unspecified.into(),
        model_name: String::new(),
        model_version: String::new(),
        idempotency_key: String::new(),
    }
}

async fn gateway(mesh: &RunningMesh, settings: &MeshSettings) -> medai_cli::client::GatewayClient {
    medai_cli::client::connect_gateway(
        &format!("https://{}", mesh.address("gateway").expect("gateway")),
        &settings.pki().ca_certificate(),
    )
    .await
    .expect("gateway client")
}

async fn login(
    client: &mut medai_cli::client::GatewayClient,
    username: &str,
    password: &str,
) -> String {
    client
        .login(gw::LoginRequest {
            username: username.to_owned(),
            password: password.to_owned(),
        })
        .await
        .expect("login")
        .into_inner()
        .grant
        .expect("tokens")
        .access_token
}

/// Predictions one after another until `stop`; every acknowledged one is returned.
async fn prediction_stream(
    mut client: medai_cli::client::GatewayClient,
    token: String,
    stop: Arc<AtomicBool>,
) -> Vec<Acknowledged> {
    let image = Assets::locate().dicom("MR_small.dcm");
    let mut acknowledged = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        if let Ok(response) = client
            .infer(authorised(infer_request(image.clone()), &token))
            .await
        {
            let response = response.into_inner();
            acknowledged.push(Acknowledged {
                at: Instant::now(),
                ledger_seq: response.ledger_seq,
                result_id: response.result_id,
            });
        }
    }
    acknowledged
}

/// Runs the real `medai` binary; returns (success, stdout, stderr).
async fn medai(arguments: &[String]) -> (bool, String, String) {
    let output = tokio::process::Command::new(binaries_dir().join("medai"))
        .args(arguments)
        .output()
        .await
        .expect("run medai");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn pg_bin() -> String {
    std::env::var("MEDAI_TEST_PG_BIN")
        .expect("MEDAI_TEST_PG_BIN is not set: run the suite with scripts/test.sh")
}

fn url_arguments(ledger: &str, identities: &str, results: &str) -> Vec<String> {
    [
        "--ledger-url",
        ledger,
        "--identities-url",
        identities,
        "--results-url",
        results,
        "--pg-bin",
        &pg_bin(),
    ]
    .iter()
    .map(|text| (*text).to_owned())
    .collect()
}

async fn backup(settings: &MeshSettings, out: &Path) -> (serde_json::Value, Duration) {
    let started = Instant::now();
    let mut arguments = vec![
        "backup".to_owned(),
        "--out".to_owned(),
        out.display().to_string(),
    ];
    arguments.extend(url_arguments(
        &settings.audit_database_url,
        &settings.auth_database_url,
        &settings.inference_database_url,
    ));
    let (ok, stdout, stderr) = medai(&arguments).await;
    let took = started.elapsed();
    assert!(ok, "medai backup failed:\n{stdout}\n{stderr}");
    eprintln!("{stdout}");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("manifest.json")).expect("manifest"))
            .expect("manifest JSON");
    (manifest, took)
}

/// Three empty databases on `server`, as an operator makes them with `createdb`.
async fn empty_databases(server: &PrivatePostgres, suffix: &str) -> [String; 3] {
    let admin = Database::connect(server.url().as_str())
        .await
        .expect("connect to the fresh server");
    let base = server.url();
    let (base, _) = base.rsplit_once('/').expect("a URL with a database");
    let mut urls = Vec::new();
    for name in ["ledger", "identities", "results"] {
        admin
            .execute_unprepared(&format!("CREATE DATABASE {name}_{suffix}"))
            .await
            .expect("create database");
        urls.push(format!("{base}/{name}_{suffix}"));
    }
    admin.close().await.expect("close");
    urls.try_into().expect("three")
}

async fn restore(
    from: &Path,
    [ledger, identities, results]: &[String; 3],
    state_dir: &Path,
) -> (bool, String, String) {
    let mut arguments = vec![
        "restore".to_owned(),
        "--from".to_owned(),
        from.display().to_string(),
    ];
    arguments.extend(url_arguments(ledger, identities, results));
    arguments.extend([
        "--checkpoint-log".to_owned(),
        state_dir
            .join("audit-checkpoint.checkpoints.jsonl")
            .display()
            .to_string(),
        "--public-key".to_owned(),
        state_dir.join("audit-checkpoint.pub").display().to_string(),
    ]);
    medai(&arguments).await
}

fn manifest_head(manifest: &serde_json::Value) -> u64 {
    manifest["ledger"]["head_seq"].as_u64().expect("head_seq")
}

#[tokio::test]
async fn a_backup_of_the_running_mesh_restores_into_a_fresh_server_with_nothing_acknowledged_lost()
{
    let state = tempfile::tempdir().expect("state dir");
    let backups = tempfile::tempdir().expect("backups");
    let assets = Assets::locate();
    let mut settings = MeshSettings::embedded(
        state.path(),
        &binaries_dir(),
        &assets.model_repository,
        &assets.onnxruntime_library,
    );
    settings.audit_database_url = fresh_postgres_database().await;
    settings.auth_database_url = fresh_postgres_database().await;
    settings.inference_database_url = fresh_postgres_database().await;
    settings.admin_password = ADMIN_PASSWORD.to_owned();
    // Checkpoints only when asked, so the test knows which ones the log holds.
    settings.extra_environment.insert(
        "audit".to_owned(),
        vec![(
            "MEDAI_AUDIT_CHECKPOINT_INTERVAL_SECONDS".to_owned(),
            "0".to_owned(),
        )],
    );
    let mesh = RunningMesh::start(&settings)
        .await
        .expect("the mesh starts");
    let mut client = gateway(&mesh, &settings).await;
    let admin = login(&mut client, "admin", ADMIN_PASSWORD).await;
    client
        .create_user(authorised(
            gw::CreateUserRequest {
                username: "audrey".to_owned(),
                password: "audrey password 123".to_owned(),
                role: "auditor".to_owned(),
            },
            &admin,
        ))
        .await
        .expect("create auditor");
    let auditor = login(&mut client, "audrey", "audrey password 123").await;

    // A steady stream of predictions for the whole time the system is backed up.
    let stop = Arc::new(AtomicBool::new(false));
    let stream = tokio::spawn(prediction_stream(
        gateway(&mesh, &settings).await,
        admin.clone(),
        stop.clone(),
    ));
    let image = assets.dicom("MR_small.dcm");
    client
        .infer(authorised(infer_request(image.clone()), &admin))
        .await
        .expect("a prediction before the first backup");

    // Backup 1 under load; then more predictions and a signed checkpoint past it.
    let older = backups.path().join("older");
    let (older_manifest, _) = backup(&settings, &older).await;
    client
        .infer(authorised(infer_request(image.clone()), &admin))
        .await
        .expect("a prediction after the first backup");
    let checkpoint = client
        .create_ledger_checkpoint(authorised(gw::CreateLedgerCheckpointRequest {}, &auditor))
        .await
        .expect("checkpoint")
        .into_inner()
        .checkpoint
        .expect("checkpoint");
    assert!(checkpoint.tree_size > manifest_head(&older_manifest));

    // Backup 2, still under load.
    let newer = backups.path().join("newer");
    let backup_started = Instant::now();
    let (newer_manifest, backup_took) = backup(&settings, &newer).await;
    stop.store(true, Ordering::Relaxed);
    let acknowledged = stream.await.expect("stream");
    let newer_head = manifest_head(&newer_manifest);
    assert!(newer_head >= checkpoint.tree_size);
    for dumped in newer_manifest["databases"].as_array().expect("databases") {
        let file = newer.join(dumped["file"].as_str().expect("file"));
        assert_eq!(
            std::fs::metadata(&file).expect("dump").len(),
            dumped["bytes"].as_u64().expect("bytes")
        );
        assert_eq!(dumped["sha256"].as_str().expect("sha256").len(), 64);
    }
    // Every prediction acknowledged before the backup began is in it; those acknowledged
    // after its snapshot are the RPO window of a restore from it.
    let before: Vec<&Acknowledged> = acknowledged
        .iter()
        .filter(|ack| ack.at < backup_started)
        .collect();
    assert!(!before.is_empty(), "predictions ran before the backup");
    for ack in &before {
        assert!(
            ack.ledger_seq <= newer_head,
            "prediction at seq {} was acknowledged before the backup but is not in it (head {newer_head})",
            ack.ledger_seq
        );
    }
    let after_snapshot = acknowledged
        .iter()
        .filter(|ack| ack.ledger_seq > newer_head)
        .count();
    let kept_result = before.last().expect("one").result_id.clone();

    // The database server is lost.
    mesh.stop(Duration::from_secs(10)).await;
    let server = PrivatePostgres::start();

    // The older backup restores, but its verification against the checkpoint log refuses it.
    let targets = empty_databases(&server, "old").await;
    let (ok, stdout, stderr) = restore(&older, &targets, state.path()).await;
    assert!(
        !ok,
        "a restore behind a signed checkpoint must fail:\n{stdout}"
    );
    assert!(stderr.contains("LEDGER_BEHIND_CHECKPOINT"), "{stderr}");
    let missing = format!(
        "entries {}..={} are missing",
        manifest_head(&older_manifest) + 1,
        checkpoint.tree_size
    );
    assert!(stderr.contains(&missing), "{stderr}");

    // The newer backup restores and verifies; a mesh on it answers predictions.
    let targets = empty_databases(&server, "new").await;
    let restore_started = Instant::now();
    let (ok, stdout, stderr) = restore(&newer, &targets, state.path()).await;
    assert!(ok, "restore failed:\n{stdout}\n{stderr}");
    assert!(
        stdout.contains("passes through the newest signed checkpoint"),
        "{stdout}"
    );
    let restore_took = restore_started.elapsed();
    let mut restored = settings.clone();
    restored.audit_database_url = targets[0].clone();
    restored.auth_database_url = targets[1].clone();
    restored.inference_database_url = targets[2].clone();
    let mesh = RunningMesh::start(&restored)
        .await
        .expect("the mesh starts on the restored databases");
    let mut client = gateway(&mesh, &restored).await;
    let admin = login(&mut client, "admin", ADMIN_PASSWORD).await;
    let answer = client
        .infer(authorised(infer_request(image), &admin))
        .await
        .expect("a prediction on the restored system")
        .into_inner();
    let recovered = restore_started.elapsed();
    assert!(answer.ledger_seq > newer_head);
    // The auditor (an identity) and a result (from the results database) came back too.
    let auditor = login(&mut client, "audrey", "audrey password 123").await;
    let result = client
        .get_result(authorised(
            gw::GetResultRequest {
                result_id: kept_result.clone(),
            },
            &admin,
        ))
        .await
        .expect("a result acknowledged before the backup")
        .into_inner();
    assert!(result.result.is_some());
    let verification = client
        .verify_ledger(authorised(gw::VerifyLedgerRequest {}, &auditor))
        .await
        .expect("verify")
        .into_inner()
        .verification
        .expect("report");
    assert!(verification.intact, "{verification:?}");
    assert!(verification.checkpoints_verified >= 1);
    mesh.stop(Duration::from_secs(10)).await;

    eprintln!(
        "RECOVERY FIGURES: backup of 3 databases under load {:.2} s (ledger head seq {newer_head}); \
         {} predictions acknowledged during the run, {after_snapshot} after the backup's snapshot \
         (RPO = the time since the last backup); restore {:.2} s; RTO (restore start to first \
         prediction on the restored mesh) {:.2} s",
        backup_took.as_secs_f64(),
        acknowledged.len(),
        restore_took.as_secs_f64(),
        recovered.as_secs_f64()
    );
}

/// Runs `work` on a blocking thread (the PostgreSQL tools block; the prediction stream shares
/// this test's runtime) and gives the cluster back.
async fn blocking<T: Send + 'static>(
    cluster: PrivatePostgres,
    work: impl FnOnce(&PrivatePostgres) -> T + Send + 'static,
) -> (PrivatePostgres, T) {
    tokio::task::spawn_blocking(move || {
        let outcome = work(&cluster);
        (cluster, outcome)
    })
    .await
    .expect("blocking PostgreSQL work")
}

#[tokio::test]
async fn a_killed_primary_fails_over_to_its_synchronous_standby_with_nothing_acknowledged_lost() {
    let (primary, standby) = tokio::task::spawn_blocking(|| {
        let primary = PrivatePostgres::start_synchronous_primary();
        let standby = PrivatePostgres::start_standby_of(&primary);
        (primary, standby)
    })
    .await
    .expect("primary and standby");
    let admin_connection = Database::connect(primary.url().as_str())
        .await
        .expect("connect to the primary");
    for name in ["ledger", "identities", "results"] {
        admin_connection
            .execute_unprepared(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create database");
    }
    admin_connection.close().await.expect("close");
    // Every service is given both servers; each follows whichever takes writes.
    let both = |database: &str| {
        format!(
            "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/{database}?target_session_attrs=read-write",
            primary.port, standby.port
        )
    };
    let state = tempfile::tempdir().expect("state dir");
    let assets = Assets::locate();
    let mut settings = MeshSettings::embedded(
        state.path(),
        &binaries_dir(),
        &assets.model_repository,
        &assets.onnxruntime_library,
    );
    settings.audit_database_url = both("ledger");
    settings.auth_database_url = both("identities");
    settings.inference_database_url = both("results");
    settings.admin_password = ADMIN_PASSWORD.to_owned();
    let mesh = RunningMesh::start(&settings)
        .await
        .expect("the mesh starts on the primary");
    let mut client = gateway(&mesh, &settings).await;
    let admin = login(&mut client, "admin", ADMIN_PASSWORD).await;
    client
        .create_user(authorised(
            gw::CreateUserRequest {
                username: "audrey".to_owned(),
                password: "audrey password 123".to_owned(),
                role: "auditor".to_owned(),
            },
            &admin,
        ))
        .await
        .expect("create auditor");
    let image = assets.dicom("MR_small.dcm");

    // Predictions stream for the whole run; a few are acknowledged before the primary dies.
    let stop = Arc::new(AtomicBool::new(false));
    let stream = tokio::spawn(prediction_stream(
        gateway(&mesh, &settings).await,
        admin.clone(),
        stop.clone(),
    ));
    for _ in 0..3 {
        client
            .infer(authorised(infer_request(image.clone()), &admin))
            .await
            .expect("a prediction on the primary");
    }

    // The primary crashes; the standby is promoted as an operator or an HA manager would.
    let (primary, ()) = blocking(primary, PrivatePostgres::kill_hard).await;
    let killed_at = Instant::now();
    let promotion = tokio::spawn(blocking(standby, |standby| {
        standby.promote();
        Instant::now()
    }));
    let mut failed_attempts = 0_u32;
    let first = loop {
        match client
            .infer(authorised(infer_request(image.clone()), &admin))
            .await
        {
            Ok(answer) => break answer.into_inner(),
            Err(status) => {
                failed_attempts += 1;
                assert!(
                    killed_at.elapsed() < Duration::from_secs(180),
                    "no prediction succeeded within 180 s of the kill (last: {status:?})"
                );
            }
        }
    };
    let time_to_first_prediction = killed_at.elapsed();
    let (standby, promoted_at) = promotion.await.expect("promotion");
    let promoted_after = promoted_at.duration_since(killed_at);
    // The standby took no write before its promotion, so this prediction was recorded on it.
    assert!(first.ledger_seq > 0);
    for _ in 0..2 {
        client
            .infer(authorised(infer_request(image.clone()), &admin))
            .await
            .expect("predictions after the failover");
    }
    stop.store(true, Ordering::Relaxed);
    let mut acknowledged = stream.await.expect("stream");
    acknowledged.push(Acknowledged {
        at: Instant::now(),
        ledger_seq: first.ledger_seq,
        result_id: first.result_id.clone(),
    });
    let before_kill = acknowledged.iter().filter(|ack| ack.at < killed_at).count();
    assert!(
        before_kill > 0,
        "predictions were acknowledged before the kill"
    );

    // Every acknowledged prediction's ledger entry is on the promoted standby.
    let ledger = Database::connect(
        format!("{}/ledger", standby.url().rsplit_once('/').expect("db").0).as_str(),
    )
    .await
    .expect("connect to the promoted standby's ledger");
    let stored: std::collections::BTreeSet<u64> = ledger
        .query_all_raw(sea_orm::Statement::from_string(
            sea_orm::DatabaseBackend::Postgres,
            "SELECT seq FROM ledger_entries",
        ))
        .await
        .expect("ledger seqs")
        .iter()
        .map(|row| u64::try_from(row.try_get::<i64>("", "seq").expect("seq")).expect("seq"))
        .collect();
    ledger.close().await.expect("close");
    for ack in &acknowledged {
        assert!(
            stored.contains(&ack.ledger_seq),
            "prediction {} was acknowledged with ledger seq {} that the promoted standby lacks",
            ack.result_id,
            ack.ledger_seq
        );
    }
    let auditor = login(&mut client, "audrey", "audrey password 123").await;
    let verification = client
        .verify_ledger(authorised(gw::VerifyLedgerRequest {}, &auditor))
        .await
        .expect("verify")
        .into_inner()
        .verification
        .expect("report");
    assert!(verification.intact, "{verification:?}");
    assert!(verification.entries_checked >= *stored.last().expect("entries"));
    mesh.stop(Duration::from_secs(10)).await;
    drop(primary);

    eprintln!(
        "FAILOVER FIGURES: {} predictions acknowledged ({before_kill} before the kill), none missing \
         on the promoted standby ({} ledger entries, chain intact); standby promoted {:.2} s after \
         the kill; first successful prediction {:.2} s after the kill (RTO), after {failed_attempts} \
         failed attempts",
        acknowledged.len(),
        stored.len(),
        promoted_after.as_secs_f64(),
        time_to_first_prediction.as_secs_f64(),
    );
}

/// Calls a gateway allows per second from one client in the Redis test (and its burst).
const CLIENT_RATE: usize = 10;

/// `calls` refresh attempts at once with a refresh token that does not exist: the cheapest call
/// that passes the token check whatever Redis does, sent together so the limiter decides them
/// all within a moment however slowly auth answers. Returns how many reached auth (refused there
/// as an invalid refresh token), how many the rate limit refused, and how long it took.
async fn refresh_burst(
    client: &mut medai_cli::client::GatewayClient,
    calls: usize,
) -> (usize, usize, Duration) {
    let started = Instant::now();
    let attempts = (0..calls).map(|_| {
        let mut client = client.clone();
        async move {
            client
                .refresh(gw::RefreshRequest {
                    refresh_token: "not a refresh token".to_owned(),
                })
                .await
                .expect_err("no such refresh token")
        }
    });
    let (mut reached_auth, mut limited) = (0, 0);
    for status in futures::future::join_all(attempts).await {
        if medai_runtime::errors::reason_of(&status).as_deref() == Some("RATE_LIMITED") {
            assert_eq!(status.code(), tonic::Code::ResourceExhausted);
            limited += 1;
        } else {
            assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
            reached_auth += 1;
        }
    }
    (reached_auth, limited, started.elapsed())
}

/// What a GCRA limit of CLIENT_RATE per second with a burst of CLIENT_RATE may let through in
/// `elapsed` (the burst plus what refilled meanwhile).
fn most_allowed_per_client(elapsed: Duration) -> usize {
    CLIENT_RATE + (elapsed.as_secs_f64() * CLIENT_RATE as f64).ceil() as usize
}

async fn fallback_count(mesh: &medai_e2e::MeshUnderTest) -> u64 {
    let metrics = medai_e2e::http_get(
        mesh.mesh.admin_address("gateway").expect("gateway admin"),
        "/metrics",
    )
    .await;
    metrics
        .lines()
        .find_map(|line| line.strip_prefix("medai_gateway_rate_limit_fallback_total "))
        .and_then(|value| value.trim().parse::<f64>().ok())
        .map_or(0, |value| value as u64)
}

/// What the gateway answers `token` (a cheap authorised call: an unknown result).
async fn token_answer(client: &mut medai_cli::client::GatewayClient, token: &str) -> String {
    let status = client
        .get_result(authorised(
            gw::GetResultRequest {
                result_id: uuid::Uuid::new_v4().to_string(),
            },
            token,
        ))
        .await
        .expect_err("no such result");
    medai_runtime::errors::reason_of(&status).unwrap_or_else(|| format!("{:?}", status.code()))
}

#[tokio::test]
async fn a_redis_restart_without_persistence_loses_no_revocation_and_rate_limits_fall_back_and_recover()
 {
    let mut redis = tokio::task::spawn_blocking(medai_testkit::PrivateRedis::start)
        .await
        .expect("redis");
    let url = redis.url();
    let revocation = |prefix: &str| {
        vec![
            (format!("{prefix}REVOCATION__MODE"), "production".to_owned()),
            (format!("{prefix}REVOCATION__REDIS_URL"), url.clone()),
        ]
    };
    let mut gateway_environment = revocation("MEDAI_GATEWAY_");
    gateway_environment.extend([
        (
            "MEDAI_GATEWAY_REVOCATION__NOT_REVOKED_CACHE_MS".to_owned(),
            "0".to_owned(),
        ),
        (
            "MEDAI_GATEWAY_LOAD_CONTROL__REDIS_URL".to_owned(),
            url.clone(),
        ),
        (
            "MEDAI_GATEWAY_LOAD_CONTROL__PER_CLIENT_PER_SECOND".to_owned(),
            CLIENT_RATE.to_string(),
        ),
        (
            "MEDAI_GATEWAY_LOAD_CONTROL__PER_CLIENT_BURST".to_owned(),
            CLIENT_RATE.to_string(),
        ),
    ]);
    let mesh = medai_e2e::MeshUnderTest::start_with(
        medai_e2e::Storage::Postgres,
        std::collections::BTreeMap::from([
            ("gateway".to_owned(), gateway_environment),
            ("auth".to_owned(), revocation("MEDAI_AUTH_")),
        ]),
    )
    .await;
    let admin = mesh.admin_token().await;
    let mut client = mesh.gateway().await;
    // A second session of the admin's, logged out: its access token is revoked.
    let revoked = mesh.admin_token().await;
    client
        .logout(authorised(gw::LogoutRequest::default(), &revoked))
        .await
        .expect("logout");
    assert_eq!(token_answer(&mut client, &revoked).await, "TOKEN_REVOKED");
    assert_eq!(token_answer(&mut client, &admin).await, "RESULT_NOT_FOUND");
    assert_eq!(fallback_count(&mesh).await, 0);

    // The client spends its burst while Redis decides: the burst and what refilled while it was
    // decided, which takes a while under load. A call Redis does not answer within the
    // gateway's 100 ms (a starved Redis) is decided by the gateway's own account instead, which
    // every call is charged to before Redis is asked, so the calls still waiting for Redis
    // count there and the burst is not given twice. (What refills later counts from the
    // burst's start, not its end.)
    let burst_started = Instant::now();
    let (reached_auth, limited, elapsed) = refresh_burst(&mut client, 3 * CLIENT_RATE).await;
    let fell_back_in_burst = fallback_count(&mesh).await;
    assert!(
        reached_auth <= most_allowed_per_client(elapsed) && limited > 0,
        "with Redis up: {reached_auth} reached auth, {limited} limited in {elapsed:?}, \
         {fell_back_in_burst} decided without Redis"
    );

    // Redis dies and loses every key.
    redis = tokio::task::spawn_blocking(move || {
        redis.kill_hard();
        redis
    })
    .await
    .expect("kill redis");
    // ... and does not get it again from the gateway deciding alone: only what refilled since.
    let (reached_auth, limited, _) = refresh_burst(&mut client, 3 * CLIENT_RATE).await;
    let refilled = (burst_started.elapsed().as_secs_f64() * CLIENT_RATE as f64).ceil() as usize;
    assert!(
        reached_auth <= refilled + 1 && limited > 0,
        "right after Redis died: {reached_auth} reached auth, {limited} limited, \
         {refilled} refilled"
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // Tokens are not trusted while revocations cannot be checked (production fails closed) ...
    assert_eq!(
        token_answer(&mut client, &admin).await,
        "REVOCATION_UNAVAILABLE"
    );
    // ... and the rate limit holds, counted in this process.
    let (reached_auth, limited, elapsed) = refresh_burst(&mut client, 3 * CLIENT_RATE).await;
    assert!(
        (CLIENT_RATE..=most_allowed_per_client(elapsed)).contains(&reached_auth) && limited > 0,
        "with Redis down: {reached_auth} reached auth, {limited} limited in {elapsed:?}"
    );
    let fell_back = fallback_count(&mesh).await;
    assert!(fell_back > 0, "the fallback was not counted");

    // Redis comes back empty. Auth writes the revocations back from its database; until then
    // the gateway keeps refusing with REVOCATION_UNAVAILABLE, never vouching for a token.
    let redis_back = Instant::now();
    let redis = tokio::task::spawn_blocking(move || {
        redis.start_again();
        redis
    })
    .await
    .expect("restart redis");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let answer = token_answer(&mut client, &admin).await;
        if answer == "RESULT_NOT_FOUND" {
            break;
        }
        assert!(
            ["REVOCATION_UNAVAILABLE", "RATE_LIMITED"].contains(&answer.as_str()),
            "while Redis is reseeded: {answer}"
        );
        assert!(Instant::now() < deadline, "tokens never trusted again");
        // Polls at half the client rate, so the poll itself is not rate limited.
        tokio::time::sleep(Duration::from_millis(2000 / CLIENT_RATE as u64)).await;
    }
    let trusted_again = redis_back.elapsed();
    assert_eq!(
        token_answer(&mut client, &revoked).await,
        "TOKEN_REVOKED",
        "the revocation was lost with Redis"
    );

    // The rate limit is kept in Redis again: a call is decided without falling back (the
    // counter stays put across it) and the limiter's key is in the restarted Redis.
    let redis = Arc::new(redis);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let before = fallback_count(&mesh).await;
        let _refused = client
            .refresh(gw::RefreshRequest {
                refresh_token: "not a refresh token".to_owned(),
            })
            .await;
        let decided_in_redis = fallback_count(&mesh).await == before;
        let scan = redis.clone();
        let keys = tokio::task::spawn_blocking(move || {
            scan.cli(&["--scan", "--pattern", "medai:ratelimit:*"])
        })
        .await
        .expect("scan");
        if decided_in_redis && !keys.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the rate limit never went back to Redis"
        );
        tokio::time::sleep(Duration::from_millis(2000 / CLIENT_RATE as u64)).await;
    }
    let limits_in_redis_again = redis_back.elapsed();
    // And it limits at its rate there (after a second's refill).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (reached_auth, limited, elapsed) = refresh_burst(&mut client, 3 * CLIENT_RATE).await;
    assert!(
        (CLIENT_RATE..=most_allowed_per_client(elapsed)).contains(&reached_auth) && limited > 0,
        "with Redis back: {reached_auth} reached auth, {limited} limited in {elapsed:?}"
    );
    mesh.stop().await;
    eprintln!(
        "REDIS RESTART FIGURES: tokens trusted again {:.2} s after an empty Redis came back \
         (revocations reseeded from auth's database); {fell_back} rate-limit decisions made \
         in-process while it was down; rate limits decided in Redis again after {:.2} s",
        trusted_again.as_secs_f64(),
        limits_in_redis_again.as_secs_f64()
    );
}

/// The short form of `scripts/chaos.sh`: under a steady load of predictions, study streams,
/// logins and signatures, each service in turn is killed (-9) and comes back under its
/// supervisor. No prediction is delivered without its ledger record, the chain verifies after
/// every fault, and predictions succeed again within the recovery limit. (SIGTERM of each
/// service, and the database, Redis, network and disk faults, are in the long form: it takes
/// minutes.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_service_killed_under_load_delivers_no_prediction_without_its_record() {
    let started = Instant::now();
    let faults: Vec<medai_e2e::chaos::Fault> = medai_cli::launcher::SERVICES
        .iter()
        .map(|&service| medai_e2e::chaos::Fault::Kill(service))
        .collect();
    let reports = medai_e2e::chaos::run_faults(&faults, 1, Duration::from_millis(500)).await;
    assert_eq!(reports.len(), faults.len());
    let mut delivered = 0;
    for report in &reports {
        assert_eq!(
            report.unrecorded, 0,
            "{}: predictions delivered without their ledger record",
            report.fault
        );
        assert!(
            report.chain_intact,
            "{}: the chain does not verify",
            report.fault
        );
        delivered += report.window.predictions.len();
    }
    assert!(delivered > 0, "the load delivered no prediction at all");
    eprintln!(
        "CHAOS SHORT FORM: {} faults, {delivered} predictions delivered, all recorded, in {:.1} s",
        reports.len(),
        started.elapsed().as_secs_f64()
    );
}
