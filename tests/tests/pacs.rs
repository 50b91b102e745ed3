//! The PACS integration, end to end with a real PACS: a throwaway Orthanc (Debian `orthanc`,
//! its own configuration on free ports, declaring the bridge as a modality), the whole mesh
//! (five processes over mTLS, PostgreSQL) and the bridge. Real DICOM files are uploaded to
//! Orthanc through its REST API and Orthanc is asked to send the study to the bridge by
//! C-STORE; dcmtk's `storescu` sends another study as a modality would. Each image comes back
//! into Orthanc as a Structured Report under the same study, whose content matches the
//! gateway's stored result and the ledger, and which dcmtk's `dsrdump` parses cleanly; a
//! multi-frame object's report names the frame the model judged (issue 15).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use dicom_object::file::ReadPreamble;
use dicom_object::{FileMetaTableBuilder, InMemDicomObject, OpenFileOptions};
use medai_bridge::config::BridgeConfig;
use medai_bridge::{BridgeListeners, serve};
use medai_cli::client::GatewayClient;
use medai_e2e::{MeshUnderTest, Storage, authorised};
use medai_proto::gateway::v1 as gw;
use medai_testkit::{Assets, sqlite_url};
use sea_orm::{ConnectionTrait, Database, DatabaseBackend, Statement};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const LIGHT: &str = "synthetic-light";
const BRIDGE_AE: &str = "MEDAI_BRIDGE";
const ORTHANC_AE: &str = "ORTHANC";
const BRIDGE_USER: &str = "pacs-bridge";
const BRIDGE_PASSWORD: &str = "the pacs bridge's password 123";
const UID_ROOT: &str = "1.2.826.0.1.3680043.10.1234";
/// How long the whole round trip may take in a debug build on a shared machine.
const DEADLINE: Duration = Duration::from_secs(240);

/// A port free now, for Orthanc (which binds its own listeners from its configuration).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("address")
        .port()
}

/// One HTTP/1.0 exchange (Orthanc closes after the answer): status and body.
async fn http(address: SocketAddr, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
    let mut stream = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect to Orthanc");
    let head = format!(
        "{method} {path} HTTP/1.0\r\nHost: {address}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.expect("send head");
    stream.write_all(body).await.expect("send body");
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.expect("read answer");
    let split = answer
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .expect("HTTP head");
    let status_line = String::from_utf8_lossy(&answer[..split]).to_string();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .expect("status code");
    (status, answer[split + 4..].to_vec())
}

async fn http_json(
    address: SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
) -> serde_json::Value {
    let (status, body) = http(address, method, path, body).await;
    assert_eq!(
        status,
        200,
        "{method} {path}: {}",
        String::from_utf8_lossy(&body)
    );
    serde_json::from_slice(&body).expect("JSON answer")
}

/// A throwaway Orthanc: its own configuration, storage and ports; killed on drop.
struct Orthanc {
    http: SocketAddr,
    process: tokio::process::Child,
    directory: tempfile::TempDir,
}

impl Orthanc {
    /// Orthanc's DICOM port is chosen before it starts, since the bridge's config names it.
    async fn start(bridge: SocketAddr, dicom_port: u16) -> Self {
        Self::start_with(bridge, dicom_port, free_port(), serde_json::json!({})).await
    }

    /// Orthanc with its HTTP port chosen by the caller and `extra` merged into its configuration
    /// (the DICOMweb plugin for STOW-RS, issue 15).
    async fn start_with(
        bridge: SocketAddr,
        dicom_port: u16,
        http_port: u16,
        extra: serde_json::Value,
    ) -> Self {
        let directory = tempfile::tempdir().expect("orthanc dir");
        let mut configuration = serde_json::json!({
            "Name": "medai-test-pacs",
            "StorageDirectory": directory.path().join("storage"),
            "IndexDirectory": directory.path().join("index"),
            "HttpPort": http_port,
            "DicomPort": dicom_port,
            "DicomAet": ORTHANC_AE,
            "RemoteAccessAllowed": false,
            "AuthenticationEnabled": false,
            "HttpServerEnabled": true,
            "DicomServerEnabled": true,
            "DicomCheckCalledAet": true,
            "DicomAlwaysAllowStore": true,
            "DicomModalities": { "bridge": [BRIDGE_AE, "127.0.0.1", bridge.port()] },
            "Plugins": [],
            "ConcurrentJobs": 2,
            "DicomScuTimeout": 60,
            "StableAge": 60,
        });
        if let (Some(configuration), Some(extra)) =
            (configuration.as_object_mut(), extra.as_object())
        {
            configuration.extend(extra.clone());
        }
        let path = directory.path().join("orthanc.json");
        std::fs::write(&path, configuration.to_string()).expect("write configuration");
        let log = std::fs::File::create(directory.path().join("orthanc.log")).expect("log");
        let orthanc = if Path::new("/usr/sbin/Orthanc").exists() {
            PathBuf::from("/usr/sbin/Orthanc")
        } else {
            PathBuf::from("Orthanc")
        };
        let process = tokio::process::Command::new(orthanc)
            .arg(&path)
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("Orthanc starts (scripts/pacs-tools.sh installs it)");
        let orthanc = Self {
            http: SocketAddr::from(([127, 0, 0, 1], http_port)),
            process,
            directory,
        };
        // Ready when its REST API answers.
        let started = Instant::now();
        loop {
            if let Ok(Ok(stream)) = tokio::time::timeout(
                Duration::from_secs(1),
                tokio::net::TcpStream::connect(orthanc.http),
            )
            .await
            {
                drop(stream);
                let (status, _) = http(orthanc.http, "GET", "/system", b"").await;
                if status == 200 {
                    return orthanc;
                }
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "Orthanc did not start: {}",
                orthanc.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.directory.path().join("orthanc.log")).unwrap_or_default()
    }

    /// Uploads one file; returns Orthanc's id of its study.
    async fn upload(&self, file: &[u8]) -> String {
        let answer = http_json(self.http, "POST", "/instances", file).await;
        answer["ParentStudy"]
            .as_str()
            .expect("parent study")
            .to_owned()
    }

    /// Orthanc's study id for a Study Instance UID.
    async fn study_id(&self, study_instance_uid: &str) -> Option<String> {
        let query = serde_json::json!({
            "Level": "Study",
            "Query": { "StudyInstanceUID": study_instance_uid },
        });
        let answer = http_json(
            self.http,
            "POST",
            "/tools/find",
            query.to_string().as_bytes(),
        )
        .await;
        answer.as_array()?.first()?.as_str().map(str::to_owned)
    }

    /// Orthanc ids of the SR instances filed under a study.
    async fn reports_in(&self, study_id: &str) -> Vec<String> {
        let series = http_json(
            self.http,
            "GET",
            &format!("/studies/{study_id}/series"),
            b"",
        )
        .await;
        series
            .as_array()
            .expect("series")
            .iter()
            .filter(|series| series["MainDicomTags"]["Modality"] == "SR")
            .flat_map(|series| series["Instances"].as_array().cloned().unwrap_or_default())
            .filter_map(|instance| instance.as_str().map(str::to_owned))
            .collect()
    }

    async fn wait_for_reports(&self, study_instance_uid: &str, expected: usize) -> Vec<String> {
        let started = Instant::now();
        loop {
            if let Some(study) = self.study_id(study_instance_uid).await {
                let reports = self.reports_in(&study).await;
                assert!(
                    reports.len() <= expected,
                    "more reports than images: {}",
                    reports.len()
                );
                if reports.len() == expected {
                    return reports;
                }
            }
            assert!(
                started.elapsed() < DEADLINE,
                "no {expected} reports in Orthanc in time; Orthanc log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn file(&self, instance_id: &str) -> Vec<u8> {
        let (status, body) = http(
            self.http,
            "GET",
            &format!("/instances/{instance_id}/file"),
            b"",
        )
        .await;
        assert_eq!(status, 200);
        body
    }
}

/// A copy of a real file under a new SOP Instance UID, so one acquisition becomes a series.
fn copy_as_instance(source: &Path, index: u32) -> (Vec<u8>, String) {
    let file = dicom_object::open_file(source).expect("source file");
    let transfer_syntax = file.meta().transfer_syntax().to_owned();
    let mut object: InMemDicomObject = file.into_inner();
    let uid = format!("{UID_ROOT}.77.{}", index + 1);
    object.put(DataElement::new(
        tags::SOP_INSTANCE_UID,
        VR::UI,
        PrimitiveValue::from(uid.as_str()),
    ));
    object.put(DataElement::new(
        tags::INSTANCE_NUMBER,
        VR::IS,
        PrimitiveValue::from((index + 1).to_string()),
    ));
    let meta = FileMetaTableBuilder::new().transfer_syntax(transfer_syntax);
    let mut bytes = Vec::new();
    object
        .with_meta(meta)
        .expect("meta")
        .write_all(&mut bytes)
        .expect("write copy");
    (bytes, uid)
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

/// What an SR says, read back from Orthanc's copy.
#[derive(Debug)]
struct ReportContent {
    study_instance_uid: String,
    patient_id: String,
    referenced_sop_instance_uid: String,
    result_id: String,
    ledger_seq: u64,
    probabilities: BTreeMap<String, f64>,
    finding: String,
    preliminary: String,
    disclaimer: String,
    /// Referenced Frame Number of the IMAGE item (issue 15): only for a multi-frame source.
    referenced_frame_number: Option<String>,
    /// The JUDGED_FRAME statement: only for a multi-frame source.
    judged_frame: Option<String>,
}

fn read_report(bytes: &[u8]) -> ReportContent {
    let object = OpenFileOptions::new()
        .read_preamble(ReadPreamble::Always)
        .from_reader(bytes)
        .expect("SR parses");
    let text = |object: &InMemDicomObject, tag| {
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
    };
    let mut items: Vec<InMemDicomObject> = Vec::new();
    let mut stack: Vec<InMemDicomObject> = vec![(*object).clone()];
    while let Some(node) = stack.pop() {
        if let Some(children) = node.get(tags::CONTENT_SEQUENCE) {
            for child in children.items().expect("items") {
                items.push(child.clone());
                stack.push(child.clone());
            }
        }
    }
    let concept = |item: &InMemDicomObject| {
        text(
            &item
                .element(tags::CONCEPT_NAME_CODE_SEQUENCE)
                .expect("concept")
                .items()
                .expect("code")[0],
            tags::CODE_VALUE,
        )
    };
    let find = |code: &str| {
        items
            .iter()
            .find(|item| concept(item) == code)
            .unwrap_or_else(|| panic!("no content item {code}"))
    };
    let number = |item: &InMemDicomObject| -> f64 {
        text(
            &item
                .element(tags::MEASURED_VALUE_SEQUENCE)
                .expect("measured")
                .items()
                .expect("value")[0],
            tags::NUMERIC_VALUE,
        )
        .parse()
        .expect("decimal")
    };
    let probabilities = items
        .iter()
        .filter_map(|item| {
            concept(item)
                .strip_prefix("P-")
                .map(|label| (label.to_owned(), number(item)))
        })
        .collect();
    let image = items
        .iter()
        .find(|item| text(item, tags::VALUE_TYPE) == "IMAGE")
        .expect("image reference");
    let finding = &find("121071")
        .element(tags::CONCEPT_CODE_SEQUENCE)
        .expect("code")
        .items()
        .expect("code")[0];
    ReportContent {
        study_instance_uid: text(&object, tags::STUDY_INSTANCE_UID),
        patient_id: text(&object, tags::PATIENT_ID),
        referenced_sop_instance_uid: text(
            &image
                .element(tags::REFERENCED_SOP_SEQUENCE)
                .expect("reference")
                .items()
                .expect("item")[0],
            tags::REFERENCED_SOP_INSTANCE_UID,
        ),
        result_id: text(find("112039"), tags::TEXT_VALUE),
        ledger_seq: number(find("LEDGER_SEQ")) as u64,
        probabilities,
        finding: text(finding, tags::CODE_MEANING),
        preliminary: text(&object, tags::PRELIMINARY_FLAG),
        disclaimer: text(find("DISCLAIMER"), tags::TEXT_VALUE),
        referenced_frame_number: image
            .element(tags::REFERENCED_SOP_SEQUENCE)
            .expect("reference")
            .items()
            .expect("item")[0]
            .get(tags::REFERENCED_FRAME_NUMBER)
            .map(|element| element.to_str().expect("text").trim().to_owned()),
        judged_frame: items
            .iter()
            .find(|item| concept(item) == "JUDGED_FRAME")
            .map(|item| text(item, tags::TEXT_VALUE)),
    }
}

/// (resource, outcome) of every INFERENCE entry in the ledger.
async fn inference_entries(mesh: &MeshUnderTest) -> Vec<(String, String)> {
    let database = Database::connect(mesh.settings.audit_database_url.as_str())
        .await
        .expect("connect to the ledger");
    database
        .query_all_raw(Statement::from_string(
            DatabaseBackend::Postgres,
            "SELECT resource, outcome FROM ledger_entries WHERE action = 'INFERENCE' ORDER BY seq",
        ))
        .await
        .expect("query the ledger")
        .into_iter()
        .map(|row| {
            (
                row.try_get("", "resource").expect("resource"),
                row.try_get("", "outcome").expect("outcome"),
            )
        })
        .collect()
}

fn bridge_config(mesh: &MeshUnderTest, state: &Path, orthanc_dicom_port: u16) -> BridgeConfig {
    let text = format!(
        r#"
dicom_listen_addr = "127.0.0.1:0"
database_url = "{database}"
uid_root = "{UID_ROOT}"
study_quiet_period_ms = 500
poll_interval_ms = 100
[scp]
ae_title = "{BRIDGE_AE}"
allowed_calling_ae_titles = ["{ORTHANC_AE}", "STORESCU"]
[gateway]
endpoint = "{endpoint}"
ca_certificate = "{ca}"
username = "{BRIDGE_USER}"
password = "{BRIDGE_PASSWORD}"
model_name = "{LIGHT}"
model_version = "1"
[results]
address = "127.0.0.1:{orthanc_dicom_port}"
ae_title = "{ORTHANC_AE}"
"#,
        database = sqlite_url(state, "bridge.db"),
        endpoint = mesh.gateway_endpoint(),
        ca = mesh.mesh.pki_layout().ca_certificate().display(),
    );
    medai_runtime::config::load_config("MEDAI_BRIDGE_", Some(&text), &Default::default())
        .expect("valid bridge config")
}

async fn dsrdump_is_clean(bytes: &[u8]) {
    let directory = tempfile::tempdir().expect("dir");
    let path = directory.path().join("report.dcm");
    std::fs::write(&path, bytes).expect("write");
    let dump = tokio::process::Command::new("dsrdump")
        .arg(&path)
        .output()
        .await
        .expect("dsrdump runs (scripts/pacs-tools.sh installs dcmtk)");
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&dump.stdout),
        String::from_utf8_lossy(&dump.stderr)
    );
    assert!(dump.status.success(), "{printed}");
    assert!(
        !printed
            .lines()
            .any(|line| line.starts_with("E:") || line.starts_with("W:")),
        "dsrdump reported problems:\n{printed}"
    );
}

/// The mesh (PostgreSQL) with the bridge's clinician user made: the mesh, an admin token and a
/// gateway client.
async fn mesh_with_bridge_user() -> (MeshUnderTest, String, GatewayClient) {
    mesh_with_bridge_user_and(BTreeMap::new()).await
}

/// The same, with extra environment (`settings`: service name → variables) for some services.
async fn mesh_with_bridge_user_and(
    settings: BTreeMap<String, Vec<(String, String)>>,
) -> (MeshUnderTest, String, GatewayClient) {
    let mesh = MeshUnderTest::start_with(Storage::Postgres, settings).await;
    let admin = mesh.admin_token().await;
    let mut gateway = mesh.gateway().await;
    gateway
        .create_user(authorised(
            gw::CreateUserRequest {
                username: BRIDGE_USER.to_owned(),
                password: BRIDGE_PASSWORD.to_owned(),
                role: "clinician".to_owned(),
            },
            &admin,
        ))
        .await
        .expect("create the bridge's user");
    (mesh, admin, gateway)
}

/// The bridge served in this process on listeners bound here (port 0): DIMSE, and STOW-RS when
/// its configuration has a `[stow]` section.
struct InProcessBridge {
    dicom: SocketAddr,
    stow: Option<SocketAddr>,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), medai_bridge::BridgeError>>,
}

impl InProcessBridge {
    async fn start(config: BridgeConfig) -> Self {
        let bind = || tokio::net::TcpListener::bind("127.0.0.1:0");
        let dicom = bind().await.expect("bind");
        let stow = match config.stow {
            Some(_) => Some(bind().await.expect("bind")),
            None => None,
        };
        let addresses = (
            dicom.local_addr().expect("address"),
            stow.as_ref()
                .map(|stow| stow.local_addr().expect("address")),
        );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(serve(config, BridgeListeners { dicom, stow }, async move {
            let _ = stopped.await;
        }));
        Self {
            dicom: addresses.0,
            stow: addresses.1,
            stop,
            task,
        }
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        self.task
            .await
            .expect("bridge task")
            .expect("bridge stopped cleanly");
    }
}

/// Orthanc's DICOMweb plugin, with the bridge's STOW-RS listener declared as the server
/// `bridge` (with its token) when there is one.
fn orthanc_dicomweb(bridge_stow: Option<SocketAddr>) -> serde_json::Value {
    let mut dicomweb = serde_json::json!({ "Enable": true, "Root": "/dicom-web/" });
    if let Some(bridge_stow) = bridge_stow {
        dicomweb["Servers"] = serde_json::json!({
            "bridge": {
                "Url": format!("http://{bridge_stow}/"),
                "HttpHeaders": { "Authorization": format!("Bearer {STOW_TOKEN}") },
            },
        });
    }
    serde_json::json!({
        "Plugins": ["/usr/share/orthanc/plugins/libOrthancDicomWeb.so"],
        "DicomWeb": dicomweb,
    })
}

/// A clinician (`dr-signer`, made here) re-authenticates and signs `result_id` APPROVED, bound
/// to the stored result's content hash.
async fn sign_as_a_clinician(
    mesh: &MeshUnderTest,
    gateway: &mut GatewayClient,
    admin: &str,
    result_id: &str,
) -> gw::SignResultResponse {
    let signer = mesh.user_token(admin, "dr-signer", "clinician").await;
    let stored = gateway
        .get_result(authorised(
            gw::GetResultRequest {
                result_id: result_id.to_owned(),
            },
            admin,
        ))
        .await
        .expect("result")
        .into_inner()
        .result
        .expect("result");
    let ticket = gateway
        .reauthenticate(authorised(
            gw::ReauthenticateRequest {
                password: "dr-signer password 123".to_owned(),
            },
            &signer,
        ))
        .await
        .expect("reauthenticate")
        .into_inner()
        .signing_ticket;
    gateway
        .sign_result(authorised(
            gw::SignResultRequest {
                result_id: result_id.to_owned(),
                signing_ticket: ticket,
                meaning: "APPROVED".to_owned(),
                reason: String::new(),
                content_sha256: stored.content_sha256,
            },
            &signer,
        ))
        .await
        .expect("sign")
        .into_inner()
}

#[tokio::test]
async fn orthanc_sends_a_study_to_the_bridge_and_files_one_matching_structured_report_per_image() {
    // The light model judges the middle frame of a multi-frame object (issue 15), set in
    // validation's environment as the chart sets it.
    let (mesh, admin, mut gateway) = mesh_with_bridge_user_and(BTreeMap::from([(
        "validation".to_owned(),
        vec![(
            "MEDAI_VALIDATION_FRAMES__BY_MODEL__SYNTHETIC-LIGHT".to_owned(),
            "middle_frame".to_owned(),
        )],
    )]))
    .await;

    // The bridge, on a listener bound here (port 0), pointed at Orthanc for its reports.
    let orthanc_dicom_port = free_port();
    let state = tempfile::tempdir().expect("bridge state");
    let mut config = bridge_config(&mesh, state.path(), orthanc_dicom_port);
    config.scp.max_associations = 4;
    let bridge = InProcessBridge::start(config).await;
    let bridge_address = bridge.dicom;

    let mut orthanc = Orthanc::start(bridge_address, orthanc_dicom_port).await;
    // Orthanc's own check that the bridge answers C-ECHO as the declared modality.
    let (echo_status, echo_body) =
        http(orthanc.http, "POST", "/modalities/bridge/echo", b"{}").await;
    assert_eq!(echo_status, 200, "{}", String::from_utf8_lossy(&echo_body));

    // A multi-image MR series: the real MR_small.dcm as eight instances of one study.
    const IMAGES: u32 = 8;
    let assets = Assets::locate();
    let mr = assets.dicom_dir.join("MR_small.dcm");
    let mr_study = uid_of(&mr, tags::STUDY_INSTANCE_UID);
    let mut sent_instances = BTreeSet::new();
    let mut orthanc_study = String::new();
    for index in 0..IMAGES {
        let (bytes, uid) = copy_as_instance(&mr, index);
        orthanc_study = orthanc.upload(&bytes).await;
        sent_instances.insert(uid);
    }

    let started = Instant::now();
    let store = serde_json::json!({ "Resources": [orthanc_study], "Synchronous": true });
    let (status, body) = http(
        orthanc.http,
        "POST",
        "/modalities/bridge/store",
        store.to_string().as_bytes(),
    )
    .await;
    assert_eq!(
        status,
        200,
        "Orthanc's C-STORE to the bridge: {}",
        String::from_utf8_lossy(&body)
    );
    let stored_after = started.elapsed();
    let reports = orthanc.wait_for_reports(&mr_study, IMAGES as usize).await;
    let round_trip = started.elapsed();
    eprintln!(
        "PACS round trip ({LIGHT}): {IMAGES} images, Orthanc C-STORE to the bridge {:.2} s, last SR stored in Orthanc after {:.2} s (includes the 0.5 s quiet period): {:.2} images/s",
        stored_after.as_secs_f64(),
        round_trip.as_secs_f64(),
        f64::from(IMAGES) / round_trip.as_secs_f64()
    );

    // One SR per image, each matching the gateway's stored result and its ledger entry.
    let source_patient = dicom_object::open_file(&mr)
        .expect("file")
        .element(tags::PATIENT_ID)
        .expect("patient id")
        .to_str()
        .expect("text")
        .trim_end_matches(['\0', ' '])
        .to_owned();
    let ledger = inference_entries(&mesh).await;
    let mut referenced = BTreeSet::new();
    for report in &reports {
        let bytes = orthanc.file(report).await;
        dsrdump_is_clean(&bytes).await;
        let content = read_report(&bytes);
        assert_eq!(content.study_instance_uid, mr_study);
        assert_eq!(content.patient_id, source_patient);
        assert_eq!(content.preliminary, "PRELIMINARY");
        assert!(
            content.disclaimer.starts_with("RESEARCH USE ONLY"),
            "{}",
            content.disclaimer
        );
        // A single-frame source: referenced as a whole, no frame stated.
        assert_eq!(
            (&content.referenced_frame_number, &content.judged_frame),
            (&None, &None)
        );
        assert!(referenced.insert(content.referenced_sop_instance_uid.clone()));
        let stored = gateway
            .get_result(authorised(
                gw::GetResultRequest {
                    result_id: content.result_id.clone(),
                },
                &admin,
            ))
            .await
            .expect("the SR's result id names a stored result")
            .into_inner()
            .result
            .expect("result");
        assert_eq!(stored.model_name, LIGHT);
        assert_eq!(stored.ledger_seq, content.ledger_seq);
        assert_eq!(stored.top_label, content.finding);
        assert_eq!(stored.probabilities.len(), content.probabilities.len());
        for entry in &stored.probabilities {
            let reported = content.probabilities[&entry.label];
            assert!(
                (reported - f64::from(entry.probability)).abs() < 1e-6,
                "{}: {reported} vs {}",
                entry.label,
                entry.probability
            );
        }
        let recorded: Vec<_> = ledger
            .iter()
            .filter(|(resource, _)| resource == &format!("result/{}", content.result_id))
            .collect();
        assert_eq!(
            recorded.len(),
            1,
            "one ledger record per image: {recorded:?}"
        );
        assert_eq!(recorded[0].1, "SUCCESS");
    }
    assert_eq!(
        referenced, sent_instances,
        "every image has its report, none twice"
    );
    assert_eq!(
        ledger.len(),
        IMAGES as usize,
        "no inference recorded beyond one per image: {ledger:?}"
    );

    // dcmtk's storescu as a modality: another study straight to the bridge.
    let ct = assets.dicom_dir.join("CT_small.dcm");
    let ct_study = uid_of(&ct, tags::STUDY_INSTANCE_UID);
    let port = bridge_address.port().to_string();
    let storescu = tokio::process::Command::new("storescu")
        .args(["-aet", "STORESCU", "-aec", BRIDGE_AE, "127.0.0.1", &port])
        .arg(&ct)
        .output()
        .await
        .expect("storescu runs");
    assert!(
        storescu.status.success(),
        "{}{}",
        String::from_utf8_lossy(&storescu.stdout),
        String::from_utf8_lossy(&storescu.stderr)
    );
    let ct_reports = orthanc.wait_for_reports(&ct_study, 1).await;
    let ct_report = read_report(&orthanc.file(&ct_reports[0]).await);
    assert_eq!(
        ct_report.referenced_sop_instance_uid,
        uid_of(&ct, tags::SOP_INSTANCE_UID)
    );
    assert_eq!(ct_report.study_instance_uid, ct_study);

    // Issue 15: a multi-frame object (pydicom's 30-frame ultrasound loop) is judged on the
    // frame the light model's policy names; its SR references frame 16 of the source and says
    // which frame of how many under which policy, as the gateway's answer and ledger record do.
    let ultrasound_loop = assets.dicom_dir.join("examples_ybr_color.dcm");
    let loop_study = uid_of(&ultrasound_loop, tags::STUDY_INSTANCE_UID);
    let orthanc_loop_study = orthanc
        .upload(&std::fs::read(&ultrasound_loop).expect("file"))
        .await;
    let store = serde_json::json!({ "Resources": [orthanc_loop_study], "Synchronous": true });
    let (status, body) = http(
        orthanc.http,
        "POST",
        "/modalities/bridge/store",
        store.to_string().as_bytes(),
    )
    .await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let loop_reports = orthanc.wait_for_reports(&loop_study, 1).await;
    let bytes = orthanc.file(&loop_reports[0]).await;
    dsrdump_is_clean(&bytes).await;
    let loop_report = read_report(&bytes);
    assert_eq!(
        loop_report.referenced_sop_instance_uid,
        uid_of(&ultrasound_loop, tags::SOP_INSTANCE_UID)
    );
    assert_eq!(loop_report.referenced_frame_number.as_deref(), Some("16"));
    assert_eq!(
        loop_report.judged_frame.as_deref(),
        Some("frame 16 of 30, chosen by the model's frame policy middle_frame")
    );

    bridge.stop().await;
    orthanc.process.kill().await.expect("stop Orthanc");
    mesh.stop().await;
}

// --- Crash safety (issue 15): the real `medai-bridge` binary killed with SIGKILL at each point ---

/// The real `medai-bridge` binary, configured by a TOML file; killed with SIGKILL on drop.
struct BridgeProcess {
    child: tokio::process::Child,
    address: SocketAddr,
    log: PathBuf,
}

/// What changes between the bridge's runs in the crash test; the outbox stays the same.
struct BridgeRun<'a> {
    outbox_url: &'a str,
    quiet_period_ms: u64,
    results_port: u16,
}

fn bridge_process_config(mesh: &MeshUnderTest, run: &BridgeRun<'_>, address_file: &Path) -> String {
    format!(
        r#"
dicom_listen_addr = "127.0.0.1:0"
address_file = "{address_file}"
database_url = "{database}"
uid_root = "{UID_ROOT}"
study_quiet_period_ms = {quiet}
poll_interval_ms = 50
[scp]
ae_title = "{BRIDGE_AE}"
allowed_calling_ae_titles = ["STORESCU"]
[gateway]
endpoint = "{endpoint}"
ca_certificate = "{ca}"
username = "{BRIDGE_USER}"
password = "{BRIDGE_PASSWORD}"
model_name = "{LIGHT}"
model_version = "1"
[results]
address = "127.0.0.1:{results_port}"
ae_title = "{ORTHANC_AE}"
max_attempts = 100000
initial_backoff_ms = 50
max_backoff_ms = 400
"#,
        address_file = address_file.display(),
        database = run.outbox_url,
        quiet = run.quiet_period_ms,
        endpoint = mesh.gateway_endpoint(),
        ca = mesh.mesh.pki_layout().ca_certificate().display(),
        results_port = run.results_port,
    )
}

impl BridgeProcess {
    /// Starts the binary and waits until its DICOM listener is bound (its address file).
    async fn start(mesh: &MeshUnderTest, run: &BridgeRun<'_>, directory: &Path) -> Self {
        let run_directory = tempfile::Builder::new()
            .prefix("run")
            .tempdir_in(directory)
            .expect("run dir")
            .keep();
        let address_file = run_directory.join("address.json");
        let config = run_directory.join("bridge.toml");
        std::fs::write(&config, bridge_process_config(mesh, run, &address_file))
            .expect("write the bridge's config");
        let log = run_directory.join("bridge.log");
        let output = std::fs::File::create(&log).expect("log");
        let mut child =
            tokio::process::Command::new(medai_testkit::binaries_dir().join("medai-bridge"))
                .env_clear()
                .env("MEDAI_BRIDGE_CONFIG", &config)
                .stdout(output.try_clone().expect("log"))
                .stderr(output)
                .kill_on_drop(true)
                .spawn()
                .expect("medai-bridge starts (cargo build --workspace --bins)");
        let started = Instant::now();
        let address = loop {
            if let Ok(text) = std::fs::read_to_string(&address_file) {
                let written: serde_json::Value = serde_json::from_str(&text).expect("address JSON");
                break written["dicom"]
                    .as_str()
                    .expect("dicom address")
                    .parse()
                    .expect("socket address");
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "medai-bridge exited ({status}): {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "the bridge never bound"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        Self {
            child,
            address,
            log,
        }
    }

    /// `kill -9`: no shutdown path runs, whatever the bridge was doing.
    async fn kill_9(mut self) {
        self.child.kill().await.expect("SIGKILL the bridge");
        let status = self.child.wait().await.expect("reaped");
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(9),
            "killed by SIGKILL: {}",
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// storescu as a modality; returns how many instances the bridge acknowledged with Success.
async fn store_as_modality(bridge: SocketAddr, files: &[PathBuf]) -> usize {
    let port = bridge.port().to_string();
    let output = tokio::process::Command::new("storescu")
        .args([
            "-v",
            "-aet",
            "STORESCU",
            "-aec",
            BRIDGE_AE,
            "127.0.0.1",
            &port,
        ])
        .args(files)
        .output()
        .await
        .expect("storescu runs (scripts/pacs-tools.sh installs dcmtk)");
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{printed}");
    printed
        .lines()
        .filter(|line| line.contains("Received Store Response (Success)"))
        .count()
}

/// The number of outbox rows in each state, read straight from the bridge's SQLite file.
async fn outbox_states(outbox: &sea_orm::DatabaseConnection) -> BTreeMap<String, i64> {
    outbox
        .query_all_raw(Statement::from_string(
            DatabaseBackend::Sqlite,
            "SELECT state, COUNT(*) AS n FROM bridge_instances GROUP BY state",
        ))
        .await
        .map(|rows| {
            rows.into_iter()
                .map(|row| {
                    (
                        row.try_get::<String>("", "state").expect("state"),
                        row.try_get::<i64>("", "n").expect("count"),
                    )
                })
                .collect()
        })
        // A read that meets the writer's checkpoint is simply read again on the next poll.
        .unwrap_or_default()
}

async fn inference_count(ledger: &sea_orm::DatabaseConnection) -> i64 {
    ledger
        .query_one_raw(Statement::from_string(
            DatabaseBackend::Postgres,
            "SELECT COUNT(*) AS n FROM ledger_entries WHERE action = 'INFERENCE'",
        ))
        .await
        .expect("query the ledger")
        .expect("a row")
        .try_get("", "n")
        .expect("count")
}

/// Polls `condition` (a read of state the processes under test write) until it holds.
async fn wait_until<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let started = Instant::now();
    while !condition().await {
        assert!(
            started.elapsed() < DEADLINE,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn signal(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill {signal} {pid}");
}

#[tokio::test]
async fn instances_acknowledged_to_a_modality_survive_kill_9_at_each_point_with_one_report_and_one_ledger_record_each()
 {
    const FIRST: usize = 6;
    const SECOND: usize = 6;
    let (mut mesh, _, _) = mesh_with_bridge_user().await;
    let ledger_connection = Database::connect(mesh.settings.audit_database_url.as_str())
        .await
        .expect("connect to the ledger");
    let ledger = &ledger_connection;

    // Orthanc is the destination of the reports; `nowhere` is a port nothing listens on, the
    // destination while reports must not go out yet.
    let orthanc_dicom_port = free_port();
    let nowhere = free_port();
    let mut orthanc = Orthanc::start(
        SocketAddr::from(([127, 0, 0, 1], nowhere)),
        orthanc_dicom_port,
    )
    .await;

    // Two studies as files for storescu: the real MR_small.dcm and CT_small.dcm, each copied
    // into a series of instances with their own SOP Instance UIDs.
    let assets = Assets::locate();
    let state = tempfile::tempdir().expect("bridge state");
    let series = |source: &str, first_index: u32, count: usize| {
        let source = assets.dicom_dir.join(source);
        let study = uid_of(&source, tags::STUDY_INSTANCE_UID);
        let mut files = Vec::new();
        let mut uids = BTreeSet::new();
        for offset in 0..count {
            let index = first_index + u32::try_from(offset).expect("small");
            let (bytes, uid) = copy_as_instance(&source, index);
            let path = state.path().join(format!("instance-{index}.dcm"));
            std::fs::write(&path, bytes).expect("write instance");
            files.push(path);
            uids.insert(uid);
        }
        (study, files, uids)
    };
    let (mr_study, mr_files, mr_uids) = series("MR_small.dcm", 0, FIRST);
    let (ct_study, ct_files, ct_uids) = series("CT_small.dcm", 100, SECOND);

    let outbox_url = sqlite_url(state.path(), "outbox.db");
    let holding = BridgeRun {
        outbox_url: &outbox_url,
        quiet_period_ms: 3_600_000,
        results_port: nowhere,
    };
    let forwarding = BridgeRun {
        quiet_period_ms: 200,
        ..holding
    };
    let reporting = BridgeRun {
        results_port: orthanc_dicom_port,
        ..forwarding
    };

    // (a) Stored and acknowledged, not yet forwarded (the study is not quiet for an hour).
    let bridge = BridgeProcess::start(&mesh, &holding, state.path()).await;
    assert_eq!(store_as_modality(bridge.address, &mr_files).await, FIRST);
    let outbox_connection = Database::connect(outbox_url.as_str())
        .await
        .expect("open the bridge's outbox");
    let outbox = &outbox_connection;
    assert_eq!(
        outbox_states(outbox).await,
        BTreeMap::from([("RECEIVED".to_owned(), FIRST as i64)])
    );
    bridge.kill_9().await;

    // (b) While the study streams to the gateway: once the ledger holds the first inference,
    // the gateway is frozen (SIGSTOP) so the stream is certainly open, and the bridge dies.
    let bridge = BridgeProcess::start(&mesh, &forwarding, state.path()).await;
    wait_until(
        "the gateway recorded the first inference",
        move || async move { inference_count(ledger).await >= 1 },
    )
    .await;
    let gateway_pid = mesh.mesh.pid("gateway").expect("gateway pid");
    signal(gateway_pid, "-STOP");
    bridge.kill_9().await;
    let at_kill = outbox_states(outbox).await;
    let recorded_at_kill = inference_count(ledger).await;
    signal(gateway_pid, "-CONT");
    assert!(
        at_kill.get("RECEIVED").copied().unwrap_or(0) >= 1 && recorded_at_kill < FIRST as i64,
        "the bridge was killed mid-study: {at_kill:?}, {recorded_at_kill} inferences recorded"
    );

    // (c) Every answer is back, no report sent (the destination is down): killed again.
    let bridge = BridgeProcess::start(&mesh, &forwarding, state.path()).await;
    wait_until("every instance is answered", move || async move {
        outbox_states(outbox).await == BTreeMap::from([("INFERRED".to_owned(), FIRST as i64)])
    })
    .await;
    bridge.kill_9().await;
    assert_eq!(
        inference_count(ledger).await,
        FIRST as i64,
        "the resent instances were answered from the stored results, not inferred again"
    );
    assert!(
        orthanc.study_id(&mr_study).await.is_none(),
        "no report went out yet"
    );

    // (d) The gateway killed mid-stream: the second study is cut after its first inference.
    let bridge = BridgeProcess::start(&mesh, &reporting, state.path()).await;
    assert_eq!(store_as_modality(bridge.address, &ct_files).await, SECOND);
    wait_until(
        "the gateway recorded the second study's first inference",
        move || async move { inference_count(ledger).await > FIRST as i64 },
    )
    .await;
    mesh.mesh.kill("gateway").await;
    assert!(
        inference_count(ledger).await < (FIRST + SECOND) as i64,
        "the gateway was killed mid-study"
    );
    mesh.mesh
        .restart("gateway", &mesh.settings)
        .await
        .expect("the gateway restarts on its port");

    // Every acknowledged instance ends with exactly one report and one ledger record.
    wait_until("every report is delivered", move || async move {
        outbox_states(outbox).await
            == BTreeMap::from([("REPORTED".to_owned(), (FIRST + SECOND) as i64)])
    })
    .await;
    let log = bridge.log();
    bridge.kill_9().await;
    let entries = inference_entries(&mesh).await;
    assert_eq!(
        entries.len(),
        FIRST + SECOND,
        "one inference record per instance: {entries:?}\nbridge log:\n{log}"
    );
    for (study, uids) in [(&mr_study, &mr_uids), (&ct_study, &ct_uids)] {
        let reports = orthanc.wait_for_reports(study, uids.len()).await;
        let mut referenced = BTreeSet::new();
        for report in &reports {
            let content = read_report(&orthanc.file(report).await);
            assert_eq!(&content.study_instance_uid, study);
            assert!(
                referenced.insert(content.referenced_sop_instance_uid.clone()),
                "two reports for one instance"
            );
            let recorded: Vec<_> = entries
                .iter()
                .filter(|(resource, _)| resource == &format!("result/{}", content.result_id))
                .collect();
            assert_eq!(
                recorded.len(),
                1,
                "one ledger record per report: {recorded:?}"
            );
        }
        assert_eq!(
            &referenced, uids,
            "every acknowledged instance has its report"
        );
    }
    orthanc.process.kill().await.expect("stop Orthanc");
    mesh.stop().await;
}

// --- Study throughput (issue 15): a figure, not a check; run by hand, never in CI ---

/// Orthanc sends an `images`-instance MR series (copies of the real MR_small.dcm) to the bridge,
/// which streams it through the mesh with `model`; the figure is images per second from
/// Orthanc's first C-STORE to the last SR stored back in Orthanc (the bridge's 200 ms quiet
/// period included).
async fn study_throughput(model: &str, images: u32) {
    let (mesh, _, _) = mesh_with_bridge_user().await;
    let orthanc_dicom_port = free_port();
    let state = tempfile::tempdir().expect("bridge state");
    let mut config = bridge_config(&mesh, state.path(), orthanc_dicom_port);
    config.gateway.model_name = model.to_owned();
    config.study_quiet_period_ms = 200;
    let bridge = InProcessBridge::start(config).await;
    let mut orthanc = Orthanc::start(bridge.dicom, orthanc_dicom_port).await;

    let mr = Assets::locate().dicom_dir.join("MR_small.dcm");
    let study_uid = uid_of(&mr, tags::STUDY_INSTANCE_UID);
    let mut orthanc_study = String::new();
    for index in 0..images {
        let (bytes, _) = copy_as_instance(&mr, index);
        orthanc_study = orthanc.upload(&bytes).await;
    }
    let started = Instant::now();
    let store = serde_json::json!({ "Resources": [orthanc_study], "Synchronous": true });
    let (status, body) = http(
        orthanc.http,
        "POST",
        "/modalities/bridge/store",
        store.to_string().as_bytes(),
    )
    .await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let stored_after = started.elapsed();
    let reports = orthanc.wait_for_reports(&study_uid, images as usize).await;
    let elapsed = started.elapsed();
    assert_eq!(reports.len(), images as usize);
    let figure = f64::from(images) / elapsed.as_secs_f64();
    eprintln!(
        "study throughput ({model}, {} build): {images} images, C-STORE to the bridge done after {:.2} s, last SR stored in Orthanc after {:.2} s: {figure:.2} images/s",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        stored_after.as_secs_f64(),
        elapsed.as_secs_f64(),
    );
    bridge.stop().await;
    orthanc.process.kill().await.expect("stop Orthanc");
    mesh.stop().await;
}

/// `scripts/test-servers.sh` then
/// `cargo test --workspace --test pacs study_throughput -- --ignored --nocapture --test-threads 1`.
#[tokio::test]
#[ignore = "a throughput figure, run by hand (see README, Connecting a PACS)"]
async fn study_throughput_with_the_light_model() {
    study_throughput(LIGHT, 32).await;
}

#[tokio::test]
#[ignore = "a throughput figure, run by hand (see README, Connecting a PACS)"]
async fn study_throughput_with_the_brain_mri_model() {
    study_throughput("brain-mri-tumor", 16).await;
}

// --- Amended report after SignResult (issue 15) ---

fn element_text(object: &InMemDicomObject, tag: dicom_core::Tag) -> String {
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

fn first_item(object: &InMemDicomObject, tag: dicom_core::Tag) -> InMemDicomObject {
    object
        .element(tag)
        .unwrap_or_else(|_| panic!("{tag} present"))
        .items()
        .expect("a sequence")[0]
        .clone()
}

fn open_report(bytes: &[u8]) -> InMemDicomObject {
    OpenFileOptions::new()
        .read_preamble(ReadPreamble::Always)
        .from_reader(bytes)
        .expect("SR parses")
        .into_inner()
}

#[tokio::test]
async fn a_result_signed_after_its_preliminary_report_gets_an_amended_verified_report_referencing_it()
 {
    let (mesh, admin, mut gateway) = mesh_with_bridge_user().await;
    let orthanc_dicom_port = free_port();
    let state = tempfile::tempdir().expect("bridge state");
    let mut config = bridge_config(&mesh, state.path(), orthanc_dicom_port);
    config.signature_poll_interval_ms = 200;
    let bridge = InProcessBridge::start(config).await;
    let bridge_address = bridge.dicom;
    let mut orthanc = Orthanc::start(bridge_address, orthanc_dicom_port).await;

    let ct = Assets::locate().dicom_dir.join("CT_small.dcm");
    let ct_study = uid_of(&ct, tags::STUDY_INSTANCE_UID);
    assert_eq!(
        store_as_modality(bridge_address, std::slice::from_ref(&ct)).await,
        1
    );
    let preliminary_id = orthanc.wait_for_reports(&ct_study, 1).await[0].clone();
    let preliminary = open_report(&orthanc.file(&preliminary_id).await);
    assert_eq!(
        element_text(&preliminary, tags::PRELIMINARY_FLAG),
        "PRELIMINARY"
    );
    assert_eq!(
        element_text(&preliminary, tags::VERIFICATION_FLAG),
        "UNVERIFIED"
    );
    let preliminary_uid = element_text(&preliminary, tags::SOP_INSTANCE_UID);
    let result_id = read_report(&orthanc.file(&preliminary_id).await).result_id;

    // A clinician signs the result after the preliminary report was filed.
    let signed = sign_as_a_clinician(&mesh, &mut gateway, &admin, &result_id).await;

    // The amended report: a new instance in the same series, verified by the signer, naming
    // the preliminary one as its predecessor; the preliminary one stays.
    let reports = orthanc.wait_for_reports(&ct_study, 2).await;
    let amended_id = reports
        .iter()
        .find(|id| **id != preliminary_id)
        .expect("a second report")
        .clone();
    let bytes = orthanc.file(&amended_id).await;
    dsrdump_is_clean(&bytes).await;
    let amended = open_report(&bytes);
    assert_ne!(
        element_text(&amended, tags::SOP_INSTANCE_UID),
        preliminary_uid
    );
    assert_eq!(
        element_text(&amended, tags::SERIES_INSTANCE_UID),
        element_text(&preliminary, tags::SERIES_INSTANCE_UID)
    );
    assert_eq!(element_text(&amended, tags::PRELIMINARY_FLAG), "FINAL");
    assert_eq!(element_text(&amended, tags::VERIFICATION_FLAG), "VERIFIED");
    let observer = first_item(&amended, tags::VERIFYING_OBSERVER_SEQUENCE);
    assert_eq!(
        element_text(&observer, tags::VERIFYING_OBSERVER_NAME),
        "dr-signer"
    );
    let signed_at = signed
        .result
        .expect("signed")
        .signature
        .expect("signature")
        .signed_at;
    let compact: String = signed_at
        .chars()
        .filter(char::is_ascii_digit)
        .take(14)
        .collect();
    assert_eq!(
        element_text(&observer, tags::VERIFICATION_DATE_TIME),
        compact
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
    assert_eq!(read_report(&bytes).result_id, result_id);

    bridge.stop().await;
    orthanc.process.kill().await.expect("stop Orthanc");
    mesh.stop().await;
}

// --- PACS STOW-RS (issue 15): Orthanc pushes over DICOMweb and gets its reports the same way ---

const STOW_CLIENT: &str = "ORTHANC_WEB";
const STOW_TOKEN: &str = "the token orthanc presents to the bridge over stow-rs";

/// The bridge taking STOW-RS from Orthanc and sending its reports to Orthanc's DICOMweb root.
fn bridge_stow_config(mesh: &MeshUnderTest, state: &Path, orthanc_http_port: u16) -> BridgeConfig {
    let text = format!(
        r#"
dicom_listen_addr = "127.0.0.1:0"
database_url = "{database}"
uid_root = "{UID_ROOT}"
study_quiet_period_ms = 500
poll_interval_ms = 100
[scp]
ae_title = "{BRIDGE_AE}"
allowed_calling_ae_titles = ["{ORTHANC_AE}"]
[stow]
listen_addr = "127.0.0.1:0"
client_name = "{STOW_CLIENT}"
bearer_token = "{STOW_TOKEN}"
[gateway]
endpoint = "{endpoint}"
ca_certificate = "{ca}"
username = "{BRIDGE_USER}"
password = "{BRIDGE_PASSWORD}"
model_name = "{LIGHT}"
model_version = "1"
[results.dicomweb]
url = "http://127.0.0.1:{orthanc_http_port}/dicom-web"
"#,
        database = sqlite_url(state, "bridge.db"),
        endpoint = mesh.gateway_endpoint(),
        ca = mesh.mesh.pki_layout().ca_certificate().display(),
    );
    medai_runtime::config::load_config("MEDAI_BRIDGE_", Some(&text), &Default::default())
        .expect("valid bridge config")
}

#[tokio::test]
async fn orthanc_pushes_a_study_over_stow_rs_and_gets_each_report_back_over_stow_rs_readable_by_highdicom()
 {
    let (mesh, admin, mut gateway) = mesh_with_bridge_user().await;

    // The bridge: DIMSE and STOW-RS listeners bound here; reports go to Orthanc by STOW-RS only
    // (no C-STORE destination is configured).
    let orthanc_http_port = free_port();
    let state = tempfile::tempdir().expect("bridge state");
    let config = bridge_stow_config(&mesh, state.path(), orthanc_http_port);
    let database_url = config.database_url.clone();
    let bridge = InProcessBridge::start(config).await;

    // Orthanc with its DICOMweb plugin, the bridge declared as a DICOMweb server with its token.
    let mut orthanc = Orthanc::start_with(
        bridge.dicom,
        free_port(),
        orthanc_http_port,
        orthanc_dicomweb(bridge.stow),
    )
    .await;

    const IMAGES: u32 = 3;
    let assets = Assets::locate();
    let mr = assets.dicom_dir.join("MR_small.dcm");
    let mr_study = uid_of(&mr, tags::STUDY_INSTANCE_UID);
    let mut sent_instances = BTreeSet::new();
    let mut orthanc_study = String::new();
    for index in 0..IMAGES {
        let (bytes, uid) = copy_as_instance(&mr, index);
        orthanc_study = orthanc.upload(&bytes).await;
        sent_instances.insert(uid);
    }

    // Orthanc's own STOW-RS client sends the study to the bridge.
    let started = Instant::now();
    let push = serde_json::json!({ "Resources": [orthanc_study], "Synchronous": true });
    let (status, body) = http(
        orthanc.http,
        "POST",
        "/dicom-web/servers/bridge/stow",
        push.to_string().as_bytes(),
    )
    .await;
    assert_eq!(
        status,
        200,
        "Orthanc's STOW-RS to the bridge: {}\n{}",
        String::from_utf8_lossy(&body),
        orthanc.log()
    );
    // Acknowledged only once stored: every instance is in the bridge's outbox, recorded as
    // coming from the STOW-RS client.
    let outbox = medai_bridge::outbox::Outbox::open(&database_url)
        .await
        .expect("the bridge's outbox");
    let received: BTreeSet<String> = outbox
        .all()
        .await
        .expect("rows")
        .into_iter()
        .inspect(|row| assert_eq!(row.calling_ae_title, STOW_CLIENT))
        .map(|row| row.sop_instance_uid)
        .collect();
    assert_eq!(received, sent_instances);

    let reports = orthanc.wait_for_reports(&mr_study, IMAGES as usize).await;
    eprintln!(
        "PACS round trip over STOW-RS ({LIGHT}): {IMAGES} images, last SR stored in Orthanc after {:.2} s",
        started.elapsed().as_secs_f64()
    );

    let ledger = inference_entries(&mesh).await;
    let mut referenced = BTreeSet::new();
    let directory = tempfile::tempdir().expect("dir");
    for report in &reports {
        // Filed by Orthanc's DICOMweb plugin, not by its DICOM server.
        let (status, origin) = http(
            orthanc.http,
            "GET",
            &format!("/instances/{report}/metadata/Origin"),
            b"",
        )
        .await;
        assert_eq!(status, 200);
        assert_ne!(String::from_utf8_lossy(&origin), "DicomProtocol");

        let bytes = orthanc.file(report).await;
        dsrdump_is_clean(&bytes).await;
        let content = read_report(&bytes);
        assert_eq!(content.study_instance_uid, mr_study);
        assert!(referenced.insert(content.referenced_sop_instance_uid.clone()));
        let stored = gateway
            .get_result(authorised(
                gw::GetResultRequest {
                    result_id: content.result_id.clone(),
                },
                &admin,
            ))
            .await
            .expect("the SR's result id names a stored result")
            .into_inner()
            .result
            .expect("result");
        assert_eq!(stored.model_name, LIGHT);
        assert_eq!(stored.ledger_seq, content.ledger_seq);
        assert_eq!(stored.top_label, content.finding);
        for entry in &stored.probabilities {
            let reported = content.probabilities[&entry.label];
            assert!((reported - f64::from(entry.probability)).abs() < 1e-6);
        }
        assert_eq!(
            ledger
                .iter()
                .filter(|(resource, _)| resource == &format!("result/{}", content.result_id))
                .count(),
            1
        );

        // highdicom reads Orthanc's copy as an SR document: the algorithm and the source.
        let path = directory.path().join(format!("{report}.dcm"));
        std::fs::write(&path, &bytes).expect("write");
        let read = &medai_testkit::highdicom_readback(&[path])[0];
        assert_eq!(read["document_class"], "ComprehensiveSR", "{read}");
        assert_eq!(
            read["algorithm_names"],
            serde_json::json!([LIGHT]),
            "{read}"
        );
        assert_eq!(
            read["algorithm_versions"],
            serde_json::json!([stored.model_version])
        );
        assert_eq!(
            read["image_references"][0]["sop_instance_uid"],
            content.referenced_sop_instance_uid.as_str()
        );
        assert_eq!(
            read["evidence"][0]["sop_instance_uid"],
            content.referenced_sop_instance_uid.as_str()
        );
        assert_eq!(read["evidence"][0]["study_instance_uid"], mr_study.as_str());
    }
    assert_eq!(
        referenced, sent_instances,
        "every image has its report, none twice"
    );
    assert_eq!(ledger.len(), IMAGES as usize, "{ledger:?}");

    bridge.stop().await;
    orthanc.process.kill().await.expect("stop Orthanc");
    mesh.stop().await;
}

// --- The amended report over STOW-RS (issue 15) ---

/// The bridge sends its reports to Orthanc by STOW-RS only (no C-STORE destination). A modality
/// stores a CT image; its preliminary report is filed in Orthanc by the DICOMweb plugin. A
/// clinician signs the result (SignResult); the amended report follows by STOW-RS, filed under
/// the same study: FINAL, VERIFIED by the signer, the preliminary report as its predecessor.
/// The bridge is then restarted on the same outbox: nothing is sent again.
#[tokio::test]
async fn a_result_signed_after_its_preliminary_report_went_by_stow_rs_gets_its_amended_report_by_stow_rs_under_the_study()
 {
    let (mesh, admin, mut gateway) = mesh_with_bridge_user().await;
    let orthanc_http_port = free_port();
    let state = tempfile::tempdir().expect("bridge state");
    let start_bridge = |state: &Path| {
        let mut config = bridge_stow_config(&mesh, state, orthanc_http_port);
        config.signature_poll_interval_ms = 200;
        config
            .scp
            .allowed_calling_ae_titles
            .push("STORESCU".to_owned());
        InProcessBridge::start(config)
    };
    let bridge = start_bridge(state.path()).await;
    let bridge_address = bridge.dicom;
    let mut orthanc = Orthanc::start_with(
        bridge_address,
        free_port(),
        orthanc_http_port,
        orthanc_dicomweb(None),
    )
    .await;

    let ct = Assets::locate().dicom_dir.join("CT_small.dcm");
    let ct_study = uid_of(&ct, tags::STUDY_INSTANCE_UID);
    assert_eq!(
        store_as_modality(bridge_address, std::slice::from_ref(&ct)).await,
        1
    );
    let preliminary_id = orthanc.wait_for_reports(&ct_study, 1).await[0].clone();
    let preliminary_bytes = orthanc.file(&preliminary_id).await;
    let preliminary = open_report(&preliminary_bytes);
    assert_eq!(
        element_text(&preliminary, tags::PRELIMINARY_FLAG),
        "PRELIMINARY"
    );
    let preliminary_uid = element_text(&preliminary, tags::SOP_INSTANCE_UID);
    let result_id = read_report(&preliminary_bytes).result_id;

    // A clinician signs the result after the preliminary report was filed.
    sign_as_a_clinician(&mesh, &mut gateway, &admin, &result_id).await;

    // The amended report, filed under the study by the DICOMweb plugin.
    let reports = orthanc.wait_for_reports(&ct_study, 2).await;
    let amended_id = reports
        .iter()
        .find(|id| **id != preliminary_id)
        .expect("a second report")
        .clone();
    let (status, origin) = http(
        orthanc.http,
        "GET",
        &format!("/instances/{amended_id}/metadata/Origin"),
        b"",
    )
    .await;
    assert_eq!(status, 200);
    assert_ne!(
        String::from_utf8_lossy(&origin),
        "DicomProtocol",
        "filed by STOW-RS, not by C-STORE"
    );
    let bytes = orthanc.file(&amended_id).await;
    dsrdump_is_clean(&bytes).await;
    let amended = open_report(&bytes);
    assert_eq!(element_text(&amended, tags::STUDY_INSTANCE_UID), ct_study);
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
    assert_eq!(read_report(&bytes).result_id, result_id);

    // A restart on the same outbox sends nothing again: both reports are recorded as delivered.
    bridge.stop().await;
    let bridge = start_bridge(state.path()).await;
    let outbox = medai_bridge::outbox::Outbox::open(&sqlite_url(state.path(), "bridge.db"))
        .await
        .expect("the bridge's outbox");
    let rows = outbox.all().await.expect("rows");
    assert_eq!(rows.len(), 1);
    assert_eq!(
        rows[0].amended_report_sop_instance_uid.as_deref(),
        Some(element_text(&amended, tags::SOP_INSTANCE_UID).as_str())
    );
    assert!(outbox.due_amendments(10).await.expect("read").is_empty());
    bridge.stop().await;
    let study = orthanc.study_id(&ct_study).await.expect("study");
    assert_eq!(orthanc.reports_in(&study).await.len(), 2);
    orthanc.process.kill().await.expect("stop Orthanc");
    mesh.stop().await;
}
