//! The auditor's view of the ledger through the gateway, and the offline verifier run as the
//! real `medai` binary with no database and no service.

use medai_e2e::{ADMIN_PASSWORD, MeshUnderTest, Storage, authorised};
use medai_proto::audit::v1::QueryEventsRequest;
use medai_proto::gateway::v1 as gw;
use tonic::Code;

async fn login(mesh: &MeshUnderTest, username: &str, password: &str) -> String {
    let request = gw::LoginRequest {
        username: username.to_owned(),
        password: password.to_owned(),
    };
    mesh.gateway()
        .await
        .login(request)
        .await
        .expect("login")
        .into_inner()
        .grant
        .expect("tokens")
        .access_token
}

fn medai(arguments: &[&str]) -> std::process::Output {
    std::process::Command::new(medai_testkit::binaries_dir().join("medai"))
        .args(arguments)
        .output()
        .expect("run medai")
}

#[tokio::test]
async fn an_auditor_exports_the_ledger_and_verifies_it_offline() {
    let mesh = MeshUnderTest::start(Storage::Postgres).await;
    let mut gateway = mesh.gateway().await;
    let admin = login(&mesh, "admin", ADMIN_PASSWORD).await;
    for (username, role) in [("audrey", "auditor"), ("clara", "clinician")] {
        let request = gw::CreateUserRequest {
            username: username.to_owned(),
            password: format!("{username} password 123"),
            role: role.to_owned(),
        };
        gateway
            .create_user(authorised(request, &admin))
            .await
            .expect("create user");
    }
    let auditor = login(&mesh, "audrey", "audrey password 123").await;
    let clinician = login(&mesh, "clara", "clara password 123").await;

    let logins = gateway
        .query_ledger(authorised(
            gw::QueryLedgerRequest {
                query: Some(QueryEventsRequest {
                    action: "LOGIN".to_owned(),
                    ..Default::default()
                }),
            },
            &auditor,
        ))
        .await
        .expect("query")
        .into_inner()
        .result
        .expect("result");
    assert!(
        logins.entries.len() >= 3 && logins.entries.iter().all(|entry| entry.action == "LOGIN")
    );

    let checkpoint = gateway
        .create_ledger_checkpoint(authorised(gw::CreateLedgerCheckpointRequest {}, &auditor))
        .await
        .expect("checkpoint")
        .into_inner()
        .checkpoint
        .expect("checkpoint");
    assert!(checkpoint.tree_size >= 5);

    let mut stream = gateway
        .export_ledger(authorised(gw::ExportLedgerRequest {}, &auditor))
        .await
        .expect("export")
        .into_inner();
    let mut export = String::new();
    while let Some(chunk) = stream.message().await.expect("chunk") {
        export.push_str(&chunk.lines);
    }
    let folder = tempfile::tempdir().expect("tempdir");
    let export_file = folder.path().join("ledger.jsonl");
    std::fs::write(&export_file, &export).expect("write export");
    let public_key = mesh.settings.state_dir.join("audit-checkpoint.pub");

    let output = medai(&[
        "audit",
        "verify",
        "--export",
        export_file.to_str().expect("utf-8"),
        "--public-key",
        public_key.to_str().expect("utf-8"),
    ]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("export intact") && stdout.contains("1 signed checkpoints verified"),
        "{stdout}"
    );

    let tampered: String = export
        .lines()
        .map(|line| {
            if line.contains(r#""seq":2,"#) {
                line.replace("SUCCESS", "FAILURE")
            } else {
                line.to_owned()
            }
        })
        .map(|line| line + "\n")
        .collect();
    std::fs::write(&export_file, tampered).expect("write tampered export");
    let output = medai(&[
        "audit",
        "verify",
        "--export",
        export_file.to_str().expect("utf-8"),
        "--public-key",
        public_key.to_str().expect("utf-8"),
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("BROKEN at seq 2"), "{stderr}");

    // Reading the ledger is for auditors, and every read is in the ledger.
    for token in [&clinician, &admin] {
        let status = gateway
            .export_ledger(authorised(gw::ExportLedgerRequest {}, token))
            .await
            .expect_err("not an auditor");
        assert_eq!(status.code(), Code::PermissionDenied);
    }
    let reads = gateway
        .query_ledger(authorised(
            gw::QueryLedgerRequest {
                query: Some(QueryEventsRequest {
                    resource: "ledger".to_owned(),
                    ..Default::default()
                }),
            },
            &auditor,
        ))
        .await
        .expect("query")
        .into_inner()
        .result
        .expect("result");
    let actions: Vec<&str> = reads
        .entries
        .iter()
        .map(|entry| entry.action.as_str())
        .collect();
    assert!(
        actions.contains(&"LEDGER_QUERY") && actions.contains(&"LEDGER_EXPORT"),
        "{actions:?}"
    );
    // The checkpoint is recorded in the name of the auditor who asked (from their token,
    // the same actor as their reads), before audit's own record of the gateway's request.
    let auditor_actor = &reads
        .entries
        .iter()
        .find(|entry| entry.action == "LEDGER_QUERY")
        .expect("the auditor's query")
        .actor;
    assert!(auditor_actor.starts_with("user:"), "{auditor_actor}");
    let checkpoints: Vec<_> = reads
        .entries
        .iter()
        .filter(|entry| entry.action == "LEDGER_CHECKPOINT")
        .map(|entry| (entry.actor.as_str(), entry.outcome.as_str(), entry.seq))
        .collect();
    assert_eq!(checkpoints.len(), 2, "{checkpoints:?}");
    assert_eq!(
        (checkpoints[0].0, checkpoints[0].1),
        (auditor_actor.as_str(), "REQUESTED"),
        "{checkpoints:?}"
    );
    assert_eq!(checkpoints[1].0, "service:gateway", "{checkpoints:?}");
    assert!(checkpoints[0].2 < checkpoints[1].2, "{checkpoints:?}");
    mesh.stop().await;
}
