//! A running service binary takes a renewed certificate without a restart: `medai-validation`
//! runs as its own process with its certificate in a folder laid out as the kubelet mounts a
//! cert-manager Secret; a client calls it throughout over mTLS (one long-lived channel and a new
//! connection per call); the folder's `..data` symlink is swapped to a renewal from the same CA
//! and new connections get the new serial with no failed call; then a replacement whose key is
//! not the certificate's is refused (counted on the admin port) while the renewal keeps serving.

// The figures (calls made and failed across the rotation) are printed for the report.
#![allow(clippy::print_stdout)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use medai_devpki::DevCertificateAuthority;
use medai_runtime::ServiceIdentity;
use medai_runtime::process::BoundAddresses;
use medai_runtime::tls::TlsMaterial;
use medai_testkit::{SecretVolume, binaries_dir, served_certificate_serial};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

/// The service looks at its files every 5 s; a rotation is seen well within this.
const ROTATION_DEADLINE: Duration = Duration::from_secs(60);

fn serial_of_pem(pem: &str) -> String {
    let (_, parsed) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).expect("PEM");
    medai_runtime::tls::certificate_serial(&parsed.contents).expect("serial")
}

async fn wait_until<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + ROTATION_DEADLINE;
    while !condition().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn reload_failures(exposition: &str) -> u64 {
    exposition
        .lines()
        .find_map(|line| line.strip_prefix("medai_tls_reload_failures_total "))
        .map_or(0, |value| value.trim().parse().expect("a count"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_service_process_serves_its_renewed_certificate_without_a_restart_or_a_failed_call() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let (authority, _) = DevCertificateAuthority::generate("rotation CA").expect("CA");
    let ca_pem = authority.certificate_pem().to_owned();
    let first = authority.issue("validation").expect("certificate");
    let renewed = authority.issue("validation").expect("renewal");
    let renewed_serial = serial_of_pem(&renewed.certificate_pem);
    let mut volume = SecretVolume::new(&scratch.path().join("etc/medai/tls"));
    volume.publish(&ca_pem, &first.certificate_pem, &first.private_key_pem);
    let files = volume.files();

    let address_file = scratch.path().join("addresses.json");
    let mut child = tokio::process::Command::new(binaries_dir().join("medai-validation"))
        .env_clear()
        .env("MEDAI_VALIDATION_PROCESS__LISTEN_ADDR", "127.0.0.1:0")
        .env("MEDAI_VALIDATION_PROCESS__ADMIN_ADDR", "127.0.0.1:0")
        .env("MEDAI_VALIDATION_PROCESS__ADDRESS_FILE", &address_file)
        .env("MEDAI_VALIDATION_TLS__CA_CERT", &files.ca_cert)
        .env("MEDAI_VALIDATION_TLS__CERT", &files.cert)
        .env("MEDAI_VALIDATION_TLS__KEY", &files.key)
        .kill_on_drop(true)
        .spawn()
        .expect("start medai-validation");
    wait_until("the service wrote its addresses", || {
        let exists = address_file.exists();
        async move { exists }
    })
    .await;
    let addresses: BoundAddresses =
        serde_json::from_slice(&std::fs::read(&address_file).expect("addresses")).expect("JSON");
    let (grpc, admin): (SocketAddr, SocketAddr) =
        (addresses.grpc, addresses.admin.expect("admin port"));

    let operator = authority.issue("operator").expect("operator");
    let client = TlsMaterial::from_pem(
        ca_pem.clone().into_bytes(),
        operator.certificate_pem.into_bytes(),
        operator.private_key_pem.into_bytes(),
    )
    .expect("client material");
    assert_eq!(
        served_certificate_serial(&client, grpc, "validation").await,
        Ok(serial_of_pem(&first.certificate_pem))
    );

    let stop = Arc::new(AtomicBool::new(false));
    let made = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let mut callers = Vec::new();
    for new_connection_per_call in [false, true] {
        let (client, stop, made, failed) =
            (client.clone(), stop.clone(), made.clone(), failed.clone());
        callers.push(tokio::spawn(async move {
            let endpoint = format!("https://{grpc}");
            let expected = ServiceIdentity::new("validation");
            let steady = HealthClient::new(client.channel(&endpoint, &expected).expect("channel"));
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
                made.fetch_add(1, Ordering::SeqCst);
                if let Err(status) = answer {
                    eprintln!("call failed: {status}");
                    failed.fetch_add(1, Ordering::SeqCst);
                }
            }
        }));
    }

    volume.publish(&ca_pem, &renewed.certificate_pem, &renewed.private_key_pem);
    wait_until("new connections get the renewed certificate", || {
        let client = client.clone();
        let renewed_serial = renewed_serial.clone();
        async move {
            served_certificate_serial(&client, grpc, "validation").await == Ok(renewed_serial)
        }
    })
    .await;
    let made_at_renewal = made.load(Ordering::SeqCst);

    // A replacement whose key is not the certificate's: refused, counted, the renewal serves on.
    let stray = authority.issue("validation").expect("another key");
    volume.publish(&ca_pem, &renewed.certificate_pem, &stray.private_key_pem);
    wait_until(
        "the bad replacement is refused and counted",
        || async move { reload_failures(&medai_e2e::http_get(admin, "/metrics").await) == 1 },
    )
    .await;
    assert_eq!(
        served_certificate_serial(&client, grpc, "validation").await,
        Ok(renewed_serial.clone()),
        "the renewed certificate keeps serving after a bad replacement"
    );
    wait_until("the callers went on calling", || {
        let more = made.load(Ordering::SeqCst) >= made_at_renewal + 20;
        async move { more }
    })
    .await;

    stop.store(true, Ordering::SeqCst);
    for caller in callers {
        caller.await.expect("caller");
    }
    assert!(
        child.try_wait().expect("status").is_none(),
        "the service was never restarted"
    );
    let _ = child.kill().await;
    println!(
        "process rotation: {} calls, {} failed",
        made.load(Ordering::SeqCst),
        failed.load(Ordering::SeqCst)
    );
    assert_eq!(failed.load(Ordering::SeqCst), 0, "no call failed");
}
