//! The bridge's Storage SCP driven by dcmtk's `echoscu` and `storescu` (Debian dcmtk, installed
//! by scripts/pacs-tools.sh): association acceptance by AE title, C-ECHO, C-STORE acknowledged
//! only once the instance and its UIDs are committed to the outbox, resends kept once, and an
//! oversized instance refused without being stored. No mesh: the gateway is unreachable here,
//! so instances stay in the outbox.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Output;

use dicom_dictionary_std::tags;
use medai_bridge::config::BridgeConfig;
use medai_bridge::outbox::{Outbox, state};
use medai_bridge::{BridgeListeners, serve};
use medai_testkit::{Assets, sqlite_url};

struct BridgeUnderTest {
    address: SocketAddr,
    outbox: Outbox,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
    _state: tempfile::TempDir,
}

fn bridge_config(state: &Path, max_instance_bytes: usize) -> BridgeConfig {
    let text = format!(
        r#"
dicom_listen_addr = "127.0.0.1:0"
database_url = "{database}"
uid_root = "1.2.826.0.1.3680043.10.1234"
study_quiet_period_ms = 3600000
[scp]
ae_title = "MEDAI_BRIDGE"
allowed_calling_ae_titles = ["STORESCU", "ORTHANC"]
max_instance_bytes = {max_instance_bytes}
[gateway]
endpoint = "https://127.0.0.1:9"
ca_certificate = "{state}/absent-ca.pem"
username = "bridge"
password = "unused here"
model_name = "synthetic-light"
[results]
address = "127.0.0.1:9"
ae_title = "ORTHANC"
"#,
        database = sqlite_url(state, "bridge.db"),
        state = state.display(),
    );
    medai_runtime::config::load_config("MEDAI_BRIDGE_", Some(&text), &Default::default())
        .expect("valid bridge config")
}

impl BridgeUnderTest {
    async fn start(max_instance_bytes: usize) -> Self {
        let state = tempfile::tempdir().expect("state dir");
        let config = bridge_config(state.path(), max_instance_bytes);
        let dicom = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = dicom.local_addr().expect("address");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let outbox = Outbox::open(&config.database_url).await.expect("outbox");
        let task = tokio::spawn(async move {
            serve(config, BridgeListeners { dicom }, async move {
                let _ = stopped.await;
            })
            .await
            .expect("bridge serves");
        });
        Self {
            address,
            outbox,
            stop: Some(stop),
            task,
            _state: state,
        }
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.await.expect("bridge task");
    }
}

async fn dcmtk(tool: &str, arguments: &[&str]) -> Output {
    tokio::process::Command::new(tool)
        .args(arguments)
        .output()
        .await
        .unwrap_or_else(|error| panic!("{tool} cannot run ({error}): run scripts/pacs-tools.sh"))
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

async fn echo(bridge: &BridgeUnderTest, calling: &str, called: &str) -> Output {
    let port = bridge.address.port().to_string();
    dcmtk(
        "echoscu",
        &["-aet", calling, "-aec", called, "127.0.0.1", &port],
    )
    .await
}

async fn store(bridge: &BridgeUnderTest, calling: &str, files: &[&Path]) -> Output {
    let port = bridge.address.port().to_string();
    let mut arguments = vec!["-aet", calling, "-aec", "MEDAI_BRIDGE", "127.0.0.1", &port];
    let paths: Vec<String> = files
        .iter()
        .map(|file| file.display().to_string())
        .collect();
    arguments.extend(paths.iter().map(String::as_str));
    dcmtk("storescu", &arguments).await
}

#[tokio::test]
async fn echo_from_an_allowed_ae_succeeds_and_unknown_calling_or_called_titles_are_rejected() {
    let bridge = BridgeUnderTest::start(64 * 1024 * 1024).await;

    let allowed = echo(&bridge, "STORESCU", "MEDAI_BRIDGE").await;
    assert!(allowed.status.success(), "{}", text(&allowed));

    let intruder = echo(&bridge, "INTRUDER", "MEDAI_BRIDGE").await;
    assert!(!intruder.status.success(), "{}", text(&intruder));
    assert!(
        text(&intruder).contains("Calling AE Title Not Recognized"),
        "{}",
        text(&intruder)
    );

    let wrong_called = echo(&bridge, "STORESCU", "SOMEONE_ELSE").await;
    assert!(!wrong_called.status.success(), "{}", text(&wrong_called));
    assert!(
        text(&wrong_called).contains("Called AE Title Not Recognized"),
        "{}",
        text(&wrong_called)
    );
    bridge.stop().await;
}

#[tokio::test]
async fn a_stored_instance_is_committed_with_its_uids_before_it_is_acknowledged_and_a_resend_is_kept_once()
 {
    let bridge = BridgeUnderTest::start(64 * 1024 * 1024).await;
    let assets = Assets::locate();
    let ct = assets.dicom_dir.join("CT_small.dcm");
    let mr = assets.dicom_dir.join("MR_small.dcm");

    let sent = store(&bridge, "STORESCU", &[&ct, &mr]).await;
    assert!(sent.status.success(), "{}", text(&sent));
    // Read at once, no waiting: storescu saw success only after the rows were committed.
    let rows = bridge.outbox.all().await.expect("outbox rows");
    assert_eq!(
        rows.len(),
        2,
        "both instances stored before the acknowledgements"
    );
    for (row, file) in rows.iter().zip([&ct, &mr]) {
        let source = dicom_object::open_file(file).expect("source file");
        let uid = |tag| {
            source
                .element(tag)
                .expect("uid")
                .to_str()
                .expect("text")
                .trim_end_matches('\0')
                .to_owned()
        };
        let row = rows
            .iter()
            .find(|candidate| candidate.sop_instance_uid == uid(tags::SOP_INSTANCE_UID))
            .unwrap_or_else(|| {
                panic!(
                    "{} not stored (have {:?})",
                    file.display(),
                    row.sop_instance_uid
                )
            });
        assert_eq!(row.sop_class_uid, uid(tags::SOP_CLASS_UID));
        assert_eq!(row.series_instance_uid, uid(tags::SERIES_INSTANCE_UID));
        assert_eq!(row.study_instance_uid, uid(tags::STUDY_INSTANCE_UID));
        assert_eq!(row.calling_ae_title, "STORESCU");
        assert_eq!(row.state, state::RECEIVED);
        // The tag the mesh will see carries none of the UIDs.
        assert!(!row.tag.contains(&row.study_instance_uid));
        // The stored Part 10 file reads back as the same instance with the same pixels.
        let stored = dicom_object::OpenFileOptions::new()
            .read_preamble(dicom_object::file::ReadPreamble::Always)
            .from_reader(row.dicom.as_slice())
            .expect("stored instance parses");
        assert_eq!(
            stored
                .element(tags::PIXEL_DATA)
                .expect("pixels")
                .to_bytes()
                .expect("bytes"),
            source
                .element(tags::PIXEL_DATA)
                .expect("pixels")
                .to_bytes()
                .expect("bytes")
        );
    }

    let resent = store(&bridge, "STORESCU", &[&ct]).await;
    assert!(resent.status.success(), "{}", text(&resent));
    let after = bridge.outbox.all().await.expect("outbox rows");
    assert_eq!(after.len(), 2, "a resent instance is kept once");
    assert_eq!(
        after.iter().map(|row| &row.tag).collect::<Vec<_>>(),
        rows.iter().map(|row| &row.tag).collect::<Vec<_>>(),
        "the first copy and its tag are kept"
    );
    bridge.stop().await;
}

#[tokio::test]
async fn an_instance_above_the_size_limit_aborts_the_association_and_nothing_is_stored() {
    let bridge = BridgeUnderTest::start(4096).await;
    let mr = Assets::locate().dicom_dir.join("MR_small.dcm");
    assert!(std::fs::metadata(&mr).expect("file").len() > 4096);

    let sent = store(&bridge, "STORESCU", &[&mr]).await;
    assert!(!sent.status.success(), "{}", text(&sent));
    assert!(bridge.outbox.all().await.expect("rows").is_empty());
    // The bridge is still serving.
    let echo = echo(&bridge, "STORESCU", "MEDAI_BRIDGE").await;
    assert!(echo.status.success(), "{}", text(&echo));
    bridge.stop().await;
}
