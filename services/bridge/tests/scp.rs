//! The bridge's Storage SCP driven by dcmtk's `echoscu` and `storescu` (Debian dcmtk, installed
//! by scripts/pacs-tools.sh): association acceptance by AE title, C-ECHO, C-STORE acknowledged
//! only once the instance and its UIDs are committed to the outbox, resends kept once, and an
//! oversized instance refused without being stored. No mesh: the gateway is unreachable here,
//! so instances stay in the outbox.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Output;

use dicom_dictionary_std::tags;
use medai_bridge::config::{BridgeConfig, ResultDestination};
use medai_bridge::delivery::ReportDelivery;
use medai_bridge::dicom_tls::{DestinationTls, ScpTls};
use medai_bridge::outbox::{NewInstance, Outbox, StoredInstance, now_ms, state};
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
        Self::start_configured(|config| config.scp.max_instance_bytes = max_instance_bytes).await
    }

    async fn start_configured(configure: impl FnOnce(&mut BridgeConfig)) -> Self {
        let state = tempfile::tempdir().expect("state dir");
        let mut config = bridge_config(state.path(), 64 * 1024 * 1024);
        configure(&mut config);
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

// --- DICOM TLS (PS3.15 Annex B) on the listener and to the report destination ---

fn scp_tls(pki: &medai_testkit::TestPki, require_client_certificate: bool) -> ScpTls {
    let files = pki.files("gateway");
    ScpTls {
        ca_certificate: files.ca_cert,
        certificate: files.cert,
        key: files.key,
        require_client_certificate,
    }
}

/// dcmtk's TLS options presenting `identity`'s certificate and trusting the test CA.
fn dcmtk_tls(pki: &medai_testkit::TestPki, identity: &str) -> Vec<String> {
    let files = pki.files(identity);
    vec![
        "+tls".to_owned(),
        files.key.display().to_string(),
        files.cert.display().to_string(),
        "+cf".to_owned(),
        files.ca_cert.display().to_string(),
    ]
}

async fn echo_with(bridge: &BridgeUnderTest, options: &[String]) -> Output {
    let port = bridge.address.port().to_string();
    let mut arguments: Vec<&str> = options.iter().map(String::as_str).collect();
    arguments.extend([
        "-aet",
        "STORESCU",
        "-aec",
        "MEDAI_BRIDGE",
        "127.0.0.1",
        &port,
    ]);
    dcmtk("echoscu", &arguments).await
}

#[tokio::test]
async fn the_tls_listener_serves_dcmtk_over_tls_with_a_client_certificate_and_refuses_plain_or_anonymous_peers()
 {
    let pki = medai_testkit::TestPki::new();
    let bridge =
        BridgeUnderTest::start_configured(|config| config.scp.tls = Some(scp_tls(&pki, true)))
            .await;
    let tls = dcmtk_tls(&pki, "operator");

    let echoed = echo_with(&bridge, &tls).await;
    assert!(
        echoed.status.success(),
        "C-ECHO over TLS: {}",
        text(&echoed)
    );

    let ct = Assets::locate().dicom_dir.join("CT_small.dcm");
    let port = bridge.address.port().to_string();
    let mut arguments: Vec<&str> = tls.iter().map(String::as_str).collect();
    let file = ct.display().to_string();
    arguments.extend([
        "-aet",
        "STORESCU",
        "-aec",
        "MEDAI_BRIDGE",
        "127.0.0.1",
        &port,
        &file,
    ]);
    let stored = dcmtk("storescu", &arguments).await;
    assert!(
        stored.status.success(),
        "C-STORE over TLS: {}",
        text(&stored)
    );
    assert_eq!(bridge.outbox.all().await.expect("rows").len(), 1);

    // A plain association on the TLS port, and TLS without a client certificate, are refused.
    let plain = echo(&bridge, "STORESCU", "MEDAI_BRIDGE").await;
    assert!(
        !plain.status.success(),
        "plain on the TLS port: {}",
        text(&plain)
    );
    let anonymous = echo_with(
        &bridge,
        &[
            "+tla".to_owned(),
            "+cf".to_owned(),
            pki.files("gateway").ca_cert.display().to_string(),
        ],
    )
    .await;
    assert!(
        !anonymous.status.success(),
        "TLS without a client certificate: {}",
        text(&anonymous)
    );
    let plain_store = store(&bridge, "STORESCU", &[&ct]).await;
    assert!(!plain_store.status.success(), "{}", text(&plain_store));
    assert_eq!(bridge.outbox.all().await.expect("rows").len(), 1);
    bridge.stop().await;
}

#[tokio::test]
async fn without_a_required_client_certificate_anonymous_tls_is_served_but_plain_is_still_refused()
{
    let pki = medai_testkit::TestPki::new();
    let bridge =
        BridgeUnderTest::start_configured(|config| config.scp.tls = Some(scp_tls(&pki, false)))
            .await;
    let anonymous = echo_with(
        &bridge,
        &[
            "+tla".to_owned(),
            "+cf".to_owned(),
            pki.files("gateway").ca_cert.display().to_string(),
        ],
    )
    .await;
    assert!(anonymous.status.success(), "{}", text(&anonymous));
    let plain = echo(&bridge, "STORESCU", "MEDAI_BRIDGE").await;
    assert!(!plain.status.success(), "{}", text(&plain));
    bridge.stop().await;
}

/// dcmtk's storescp as a TLS destination (it demands the bridge's certificate), on a port
/// it binds itself; killed on drop.
struct TlsDestination {
    port: u16,
    received: tempfile::TempDir,
    _process: tokio::process::Child,
}

impl TlsDestination {
    async fn start(pki: &medai_testkit::TestPki) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("address")
            .port();
        let received = tempfile::tempdir().expect("received dir");
        let process = tokio::process::Command::new("storescp")
            .args(dcmtk_tls(pki, "audit"))
            .args(["-aet", "PACS_TLS", "-od"])
            .arg(received.path())
            .arg(port.to_string())
            .kill_on_drop(true)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("storescp runs");
        let started = std::time::Instant::now();
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(
                started.elapsed() < std::time::Duration::from_secs(30),
                "storescp never listened"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        Self {
            port,
            received,
            _process: process,
        }
    }

    fn files(&self) -> Vec<String> {
        std::fs::read_dir(self.received.path())
            .expect("read dir")
            .map(|entry| {
                entry
                    .expect("entry")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect()
    }
}

#[tokio::test]
async fn reports_go_to_a_tls_destination_that_checks_the_bridges_certificate_and_not_to_the_wrong_name()
 {
    let pki = medai_testkit::TestPki::new();
    let destination = TlsDestination::start(&pki).await;
    let state = tempfile::tempdir().expect("state");
    let outbox = Outbox::open(&sqlite_url(state.path(), "bridge.db"))
        .await
        .expect("outbox");
    let ct = Assets::locate().dicom_dir.join("CT_small.dcm");
    let source = dicom_object::open_file(&ct).expect("source");
    let uid = |tag| {
        source
            .element(tag)
            .expect("uid")
            .to_str()
            .expect("text")
            .trim_end_matches('\0')
            .to_owned()
    };
    let sop_instance_uid = uid(tags::SOP_INSTANCE_UID);
    outbox
        .store(NewInstance {
            sop_instance_uid: sop_instance_uid.clone(),
            sop_class_uid: uid(tags::SOP_CLASS_UID),
            series_instance_uid: uid(tags::SERIES_INSTANCE_UID),
            study_instance_uid: uid(tags::STUDY_INSTANCE_UID),
            calling_ae_title: "STORESCU".to_owned(),
            dicom: std::fs::read(&ct).expect("file"),
        })
        .await
        .expect("store");
    let tag = outbox.all().await.expect("rows")[0].tag.clone();
    let outcome = medai_bridge::outcome::InferenceOutcome {
        result_id: "result-1".to_owned(),
        ledger_seq: 7,
        ledger_hash: "ab".repeat(32),
        image_sha256: "cd".repeat(32),
        replayed: false,
        model_name: "synthetic-light".to_owned(),
        model_version: "1".to_owned(),
        model_sha256: "ef".repeat(32),
        probabilities: vec![("normal".to_owned(), 0.75), ("abnormal".to_owned(), 0.25)],
        top_label: "normal".to_owned(),
        top_probability: 0.75,
        decision_threshold: 0.5,
        decision: "NEGATIVE".to_owned(),
        intended_use: "research use only".to_owned(),
        quality: None,
        unusual_case: false,
        unusual_case_reasons: Vec::new(),
    };
    outbox
        .record_result(&tag, serde_json::to_string(&outcome).expect("json"))
        .await
        .expect("result");

    let bridge_files = pki.files("gateway");
    let destination_tls = |server_name: &str| DestinationTls {
        ca_certificate: bridge_files.ca_cert.clone(),
        certificate: bridge_files.cert.clone(),
        key: bridge_files.key.clone(),
        server_name: server_name.to_owned(),
    };
    let delivery = |tls: Option<DestinationTls>| ReportDelivery {
        destination: ResultDestination {
            address: format!("127.0.0.1:{}", destination.port),
            ae_title: "PACS_TLS".to_owned(),
            max_attempts: 10,
            initial_backoff_ms: 0,
            max_backoff_ms: 0,
            tls,
        },
        calling_ae_title: "MEDAI_BRIDGE".to_owned(),
        uid_root: "1.2.826.0.1.3680043.10.1234".to_owned(),
        outbox: outbox.clone(),
    };

    // The destination's certificate does not name "pacs.example": refused, nothing sent.
    let wrong_name = delivery(Some(destination_tls("pacs.example")))
        .deliver_due()
        .await
        .expect("outbox");
    assert_eq!((wrong_name.delivered, wrong_name.failed), (0, 1));
    // Plain TCP to the TLS destination fails too.
    let plain = delivery(None).deliver_due().await.expect("outbox");
    assert_eq!((plain.delivered, plain.failed), (0, 1));
    assert!(destination.files().is_empty());

    let sent = delivery(Some(destination_tls("localhost")))
        .deliver_due()
        .await
        .expect("outbox");
    assert_eq!((sent.delivered, sent.failed), (1, 0));
    let row = &outbox.all().await.expect("rows")[0];
    assert_eq!(row.state, state::REPORTED);
    let report_uid = row.report_sop_instance_uid.clone().expect("report uid");
    let received = destination.files();
    assert_eq!(received.len(), 1, "{received:?}");
    assert!(
        received[0].ends_with(&format!(".{report_uid}")),
        "storescp filed the report under its SOP Instance UID: {received:?}"
    );
}

// --- The outbox and UID mapping, the same behaviour on SQLite (the embedded default) and on
// PostgreSQL (production; the suite's real server from scripts/test-servers.sh) ---

fn instance(sop_instance_uid: &str, study_instance_uid: &str) -> NewInstance {
    NewInstance {
        sop_instance_uid: sop_instance_uid.to_owned(),
        sop_class_uid: "1.2.840.10008.5.1.4.1.1.4".to_owned(),
        series_instance_uid: format!("{study_instance_uid}.1"),
        study_instance_uid: study_instance_uid.to_owned(),
        calling_ae_title: "STORESCU".to_owned(),
        dicom: format!("DICM bytes of {sop_instance_uid}").into_bytes(),
    }
}

async fn row(outbox: &Outbox, sop_instance_uid: &str) -> StoredInstance {
    outbox
        .all()
        .await
        .expect("read")
        .into_iter()
        .find(|row| row.sop_instance_uid == sop_instance_uid)
        .expect("stored")
}

async fn keeps_its_promises(outbox: Outbox) {
    // Stored once; a resend (or two associations racing with one instance) keeps the first.
    assert!(
        outbox
            .store(instance("1.2.3.1", "1.2.3"))
            .await
            .expect("store")
    );
    assert!(
        !outbox
            .store(instance("1.2.3.1", "1.2.3"))
            .await
            .expect("resend")
    );
    let (first, second) = tokio::join!(
        outbox.store(instance("1.2.3.2", "1.2.3")),
        outbox.store(instance("1.2.3.2", "1.2.3"))
    );
    let stored_now = [first.expect("store"), second.expect("store")];
    assert_eq!(stored_now.iter().filter(|stored| **stored).count(), 1);
    assert!(
        outbox
            .store(instance("1.2.4.1", "1.2.4"))
            .await
            .expect("store")
    );

    // The UID mapping: the mesh sees a random tag, the UIDs stay here.
    let first = row(&outbox, "1.2.3.1").await;
    assert_eq!(first.state, state::RECEIVED);
    assert_eq!(first.series_instance_uid, "1.2.3.1");
    assert_eq!(first.study_instance_uid, "1.2.3");
    assert!(uuid::Uuid::parse_str(&first.tag).is_ok(), "{}", first.tag);
    assert!(!first.tag.contains("1.2.3"));
    assert_eq!(
        outbox.dicom_of(&first.tag).await.expect("read"),
        Some(b"DICM bytes of 1.2.3.1".to_vec())
    );
    assert_eq!(outbox.dicom_of("no such tag").await.expect("read"), None);

    // Studies are sent once quiet, each with its unanswered instances oldest first.
    assert!(
        outbox
            .quiet_studies(3_600_000)
            .await
            .expect("read")
            .is_empty()
    );
    let quiet = outbox.quiet_studies(0).await.expect("read");
    let studies: BTreeSet<_> = quiet
        .iter()
        .map(|study| study.study_instance_uid.as_str())
        .collect();
    assert_eq!(studies, BTreeSet::from(["1.2.3", "1.2.4"]));
    let three = quiet
        .iter()
        .find(|study| study.study_instance_uid == "1.2.3")
        .expect("study");
    assert_eq!(three.instances.len(), 2);
    assert_eq!(
        three.instances[0],
        (first.tag.clone(), "1.2.3.1".to_owned())
    );

    // An answer is kept once: a second answer for the same tag changes nothing.
    let second = row(&outbox, "1.2.3.2").await;
    let other = row(&outbox, "1.2.4.1").await;
    outbox
        .record_result(&first.tag, "{\"result_id\":\"a\"}".to_owned())
        .await
        .expect("record");
    outbox
        .record_result(&first.tag, "{\"result_id\":\"b\"}".to_owned())
        .await
        .expect("record again");
    outbox
        .record_refusal(&second.tag, "DICOM_UNSUPPORTED")
        .await
        .expect("refuse");
    let first = row(&outbox, "1.2.3.1").await;
    assert_eq!(first.state, state::INFERRED);
    assert_eq!(first.result_json.as_deref(), Some("{\"result_id\":\"a\"}"));
    let second = row(&outbox, "1.2.3.2").await;
    assert_eq!(second.state, state::REFUSED);
    assert_eq!(second.refusal_reason.as_deref(), Some("DICOM_UNSUPPORTED"));
    let remaining = outbox.quiet_studies(0).await.expect("read");
    assert_eq!(remaining.len(), 1);
    assert_eq!(
        remaining[0].instances,
        [(other.tag.clone(), "1.2.4.1".to_owned())]
    );

    // Reports: due until delivered; a failure waits for its back-off, then is given up.
    let due = outbox.due_reports(10).await.expect("read");
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].sop_instance_uid, "1.2.3.1");
    outbox
        .record_delivery_failure(&due[0], 2, now_ms() + 3_600_000)
        .await
        .expect("failure");
    assert!(outbox.due_reports(10).await.expect("read").is_empty());
    let waiting = row(&outbox, "1.2.3.1").await;
    assert_eq!(
        (waiting.state.as_str(), waiting.report_attempts),
        (state::INFERRED, 1)
    );
    outbox
        .record_delivery_failure(&waiting, 2, 0)
        .await
        .expect("failure");
    assert_eq!(row(&outbox, "1.2.3.1").await.state, state::UNDELIVERABLE);

    outbox
        .record_result(&other.tag, "{}".to_owned())
        .await
        .expect("record");
    outbox
        .record_reported(&other.tag, "1.2.826.0.1.3680043.10.1234.9")
        .await
        .expect("reported");
    let reported = row(&outbox, "1.2.4.1").await;
    assert_eq!(reported.state, state::REPORTED);
    assert_eq!(
        reported.report_sop_instance_uid.as_deref(),
        Some("1.2.826.0.1.3680043.10.1234.9")
    );
    assert!(reported.reported_at_ms.is_some());
    assert!(outbox.due_reports(10).await.expect("read").is_empty());

    // A signature after the report: kept once, then one amended report is due until sent.
    let unsigned = outbox.reported_unsigned().await.expect("read");
    assert_eq!(unsigned.len(), 1);
    assert_eq!(
        (unsigned[0].0.as_str(), unsigned[0].1.as_str()),
        (other.tag.as_str(), "{}")
    );
    assert!(outbox.due_amendments(10).await.expect("read").is_empty());
    outbox
        .record_signature(&other.tag, "{\"meaning\":\"APPROVED\"}".to_owned())
        .await
        .expect("signature");
    outbox
        .record_signature(&other.tag, "{\"meaning\":\"REJECTED\"}".to_owned())
        .await
        .expect("a later signature");
    assert!(outbox.reported_unsigned().await.expect("read").is_empty());
    let amendments = outbox.due_amendments(10).await.expect("read");
    assert_eq!(amendments.len(), 1);
    assert_eq!(
        amendments[0].signature_json.as_deref(),
        Some("{\"meaning\":\"APPROVED\"}")
    );
    outbox
        .record_amended(&other.tag, "1.2.826.0.1.3680043.10.1234.10")
        .await
        .expect("amended");
    assert!(outbox.due_amendments(10).await.expect("read").is_empty());
    assert_eq!(
        row(&outbox, "1.2.4.1")
            .await
            .amended_report_sop_instance_uid
            .as_deref(),
        Some("1.2.826.0.1.3680043.10.1234.10")
    );
    assert_eq!(outbox.all().await.expect("read").len(), 3);
}

#[tokio::test]
async fn the_outbox_and_uid_mapping_behave_on_sqlite() {
    let directory = tempfile::tempdir().expect("dir");
    let url = format!(
        "sqlite://{}?mode=rwc",
        directory.path().join("bridge.db").display()
    );
    keeps_its_promises(Outbox::open(&url).await.expect("open")).await;
    // Opening again (a restart) keeps everything and migrates nothing twice.
    let reopened = Outbox::open(&url).await.expect("reopen");
    assert_eq!(reopened.all().await.expect("read").len(), 3);
}

#[tokio::test]
async fn the_outbox_and_uid_mapping_behave_on_postgresql() {
    let url = medai_testkit::fresh_postgres_database().await;
    keeps_its_promises(Outbox::open(&url).await.expect("open on PostgreSQL")).await;
    let reopened = Outbox::open(&url).await.expect("reopen");
    assert_eq!(reopened.all().await.expect("read").len(), 3);
    // Large instances fit (bytea), as they do in SQLite's blob.
    let large = NewInstance {
        dicom: vec![0x5a; 8 * 1024 * 1024],
        ..instance("1.2.5.1", "1.2.5")
    };
    assert!(reopened.store(large).await.expect("store a large instance"));
    let tag = row(&reopened, "1.2.5.1").await.tag;
    assert_eq!(
        reopened
            .dicom_of(&tag)
            .await
            .expect("read")
            .map(|bytes| bytes.len()),
        Some(8 * 1024 * 1024)
    );
}
