//! One damaged ledger, three verifiers: the gateway's VerifyLedger (the audit service's
//! Verify), `medai audit verify` online, and `medai audit verify --export … --public-key …`
//! offline name the same first bad seq.

use medai_e2e::{MeshUnderTest, Storage, authorised};
use medai_proto::gateway::v1 as gw;
use sea_orm::{ConnectionTrait, Database};

fn medai(arguments: &[&str]) -> std::process::Output {
    std::process::Command::new(medai_testkit::binaries_dir().join("medai"))
        .args(arguments)
        .output()
        .expect("run medai")
}

#[tokio::test]
async fn one_damaged_ledger_gets_the_same_first_bad_seq_from_all_three_verifiers() {
    let mesh = MeshUnderTest::start(Storage::Postgres).await;
    let mut gateway = mesh.gateway().await;
    let admin = mesh.admin_token().await;
    gateway
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
    let auditor = gateway
        .login(gw::LoginRequest {
            username: "audrey".to_owned(),
            password: "audrey password 123".to_owned(),
        })
        .await
        .expect("login")
        .into_inner()
        .grant
        .expect("tokens")
        .access_token;
    let checkpoint = gateway
        .create_ledger_checkpoint(authorised(gw::CreateLedgerCheckpointRequest {}, &auditor))
        .await
        .expect("checkpoint")
        .into_inner()
        .checkpoint
        .expect("checkpoint");
    assert!(checkpoint.tree_size >= 3, "{checkpoint:?}");
    // More history after the checkpoint.
    for _ in 0..3 {
        mesh.admin_token().await;
    }

    // A superuser changes one entry under the checkpoint, bypassing the triggers.
    let damaged_seq = 2;
    let database = Database::connect(mesh.settings.audit_database_url.as_str())
        .await
        .expect("superuser");
    database
        .execute_unprepared(&format!(
            "SET session_replication_role = replica; \
             UPDATE ledger_entries SET outcome = 'FAILURE' WHERE seq = {damaged_seq}; \
             SET session_replication_role = DEFAULT;"
        ))
        .await
        .expect("damage");

    // 1. The gateway's VerifyLedger.
    let online = gateway
        .verify_ledger(authorised(gw::VerifyLedgerRequest {}, &auditor))
        .await
        .expect("verify")
        .into_inner()
        .verification
        .expect("report");
    assert!(!online.intact);
    assert_eq!(online.first_bad_seq, damaged_seq, "{online:?}");

    // 2. `medai audit verify`, online through the gateway with the auditor's saved token.
    let state_dir = mesh.settings.state_dir.to_str().expect("utf-8").to_owned();
    std::fs::write(mesh.settings.state_dir.join("token"), &auditor).expect("token");
    let endpoint = mesh.gateway_endpoint();
    let output = medai(&[
        "--state-dir",
        &state_dir,
        "--gateway",
        &endpoint,
        "audit",
        "verify",
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("ledger BROKEN at seq {damaged_seq}:")),
        "{stderr}"
    );

    // 3. Offline, over an export, trusting only the public key.
    let output = medai(&[
        "--state-dir",
        &state_dir,
        "--gateway",
        &endpoint,
        "audit",
        "export",
        "--out",
        mesh.settings
            .state_dir
            .join("ledger.jsonl")
            .to_str()
            .expect("utf-8"),
    ]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let public_key = mesh.settings.state_dir.join("audit-checkpoint.pub");
    let output = medai(&[
        "audit",
        "verify",
        "--export",
        mesh.settings
            .state_dir
            .join("ledger.jsonl")
            .to_str()
            .expect("utf-8"),
        "--public-key",
        public_key.to_str().expect("utf-8"),
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("export BROKEN at seq {damaged_seq}:")),
        "{stderr}"
    );
    mesh.stop().await;
}
