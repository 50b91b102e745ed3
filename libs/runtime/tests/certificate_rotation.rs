//! Certificates rotate without a restart: files replaced the way the kubelet replaces a
//! cert-manager Secret's volume (a new folder, then the `..data` symlink swapped in one rename)
//! reach new connections, on the server side and on the client side, while a client calls
//! throughout and no call fails; a replacement that does not hold together is refused and the
//! old certificate keeps serving. Real mTLS over TCP between a mesh server and its clients.

// The figures (calls made and failed across the rotation) are printed for the report.
#![allow(clippy::print_stdout)]

/// Replicas behind one name (issue 13): the balanced mesh channel, over the same real mTLS.
mod balance;
/// Pods replaced under callers (issue 13): nothing accepted is dropped, nothing unprocessed is lost.
mod drain;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use medai_devpki::{DevCertificateAuthority, IssuedCertificate};
use medai_runtime::ServiceIdentity;
use medai_runtime::connections::ConnectionLimits;
use medai_runtime::peer_policy::PeerPolicy;
use medai_runtime::server::{incoming, mesh_server};
use medai_runtime::tls::{ClientCertificates, TlsMaterial, certificate_serial};
use medai_testkit::SecretVolume;
use metrics_exporter_prometheus::PrometheusHandle;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

/// How often the services under test look at their files (production: every 5 s).
const WATCH_INTERVAL: Duration = Duration::from_millis(100);
/// How long a rotation may take to be seen before the test fails.
const ROTATION_DEADLINE: Duration = Duration::from_secs(30);

fn serial_of_pem(pem: &str) -> String {
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).expect("a PEM certificate");
    certificate_serial(der.as_ref()).expect("a serial")
}

fn metrics_handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        medai_runtime::admin::install_prometheus_recorder().expect("metrics recorder")
    })
}

fn reload_failures() -> u64 {
    metrics_handle()
        .render()
        .lines()
        .find_map(|line| line.strip_prefix("medai_tls_reload_failures_total "))
        .map_or(0, |value| value.trim().parse().expect("a count"))
}

/// The serial of the client certificate on each connection the server accepted.
type SeenPeers = Arc<Mutex<Vec<String>>>;

/// A mesh server (the production acceptor and layers) answering health on a port-0 listener,
/// recording the client certificate of every connection it accepts. Health is open only to
/// verified peers (the peer policy reads the identity from the connection's certificates), so
/// every successful call also shows that the identity reached the policy.
async fn start_mesh_server(tls: &TlsMaterial) -> (SocketAddr, SeenPeers, oneshot::Sender<()>) {
    use futures::StreamExt;

    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    let seen = SeenPeers::default();
    let (_health_reporter, health_service) = tonic_health::server::health_reporter();
    let server = mesh_server(tls, PeerPolicy::new(), &ConnectionLimits::default())
        .expect("mesh server")
        .add_service(health_service);
    let (stop, stopped) = oneshot::channel::<()>();
    let incoming = {
        let seen = seen.clone();
        incoming(
            listener,
            tls,
            ClientCertificates::Required,
            &ConnectionLimits::default(),
        )
        .inspect(move |connection| {
            if let Ok(connection) = connection {
                let serial = connection
                    .get_ref()
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|chain| chain.first())
                    .and_then(|leaf| certificate_serial(leaf.as_ref()))
                    .unwrap_or_default();
                seen.lock().expect("seen").push(serial);
            }
        })
    };
    tokio::spawn(async move {
        server
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stopped.await;
            })
            .await
            .expect("server");
    });
    (address, seen, stop)
}

/// The serial of the certificate `validation` presents on a new connection.
async fn served_serial(client: &TlsMaterial, address: SocketAddr) -> Result<String, String> {
    medai_testkit::served_certificate_serial(client, address, "validation").await
}

/// Calls made and failed by one caller.
#[derive(Default)]
struct Tally {
    made: AtomicU64,
    failed: AtomicU64,
}

impl Tally {
    fn made(&self) -> u64 {
        self.made.load(Ordering::SeqCst)
    }
    fn failed(&self) -> u64 {
        self.failed.load(Ordering::SeqCst)
    }
}

/// Calls health on `address` until `stop`: over one long-lived channel, or over a new channel
/// (so a new connection) for every call.
fn spawn_caller(
    client: TlsMaterial,
    address: SocketAddr,
    new_connection_per_call: bool,
    stop: Arc<AtomicBool>,
) -> (Arc<Tally>, tokio::task::JoinHandle<()>) {
    let tally = Arc::new(Tally::default());
    let task = {
        let tally = tally.clone();
        tokio::spawn(async move {
            let endpoint = format!("https://{address}");
            let expected = ServiceIdentity::new("validation");
            let mut steady =
                HealthClient::new(client.channel(&endpoint, &expected).expect("channel"));
            while !stop.load(Ordering::SeqCst) {
                let mut health = if new_connection_per_call {
                    HealthClient::new(client.channel(&endpoint, &expected).expect("channel"))
                } else {
                    steady.clone()
                };
                let answer = health
                    .check(HealthCheckRequest {
                        service: String::new(),
                    })
                    .await;
                tally.made.fetch_add(1, Ordering::SeqCst);
                if let Err(status) = answer {
                    eprintln!("call failed: {status}");
                    tally.failed.fetch_add(1, Ordering::SeqCst);
                }
                steady = health;
            }
        })
    };
    (tally, task)
}

/// Waits (polling) until `condition` holds, failing the test after [`ROTATION_DEADLINE`].
async fn wait_until<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + ROTATION_DEADLINE;
    while !condition().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until every caller has made `more` further calls.
async fn wait_for_calls(tallies: &[&Arc<Tally>], more: u64) {
    let targets: Vec<u64> = tallies.iter().map(|tally| tally.made() + more).collect();
    wait_until("the callers made more calls", || {
        let done = tallies
            .iter()
            .zip(&targets)
            .all(|(tally, target)| tally.made() >= *target);
        async move { done }
    })
    .await;
}

struct Pki {
    authority: DevCertificateAuthority,
    ca_pem: String,
}

impl Pki {
    fn new() -> Self {
        let (authority, _key) =
            DevCertificateAuthority::generate("rotation test CA").expect("a CA");
        let ca_pem = authority.certificate_pem().to_owned();
        Self { authority, ca_pem }
    }

    fn issue(&self, service: &str) -> IssuedCertificate {
        self.authority.issue(service).expect("a certificate")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rotated_server_certificate_reaches_new_connections_and_a_bad_one_is_refused() {
    let directory = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new();
    let first = pki.issue("validation");
    let second = pki.issue("validation");
    let (first_serial, second_serial) = (
        serial_of_pem(&first.certificate_pem),
        serial_of_pem(&second.certificate_pem),
    );
    assert_ne!(
        first_serial, second_serial,
        "the renewal has its own serial"
    );

    let mut server_volume = SecretVolume::new(&directory.path().join("validation"));
    server_volume.publish(&pki.ca_pem, &first.certificate_pem, &first.private_key_pem);
    let server_tls = TlsMaterial::load(&server_volume.files()).expect("server material");
    server_tls.watch_files(WATCH_INTERVAL);
    let operator = pki.issue("operator");
    let client = TlsMaterial::from_pem(
        pki.ca_pem.clone().into_bytes(),
        operator.certificate_pem.clone().into_bytes(),
        operator.private_key_pem.clone().into_bytes(),
    )
    .expect("client material");
    let (address, _seen, stop_server) = start_mesh_server(&server_tls).await;
    assert_eq!(
        served_serial(&client, address).await,
        Ok(first_serial.clone())
    );

    let stop = Arc::new(AtomicBool::new(false));
    let (steady, steady_task) = spawn_caller(client.clone(), address, false, stop.clone());
    let (fresh, fresh_task) = spawn_caller(client.clone(), address, true, stop.clone());
    wait_for_calls(&[&steady, &fresh], 5).await;

    // cert-manager renews: same CA, new key, new serial.
    server_volume.publish(
        &pki.ca_pem,
        &second.certificate_pem,
        &second.private_key_pem,
    );
    wait_until("new connections get the renewed certificate", || {
        let client = client.clone();
        let second_serial = second_serial.clone();
        async move { served_serial(&client, address).await == Ok(second_serial) }
    })
    .await;
    assert_eq!(server_tls.serial(), second_serial);
    wait_for_calls(&[&steady, &fresh], 5).await;

    // Bad replacements, each refused while the renewed certificate keeps serving: a key that is
    // not the certificate's, a certificate the trust bundle does not vouch for, and a
    // certificate naming another service.
    let third = pki.issue("validation");
    let foreign_pki = Pki::new();
    let foreign = foreign_pki.issue("validation");
    let other_service = pki.issue("audit");
    let bad_replacements = [
        (
            "mismatched key",
            third.certificate_pem.as_str(),
            second.private_key_pem.as_str(),
        ),
        (
            "another CA",
            foreign.certificate_pem.as_str(),
            foreign.private_key_pem.as_str(),
        ),
        (
            "another identity",
            other_service.certificate_pem.as_str(),
            other_service.private_key_pem.as_str(),
        ),
    ];
    for (what, certificate_pem, key_pem) in bad_replacements {
        let failures_before = reload_failures();
        server_volume.publish(&pki.ca_pem, certificate_pem, key_pem);
        wait_until(&format!("the replacement ({what}) is refused"), || {
            let refused = reload_failures() > failures_before;
            async move { refused }
        })
        .await;
        assert_eq!(
            served_serial(&client, address).await,
            Ok(second_serial.clone()),
            "after a bad replacement ({what}) the renewed certificate keeps serving"
        );
        wait_for_calls(&[&steady, &fresh], 3).await;
    }

    // A good certificate after the bad ones is taken again.
    let fourth = pki.issue("validation");
    let fourth_serial = serial_of_pem(&fourth.certificate_pem);
    server_volume.publish(
        &pki.ca_pem,
        &fourth.certificate_pem,
        &fourth.private_key_pem,
    );
    wait_until("the next good renewal is served", || {
        let client = client.clone();
        let fourth_serial = fourth_serial.clone();
        async move { served_serial(&client, address).await == Ok(fourth_serial) }
    })
    .await;
    wait_for_calls(&[&steady, &fresh], 3).await;

    stop.store(true, Ordering::SeqCst);
    steady_task.await.expect("steady caller");
    fresh_task.await.expect("fresh caller");
    let _ = stop_server.send(());
    println!(
        "server rotation: one channel {} calls ({} failed), a new connection per call {} calls ({} failed)",
        steady.made(),
        steady.failed(),
        fresh.made(),
        fresh.failed()
    );
    assert_eq!(
        steady.failed(),
        0,
        "no call over the long-lived channel failed"
    );
    assert_eq!(fresh.failed(), 0, "no call over a new connection failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rotated_client_certificate_is_presented_on_new_connections() {
    let directory = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new();
    let server = pki.issue("validation");
    let server_tls = TlsMaterial::from_pem(
        pki.ca_pem.clone().into_bytes(),
        server.certificate_pem.into_bytes(),
        server.private_key_pem.into_bytes(),
    )
    .expect("server material");
    let (address, seen, stop_server) = start_mesh_server(&server_tls).await;

    let first = pki.issue("operator");
    let second = pki.issue("operator");
    let second_serial = serial_of_pem(&second.certificate_pem);
    let mut client_volume = SecretVolume::new(&directory.path().join("operator"));
    client_volume.publish(&pki.ca_pem, &first.certificate_pem, &first.private_key_pem);
    let client = TlsMaterial::load(&client_volume.files()).expect("client material");
    client.watch_files(WATCH_INTERVAL);

    let stop = Arc::new(AtomicBool::new(false));
    let (steady, steady_task) = spawn_caller(client.clone(), address, false, stop.clone());
    let (fresh, fresh_task) = spawn_caller(client.clone(), address, true, stop.clone());
    wait_for_calls(&[&steady, &fresh], 5).await;
    assert!(
        seen.lock()
            .expect("seen")
            .iter()
            .all(|serial| *serial == serial_of_pem(&first.certificate_pem)),
        "before the rotation every call presents the first certificate"
    );

    client_volume.publish(
        &pki.ca_pem,
        &second.certificate_pem,
        &second.private_key_pem,
    );
    wait_until("the server sees the renewed client certificate", || {
        let renewed = seen.lock().expect("seen").contains(&second_serial);
        async move { renewed }
    })
    .await;
    wait_for_calls(&[&steady, &fresh], 5).await;

    stop.store(true, Ordering::SeqCst);
    steady_task.await.expect("steady caller");
    fresh_task.await.expect("fresh caller");
    let _ = stop_server.send(());
    println!(
        "client rotation: one channel {} calls ({} failed), a new connection per call {} calls ({} failed)",
        steady.made(),
        steady.failed(),
        fresh.made(),
        fresh.failed()
    );
    assert_eq!(
        steady.failed(),
        0,
        "no call over the long-lived channel failed"
    );
    assert_eq!(fresh.failed(), 0, "no call over a new connection failed");
}

#[test]
fn a_bad_replacement_is_reported_once_and_an_unreadable_file_keeps_the_old_material() {
    use medai_runtime::tls::ReloadOutcome;

    let directory = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new();
    let first = pki.issue("validation");
    let stray = pki.issue("validation");
    let renewed = pki.issue("validation");
    let mut volume = SecretVolume::new(&directory.path().join("validation"));
    volume.publish(&pki.ca_pem, &first.certificate_pem, &first.private_key_pem);
    let tls = TlsMaterial::load(&volume.files()).expect("material");
    let first_serial = serial_of_pem(&first.certificate_pem);
    assert_eq!(tls.reload_if_changed(), ReloadOutcome::Unchanged);

    // A key that is not the certificate's: refused once, then not reported again.
    volume.publish(&pki.ca_pem, &first.certificate_pem, &stray.private_key_pem);
    assert!(matches!(
        tls.reload_if_changed(),
        ReloadOutcome::Refused { reason } if reason.contains("not the certificate's")
    ));
    assert_eq!(tls.reload_if_changed(), ReloadOutcome::Unchanged);
    assert_eq!(tls.serial(), first_serial);

    // A file that cannot be read (the key's link gone): refused once, the old material serves.
    std::fs::remove_file(volume.files().key).expect("remove the key link");
    assert!(matches!(
        tls.reload_if_changed(),
        ReloadOutcome::Refused { reason } if reason.contains("cannot read")
    ));
    assert_eq!(tls.reload_if_changed(), ReloadOutcome::Unchanged);
    assert_eq!(tls.serial(), first_serial);

    // A good renewal is taken.
    volume.publish(
        &pki.ca_pem,
        &renewed.certificate_pem,
        &renewed.private_key_pem,
    );
    let renewed_serial = serial_of_pem(&renewed.certificate_pem);
    assert_eq!(
        tls.reload_if_changed(),
        ReloadOutcome::Reloaded {
            serial: renewed_serial.clone()
        }
    );
    assert_eq!(tls.serial(), renewed_serial);
    assert_eq!(tls.reload_if_changed(), ReloadOutcome::Unchanged);
}
