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
use medai_bridge::outcome::InferenceOutcome;
use medai_bridge::{BridgeListeners, serve};
use medai_testkit::{Assets, sqlite_url};

/// The bridge served in this process on listeners bound here (port 0): DIMSE at `address`,
/// and STOW-RS at `stow` when its configuration has a `[stow]` section.
struct BridgeUnderTest {
    address: SocketAddr,
    stow: Option<SocketAddr>,
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
        config.validate().expect("valid config");
        let bind = || tokio::net::TcpListener::bind("127.0.0.1:0");
        let dicom = bind().await.expect("bind");
        let stow = match config.stow {
            Some(_) => Some(bind().await.expect("bind")),
            None => None,
        };
        let address = dicom.local_addr().expect("address");
        let stow_address = stow
            .as_ref()
            .map(|stow| stow.local_addr().expect("address"));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let outbox = Outbox::open(&config.database_url).await.expect("outbox");
        let task = tokio::spawn(async move {
            serve(config, BridgeListeners { dicom, stow }, async move {
                let _ = stopped.await;
            })
            .await
            .expect("bridge serves");
        });
        Self {
            address,
            stow: stow_address,
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

/// dcmtk's storescp as the reports' destination, called `ae_title`, on a port it binds
/// itself, with extra `options` (the TLS ones make it demand the bridge's certificate); killed
/// on drop.
struct StorescpDestination {
    port: u16,
    received: tempfile::TempDir,
    _process: tokio::process::Child,
}

impl StorescpDestination {
    async fn start(options: Vec<String>, ae_title: &str) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("address")
            .port();
        let received = tempfile::tempdir().expect("received dir");
        let process = tokio::process::Command::new("storescp")
            .args(options)
            .args(["-aet", ae_title, "-od"])
            .arg(received.path())
            .arg(port.to_string())
            .kill_on_drop(true)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("storescp runs");
        listening(port, "storescp").await;
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

/// The gateway's answer for the light model, as the outbox keeps it (no frame: single images).
fn light_outcome(result_id: &str) -> InferenceOutcome {
    InferenceOutcome {
        result_id: result_id.to_owned(),
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
        frame: None,
    }
}

/// Stores the real `file` in `outbox` as a C-STORE of it would, and records `outcome` as the
/// gateway's answer for it: the report is then due. Returns the instance's tag.
async fn answered(outbox: &Outbox, file: &Path, outcome: &InferenceOutcome) -> String {
    outbox
        .store(NewInstance {
            sop_instance_uid: uid_of(file, tags::SOP_INSTANCE_UID),
            sop_class_uid: uid_of(file, tags::SOP_CLASS_UID),
            series_instance_uid: uid_of(file, tags::SERIES_INSTANCE_UID),
            study_instance_uid: uid_of(file, tags::STUDY_INSTANCE_UID),
            calling_ae_title: "STORESCU".to_owned(),
            dicom: std::fs::read(file).expect("file"),
        })
        .await
        .expect("store");
    let tag = outbox.all().await.expect("rows")[0].tag.clone();
    outbox
        .record_result(&tag, serde_json::to_string(outcome).expect("json"))
        .await
        .expect("result");
    tag
}

/// The bridge's report delivery from `outbox` to `destination`.
fn report_delivery(outbox: &Outbox, destination: ResultDestination) -> ReportDelivery {
    ReportDelivery {
        destination,
        calling_ae_title: "MEDAI_BRIDGE".to_owned(),
        uid_root: "1.2.826.0.1.3680043.10.1234".to_owned(),
        outbox: outbox.clone(),
    }
}

#[tokio::test]
async fn reports_go_to_a_tls_destination_that_checks_the_bridges_certificate_and_not_to_the_wrong_name()
 {
    let pki = medai_testkit::TestPki::new();
    let destination = StorescpDestination::start(dcmtk_tls(&pki, "audit"), "PACS_TLS").await;
    let state = tempfile::tempdir().expect("state");
    let outbox = Outbox::open(&sqlite_url(state.path(), "bridge.db"))
        .await
        .expect("outbox");
    let ct = Assets::locate().dicom_dir.join("CT_small.dcm");
    answered(&outbox, &ct, &light_outcome("result-1")).await;

    let bridge_files = pki.files("gateway");
    let destination_tls = |server_name: &str| DestinationTls {
        ca_certificate: bridge_files.ca_cert.clone(),
        certificate: bridge_files.cert.clone(),
        key: bridge_files.key.clone(),
        server_name: server_name.to_owned(),
    };
    let delivery = |tls: Option<DestinationTls>| {
        report_delivery(
            &outbox,
            ResultDestination {
                address: format!("127.0.0.1:{}", destination.port),
                ae_title: "PACS_TLS".to_owned(),
                max_attempts: 10,
                initial_backoff_ms: 0,
                max_backoff_ms: 0,
                tls,
                dicomweb: None,
            },
        )
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

/// The Referenced Frame Numbers of every IMAGE content item of a report, depth first.
fn image_frame_numbers(object: &dicom_object::InMemDicomObject, into: &mut Vec<Option<String>>) {
    let Some(sequence) = object.get(tags::CONTENT_SEQUENCE) else {
        return;
    };
    for item in sequence.items().expect("items") {
        if item
            .element(tags::VALUE_TYPE)
            .expect("type")
            .to_str()
            .expect("text")
            .trim()
            == "IMAGE"
        {
            let reference = &item
                .element(tags::REFERENCED_SOP_SEQUENCE)
                .expect("reference")
                .items()
                .expect("items")[0];
            into.push(
                reference
                    .get(tags::REFERENCED_FRAME_NUMBER)
                    .map(|element| element.to_str().expect("text").trim().to_owned()),
            );
        }
        image_frame_numbers(item, into);
    }
}

/// Issue 15, through the running bridge: pydicom's 30-frame ultrasound loop arrives by C-STORE
/// (dcmtk's storescu), the gateway's answer names frame 16 of 30 judged under middle_frame
/// (a StudyStream answer converted and kept as the forwarder keeps it), and the SR the bridge
/// delivers to a PACS (dcmtk's storescp) references the source at frame 16 and says which
/// frame of how many under which policy; dcmtk's dsrdump parses it cleanly and highdicom
/// finds the referenced frame.
#[tokio::test]
async fn a_multi_frame_instance_s_report_reaches_the_pacs_referencing_the_frame_the_gateway_judged()
{
    use medai_proto::inference::v1::{LabelProbability, PredictResponse};

    let destination = StorescpDestination::start(Vec::new(), "ORTHANC").await;
    let port = destination.port;
    let bridge = BridgeUnderTest::start_configured(move |config| {
        config.results.address = format!("127.0.0.1:{port}");
        config.poll_interval_ms = 50;
    })
    .await;
    let ultrasound_loop = Assets::locate().dicom_dir.join("examples_ybr_color.dcm");
    // Sent in its own transfer syntax (JPEG baseline), which storescu proposes with -xy.
    let port = bridge.address.port().to_string();
    let path = ultrasound_loop.to_str().expect("path");
    let stored = dcmtk(
        "storescu",
        &[
            "-xy",
            "-aet",
            "STORESCU",
            "-aec",
            "MEDAI_BRIDGE",
            "127.0.0.1",
            &port,
            path,
        ],
    )
    .await;
    assert!(stored.status.success(), "{}", text(&stored));
    let row = bridge.outbox.all().await.expect("rows").remove(0);
    assert_eq!(
        row.sop_class_uid, "1.2.840.10008.5.1.4.1.1.3.1",
        "US multi-frame"
    );

    let answer = medai_proto::gateway::v1::InferResponse {
        result_id: "result-frames".to_owned(),
        ledger_seq: 11,
        prediction: Some(PredictResponse {
            model_name: "synthetic-light".to_owned(),
            model_version: "1".to_owned(),
            probabilities: vec![LabelProbability {
                label: "normal".to_owned(),
                probability: 0.75,
            }],
            top_label: "normal".to_owned(),
            top_probability: 0.75,
            decision_threshold: 0.5,
            decision: "ABOVE_THRESHOLD".to_owned(),
            intended_use: "research use only".to_owned(),
            ..Default::default()
        }),
        frame: Some(medai_proto::common::v1::JudgedFrame {
            frame_number: 16,
            number_of_frames: 30,
            policy: "MIDDLE_FRAME".to_owned(),
        }),
        ..Default::default()
    };
    let outcome = InferenceOutcome::try_from(answer).expect("a complete answer");
    bridge
        .outbox
        .record_result(&row.tag, serde_json::to_string(&outcome).expect("json"))
        .await
        .expect("result");

    let started = std::time::Instant::now();
    let report_uid = loop {
        let row = bridge.outbox.all().await.expect("rows").remove(0);
        if row.state == state::REPORTED {
            break row.report_sop_instance_uid.expect("report uid");
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(60),
            "the report never went out: {} after {} attempts",
            row.state,
            row.report_attempts
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    bridge.stop().await;
    let received = destination.files();
    assert_eq!(received.len(), 1, "{received:?}");
    let path = destination.received.path().join(&received[0]);
    let report = dicom_object::open_file(&path).expect("a Part 10 report");
    assert_eq!(
        report
            .element(tags::SOP_INSTANCE_UID)
            .expect("uid")
            .to_str()
            .expect("text")
            .trim_end_matches('\0'),
        report_uid
    );
    let mut frames = Vec::new();
    image_frame_numbers(&report, &mut frames);
    assert_eq!(frames, vec![Some("16".to_owned())]);

    let dump = dcmtk("dsrdump", &["+Pl", path.to_str().expect("path")]).await;
    let printed = text(&dump);
    assert!(dump.status.success(), "{printed}");
    assert!(
        !printed
            .lines()
            .any(|line| line.starts_with("E:") || line.starts_with("W:")),
        "dsrdump reported problems:\n{printed}"
    );
    assert!(
        printed.contains("frame 16 of 30, chosen by the model's frame policy middle_frame"),
        "{printed}"
    );

    let read = &medai_testkit::highdicom_readback(std::slice::from_ref(&path))[0];
    assert_eq!(
        read["image_references"],
        serde_json::json!([{
            "sop_class_uid": row.sop_class_uid,
            "sop_instance_uid": row.sop_instance_uid,
            "referenced_frame_numbers": [16],
        }]),
        "{read}"
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

// --- DICOMweb STOW-RS in (issue 15): the same outbox behind `POST /studies` ---

const STOW_TOKEN: &str = "a stow bearer token of forty characters!";

/// The bridge with its STOW-RS listener at `http` (a client `ORTHANC_WEB` with STOW_TOKEN).
struct StowBridge {
    http: SocketAddr,
    outbox: Outbox,
    bridge: BridgeUnderTest,
}

impl StowBridge {
    async fn start(max_instance_bytes: usize, max_parts: usize) -> Self {
        Self::start_with(max_instance_bytes, max_parts, "").await
    }

    /// [`StowBridge::start`] with more STOW-RS settings (TOML lines).
    async fn start_with(max_instance_bytes: usize, max_parts: usize, more: &str) -> Self {
        let stow_settings = format!(
            r#"
listen_addr = "127.0.0.1:0"
client_name = "ORTHANC_WEB"
bearer_token = "{STOW_TOKEN}"
max_parts = {max_parts}
max_request_bytes = 4194304
{more}
"#
        );
        let bridge = BridgeUnderTest::start_configured(|config| {
            config.scp.max_instance_bytes = max_instance_bytes;
            config.stow = Some(toml::from_str(&stow_settings).expect("stow settings"));
        })
        .await;
        Self {
            http: bridge.stow.expect("a STOW-RS listener"),
            outbox: bridge.outbox.clone(),
            bridge,
        }
    }

    async fn stop(self) {
        self.bridge.stop().await;
    }

    /// One HTTP/1.1 exchange on its own connection: status and body.
    async fn post(&self, path: &str, headers: &[(&str, String)], body: &[u8]) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let stream = tokio::net::TcpStream::connect(self.http)
            .await
            .expect("connect");
        let mut head = format!(
            "POST {path} HTTP/1.1\r\nHost: bridge\r\nConnection: close\r\nContent-Length: {}\r\n",
            body.len()
        );
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        let (mut reader, mut writer) = stream.into_split();
        writer.write_all(head.as_bytes()).await.expect("head");
        // The body is written while the answer is read: a refusal may come before the body is
        // taken, and the server then closes without reading the rest.
        let body = body.to_vec();
        let writing = tokio::spawn(async move {
            let _ = writer.write_all(&body).await;
            writer
        });
        let mut answer = Vec::new();
        let _ = reader.read_to_end(&mut answer).await;
        writing.abort();
        let answer = String::from_utf8_lossy(&answer).to_string();
        let (head, body) = answer.split_once("\r\n\r\n").expect("HTTP answer");
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .expect("status");
        (status, body.to_owned())
    }
}

fn multipart(boundary: &str, parts: &[&[u8]]) -> Vec<u8> {
    let mut body = Vec::new();
    for part in parts {
        body.extend_from_slice(
            format!("--{boundary}\r\nContent-Type: application/dicom\r\n\r\n").as_bytes(),
        );
        body.extend_from_slice(part);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    body
}

fn stow_headers(boundary: &str) -> Vec<(&'static str, String)> {
    vec![
        ("Authorization", format!("Bearer {STOW_TOKEN}")),
        (
            "Content-Type",
            format!("multipart/related; type=\"application/dicom\"; boundary={boundary}"),
        ),
    ]
}

fn uid_of(file: &Path, tag: dicom_core::Tag) -> String {
    dicom_object::open_file(file)
        .expect("file")
        .element(tag)
        .expect("uid")
        .to_str()
        .expect("text")
        .trim_end_matches('\0')
        .to_owned()
}

/// A real file with its SOP Class changed (file meta and data set) to one the bridge does not take.
fn as_basic_text_sr(file: &Path) -> Vec<u8> {
    let basic_text_sr = "1.2.840.10008.5.1.4.1.1.88.11";
    let source = dicom_object::open_file(file).expect("file");
    let transfer_syntax = source.meta().transfer_syntax().to_owned();
    let mut object = source.into_inner();
    object.put(dicom_core::DataElement::new(
        tags::SOP_CLASS_UID,
        dicom_core::VR::UI,
        dicom_core::PrimitiveValue::from(basic_text_sr),
    ));
    let mut bytes = Vec::new();
    object
        .with_meta(dicom_object::FileMetaTableBuilder::new().transfer_syntax(transfer_syntax))
        .expect("meta")
        .write_all(&mut bytes)
        .expect("write");
    bytes
}

#[tokio::test]
async fn stow_rs_commits_every_part_to_the_outbox_before_answering_with_the_referenced_sop_sequence()
 {
    let bridge = StowBridge::start(64 * 1024 * 1024, 16).await;
    let assets = Assets::locate();
    let ct = assets.dicom_dir.join("CT_small.dcm");
    let mr = assets.dicom_dir.join("MR_small.dcm");
    let body = multipart(
        "stow-boundary",
        &[
            &std::fs::read(&ct).expect("ct"),
            &std::fs::read(&mr).expect("mr"),
        ],
    );

    let (status, answer) = bridge
        .post("/studies", &stow_headers("stow-boundary"), &body)
        .await;
    assert_eq!(status, 200, "{answer}");
    let answer: serde_json::Value = serde_json::from_str(&answer).expect("DICOM JSON");
    let referenced: Vec<&str> = answer["00081199"]["Value"]
        .as_array()
        .expect("Referenced SOP Sequence")
        .iter()
        .map(|item| item["00081155"]["Value"][0].as_str().expect("uid"))
        .collect();
    let expected = [
        uid_of(&ct, tags::SOP_INSTANCE_UID),
        uid_of(&mr, tags::SOP_INSTANCE_UID),
    ];
    assert_eq!(referenced, expected);
    assert!(answer.get("00081198").is_none(), "{answer}");

    // Read at once: the answer came only after both rows were committed.
    let rows = bridge.outbox.all().await.expect("rows");
    assert_eq!(rows.len(), 2);
    for (file, uid) in [&ct, &mr].iter().zip(&expected) {
        let row = rows
            .iter()
            .find(|row| &row.sop_instance_uid == uid)
            .expect("stored");
        assert_eq!(
            row.study_instance_uid,
            uid_of(file, tags::STUDY_INSTANCE_UID)
        );
        assert_eq!(row.sop_class_uid, uid_of(file, tags::SOP_CLASS_UID));
        assert_eq!(row.calling_ae_title, "ORTHANC_WEB");
        assert_eq!(row.state, state::RECEIVED);
    }

    // A resend into the right study is answered as stored and kept once.
    let study = uid_of(&ct, tags::STUDY_INSTANCE_UID);
    let again = multipart("b2", &[&std::fs::read(&ct).expect("ct")]);
    let (status, answer) = bridge
        .post(&format!("/studies/{study}"), &stow_headers("b2"), &again)
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(bridge.outbox.all().await.expect("rows").len(), 2);
    bridge.stop().await;
}

#[tokio::test]
async fn stow_rs_answers_202_or_409_with_a_failure_reason_for_each_instance_it_cannot_take() {
    let bridge = StowBridge::start(64 * 1024 * 1024, 16).await;
    let assets = Assets::locate();
    let ct = assets.dicom_dir.join("CT_small.dcm");
    let mr = assets.dicom_dir.join("MR_small.dcm");
    let mut not_dicom = vec![0u8; 128];
    not_dicom.extend_from_slice(b"DICMthis is no meta group");
    let body = multipart(
        "mixed",
        &[
            &std::fs::read(&ct).expect("ct"),
            &not_dicom,
            &as_basic_text_sr(&mr),
        ],
    );
    let (status, answer) = bridge.post("/studies", &stow_headers("mixed"), &body).await;
    assert_eq!(status, 202, "{answer}");
    let answer: serde_json::Value = serde_json::from_str(&answer).expect("DICOM JSON");
    assert_eq!(
        answer["00081199"]["Value"]
            .as_array()
            .expect("referenced")
            .len(),
        1
    );
    let reasons: Vec<(String, u64)> = answer["00081198"]["Value"]
        .as_array()
        .expect("Failed SOP Sequence")
        .iter()
        .map(|item| {
            (
                item["00081155"]["Value"][0]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                item["00081197"]["Value"][0].as_u64().expect("reason"),
            )
        })
        .collect();
    assert_eq!(
        reasons,
        [
            (String::new(), 0xC000),
            (uid_of(&mr, tags::SOP_INSTANCE_UID), 0x0122)
        ]
    );
    let rows = bridge.outbox.all().await.expect("rows");
    assert_eq!(rows.len(), 1, "only the instance it could take is stored");

    // Into a study the instance does not belong to: nothing stored, 409, 0xA900.
    let (status, answer) = bridge
        .post(
            "/studies/1.2.3.4.5",
            &stow_headers("other"),
            &multipart("other", &[&std::fs::read(&mr).expect("mr")]),
        )
        .await;
    assert_eq!(status, 409, "{answer}");
    let answer: serde_json::Value = serde_json::from_str(&answer).expect("DICOM JSON");
    assert_eq!(
        answer["00081198"]["Value"][0]["00081197"]["Value"][0],
        0xA900
    );
    assert_eq!(bridge.outbox.all().await.expect("rows").len(), 1);
    bridge.stop().await;
}

/// The STOW-RS listener bounds its connections as the gRPC listeners do: beyond
/// `max_connections` a connection is closed as it is accepted, a silent one is closed at the
/// idle time (not before), and requests are served again once the silent ones are gone.
#[tokio::test]
async fn stow_rs_connections_are_bounded_in_number_and_closed_when_idle() {
    use std::time::Duration;
    use tokio::io::AsyncReadExt;
    let bridge = StowBridge::start_with(8 * 1024, 2, "max_connections = 3\nidle_seconds = 2").await;
    let opened = std::time::Instant::now();
    let mut silent = Vec::new();
    for _ in 0..3 {
        silent.push(
            tokio::net::TcpStream::connect(bridge.http)
                .await
                .expect("connect"),
        );
    }
    // Every place is taken: one more connection is closed at once.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut beyond = tokio::net::TcpStream::connect(bridge.http)
        .await
        .expect("connect");
    let mut sink = Vec::new();
    tokio::time::timeout(Duration::from_secs(1), beyond.read_to_end(&mut sink))
        .await
        .expect("closed as it was accepted, not left waiting")
        .ok();
    assert!(sink.is_empty(), "nothing answered beyond the limit");
    // The silent ones are closed at the idle time.
    for mut connection in silent {
        tokio::time::timeout(Duration::from_secs(6), connection.read_to_end(&mut sink))
            .await
            .expect("closed at the idle time")
            .ok();
    }
    assert!(
        opened.elapsed() >= Duration::from_millis(1500),
        "closed at the idle time, not before ({:?})",
        opened.elapsed()
    );
    assert!(
        sink.is_empty(),
        "nothing answered on the silent connections"
    );
    // Served again: a request without a token is answered (401), not closed.
    let small = {
        let mut part = vec![0u8; 128];
        part.extend_from_slice(b"DICM");
        part
    };
    let content_type = stow_headers("b")[1].clone();
    let (status, body) = bridge
        .post("/studies", &[content_type], &multipart("b", &[&small]))
        .await;
    assert_eq!(status, 401, "{body}");
    bridge.stop().await;
}

#[tokio::test]
async fn stow_rs_refuses_strangers_and_malformed_or_oversized_requests_with_stable_codes_storing_nothing()
 {
    let bridge = StowBridge::start(8 * 1024, 2).await;
    let ct = std::fs::read(Assets::locate().dicom_dir.join("CT_small.dcm")).expect("ct");
    let small = {
        let mut part = vec![0u8; 128];
        part.extend_from_slice(b"DICM");
        part
    };
    let good = multipart("b", &[&small]);
    let code = |answer: &str| -> String {
        serde_json::from_str::<serde_json::Value>(answer).expect("JSON")["code"]
            .as_str()
            .expect("code")
            .to_owned()
    };
    /// What is sent (a name, headers, body) and the status and code expected.
    type Case<'a> = (&'a str, Vec<(&'a str, String)>, Vec<u8>, u16, &'a str);
    let mut cases: Vec<Case<'_>> = Vec::new();
    let content_type = stow_headers("b")[1].clone();
    cases.push((
        "no token",
        vec![content_type.clone()],
        good.clone(),
        401,
        "STOW_UNAUTHENTICATED",
    ));
    cases.push((
        "a wrong token",
        vec![
            ("Authorization", "Bearer not the token".to_owned()),
            content_type.clone(),
        ],
        good.clone(),
        401,
        "STOW_UNAUTHENTICATED",
    ));
    let mut wrong_type = stow_headers("b");
    wrong_type[1].1 = "application/dicom".to_owned();
    cases.push((
        "not multipart",
        wrong_type,
        ct.clone(),
        415,
        "STOW_UNSUPPORTED_MEDIA_TYPE",
    ));
    let mut no_boundary = stow_headers("b");
    no_boundary[1].1 = "multipart/related; type=\"application/dicom\"".to_owned();
    cases.push((
        "no boundary",
        no_boundary,
        good.clone(),
        400,
        "STOW_MULTIPART_BOUNDARY_MISSING",
    ));
    let mut unterminated = good.clone();
    unterminated.truncate(unterminated.len() - 8);
    cases.push((
        "unterminated",
        stow_headers("b"),
        unterminated,
        400,
        "STOW_MULTIPART_UNTERMINATED",
    ));
    cases.push((
        "three parts against a limit of two",
        stow_headers("b"),
        multipart("b", &[&small, &small, &small]),
        413,
        "STOW_TOO_MANY_PARTS",
    ));
    // CT_small is about 39 KB against an instance limit of 8 KiB (+ 64 KiB part overhead):
    // a part of 100 KB is refused as it arrives.
    let mut large = ct.clone();
    large.resize(100 * 1024, 0);
    cases.push((
        "a part over the instance limit",
        stow_headers("b"),
        multipart("b", &[&large]),
        413,
        "STOW_PART_TOO_LARGE",
    ));
    cases.push((
        "a body over the request limit",
        stow_headers("b"),
        vec![b'x'; 4 * 1024 * 1024 + 1],
        413,
        "STOW_REQUEST_TOO_LARGE",
    ));
    for (what, headers, body, status, expected) in cases {
        let (answered, answer) = bridge.post("/studies", &headers, &body).await;
        assert_eq!(answered, status, "{what}: {answer}");
        assert_eq!(code(&answer), expected, "{what}");
    }
    let (status, answer) = bridge
        .post("/studies/not-a-uid", &stow_headers("b"), &good)
        .await;
    assert_eq!(
        (status, code(&answer).as_str()),
        (400, "STOW_STUDY_UID_INVALID")
    );
    assert!(
        bridge.outbox.all().await.expect("rows").is_empty(),
        "nothing of a refused request is stored"
    );
    bridge.stop().await;
}

/// STOW-RS out: an unreachable DICOMweb endpoint defers the report with back-off, and an endpoint
/// that refuses it (here the bridge's own STOW-RS, which takes no SR class) is answered with its
/// failure reason and counted as a failed attempt, as a C-STORE refusal is.
#[tokio::test]
async fn reports_sent_by_stow_rs_are_retried_with_back_off_when_unreachable_or_refused() {
    let receiver = StowBridge::start(64 * 1024 * 1024, 16).await;
    let state = tempfile::tempdir().expect("state");
    let outbox = Outbox::open(&sqlite_url(state.path(), "sender.db"))
        .await
        .expect("outbox");
    let ct = Assets::locate().dicom_dir.join("CT_small.dcm");
    answered(&outbox, &ct, &light_outcome("result-1")).await;

    let closed_port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("address").port()
    };
    let delivery = |url: String| {
        report_delivery(
            &outbox,
            toml::from_str(&format!(
                "initial_backoff_ms = 60000\nmax_backoff_ms = 600000\n[dicomweb]\nurl = \"{url}\"\nbearer_token = \"{STOW_TOKEN}\"\n"
            ))
            .expect("destination"),
        )
    };

    let unreachable = delivery(format!("http://127.0.0.1:{closed_port}"));
    let summary = unreachable.deliver_due().await.expect("delivery");
    assert_eq!((summary.delivered, summary.failed), (0, 1));
    let row = &outbox.all().await.expect("rows")[0];
    assert_eq!(
        (row.state.as_str(), row.report_attempts),
        (state::INFERRED, 1)
    );
    let backoff = row.next_report_at_ms - medai_bridge::outbox::now_ms();
    assert!(
        (50_000..=60_000).contains(&backoff),
        "retried after the initial back-off, not at once: {backoff} ms"
    );
    // Not due again before its back-off.
    let summary = unreachable.deliver_due().await.expect("delivery");
    assert_eq!((summary.delivered, summary.failed), (0, 0));

    // Due again (as if the back-off had passed): the bridge's own STOW-RS refuses an SR.
    sea_orm::ConnectionTrait::execute_unprepared(
        &sea_orm::Database::connect(sqlite_url(state.path(), "sender.db"))
            .await
            .expect("connect"),
        "UPDATE bridge_instances SET next_report_at_ms = 0",
    )
    .await
    .expect("make due");
    let refusing = delivery(format!("http://{}/", receiver.http));
    let summary = refusing.deliver_due().await.expect("delivery");
    assert_eq!((summary.delivered, summary.failed), (0, 1));
    let row = &outbox.all().await.expect("rows")[0];
    assert_eq!(
        (row.state.as_str(), row.report_attempts),
        (state::INFERRED, 2)
    );
    assert!(
        receiver.outbox.all().await.expect("rows").is_empty(),
        "the refused SR is not stored"
    );
    receiver.stop().await;
}

// --- STOW-RS out over https, and the amended report by STOW-RS (issue 15) ---

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("address")
        .port()
}

/// Waits until something accepts connections on `port` (a process that binds its own port).
async fn listening(port: u16, what: &str) {
    let started = std::time::Instant::now();
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(60),
            "{what} never listened"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// A throwaway Orthanc (Debian `orthanc`) with its DICOMweb plugin, on plain HTTP on loopback,
/// behind stunnel (Debian `stunnel4`, OpenSSL) as its HTTPS front: a server certificate from
/// `server` and a client certificate demanded and checked against `server`'s CA. (Orthanc
/// 1.10.1's own `SslEnabled` crashes its web server at the first TLS connection with Debian
/// 12's OpenSSL 3, so a TLS front is how this Orthanc serves https, as many sites run it.)
/// Both are killed on drop.
struct HttpsOrthanc {
    http: SocketAddr,
    https_port: u16,
    directory: tempfile::TempDir,
    _orthanc: tokio::process::Child,
    _stunnel: tokio::process::Child,
}

impl HttpsOrthanc {
    async fn start(server: &medai_testkit::TestPki) -> Self {
        let directory = tempfile::tempdir().expect("orthanc dir");
        let http_port = free_port();
        let configuration = serde_json::json!({
            "Name": "medai-test-pacs-https",
            "StorageDirectory": directory.path().join("storage"),
            "IndexDirectory": directory.path().join("index"),
            "HttpPort": http_port,
            "RemoteAccessAllowed": false,
            "AuthenticationEnabled": false,
            "DicomServerEnabled": false,
            "Plugins": ["/usr/share/orthanc/plugins/libOrthancDicomWeb.so"],
            "DicomWeb": { "Enable": true, "Root": "/dicom-web/" },
        });
        let path = directory.path().join("orthanc.json");
        std::fs::write(&path, configuration.to_string()).expect("orthanc configuration");
        let log = std::fs::File::create(directory.path().join("orthanc.log")).expect("log");
        let orthanc = tokio::process::Command::new(if Path::new("/usr/sbin/Orthanc").exists() {
            "/usr/sbin/Orthanc"
        } else {
            "Orthanc"
        })
        .arg(&path)
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .expect("Orthanc starts (scripts/pacs-tools.sh installs it)");
        let https_port = free_port();
        let files = server.files("audit");
        let stunnel_configuration = format!(
            "foreground = yes\npid =\ndebug = notice\n[dicomweb]\naccept = 127.0.0.1:{https_port}\nconnect = 127.0.0.1:{http_port}\ncert = {cert}\nkey = {key}\nCAfile = {ca}\nverifyChain = yes\n",
            cert = files.cert.display(),
            key = files.key.display(),
            ca = files.ca_cert.display(),
        );
        let stunnel_path = directory.path().join("stunnel.conf");
        std::fs::write(&stunnel_path, stunnel_configuration).expect("stunnel configuration");
        let log = std::fs::File::create(directory.path().join("stunnel.log")).expect("log");
        let stunnel = tokio::process::Command::new("stunnel4")
            .arg(&stunnel_path)
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("stunnel4 starts (scripts/pacs-tools.sh installs it)");
        let orthanc = Self {
            http: SocketAddr::from(([127, 0, 0, 1], http_port)),
            https_port,
            directory,
            _orthanc: orthanc,
            _stunnel: stunnel,
        };
        listening(http_port, "Orthanc").await;
        listening(https_port, "stunnel").await;
        orthanc
    }

    fn logs(&self) -> String {
        ["orthanc.log", "stunnel.log"]
            .iter()
            .map(|name| {
                std::fs::read_to_string(self.directory.path().join(name)).unwrap_or_default()
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// One request to Orthanc's REST API on its own (plain, loopback) port: what the test looks
    /// at, not the way the bridge goes.
    async fn rest(&self, method: &str, path: &str, body: &str) -> Vec<u8> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(self.http)
            .await
            .expect("connect to Orthanc");
        let head = format!(
            "{method} {path} HTTP/1.0\r\nHost: {}\r\nContent-Length: {}\r\n\r\n",
            self.http,
            body.len()
        );
        stream.write_all(head.as_bytes()).await.expect("head");
        stream.write_all(body.as_bytes()).await.expect("body");
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await.expect("answer");
        let split = answer
            .windows(4)
            .position(|window| window == b"\r\n\r\n")
            .expect("HTTP head");
        let head = String::from_utf8_lossy(&answer[..split]).to_string();
        assert!(head.contains(" 200 "), "{method} {path}: {head}");
        answer[split + 4..].to_vec()
    }

    /// (Orthanc id, SOP Instance UID) of every instance Orthanc holds.
    async fn instances(&self) -> Vec<(String, String)> {
        let ids: Vec<String> =
            serde_json::from_slice(&self.rest("GET", "/instances", "").await).expect("ids");
        let mut instances = Vec::new();
        for id in ids {
            let tags: serde_json::Value = serde_json::from_slice(
                &self
                    .rest("GET", &format!("/instances/{id}/simplified-tags"), "")
                    .await,
            )
            .expect("tags");
            let uid = tags["SOPInstanceUID"].as_str().expect("uid").to_owned();
            instances.push((id, uid));
        }
        instances
    }
}

fn element_text(object: &dicom_object::InMemDicomObject, tag: dicom_core::Tag) -> String {
    object
        .element(tag)
        .map(|element| {
            element
                .to_str()
                .expect("text")
                .trim_end_matches(['\0', ' '])
                .to_owned()
        })
        .unwrap_or_default()
}

fn first_item(
    object: &dicom_object::InMemDicomObject,
    tag: dicom_core::Tag,
) -> dicom_object::InMemDicomObject {
    object
        .element(tag)
        .unwrap_or_else(|_| panic!("{tag} present"))
        .items()
        .expect("a sequence")[0]
        .clone()
}

/// The report destination is an https DICOMweb endpoint (Orthanc behind an OpenSSL TLS front
/// that demands a client certificate). An endpoint whose certificate the configured CA bundle
/// does not vouch for gets nothing, and a bridge without its client certificate gets nothing
/// through: each time the report stays in the outbox with back-off. With the right CA and
/// certificate the preliminary report, then (after the signature) the amended report reach
/// Orthanc over https, the amended one FINAL, VERIFIED, by the signer, naming the preliminary
/// one as its predecessor. An amended report already accepted but not recorded (the bridge
/// stopped in between) is sent again after a restart under the same UID: Orthanc keeps one.
#[tokio::test]
async fn reports_and_amended_reports_go_by_stow_rs_over_https_only_to_the_configured_ca_with_back_off_and_no_duplicate()
 {
    use medai_bridge::amendment::SignatureOutcome;

    let trusted = medai_testkit::TestPki::new();
    let stranger = medai_testkit::TestPki::new();
    let orthanc = HttpsOrthanc::start(&trusted).await;
    let state = tempfile::tempdir().expect("state");
    let database_url = sqlite_url(state.path(), "bridge.db");
    let outbox = Outbox::open(&database_url).await.expect("outbox");
    let ct = Assets::locate().dicom_dir.join("CT_small.dcm");
    let study_instance_uid = uid_of(&ct, tags::STUDY_INSTANCE_UID);
    let tag = answered(&outbox, &ct, &light_outcome("result-https-1")).await;

    let bridge_files = trusted.files("gateway");
    let destination = |ca: &Path, client_certificate: bool| {
        let mut text = format!(
            "initial_backoff_ms = 60000\nmax_backoff_ms = 600000\n[dicomweb]\nurl = \"https://127.0.0.1:{}/dicom-web\"\nca_certificate = \"{}\"\n",
            orthanc.https_port,
            ca.display()
        );
        if client_certificate {
            text.push_str(&format!(
                "certificate = \"{}\"\nkey = \"{}\"\n",
                bridge_files.cert.display(),
                bridge_files.key.display()
            ));
        }
        let destination: ResultDestination = toml::from_str(&text).expect("destination");
        destination
            .dicomweb
            .as_ref()
            .expect("dicomweb")
            .validate()
            .expect("valid destination");
        destination
    };
    let delivery = report_delivery;
    let trusted_ca = trusted.layout.ca_certificate();
    let stranger_ca = stranger.layout.ca_certificate();
    let writer = sea_orm::Database::connect(&database_url)
        .await
        .expect("connect");
    let make_due = || async {
        sea_orm::ConnectionTrait::execute_unprepared(
            &writer,
            "UPDATE bridge_instances SET next_report_at_ms = 0",
        )
        .await
        .expect("make due");
    };
    let row = || async { outbox.all().await.expect("rows")[0].clone() };

    // A CA bundle that does not vouch for the endpoint: refused at the handshake, kept, backed off.
    let summary = delivery(&outbox, destination(stranger_ca.as_path(), true))
        .deliver_due()
        .await
        .expect("outbox");
    assert_eq!((summary.delivered, summary.failed), (0, 1));
    let waiting = row().await;
    assert_eq!(
        (waiting.state.as_str(), waiting.report_attempts),
        (state::INFERRED, 1)
    );
    assert!(
        waiting.next_report_at_ms - now_ms() > 50_000,
        "retried after the back-off"
    );
    // Not due again before its back-off.
    let summary = delivery(&outbox, destination(trusted_ca.as_path(), true))
        .deliver_due()
        .await
        .expect("outbox");
    assert_eq!((summary.delivered, summary.failed), (0, 0));
    // Without the client certificate the endpoint lets nothing through.
    make_due().await;
    let summary = delivery(&outbox, destination(trusted_ca.as_path(), false))
        .deliver_due()
        .await
        .expect("outbox");
    assert_eq!((summary.delivered, summary.failed), (0, 1));
    assert_eq!(row().await.report_attempts, 2);
    assert!(orthanc.instances().await.is_empty(), "{}", orthanc.logs());

    // The configured CA and client certificate: the preliminary report arrives over https.
    make_due().await;
    let summary = delivery(&outbox, destination(trusted_ca.as_path(), true))
        .deliver_due()
        .await
        .expect("outbox");
    assert_eq!(
        (summary.delivered, summary.failed),
        (1, 0),
        "{}",
        orthanc.logs()
    );
    let reported = row().await;
    assert_eq!(reported.state, state::REPORTED);
    let preliminary_uid = reported.report_sop_instance_uid.clone().expect("uid");
    let instances = orthanc.instances().await;
    assert_eq!(
        instances
            .iter()
            .map(|(_, uid)| uid.as_str())
            .collect::<Vec<_>>(),
        [preliminary_uid.as_str()]
    );

    // Signed: the amended report, first to the stranger (kept, backed off), then delivered.
    let signature = SignatureOutcome {
        signer_name: "dr-signer".to_owned(),
        meaning: "APPROVED".to_owned(),
        reason: String::new(),
        signed_at: "2026-11-29T21:45:30Z".to_owned(),
        ledger_seq: 8,
    };
    outbox
        .record_signature(&tag, serde_json::to_string(&signature).expect("json"))
        .await
        .expect("signature");
    let summary = delivery(&outbox, destination(stranger_ca.as_path(), true))
        .deliver_due()
        .await
        .expect("outbox");
    assert_eq!((summary.delivered, summary.failed), (0, 1));
    assert!(outbox.due_amendments(10).await.expect("read").is_empty());
    let waiting = row().await;
    assert_eq!(
        (
            waiting.report_attempts,
            waiting.amended_report_sop_instance_uid
        ),
        (1, None)
    );
    assert!(waiting.next_report_at_ms - now_ms() > 50_000);
    make_due().await;
    let summary = delivery(&outbox, destination(trusted_ca.as_path(), true))
        .deliver_due()
        .await
        .expect("outbox");
    assert_eq!(
        (summary.delivered, summary.failed),
        (1, 0),
        "{}",
        orthanc.logs()
    );
    let amended_uid = row()
        .await
        .amended_report_sop_instance_uid
        .expect("amended report recorded");
    assert_ne!(amended_uid, preliminary_uid);
    let instances = orthanc.instances().await;
    assert_eq!(instances.len(), 2);
    let (amended_id, _) = instances
        .iter()
        .find(|(_, uid)| *uid == amended_uid)
        .expect("the amended report in Orthanc");
    let bytes = orthanc
        .rest("GET", &format!("/instances/{amended_id}/file"), "")
        .await;
    let amended = dicom_object::OpenFileOptions::new()
        .read_preamble(dicom_object::file::ReadPreamble::Always)
        .from_reader(bytes.as_slice())
        .expect("the amended report parses")
        .into_inner();
    assert_eq!(
        element_text(&amended, tags::STUDY_INSTANCE_UID),
        study_instance_uid
    );
    assert_eq!(element_text(&amended, tags::PRELIMINARY_FLAG), "FINAL");
    assert_eq!(element_text(&amended, tags::VERIFICATION_FLAG), "VERIFIED");
    assert_eq!(
        element_text(
            &first_item(&amended, tags::VERIFYING_OBSERVER_SEQUENCE),
            tags::VERIFYING_OBSERVER_NAME
        ),
        "dr-signer"
    );
    let predecessor = first_item(
        &first_item(
            &first_item(&amended, tags::PREDECESSOR_DOCUMENTS_SEQUENCE),
            tags::REFERENCED_SERIES_SEQUENCE,
        ),
        tags::REFERENCED_SOP_SEQUENCE,
    );
    assert_eq!(
        element_text(&predecessor, tags::REFERENCED_SOP_INSTANCE_UID),
        preliminary_uid
    );

    // Accepted but not recorded (the bridge stopped in between): after a restart (the outbox
    // opened again) it is sent again under the same UID, and Orthanc keeps one copy.
    sea_orm::ConnectionTrait::execute_unprepared(
        &writer,
        "UPDATE bridge_instances SET amended_report_sop_instance_uid = NULL",
    )
    .await
    .expect("forget the record");
    drop(outbox);
    let restarted = Outbox::open(&database_url).await.expect("reopen");
    let summary = delivery(&restarted, destination(trusted_ca.as_path(), true))
        .deliver_due()
        .await
        .expect("outbox");
    assert_eq!((summary.delivered, summary.failed), (1, 0));
    assert_eq!(
        restarted.all().await.expect("rows")[0]
            .amended_report_sop_instance_uid
            .as_deref(),
        Some(amended_uid.as_str())
    );
    assert_eq!(orthanc.instances().await.len(), 2, "nothing duplicated");
}

/// The https settings are checked at start: an https url needs its CA bundle, a client
/// certificate needs its key, TLS files need an https url; unusable files are a delivery error
/// (the reports stay due), never a panic.
#[test]
fn https_needs_its_ca_bundle_and_tls_files_need_an_https_url() {
    use medai_bridge::dicomweb::DicomWebDestination;
    use medai_bridge::scu::DeliveryError;

    let problem = |text: &str| {
        toml::from_str::<DicomWebDestination>(text)
            .expect("destination")
            .validate()
            .err()
    };
    assert_eq!(problem("url = \"http://pacs:8042/dicom-web\""), None);
    assert!(
        problem("url = \"https://pacs:8443/dicom-web\"")
            .is_some_and(|problem| problem.contains("ca_certificate"))
    );
    assert_eq!(
        problem("url = \"https://pacs:8443/dicom-web\"\nca_certificate = \"/ca.pem\""),
        None
    );
    assert_eq!(
        problem(
            "url = \"https://[::1]:8443/dicom-web\"\nca_certificate = \"/ca.pem\"\ncertificate = \"/tls.crt\"\nkey = \"/tls.key\""
        ),
        None
    );
    assert!(
        problem(
            "url = \"https://pacs:8443/dicom-web\"\nca_certificate = \"/ca.pem\"\ncertificate = \"/tls.crt\""
        )
        .is_some_and(|problem| problem.contains("together"))
    );
    assert!(
        problem("url = \"http://pacs:8042/dicom-web\"\nca_certificate = \"/ca.pem\"")
            .is_some_and(|problem| problem.contains("https url only"))
    );
    assert!(
        problem(
            "url = \"https://pacs:8443/dicom-web\"\nca_certificate = \"/ca.pem\"\nserver_name = \"not a name!\""
        )
        .is_some_and(|problem| problem.contains("server_name"))
    );
    for url in [
        "ftp://pacs/dicom-web",
        "https:///dicom-web",
        "http://pacs/x?y=1",
    ] {
        assert!(
            problem(&format!("url = \"{url}\"")).is_some_and(|problem| problem.contains("url")),
            "{url}"
        );
    }
    let directory = tempfile::tempdir().expect("dir");
    let empty = directory.path().join("empty.pem");
    std::fs::write(&empty, "not a certificate").expect("write");
    for ca in [directory.path().join("absent.pem"), empty] {
        let destination: DicomWebDestination = toml::from_str(&format!(
            "url = \"https://127.0.0.1:9/dicom-web\"\nca_certificate = \"{}\"",
            ca.display()
        ))
        .expect("destination");
        assert!(matches!(
            destination.tls_client_config(),
            Err(DeliveryError::Associate(_))
        ));
    }
}
