//! The `medai` command as people use it: the real binary (target/debug/medai) against a real
//! mesh over TLS, checked by its exit codes, its messages and its `-o json` documents.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use dicom_object::{FileMetaTableBuilder, InMemDicomObject};
use medai_e2e::{ADMIN_PASSWORD, MeshUnderTest, Storage, authorised};
use medai_proto::gateway::v1 as gw;
use medai_runtime::tls::{TlsFiles, TlsMaterial};
use medai_testkit::{Assets, TestPki, binaries_dir};
use serde_json::Value;
use tokio_stream::StreamExt;

const UID_ROOT: &str = "1.2.826.0.1.3680043.10.1234.16";

/// Runs `medai` with `arguments`, `stdin` on its standard input, and nothing inherited from
/// the environment that would choose another gateway or state folder.
fn medai(arguments: &[&str], stdin: Option<&str>) -> Output {
    use std::io::Write;
    let mut child = Command::new(binaries_dir().join("medai"))
        .args(arguments)
        .env_remove("MEDAI_GATEWAY")
        .env_remove("MEDAI_STATE_DIR")
        .env_remove("MEDAI_CACERT")
        .env_remove("MEDAI_INFERENCE")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run medai");
    let mut input = child.stdin.take().expect("stdin");
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).expect("write stdin");
    }
    drop(input);
    child.wait_with_output().expect("medai output")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn describe(output: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        output.status.code(),
        text(&output.stdout),
        text(&output.stderr)
    )
}

fn json_of(output: &Output) -> Value {
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|error| panic!("stdout is not JSON ({error}): {}", describe(output)))
}

/// `medai` pointed at one mesh, with one state folder (so one saved session).
struct Medai {
    state_dir: String,
    gateway: String,
    cacert: String,
}

impl Medai {
    fn for_mesh(mesh: &MeshUnderTest, state_dir: &Path) -> Self {
        Self {
            state_dir: state_dir.to_str().expect("utf-8").to_owned(),
            gateway: mesh.gateway_endpoint(),
            cacert: mesh
                .mesh
                .pki_layout()
                .ca_certificate()
                .to_str()
                .expect("utf-8")
                .to_owned(),
        }
    }

    fn run(&self, arguments: &[&str], stdin: Option<&str>) -> Output {
        let mut all: Vec<&str> = vec![
            "--state-dir",
            &self.state_dir,
            "--gateway",
            &self.gateway,
            "--cacert",
            &self.cacert,
        ];
        all.extend_from_slice(arguments);
        medai(&all, stdin)
    }

    fn json(&self, arguments: &[&str], stdin: Option<&str>) -> Value {
        let mut all: Vec<&str> = vec!["-o", "json"];
        all.extend_from_slice(arguments);
        let output = self.run(&all, stdin);
        assert!(output.status.success(), "{}", describe(&output));
        json_of(&output)
    }

    fn login(&self, username: &str, password: &str) {
        let output = self.run(
            &["login", "--username", username, "--password-stdin"],
            Some(&format!("{password}\n")),
        );
        assert!(output.status.success(), "{}", describe(&output));
    }
}

async fn create_user(mesh: &MeshUnderTest, username: &str, password: &str, role: &str) {
    let admin = mesh.admin_token().await;
    mesh.gateway()
        .await
        .create_user(authorised(
            gw::CreateUserRequest {
                username: username.to_owned(),
                password: password.to_owned(),
                role: role.to_owned(),
            },
            &admin,
        ))
        .await
        .expect("create user");
}

/// A free loopback port nothing listens on (bound, read back, released).
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("address").port()
}

#[tokio::test]
async fn medai_names_a_gateway_that_is_down_a_url_without_scheme_a_certificate_mismatch_and_a_wrong_password()
 {
    let mesh = MeshUnderTest::start(Storage::Sqlite).await;
    let state = tempfile::tempdir().expect("state");
    let cli = Medai::for_mesh(&mesh, state.path());
    let password = Some("an admin password for the whole-mesh tests\n");

    // The gateway is down (nothing listens on that port).
    let down = format!("https://127.0.0.1:{}", closed_port());
    let output = medai(
        &[
            "--state-dir",
            &cli.state_dir,
            "--cacert",
            &cli.cacert,
            "--gateway",
            &down,
            "login",
            "--password-stdin",
        ],
        password,
    );
    assert_eq!(output.status.code(), Some(3), "{}", describe(&output));
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains(&format!("cannot reach {down}")) && !stderr.contains("transport error"),
        "{stderr}"
    );
    // The same failure as JSON for programs.
    let output = medai(
        &[
            "-o",
            "json",
            "--state-dir",
            &cli.state_dir,
            "--cacert",
            &cli.cacert,
            "--gateway",
            &down,
            "login",
            "--password-stdin",
        ],
        password,
    );
    assert_eq!(output.status.code(), Some(3), "{}", describe(&output));
    let error: Value = serde_json::from_slice(&output.stderr).expect("stderr is JSON");
    assert_eq!(error["error"]["kind"], "unreachable", "{error}");
    assert_eq!(error["error"]["exit_code"], 3, "{error}");

    // A URL without scheme: a usage error that names the fix.
    let address = cli.gateway.trim_start_matches("https://").to_owned();
    let output = medai(
        &[
            "--state-dir",
            &cli.state_dir,
            "--gateway",
            &address,
            "login",
            "--password-stdin",
        ],
        password,
    );
    assert_eq!(output.status.code(), Some(2), "{}", describe(&output));
    assert!(
        text(&output.stderr).contains(&format!("has no scheme: write https://{address}")),
        "{}",
        describe(&output)
    );

    // The certificate does not carry the name asked for.
    let output = cli.run(
        &["--servername", "medai-audit", "login", "--password-stdin"],
        password,
    );
    assert_eq!(output.status.code(), Some(6), "{}", describe(&output));
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("is not accepted") && stderr.contains("--servername"),
        "{stderr}"
    );

    // A CA that did not sign the gateway's certificate.
    let stranger = TestPki::new();
    let other_ca = stranger.layout.ca_certificate();
    let output = medai(
        &[
            "--state-dir",
            &cli.state_dir,
            "--gateway",
            &cli.gateway,
            "--cacert",
            other_ca.to_str().expect("utf-8"),
            "login",
            "--password-stdin",
        ],
        password,
    );
    assert_eq!(output.status.code(), Some(6), "{}", describe(&output));
    assert!(
        text(&output.stderr).contains("is not accepted"),
        "{}",
        describe(&output)
    );

    // A wrong password: authentication, with the service's reason.
    let output = cli.run(&["login", "--password-stdin"], Some("not the password\n"));
    assert_eq!(output.status.code(), Some(4), "{}", describe(&output));
    assert!(
        text(&output.stderr).contains("login refused"),
        "{}",
        describe(&output)
    );
    assert!(!state.path().join("token").exists());

    // No password option and no terminal to ask on: a usage error that names the options.
    let output = cli.run(&["login", "--username", "alice"], None);
    assert_eq!(output.status.code(), Some(2), "{}", describe(&output));
    assert!(
        text(&output.stderr).contains("--password-stdin"),
        "{}",
        describe(&output)
    );

    // No saved session: authentication too, with what to do.
    let output = cli.run(&["results", "list"], None);
    assert_eq!(output.status.code(), Some(4), "{}", describe(&output));
    assert!(
        text(&output.stderr).contains("run `medai login`"),
        "{}",
        describe(&output)
    );

    // The right one, with a client certificate as well (--cert/--key, accepted by the gateway).
    let pki = mesh.mesh.pki_layout();
    let output = cli.run(
        &[
            "--cert",
            pki.certificate("operator").to_str().expect("utf-8"),
            "--key",
            pki.key("operator").to_str().expect("utf-8"),
            "-o",
            "json",
            "login",
            "--password-stdin",
        ],
        Some(&format!("{ADMIN_PASSWORD}\n")),
    );
    assert!(output.status.success(), "{}", describe(&output));
    assert_eq!(json_of(&output)["role"], "admin");

    // The exit codes are documented in --help.
    let help = medai(&["--help"], None);
    assert!(help.status.success());
    let help = text(&help.stdout);
    for documented in [
        "3  unreachable",
        "4  authentication",
        "5  refused",
        "6  certificate",
    ] {
        assert!(help.contains(documented), "{help}");
    }
    mesh.stop().await;
}

fn forged_expired_token() -> String {
    use base64::Engine;
    let encode = |text: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(text);
    format!(
        "{}.{}.c2lnbmF0dXJl",
        encode(r#"{"alg":"EdDSA","typ":"JWT"}"#),
        encode(r#"{"sub":"someone","exp":1}"#)
    )
}

#[tokio::test]
async fn medai_keeps_the_refresh_token_private_refreshes_an_expired_session_and_logout_revokes_it()
{
    let mesh = MeshUnderTest::start(Storage::Sqlite).await;
    let state = tempfile::tempdir().expect("state");
    let cli = Medai::for_mesh(&mesh, state.path());
    let login = cli.json(
        &["login", "--password-stdin"],
        Some(&format!("{ADMIN_PASSWORD}\n")),
    );
    assert_eq!(login["role"], "admin", "{login}");
    assert!(
        login["refresh_expires_in_seconds"].as_u64() > Some(0),
        "{login}"
    );
    let token_file = state.path().join("token");
    let refresh_file = state.path().join("refresh-token");
    for file in [&token_file, &refresh_file] {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(file).expect("saved").permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{}", file.display());
    }
    let first_refresh = std::fs::read_to_string(&refresh_file).expect("refresh token");

    // The access token has expired: the command refreshes the session by itself.
    let expired = forged_expired_token();
    std::fs::write(&token_file, &expired).expect("expire the token");
    let listed = cli.json(&["results", "list"], None);
    assert!(listed["results"].is_array(), "{listed}");
    let access = std::fs::read_to_string(&token_file).expect("token");
    let second_refresh = std::fs::read_to_string(&refresh_file).expect("refresh token");
    assert_ne!(access.trim(), expired);
    assert_ne!(second_refresh, first_refresh, "the refresh token rotates");

    // Logout revokes the session at the gateway and deletes both files.
    let output = cli.run(&["logout"], None);
    assert!(output.status.success(), "{}", describe(&output));
    assert!(!token_file.exists() && !refresh_file.exists());
    let refused = mesh
        .gateway()
        .await
        .refresh(gw::RefreshRequest {
            refresh_token: second_refresh.trim().to_owned(),
        })
        .await
        .expect_err("a logged-out session cannot be refreshed");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    let revoked = mesh
        .gateway()
        .await
        .list_results(authorised(gw::ListResultsRequest::default(), access.trim()))
        .await
        .expect_err("a logged-out access token is refused");
    assert_eq!(revoked.code(), tonic::Code::Unauthenticated, "{revoked:?}");
    mesh.stop().await;
}

/// A copy of a real DICOM file under a new SOP Instance UID (one acquisition, several
/// instances), written to `path`.
fn write_instance(source: &Path, uid: &str, path: &Path) {
    let file = dicom_object::open_file(source).expect("source file");
    let transfer_syntax = file.meta().transfer_syntax().to_owned();
    let mut object: InMemDicomObject = file.into_inner();
    object.put(DataElement::new(
        tags::SOP_INSTANCE_UID,
        VR::UI,
        PrimitiveValue::from(uid),
    ));
    let meta = FileMetaTableBuilder::new()
        .transfer_syntax(transfer_syntax)
        .media_storage_sop_instance_uid(uid);
    object
        .with_meta(meta)
        .expect("meta")
        .write_to_file(path)
        .expect("write instance");
}

/// The real 64×64 MR image scaled up `factor` times (nearest neighbour), uncompressed: a
/// valid image larger than one gRPC message.
fn write_large_mr(source: &Path, factor: usize, path: &Path) -> u64 {
    let file = dicom_object::open_file(source).expect("MR_small");
    let transfer_syntax = file.meta().transfer_syntax().to_owned();
    let mut object: InMemDicomObject = file.into_inner();
    let rows = usize::from(
        object
            .element(tags::ROWS)
            .expect("rows")
            .to_int::<u16>()
            .expect("rows"),
    );
    let columns = usize::from(
        object
            .element(tags::COLUMNS)
            .expect("columns")
            .to_int::<u16>()
            .expect("columns"),
    );
    let pixels = object
        .element(tags::PIXEL_DATA)
        .expect("pixel data")
        .to_bytes()
        .expect("native pixel data")
        .into_owned();
    assert_eq!(pixels.len(), rows * columns * 2, "16-bit native pixels");
    let (large_rows, large_columns) = (rows * factor, columns * factor);
    let mut large = Vec::with_capacity(large_rows * large_columns * 2);
    for row in 0..large_rows {
        for column in 0..large_columns {
            let at = ((row / factor) * columns + column / factor) * 2;
            large.extend_from_slice(&pixels[at..at + 2]);
        }
    }
    let dimension = |value: usize| PrimitiveValue::from(u16::try_from(value).expect("u16"));
    object.put(DataElement::new(tags::ROWS, VR::US, dimension(large_rows)));
    object.put(DataElement::new(
        tags::COLUMNS,
        VR::US,
        dimension(large_columns),
    ));
    object.put(DataElement::new(
        tags::PIXEL_DATA,
        VR::OW,
        PrimitiveValue::from(large),
    ));
    let uid = format!("{UID_ROOT}.9.1");
    object.put(DataElement::new(
        tags::SOP_INSTANCE_UID,
        VR::UI,
        PrimitiveValue::from(uid.as_str()),
    ));
    let meta = FileMetaTableBuilder::new()
        .transfer_syntax(transfer_syntax)
        .media_storage_sop_instance_uid(uid.as_str());
    object
        .with_meta(meta)
        .expect("meta")
        .write_to_file(path)
        .expect("write the large image");
    std::fs::metadata(path).expect("size").len()
}

#[tokio::test]
async fn medai_infers_small_and_large_images_streams_a_dicom_folder_and_signs_a_result() {
    let mesh = MeshUnderTest::start(Storage::Sqlite).await;
    let assets = Assets::locate();
    let state = tempfile::tempdir().expect("state");
    let work = tempfile::tempdir().expect("work");
    let cli = Medai::for_mesh(&mesh, state.path());
    cli.login("admin", ADMIN_PASSWORD);

    // One small image: one Infer message.
    let small = assets.dicom_dir.join("MR_small.dcm");
    let answer = cli.json(&["infer", small.to_str().expect("utf-8")], None);
    assert!(answer["upload"].is_null(), "{answer}");
    assert!(
        !answer["top_label"].as_str().unwrap_or_default().is_empty(),
        "{answer}"
    );
    let small_result = answer["result_id"].as_str().expect("result id").to_owned();

    // A real image larger than one message: streamed through UploadImage in chunks.
    let large = work.path().join("MR_large.dcm");
    let size = write_large_mr(&small, 24, &large);
    assert!(size > 4 * 1024 * 1024, "{size} bytes");
    let answer = cli.json(&["infer", large.to_str().expect("utf-8")], None);
    let upload_id = answer["upload"]["client_request_id"]
        .as_str()
        .unwrap_or_else(|| panic!("sent through UploadImage: {answer}"))
        .to_owned();
    assert_eq!(answer["upload"]["bytes"], size, "{answer}");
    assert!(answer["upload"]["chunks"].as_u64() >= Some(5), "{answer}");
    assert_eq!(answer["status"], "PRELIMINARY", "{answer}");
    // The ledger's record of that prediction names the upload (only UploadImage carries it),
    // read by an auditor through `medai audit query`.
    create_user(&mesh, "audrey", "audrey password 123", "auditor").await;
    let auditor_state = tempfile::tempdir().expect("auditor state");
    let auditor = Medai::for_mesh(&mesh, auditor_state.path());
    auditor.login("audrey", "audrey password 123");
    let entries = auditor.json(&["audit", "query", "--action", "INFERENCE"], None);
    let uploaded: Vec<&Value> = entries["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .filter(|entry| entry["context"]["client_request_id"] == upload_id.as_str())
        .collect();
    assert_eq!(uploaded.len(), 1, "{entries}");
    let output = auditor.run(&["audit", "query", "--action", "INFERENCE"], None);
    assert!(
        output.status.success() && text(&output.stdout).contains("SEQ"),
        "{}",
        describe(&output)
    );

    // A folder of real DICOM files: three instances of one MR acquisition, a CT image, and an
    // RT plan (no image: refused, the stream goes on).
    let study = work.path().join("study");
    std::fs::create_dir_all(study.join("series-2")).expect("study folder");
    for index in 1..=3 {
        write_instance(
            &small,
            &format!("{UID_ROOT}.1.{index}"),
            &study.join(format!("mr-{index}.dcm")),
        );
    }
    write_instance(
        &assets.dicom_dir.join("CT_small.dcm"),
        &format!("{UID_ROOT}.2.1"),
        &study.join("series-2").join("ct-1.dcm"),
    );
    std::fs::copy(
        assets.dicom_dir.join("rtplan.dcm"),
        study.join("rtplan.dcm"),
    )
    .expect("copy rtplan");
    let study_path = study.to_str().expect("utf-8");
    let output = cli.run(&["-o", "json", "study", "send", study_path], None);
    assert_eq!(output.status.code(), Some(8), "{}", describe(&output));
    let summary = json_of(&output);
    assert_eq!(
        (
            &summary["predicted"],
            &summary["replayed"],
            &summary["refused"]
        ),
        (&Value::from(4), &Value::from(0), &Value::from(1)),
        "{summary}"
    );
    let images = summary["images"].as_array().expect("images");
    assert_eq!(images.len(), 5, "{summary}");
    assert!(
        images
            .iter()
            .all(|image| image["keyed_by_sop_instance_uid"] == true),
        "every instance is keyed by its SOP Instance UID: {summary}"
    );
    let refused: Vec<&Value> = images
        .iter()
        .filter(|image| image["outcome"] == "refused")
        .collect();
    assert!(
        refused.len() == 1
            && refused[0]["file"]
                .as_str()
                .is_some_and(|file| file.ends_with("rtplan.dcm"))
            && !refused[0]["error"]["reason"]
                .as_str()
                .unwrap_or_default()
                .is_empty(),
        "{summary}"
    );
    let first_ids: Vec<Value> = images
        .iter()
        .map(|image| image["result"]["result_id"].clone())
        .collect();

    // Sent again: the same keys bring back the stored results, no new predictions.
    let output = cli.run(&["study", "send", study_path], None);
    assert_eq!(output.status.code(), Some(8), "{}", describe(&output));
    let table = text(&output.stdout);
    assert!(
        table.contains("5 images: 0 predicted, 4 replayed, 1 refused")
            && table.contains("FILE")
            && table.contains("replayed"),
        "{table}"
    );
    let output = cli.run(&["-o", "json", "study", "send", study_path], None);
    let again: Vec<Value> = json_of(&output)["images"]
        .as_array()
        .expect("images")
        .iter()
        .map(|image| image["result"]["result_id"].clone())
        .collect();
    assert_eq!(again, first_ids);

    // Results: list, show, sign (re-authentication first).
    let listed = cli.json(&["results", "list", "--page-size", "100"], None);
    let ids: Vec<&str> = listed["results"]
        .as_array()
        .expect("results")
        .iter()
        .filter_map(|result| result["result_id"].as_str())
        .collect();
    assert!(ids.contains(&small_result.as_str()), "{listed}");
    let shown = cli.json(&["results", "show", &small_result], None);
    assert_eq!(shown["status"], "PRELIMINARY", "{shown}");
    assert_eq!(
        shown["content_sha256"].as_str().map(str::len),
        Some(64),
        "{shown}"
    );

    let output = cli.run(
        &[
            "results",
            "sign",
            &small_result,
            "--meaning",
            "approved",
            "--password-stdin",
        ],
        Some("not my password\n"),
    );
    assert_eq!(output.status.code(), Some(4), "{}", describe(&output));
    let signed = cli.json(
        &[
            "results",
            "sign",
            &small_result,
            "--meaning",
            "approved",
            "--password-stdin",
        ],
        Some(&format!("{ADMIN_PASSWORD}\n")),
    );
    assert_eq!(signed["status"], "SIGNED", "{signed}");
    assert_eq!(signed["signature"]["meaning"], "APPROVED", "{signed}");
    assert!(
        signed["signature_ledger_seq"].as_u64() > Some(0),
        "{signed}"
    );
    // A signed result never changes: a second signature is refused by the service.
    let output = cli.run(
        &[
            "results",
            "sign",
            &small_result,
            "--meaning",
            "reviewed",
            "--password-stdin",
        ],
        Some(&format!("{ADMIN_PASSWORD}\n")),
    );
    assert_eq!(output.status.code(), Some(5), "{}", describe(&output));
    assert!(
        text(&output.stderr).contains("RESULT_ALREADY_SIGNED"),
        "{}",
        describe(&output)
    );
    mesh.stop().await;
}

/// A Service address in front of the inference service whose first pod is draining as the
/// first call reaches it: the front's first connection goes to a pod that reads the HTTP/2
/// connection up to that call's HEADERS and answers GOAWAY(last stream 0, NO_ERROR), so the
/// call is above the last stream id (RFC 9113 §6.8: not processed, may be sent again); every
/// later connection goes to the real inference service, as kube-proxy sends new connections
/// to the pods still ready. Raw frames, so the GOAWAY comes after the call's HEADERS every
/// time and not before the call is made.
struct DrainingFront {
    address: std::net::SocketAddr,
    /// Calls the draining pod answered with GOAWAY.
    refused: Arc<AtomicUsize>,
    /// Connections sent on to the real inference service.
    forwarded: Arc<AtomicUsize>,
}

impl DrainingFront {
    async fn start(tls: &TlsMaterial, inference: std::net::SocketAddr) -> Self {
        let draining = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the draining pod");
        let draining_address = draining.local_addr().expect("address");
        let refused = Arc::new(AtomicUsize::new(0));
        let mut connections = medai_runtime::server::incoming(
            draining,
            tls,
            medai_runtime::tls::ClientCertificates::Required,
            &medai_runtime::connections::ConnectionLimits::default(),
        );
        {
            let refused = refused.clone();
            tokio::spawn(async move {
                while let Some(Ok(connection)) = connections.next().await {
                    let refused = refused.clone();
                    tokio::spawn(answer_the_first_call_with_goaway(connection, refused));
                }
            });
        }
        let front = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the Service address");
        let address = front.local_addr().expect("address");
        let forwarded = Arc::new(AtomicUsize::new(0));
        {
            let forwarded = forwarded.clone();
            tokio::spawn(async move {
                let mut pod = draining_address;
                while let Ok((mut inbound, _)) = front.accept().await {
                    let target = std::mem::replace(&mut pod, inference);
                    if target == inference {
                        forwarded.fetch_add(1, Ordering::SeqCst);
                    }
                    tokio::spawn(async move {
                        if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                }
            });
        }
        Self {
            address,
            refused,
            forwarded,
        }
    }
}

/// One HTTP/2 frame: its 9-byte header (length, type, flags, stream 0) and payload.
fn http2_frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
    let length = u32::try_from(payload.len())
        .expect("a short frame")
        .to_be_bytes();
    let mut frame = vec![length[1], length[2], length[3], kind, flags, 0, 0, 0, 0];
    frame.extend_from_slice(payload);
    frame
}

/// Writes `frame` and flushes it through TLS; false when the connection is gone.
async fn send_frame<S>(connection: &mut S, frame: &[u8]) -> bool
where
    S: tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::AsyncWriteExt;
    connection.write_all(frame).await.is_ok() && connection.flush().await.is_ok()
}

/// The server side of a connection whose server begins draining as the first call arrives:
/// settings exchanged, then the first HEADERS frame answered with GOAWAY(last stream id 0,
/// NO_ERROR) and nothing of the call read further. `refused` counts the calls so answered,
/// before the GOAWAY leaves (so before the client can have seen it).
async fn answer_the_first_call_with_goaway<S>(mut connection: S, refused: Arc<AtomicUsize>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::AsyncReadExt;
    const SETTINGS: u8 = 0x4;
    const HEADERS: u8 = 0x1;
    const GOAWAY: u8 = 0x7;
    const ACK: u8 = 0x1;
    let mut preface = [0_u8; 24];
    if connection.read_exact(&mut preface).await.is_err()
        || &preface != b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
        || !send_frame(&mut connection, &http2_frame(SETTINGS, 0, &[])).await
    {
        return;
    }
    loop {
        let mut header = [0_u8; 9];
        if connection.read_exact(&mut header).await.is_err() {
            return;
        }
        let length = u32::from_be_bytes([0, header[0], header[1], header[2]]);
        let mut payload = vec![0_u8; usize::try_from(length).expect("a frame length")];
        if connection.read_exact(&mut payload).await.is_err() {
            return;
        }
        let answer = match header[3] {
            SETTINGS if header[4] & ACK == 0 => http2_frame(SETTINGS, ACK, &[]),
            HEADERS => {
                refused.fetch_add(1, Ordering::SeqCst);
                // Last stream id 0 (no stream processed), error code NO_ERROR.
                if send_frame(&mut connection, &http2_frame(GOAWAY, 0, &[0; 8])).await {
                    // Read on until the client closes, as a draining server does.
                    let mut rest = Vec::new();
                    let _ = tokio::time::timeout(
                        std::time::Duration::from_secs(30),
                        connection.read_to_end(&mut rest),
                    )
                    .await;
                }
                return;
            }
            _ => continue,
        };
        if !send_frame(&mut connection, &answer).await {
            return;
        }
    }
}

// Two workers: the draining front's tasks run while the test waits on the `medai` process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn medai_models_stages_activates_rolls_back_and_retires_with_the_operator_certificate() {
    // A repository of its own, so lifecycle changes touch nothing shared.
    let state = tempfile::tempdir().expect("state dir");
    let assets = Assets::locate();
    let repository = state.path().join("models");
    let light = assets.model_repository.join("synthetic-light").join("1");
    let copy_version = |version: &str| -> PathBuf {
        let folder = repository.join("synthetic-light").join(version);
        std::fs::create_dir_all(&folder).expect("version folder");
        std::fs::copy(light.join("model.onnx"), folder.join("model.onnx")).expect("model");
        let manifest = std::fs::read_to_string(light.join("manifest.toml")).expect("manifest");
        let manifest = manifest.replace("version = \"1\"", &format!("version = \"{version}\""));
        let manifest = if version == "1" {
            manifest
        } else {
            manifest.replace("status = \"active\"", "status = \"staged\"")
        };
        std::fs::write(folder.join("manifest.toml"), manifest).expect("manifest");
        folder
    };
    copy_version("1");
    let mesh_state = state.path().join("mesh");
    let mut settings = medai_cli::launcher::MeshSettings::embedded(
        &mesh_state,
        &binaries_dir(),
        &repository,
        &assets.onnxruntime_library,
    );
    settings.admin_password = ADMIN_PASSWORD.to_owned();
    let mesh = medai_cli::launcher::RunningMesh::start(&settings)
        .await
        .expect("the mesh starts");
    let inference_address = mesh.address("inference").expect("inference");
    let inference = format!("https://{inference_address}");
    let state_dir = mesh_state.to_str().expect("utf-8").to_owned();
    let models_at = |endpoint: &str, arguments: &[&str]| {
        let mut all: Vec<&str> = vec![
            "--state-dir",
            &state_dir,
            "-o",
            "json",
            "models",
            "--inference",
            endpoint,
        ];
        all.extend_from_slice(arguments);
        medai(&all, None)
    };
    let models = |arguments: &[&str]| models_at(&inference, arguments);
    let status_of = |version: &str| {
        let output = models(&["list"]);
        assert!(output.status.success(), "{}", describe(&output));
        json_of(&output)["versions"]
            .as_array()
            .expect("versions")
            .iter()
            .find(|entry| entry["name"] == "synthetic-light" && entry["version"] == version)
            .map(|entry| entry["status"].as_str().unwrap_or_default().to_owned())
    };
    assert_eq!(status_of("1").as_deref(), Some("ACTIVE"));

    // A lifecycle change without a reason is a usage error before anything is sent.
    let output = models(&["activate", "synthetic-light", "1"]);
    assert_eq!(output.status.code(), Some(2), "{}", describe(&output));
    assert!(
        text(&output.stderr).contains("--reason"),
        "{}",
        describe(&output)
    );

    // Nothing to roll back to yet: refused with the service's stable reason.
    let output = models(&["rollback", "synthetic-light", "--reason", "CR-16 try"]);
    assert_eq!(output.status.code(), Some(5), "{}", describe(&output));
    assert!(
        text(&output.stderr).contains("NO_PREVIOUS_VERSION"),
        "{}",
        describe(&output)
    );

    copy_version("2");
    let changed_at = |endpoint: &str, arguments: &[&str]| {
        let output = models_at(endpoint, arguments);
        assert!(output.status.success(), "{}", describe(&output));
        let outcome = json_of(&output);
        assert!(outcome["ledger_seq"].as_u64() > Some(0), "{outcome}");
        outcome["changed"]["status"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    let changed = |arguments: &[&str]| changed_at(&inference, arguments);
    // Staged through a Service address whose first pod drains as the call reaches it: the
    // GOAWAY proves the call was never processed, so the client sends it again (the resend
    // layer, medai_runtime::unprocessed::RetryNeverProcessed), on a new connection that
    // reaches the inference service; without the layer the command fails with the GOAWAY.
    let pki = settings.pki();
    let inference_tls = TlsMaterial::load(&TlsFiles {
        ca_cert: pki.ca_certificate(),
        cert: pki.certificate("inference"),
        key: pki.key("inference"),
    })
    .expect("the inference certificate");
    let front = DrainingFront::start(&inference_tls, inference_address).await;
    assert_eq!(
        changed_at(
            &format!("https://{}", front.address),
            &["stage", "synthetic-light", "2", "--reason", "CR-16 stage"]
        ),
        "STAGED"
    );
    assert_eq!(
        front.refused.load(Ordering::SeqCst),
        1,
        "the first attempt met the draining pod's GOAWAY"
    );
    assert_eq!(
        front.forwarded.load(Ordering::SeqCst),
        1,
        "the call was sent again, on one new connection, to the inference service"
    );
    assert_eq!(
        changed(&["activate", "synthetic-light", "2", "--reason", "CR-16 go"]),
        "ACTIVE"
    );
    assert_eq!(status_of("1").as_deref(), Some("STAGED"));
    changed(&["rollback", "synthetic-light", "--reason", "CR-16 back"]);
    assert_eq!(status_of("1").as_deref(), Some("ACTIVE"));
    assert_eq!(
        changed(&["retire", "synthetic-light", "2", "--reason", "CR-16 done"]),
        "RETIRED"
    );

    // Another identity's certificate (a KServe client's) may not manage models.
    let kserve_certificate = settings.pki().certificate("kserve-client");
    let kserve_key = settings.pki().key("kserve-client");
    let output = medai(
        &[
            "--state-dir",
            &state_dir,
            "--cert",
            kserve_certificate.to_str().expect("utf-8"),
            "--key",
            kserve_key.to_str().expect("utf-8"),
            "models",
            "--inference",
            &inference,
            "list",
        ],
        None,
    );
    assert_eq!(output.status.code(), Some(5), "{}", describe(&output));
    assert!(
        text(&output.stderr).contains("PermissionDenied"),
        "{}",
        describe(&output)
    );
    mesh.stop(std::time::Duration::from_secs(10)).await;
}

/// Every process below `pid` (Linux /proc).
fn descendants(pid: u32) -> Vec<u32> {
    let children: Vec<u32> = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|child| child.parse().ok())
        .collect();
    let mut all = children.clone();
    for child in children {
        all.extend(descendants(child));
    }
    all
}

/// True while the process's main thread is blocked in read(2) (syscall 0 on x86-64 and 63 on
/// aarch64).
fn blocked_in_read(pid: u32) -> bool {
    let syscall = std::fs::read_to_string(format!("/proc/{pid}/syscall")).unwrap_or_default();
    let number = syscall.split_whitespace().next().unwrap_or_default();
    let read = if cfg!(target_arch = "aarch64") {
        "63"
    } else {
        "0"
    };
    number == read
        && std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .is_ok_and(|name| name.trim() == "medai")
}

#[test]
fn medai_asks_for_the_password_on_a_terminal_without_echoing_it() {
    use std::io::{Read, Write};
    let state = tempfile::tempdir().expect("state");
    let down = format!("https://127.0.0.1:{}", closed_port());
    let pki = TestPki::new();
    let command_line = format!(
        "{} --state-dir {} --cacert {} --gateway {down} login --username alice",
        binaries_dir().join("medai").display(),
        state.path().display(),
        pki.layout.ca_certificate().display()
    );
    // `script` runs the command on a pseudo-terminal, as a person at a terminal would.
    let mut child = Command::new("script")
        .args(["-q", "-e", "-c", &command_line, "/dev/null"])
        .env_remove("MEDAI_GATEWAY")
        .env_remove("MEDAI_STATE_DIR")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run medai under script");
    let mut stdin = child.stdin.take().expect("stdin");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut transcript = Vec::new();
    let mut buffer = [0u8; 256];
    // Type only once the prompt is shown (echo is off by then).
    while !String::from_utf8_lossy(&transcript).contains("Password for alice:") {
        let read = stdout.read(&mut buffer).expect("read the terminal");
        assert!(
            read > 0,
            "no prompt: {}",
            String::from_utf8_lossy(&transcript)
        );
        transcript.extend_from_slice(&buffer[..read]);
    }
    // The prompt is written just before echo is turned off: type only once medai (somewhere
    // under script) is blocked reading the terminal, which it does after turning echo off.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !descendants(child.id()).into_iter().any(blocked_in_read) {
        assert!(
            std::time::Instant::now() < deadline,
            "medai never waited for the password"
        );
        std::thread::yield_now();
    }
    let secret = "a secret typed at the terminal";
    stdin
        .write_all(format!("{secret}\n").as_bytes())
        .expect("type the password");
    stdout.read_to_end(&mut transcript).expect("read the rest");
    let status = child.wait().expect("script exits");
    drop(stdin);
    let transcript = String::from_utf8_lossy(&transcript).into_owned();
    // The password was read (the command went on to the gateway, which is down) and never shown.
    assert_eq!(status.code(), Some(3), "{transcript}");
    assert!(transcript.contains("cannot reach"), "{transcript}");
    assert!(
        !transcript.contains(secret),
        "the password was echoed: {transcript}"
    );
}

#[test]
fn every_service_binary_answers_help_and_version_and_refuses_unknown_arguments() {
    for service in medai_cli::launcher::SERVICES {
        let binary = binaries_dir().join(format!("medai-{service}"));
        let run = |argument: &str| {
            Command::new(&binary)
                .arg(argument)
                .env_clear()
                .output()
                .expect("run the service binary")
        };
        let help = run("--help");
        assert!(
            help.status.success(),
            "{service} --help: {}",
            describe(&help)
        );
        let shown = text(&help.stdout);
        assert!(
            shown.contains(&format!("Usage: medai-{service}"))
                && shown.contains("--print-config")
                && shown.contains("--probe"),
            "{shown}"
        );
        let version = run("--version");
        assert!(
            version.status.success(),
            "{service} --version: {}",
            describe(&version)
        );
        assert_eq!(
            text(&version.stdout).trim(),
            format!("medai-{service} {}", env!("CARGO_PKG_VERSION"))
        );
        let unknown = run("--frobnicate");
        assert_eq!(unknown.status.code(), Some(2), "{}", describe(&unknown));
        assert!(
            text(&unknown.stderr).contains("unknown argument \"--frobnicate\""),
            "{}",
            describe(&unknown)
        );
        assert_runtime_size_is_checked(&binary, &["--version"]);
    }
    // The DICOM bridge is a service binary too (it has no `--probe`: no gRPC health of its own).
    let bridge = |argument: &str| {
        Command::new(binaries_dir().join("medai-bridge"))
            .arg(argument)
            .env_clear()
            .output()
            .expect("run medai-bridge")
    };
    let help = bridge("--help");
    assert!(help.status.success(), "bridge --help: {}", describe(&help));
    assert!(
        text(&help.stdout).contains("Usage: medai-bridge")
            && text(&help.stdout).contains("--print-config"),
        "{}",
        describe(&help)
    );
    let version = bridge("--version");
    assert_eq!(
        text(&version.stdout).trim(),
        format!("medai-bridge {}", env!("CARGO_PKG_VERSION")),
        "{}",
        describe(&version)
    );
    let unknown = bridge("--frobnicate");
    assert_eq!(unknown.status.code(), Some(2), "{}", describe(&unknown));
    assert!(
        text(&unknown.stderr).contains("unknown argument \"--frobnicate\""),
        "{}",
        describe(&unknown)
    );
    assert_runtime_size_is_checked(&binaries_dir().join("medai-bridge"), &["--version"]);
    let version = medai(&["--version"], None);
    assert!(version.status.success());
    assert!(text(&version.stdout).contains(env!("CARGO_PKG_VERSION")));
    // `medai --version` is answered before any runtime starts; `logout` with no session needs one.
    assert_runtime_size_is_checked(&binaries_dir().join("medai"), &["logout"]);
}

/// A binary sized by `TOKIO_WORKER_THREADS` runs with a count of at least 1 and refuses any
/// other as a configuration error (exit 2, the variable named), where tokio would panic.
fn assert_runtime_size_is_checked(binary: &std::path::Path, arguments: &[&str]) {
    let state = tempfile::tempdir().expect("a state folder");
    let run_with = |workers: &str| {
        Command::new(binary)
            .args(arguments)
            .env_clear()
            .env("MEDAI_STATE_DIR", state.path())
            .env("TOKIO_WORKER_THREADS", workers)
            .output()
            .expect("run the binary")
    };
    let one = run_with("1");
    let said = text(&one.stderr);
    assert!(
        one.status
            .code()
            .is_some_and(|code| code != 2 && code != 101)
            && !said.contains("TOKIO_WORKER_THREADS")
            && !said.contains("panicked"),
        "{}: {}",
        binary.display(),
        describe(&one)
    );
    for refused in ["0", "two"] {
        let output = run_with(refused);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{}: {}",
            binary.display(),
            describe(&output)
        );
        let message = text(&output.stderr);
        assert!(
            message.contains("TOKIO_WORKER_THREADS must be a whole number of at least 1")
                && !message.contains("panicked"),
            "{}: {message}",
            binary.display()
        );
    }
}

/// `medai up` and `medai demo` as a program drives them: `-o json` gives one document each
/// (`up` on one line while the mesh runs), whose endpoints, paths and process ids are real.
#[tokio::test]
async fn medai_up_and_demo_print_one_json_document_a_program_can_use() {
    use std::io::BufRead;
    use std::os::unix::fs::PermissionsExt;

    let state = tempfile::tempdir().expect("state dir");
    let state_dir = state.path().to_str().expect("utf-8").to_owned();
    let assets = Assets::locate();
    let model_repository = assets.model_repository.to_str().expect("utf-8").to_owned();
    let onnxruntime = assets
        .onnxruntime_library
        .to_str()
        .expect("utf-8")
        .to_owned();
    let embedded = [
        "--port",
        "0",
        "--model-repository",
        &model_repository,
        "--onnxruntime-library",
        &onnxruntime,
    ];

    // `up`: the document arrives while the mesh runs.
    let mut up = Command::new(binaries_dir().join("medai"))
        .args(["-o", "json", "--state-dir", &state_dir, "up"])
        .args(embedded)
        .env_remove("MEDAI_GATEWAY")
        .env_remove("MEDAI_STATE_DIR")
        .env_remove("MEDAI_CACERT")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run medai up");
    let mut stdout = std::io::BufReader::new(up.stdout.take().expect("stdout"));
    let mut first = String::new();
    stdout.read_line(&mut first).expect("read the document");
    let document: Value = serde_json::from_str(&first)
        .unwrap_or_else(|error| panic!("`up -o json` printed no JSON line ({error}): {first:?}"));
    eprintln!("medai up -o json: {document}");
    let gateway = document["gateway"].as_str().expect("gateway").to_owned();
    assert!(gateway.starts_with("https://127.0.0.1:"), "{document}");
    for service in medai_cli::launcher::SERVICES {
        let entry = &document["services"][service];
        let grpc: std::net::SocketAddr = entry["grpc"]
            .as_str()
            .and_then(|address| address.parse().ok())
            .unwrap_or_else(|| panic!("{service}: no gRPC address in {document}"));
        if service == "gateway" {
            assert_eq!(gateway, format!("https://{grpc}"));
        }
        let pid = entry["pid"].as_u64().expect("pid");
        let command = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        assert!(
            command.contains(&format!("medai-{service}")),
            "{service}: pid {pid} runs {command:?}"
        );
        let admin: std::net::SocketAddr = entry["admin"]
            .as_str()
            .and_then(|address| address.parse().ok())
            .expect("admin address");
        assert_eq!(entry["metrics"], format!("http://{admin}/metrics"));
        assert!(
            medai_e2e::http_get(admin, "/metrics")
                .await
                .starts_with("HTTP/1.1 200"),
            "{service}: metrics at {admin}"
        );
        assert!(Path::new(entry["log"].as_str().expect("log")).is_file());
    }
    let ca = document["ca_certificate"].as_str().expect("ca").to_owned();
    assert!(
        std::fs::read_to_string(&ca)
            .expect("the CA file")
            .starts_with("-----BEGIN CERTIFICATE-----")
    );
    let password_file = document["admin_password_file"]
        .as_str()
        .expect("password file")
        .to_owned();
    let mode = std::fs::metadata(&password_file)
        .expect("the password file")
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "{password_file} is readable by others");
    // What it names is enough to log in.
    let login = medai(
        &[
            "-o",
            "json",
            "--state-dir",
            &state_dir,
            "--gateway",
            &gateway,
            "--cacert",
            &ca,
            "login",
            "--password-file",
            &password_file,
        ],
        None,
    );
    assert!(login.status.success(), "{}", describe(&login));
    assert_eq!(json_of(&login)["role"], "admin");
    // Stopped like Ctrl-C would: nothing more on stdout, exit 0.
    let pid = up.id().to_string();
    let signal = Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .expect("kill");
    assert!(signal.success());
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).expect("the rest of stdout");
    let ended = up.wait().expect("up exits");
    assert!(ended.success(), "up exited {ended:?}");
    assert_eq!(rest, "", "`up -o json` printed more than its document");

    // `demo`: one document with the mesh, the prediction, its decision and the ledger check.
    let image = assets.dicom_dir.join("MR_small.dcm");
    let mut arguments = vec!["-o", "json", "--state-dir", &state_dir, "demo"];
    arguments.extend_from_slice(&embedded);
    arguments.push(image.to_str().expect("utf-8"));
    let demo = medai(&arguments, None);
    assert!(demo.status.success(), "{}", describe(&demo));
    let document = json_of(&demo);
    eprintln!("medai demo -o json: {document}");
    assert!(
        document["gateway"]
            .as_str()
            .is_some_and(|gateway| gateway.starts_with("https://127.0.0.1:")),
        "{document}"
    );
    assert_eq!(document["login"]["role"], "admin");
    let prediction = &document["prediction"];
    assert_eq!(prediction["model_name"], "brain-mri-tumor", "{document}");
    assert!(
        ["glioma", "meningioma", "notumor", "pituitary"]
            .contains(&prediction["top_label"].as_str().unwrap_or_default()),
        "{document}"
    );
    assert!(
        prediction["decision"]
            .as_str()
            .is_some_and(|decision| !decision.is_empty()),
        "{document}"
    );
    assert_eq!(prediction["status"], "PRELIMINARY");
    let ledger = &document["ledger"];
    assert_eq!(ledger["intact"], true, "{document}");
    assert_eq!(ledger["head_hash"], prediction["ledger_hash"], "{document}");
    assert!(
        ledger["entries_checked"].as_u64().unwrap_or_default()
            >= prediction["ledger_seq"].as_u64().expect("ledger_seq"),
        "{document}"
    );
    assert_eq!(document["stopped"], true);
}
