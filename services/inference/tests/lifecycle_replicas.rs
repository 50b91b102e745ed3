//! Lifecycle state every inference replica agrees on (issue 13): two inference servers on one
//! real PostgreSQL database and one real audit service. A change made through one is served by
//! the other within the poll bound; two changes racing on the two replicas cannot both win;
//! the model repository is never written, so a read-only one takes every lifecycle RPC.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use medai_inference::config::RuntimeSettings;
use medai_inference::lifecycle_store::{LifecycleStore, LifecycleStoreError};
use medai_inference::manifest::ModelStatus;
use medai_proto::inference::v1::inference_service_client::InferenceServiceClient;
use medai_proto::inference::v1::{
    ActivateModelVersionRequest, ListModelsRequest, ModelChange, RetireModelVersionRequest,
    RollbackModelRequest, StageModelVersionRequest,
};
use medai_proto::kserve::grpc_inference_service_client::GrpcInferenceServiceClient;
use medai_proto::kserve::{ModelMetadataRequest, ModelReadyRequest};
use medai_runtime::errors::reason_of;
use medai_testkit::{TestServer, fresh_postgres_database};
use sea_orm::{ConnectionTrait, Database, DatabaseBackend, DatabaseConnection, Statement};
use support::{Harness, LIGHT, add_light_version, grey_image, light_repository};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tonic::Code;
use tonic::transport::Channel;

/// The longest a replica may take to serve a change made through another: the one-second
/// poll, plus loading the light model, with room for a loaded two-core machine.
const AGREEMENT_BOUND: Duration = Duration::from_secs(10);

fn change(version: &str) -> Option<ModelChange> {
    Some(ModelChange {
        model_name: LIGHT.to_owned(),
        model_version: version.to_owned(),
        reason: "CHG-2001 replica agreement".to_owned(),
    })
}

fn activate(version: &str) -> ActivateModelVersionRequest {
    ActivateModelVersionRequest {
        change: change(version),
    }
}

fn inference_client(harness: &Harness, server: &TestServer) -> InferenceServiceClient<Channel> {
    InferenceServiceClient::new(
        harness
            .pki
            .channel_as("operator", server.address, "inference"),
    )
}

fn kserve_client(harness: &Harness, server: &TestServer) -> GrpcInferenceServiceClient<Channel> {
    GrpcInferenceServiceClient::new(
        harness
            .pki
            .channel_as("operator", server.address, "inference"),
    )
}

/// (version, status, ready) of every listed version.
async fn listing(client: &mut InferenceServiceClient<Channel>) -> Vec<(String, String, bool)> {
    client
        .list_models(ListModelsRequest {})
        .await
        .expect("list")
        .into_inner()
        .versions
        .into_iter()
        .map(|info| (info.version, info.status, info.ready))
        .collect()
}

async fn model_ready(kserve: &mut GrpcInferenceServiceClient<Channel>, version: &str) -> bool {
    kserve
        .model_ready(ModelReadyRequest {
            name: LIGHT.to_owned(),
            version: version.to_owned(),
        })
        .await
        .expect("model ready")
        .into_inner()
        .ready
}

/// Polls the replica's KServe readiness until `version` is the one it serves; the time taken.
async fn time_until_ready(
    kserve: &mut GrpcInferenceServiceClient<Channel>,
    version: &str,
) -> Duration {
    let began = Instant::now();
    while !model_ready(kserve, version).await {
        assert!(
            began.elapsed() < AGREEMENT_BOUND,
            "the other replica did not serve version {version} within {AGREEMENT_BOUND:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    began.elapsed()
}

/// Every way a client asks which version is served, on one replica.
async fn served_everywhere(
    client: &mut InferenceServiceClient<Channel>,
    kserve: &mut GrpcInferenceServiceClient<Channel>,
    gateway: &mut InferenceServiceClient<Channel>,
) -> (Vec<String>, Vec<String>, String) {
    let listed = listing(client)
        .await
        .into_iter()
        .filter(|(_, status, ready)| status == "ACTIVE" && *ready)
        .map(|(version, _, _)| version)
        .collect();
    let metadata = kserve
        .model_metadata(ModelMetadataRequest {
            name: LIGHT.to_owned(),
            version: String::new(),
        })
        .await
        .expect("metadata")
        .into_inner()
        .versions;
    let predicted = gateway
        .predict(support::predict(LIGHT, grey_image(64, 5)))
        .await
        .expect("predict")
        .into_inner()
        .model_version;
    (listed, metadata, predicted)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_change_through_one_replica_is_served_by_the_other_within_the_poll_bound() {
    let repository = light_repository(&[("1", "active"), ("2", "staged")]);
    let harness = Harness::start(repository.path(), RuntimeSettings::default()).await;
    let second = Harness::start_inference(&harness.pki, harness.config.clone()).await;
    let (first, second) = (&harness.inference, &second);
    let mut first_client = inference_client(&harness, first);
    let mut second_kserve = kserve_client(&harness, second);
    let mut second_client = inference_client(&harness, second);
    let mut second_gateway = InferenceServiceClient::new(harness.pki.channel_as(
        "gateway",
        second.address,
        "inference",
    ));
    assert!(model_ready(&mut second_kserve, "1").await);

    first_client
        .activate_model_version(activate("2"))
        .await
        .expect("activate 2 through the first replica");
    let seen_after = time_until_ready(&mut second_kserve, "2").await;
    eprintln!(
        "the second replica served version 2 {:.0} ms after the first replica activated it",
        seen_after.as_secs_f64() * 1000.0
    );
    assert!(!model_ready(&mut second_kserve, "1").await);
    assert_eq!(
        served_everywhere(&mut second_client, &mut second_kserve, &mut second_gateway).await,
        (vec!["2".to_owned()], vec!["2".to_owned()], "2".to_owned())
    );
    assert_eq!(
        listing(&mut first_client).await,
        listing(&mut second_client).await
    );

    // And back the other way: a rollback through the second replica reaches the first.
    second_client
        .rollback_model(RollbackModelRequest { change: change("") })
        .await
        .expect("roll back through the second replica");
    let mut first_kserve = kserve_client(&harness, first);
    let seen_after = time_until_ready(&mut first_kserve, "1").await;
    eprintln!(
        "the first replica served version 1 {:.0} ms after the second replica rolled back",
        seen_after.as_secs_f64() * 1000.0
    );
    let mut first_gateway = InferenceServiceClient::new(harness.pki.channel_as(
        "gateway",
        first.address,
        "inference",
    ));
    assert_eq!(
        served_everywhere(&mut first_client, &mut first_kserve, &mut first_gateway).await,
        (vec!["1".to_owned()], vec!["1".to_owned()], "1".to_owned())
    );

    // The database, not the manifests, is the record: activate 2 again and start a third
    // replica; the manifests still name 1 active, and it serves 2 at once.
    first_client
        .activate_model_version(activate("2"))
        .await
        .expect("activate 2 again");
    let third = Harness::start_inference(&harness.pki, harness.config.clone()).await;
    let mut third_kserve = kserve_client(&harness, &third);
    assert!(model_ready(&mut third_kserve, "2").await);
    assert_eq!(support::manifest_status(repository.path(), "1"), "active");

    let recorded: Vec<(String, String)> = harness
        .ledger()
        .await
        .into_iter()
        .map(|(_, action, resource, _)| (action, resource))
        .collect();
    assert_eq!(
        recorded,
        [
            ("MODEL_ACTIVATE", "model/synthetic-light/2"),
            ("MODEL_ROLLBACK", "model/synthetic-light/1"),
            ("MODEL_ACTIVATE", "model/synthetic-light/2"),
        ]
        .map(|(action, resource)| (action.to_owned(), resource.to_owned()))
    );
    third.stop().await;
}

/// A TCP relay whose client-to-server direction can be held: bytes read while it is closed are
/// written only once it opens again. Placed between an inference replica and audit, it holds
/// that replica's ledger call (and with it the replica's lifecycle transaction) open.
async fn pausable_relay(upstream: SocketAddr) -> (SocketAddr, watch::Sender<bool>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("relay listener");
    let address = listener.local_addr().expect("relay address");
    let (open, _) = watch::channel(true);
    let gate = open.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                continue;
            };
            let mut gate = gate.subscribe();
            tokio::spawn(async move {
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                let upward = async move {
                    let mut buffer = vec![0u8; 16 * 1024];
                    loop {
                        let read = client_read.read(&mut buffer).await?;
                        if read == 0 {
                            return server_write.shutdown().await;
                        }
                        if gate.wait_for(|open| *open).await.is_err() {
                            return Ok(());
                        }
                        server_write.write_all(&buffer[..read]).await?;
                    }
                };
                let downward = tokio::io::copy(&mut server_read, &mut client_write);
                let _: (std::io::Result<()>, std::io::Result<u64>) = tokio::join!(upward, downward);
            });
        }
    });
    (address, open)
}

/// Whether a transaction still in progress has locked or written the model's lifecycle row,
/// seen without taking any lock: the row version this session sees carries that transaction's
/// id as its `xmax`, and the transaction still holds the lock on its own id. (A probe that
/// locked the row itself, even for a moment, would make the change it waits for meet a locked
/// row and be refused with LIFECYCLE_CONFLICT: the flake of session 9.) An `xmax` left by a
/// transaction that has ended, committed or rolled back, holds no lock and reads as unlocked.
async fn row_is_locked(database: &DatabaseConnection) -> bool {
    database
        .query_one_raw(Statement::from_sql_and_values(
            DatabaseBackend::Postgres,
            "SELECT EXISTS (SELECT 1 FROM model_lifecycle AS lifecycle JOIN pg_locks AS held \
             ON held.locktype = 'transactionid' AND held.transactionid = lifecycle.xmax \
             AND held.granted WHERE lifecycle.model_name = $1) AS locked",
            [LIGHT.into()],
        ))
        .await
        .expect("probe the row")
        .expect("one row")
        .try_get("", "locked")
        .expect("locked")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn of_two_changes_racing_on_two_replicas_exactly_one_wins_and_the_other_gets_lifecycle_conflict()
 {
    let repository = light_repository(&[("1", "active"), ("2", "staged"), ("3", "staged")]);
    let harness = Harness::start(repository.path(), RuntimeSettings::default()).await;
    // The first replica reaches audit through a relay the test can hold.
    let audit_address = harness.audit.as_ref().expect("audit").address;
    let (relay, relay_open) = pausable_relay(audit_address).await;
    let mut held_config = harness.config.clone();
    held_config.audit_endpoint = format!("https://{relay}");
    let first = Harness::start_inference(&harness.pki, held_config).await;
    let second = &harness.inference;
    let mut first_client = inference_client(&harness, &first);
    let mut second_client = inference_client(&harness, second);
    // One recorded change warms the first replica's connection to audit through the relay.
    add_light_version(repository.path(), "4", "staged");
    first_client
        .stage_model_version(StageModelVersionRequest {
            change: change("4"),
        })
        .await
        .expect("stage 4 through the first replica");

    // The test watches the model's row from a session of its own that never locks it.
    let observer = Database::connect(harness.config.database_url.as_str())
        .await
        .expect("connect");
    assert!(
        !row_is_locked(&observer).await,
        "the row is locked before the change"
    );

    // The first replica's activation of 2 is planned and written, and waits on the ledger
    // while it holds the model's row.
    relay_open.send_replace(false);
    let racing = {
        let mut client = first_client.clone();
        tokio::spawn(async move { client.activate_model_version(activate("2")).await })
    };
    let began = Instant::now();
    while !row_is_locked(&observer).await {
        assert!(
            began.elapsed() < Duration::from_secs(30),
            "the first replica's change never took the row"
        );
        if racing.is_finished() {
            let answer = racing.await.expect("racing task");
            panic!(
                "the held change finished early: {:?}",
                answer
                    .map(|response| response.into_inner())
                    .map_err(|status| (
                        status.code(),
                        reason_of(&status),
                        status.message().to_owned()
                    ))
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Meanwhile every change through the second replica is refused at once with the stable
    // code, and nothing of it is recorded.
    let asked = Instant::now();
    let status = second_client
        .activate_model_version(activate("3"))
        .await
        .expect_err("a concurrent change must not also win");
    let refused_after = asked.elapsed();
    assert_eq!(
        (status.code(), reason_of(&status).as_deref()),
        (Code::Aborted, Some("LIFECYCLE_CONFLICT"))
    );
    let status = second_client
        .retire_model_version(RetireModelVersionRequest {
            change: change("2"),
        })
        .await
        .expect_err("a concurrent retirement must not win either");
    assert_eq!(reason_of(&status).as_deref(), Some("LIFECYCLE_CONFLICT"));
    eprintln!(
        "the concurrent change was refused after {:.0} ms",
        refused_after.as_secs_f64() * 1000.0
    );

    // The held change completes once the ledger answers; it is the one that won.
    relay_open.send_replace(true);
    let won = racing
        .await
        .expect("racing task")
        .expect("the first change wins")
        .into_inner()
        .outcome
        .expect("outcome")
        .changed
        .expect("changed");
    assert_eq!((won.version.as_str(), won.status.as_str()), ("2", "ACTIVE"));
    assert!(
        !row_is_locked(&observer).await,
        "the committed change left the row locked"
    );
    let mut second_kserve = kserve_client(&harness, second);
    time_until_ready(&mut second_kserve, "2").await;

    // Asked again, the second replica decides on the state that won.
    second_client
        .activate_model_version(activate("3"))
        .await
        .expect("activate 3 on the current state");
    let mut first_kserve = kserve_client(&harness, &first);
    time_until_ready(&mut first_kserve, "3").await;
    let recorded: Vec<(String, String)> = harness
        .ledger()
        .await
        .into_iter()
        .map(|(_, action, resource, _)| (action, resource))
        .collect();
    assert_eq!(
        recorded,
        [
            ("MODEL_STAGE", "model/synthetic-light/4"),
            ("MODEL_ACTIVATE", "model/synthetic-light/2"),
            ("MODEL_ACTIVATE", "model/synthetic-light/3"),
        ]
        .map(|(action, resource)| (action.to_owned(), resource.to_owned()))
    );
    first.stop().await;
}

/// Optimistic concurrency in the store itself, on both backends: a change planned from a
/// revision another change has moved past is a conflict, and so is one made while another
/// is in flight; a rolled-back change leaves the row as it was.
#[tokio::test]
async fn the_store_refuses_a_change_planned_from_a_stale_revision_on_postgres_and_sqlite() {
    let sqlite_folder = tempfile::tempdir().expect("tempdir");
    let sqlite_url = format!(
        "sqlite://{}?mode=rwc",
        sqlite_folder.path().join("inference.sqlite").display()
    );
    for url in [fresh_postgres_database().await, sqlite_url] {
        let open = || async {
            medai_inference::results::ResultsStore::connect(&url)
                .await
                .expect("connect and migrate")
        };
        let first = LifecycleStore::new(open().await.connection());
        let second = LifecycleStore::new(open().await.connection());
        let seeded: BTreeMap<String, ModelStatus> = [
            ("1".to_owned(), ModelStatus::Active),
            ("2".to_owned(), ModelStatus::Staged),
        ]
        .into();
        assert!(
            first
                .seed(LIGHT, &seeded, &["1".to_owned()])
                .await
                .expect("seed")
        );
        assert!(!second.seed(LIGHT, &seeded, &[]).await.expect("seed again"));
        let base = second.load(LIGHT).await.expect("load").expect("row");
        assert_eq!(base.revision, 1);

        let mut activated = seeded.clone();
        activated.insert("1".to_owned(), ModelStatus::Staged);
        activated.insert("2".to_owned(), ModelStatus::Active);
        let history = ["1".to_owned(), "2".to_owned()];
        let pending = first
            .begin_change(
                LIGHT,
                base.revision,
                &activated,
                &history,
                &Default::default(),
            )
            .await
            .expect("first change");
        if url.starts_with("postgres") {
            // In flight: the second writer is refused at once rather than made to wait.
            let refused = second
                .begin_change(LIGHT, base.revision, &seeded, &[], &Default::default())
                .await;
            assert!(
                matches!(refused, Err(LifecycleStoreError::Conflict { .. })),
                "{url}: {:?}",
                refused.err()
            );
        }
        assert_eq!(pending.commit(7).await.expect("commit"), 2);
        let now = second.load(LIGHT).await.expect("load").expect("row");
        assert_eq!((now.revision, now.active()), (2, Some("2")));

        // Planned from revision 1, which is gone.
        let stale = second
            .begin_change(LIGHT, base.revision, &seeded, &[], &Default::default())
            .await;
        assert!(
            matches!(stale, Err(LifecycleStoreError::Conflict { .. })),
            "{url}: {:?}",
            stale.err()
        );
        // A rolled-back change (the ledger did not record it) leaves nothing behind.
        let pending = second
            .begin_change(LIGHT, now.revision, &seeded, &[], &Default::default())
            .await
            .expect("change from the current revision");
        pending.roll_back().await;
        assert_eq!(first.load(LIGHT).await.expect("load").expect("row"), now);
        assert_eq!(first.revisions().await.expect("revisions")[LIGHT], 2);
    }
}

/// Every file under `root` with its bytes, permissions and modification time.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, (Vec<u8>, u32, std::time::SystemTime)> {
    use std::os::unix::fs::PermissionsExt;
    let mut files = BTreeMap::new();
    let mut folders = vec![root.to_owned()];
    while let Some(folder) = folders.pop() {
        for entry in std::fs::read_dir(&folder).expect("read folder") {
            let path = entry.expect("entry").path();
            let metadata = std::fs::metadata(&path).expect("metadata");
            let modified = metadata.modified().expect("mtime");
            let mode = metadata.permissions().mode();
            if metadata.is_dir() {
                files.insert(path.clone(), (Vec::new(), mode, modified));
                folders.push(path);
            } else {
                files.insert(
                    path.clone(),
                    (std::fs::read(&path).expect("read"), mode, modified),
                );
            }
        }
    }
    files
}

fn make_read_only(root: &Path) {
    use std::os::unix::fs::PermissionsExt;
    for (path, (_, mode, _)) in snapshot(root) {
        let read_only = mode & 0o555;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(read_only)).expect("chmod");
    }
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o555)).expect("chmod root");
}

fn make_writable(root: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755)).expect("chmod root");
    for (path, _) in snapshot(root) {
        let mode = if path.is_dir() { 0o755 } else { 0o644 };
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }
}

#[tokio::test]
async fn every_lifecycle_rpc_works_on_a_read_only_model_repository_and_writes_nothing_there() {
    let repository = light_repository(&[("1", "active")]);
    let harness = Harness::start(repository.path(), RuntimeSettings::default()).await;
    let mut operator = harness.client_as("operator");
    // A new version arrives as an immutable artifact; then nothing under the root is writable
    // (modes a-w; the snapshot below also catches writes by a process that ignores modes).
    add_light_version(repository.path(), "2", "staged");
    make_read_only(repository.path());
    let before = snapshot(repository.path());

    operator
        .stage_model_version(StageModelVersionRequest {
            change: change("2"),
        })
        .await
        .expect("stage on a read-only repository");
    operator
        .activate_model_version(activate("2"))
        .await
        .expect("activate on a read-only repository");
    operator
        .rollback_model(RollbackModelRequest { change: change("") })
        .await
        .expect("roll back on a read-only repository");
    operator
        .retire_model_version(RetireModelVersionRequest {
            change: change("2"),
        })
        .await
        .expect("retire on a read-only repository");
    assert_eq!(
        listing(&mut operator).await,
        [
            ("1".to_owned(), "ACTIVE".to_owned(), true),
            ("2".to_owned(), "RETIRED".to_owned(), false)
        ]
    );
    let after = snapshot(repository.path());
    make_writable(repository.path());
    assert!(
        before == after,
        "the model repository changed: {:?}",
        after
            .keys()
            .filter(|path| before.get(*path) != after.get(*path))
            .chain(before.keys().filter(|path| !after.contains_key(*path)))
            .collect::<Vec<_>>()
    );
    let actions: Vec<String> = harness
        .ledger()
        .await
        .into_iter()
        .map(|(_, action, _, _)| action)
        .collect();
    assert_eq!(
        actions,
        [
            "MODEL_STAGE",
            "MODEL_ACTIVATE",
            "MODEL_ROLLBACK",
            "MODEL_RETIRE"
        ]
    );
}
