//! The identity lifecycle through the whole mesh: users and roles in PostgreSQL, revocations
//! in the suite's real Redis, in production mode (a revocation check that cannot be made fails
//! closed).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use medai_cli::client::GatewayClient;
use medai_e2e::{ADMIN_PASSWORD, MeshUnderTest, Storage, authorised, suite_redis_url};
use medai_proto::common::v1::ImageFormat;
use medai_proto::gateway::v1 as gw;
use medai_runtime::errors::reason_of;
use medai_testkit::Assets;
use sea_orm::{ConnectionTrait, Database, DatabaseBackend, Statement};
use tonic::Code;

const LOCKOUT_AFTER: u32 = 3;

fn production_revocation(service: &str, redis_url: &str) -> Vec<(String, String)> {
    let prefix = format!("MEDAI_{}_", service.to_ascii_uppercase());
    vec![
        (format!("{prefix}REVOCATION__MODE"), "production".to_owned()),
        (
            format!("{prefix}REVOCATION__REDIS_URL"),
            redis_url.to_owned(),
        ),
        (
            format!("{prefix}REVOCATION__NOT_REVOKED_CACHE_MS"),
            "250".to_owned(),
        ),
    ]
}

async fn identity_mesh() -> MeshUnderTest {
    let redis = suite_redis_url();
    let mut auth = production_revocation("auth", &redis);
    auth.push((
        "MEDAI_AUTH_LOCKOUT__MAX_FAILED_ATTEMPTS".to_owned(),
        LOCKOUT_AFTER.to_string(),
    ));
    // The publication lead must exceed the gateway's key refresh period.
    auth.push((
        "MEDAI_AUTH_TOKENS__KEY_PUBLICATION_LEAD_SECONDS".to_owned(),
        "2".to_owned(),
    ));
    let mut gateway = production_revocation("gateway", &redis);
    gateway.push((
        "MEDAI_GATEWAY_TOKENS__KEY_REFRESH_SECONDS".to_owned(),
        "1".to_owned(),
    ));
    let extra = BTreeMap::from([("auth".to_owned(), auth), ("gateway".to_owned(), gateway)]);
    MeshUnderTest::start_with(Storage::Postgres, extra).await
}

async fn login(
    gateway: &mut GatewayClient,
    username: &str,
    password: &str,
) -> Result<medai_proto::auth::v1::TokenGrant, tonic::Status> {
    gateway
        .login(gw::LoginRequest {
            username: username.to_owned(),
            password: password.to_owned(),
        })
        .await
        .map(|response| response.into_inner().grant.expect("tokens"))
}

async fn create_user(gateway: &mut GatewayClient, admin_token: &str, username: &str, role: &str) {
    let request = gw::CreateUserRequest {
        username: username.to_owned(),
        password: format!("{username} password 123"),
        role: role.to_owned(),
    };
    gateway
        .create_user(authorised(request, admin_token))
        .await
        .expect("create user");
}

fn infer(image: Vec<u8>) -> gw::InferRequest {
    gw::InferRequest {
        image: image.into(),
        format: ImageFormat::Unspecified.into(),
        model_name: String::new(),
        model_version: String::new(),
        idempotency_key: String::new(),
    }
}

async fn verify_ledger(gateway: &mut GatewayClient, token: &str) -> Result<(), tonic::Status> {
    gateway
        .verify_ledger(authorised(gw::VerifyLedgerRequest {}, token))
        .await
        .map(|_| ())
}

fn refusal_reason(result: Result<(), tonic::Status>) -> (Code, Option<String>) {
    let status = result.expect_err("refused");
    (status.code(), reason_of(&status))
}

async fn ledger_count(mesh: &MeshUnderTest, condition: &str) -> i64 {
    let database = Database::connect(mesh.settings.audit_database_url.as_str())
        .await
        .expect("connect");
    let row = database
        .query_one_raw(Statement::from_string(
            DatabaseBackend::Postgres,
            format!("SELECT count(*) AS n FROM ledger_entries WHERE {condition}"),
        ))
        .await
        .expect("query")
        .expect("row");
    row.try_get("", "n").expect("count")
}

#[tokio::test]
async fn forged_tokens_are_refused_at_the_gateway_and_leave_no_trace() {
    let mesh = identity_mesh().await;
    let mut gateway = mesh.gateway().await;
    let admin = mesh.admin_token().await;
    let entries_before = ledger_count(&mesh, "true").await;
    let (header, rest) = admin.split_once('.').expect("jwt");
    let (payload, _signature) = rest.split_once('.').expect("jwt");

    let none = format!(
        "{}.{payload}.",
        URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#)
    );
    let header_json: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(header).expect("b64")).expect("json");
    let kid = header_json["kid"].as_str().expect("kid").to_owned();
    let keys_x = {
        // HS256 keyed with the published public key.
        let hs_header =
            URL_SAFE_NO_PAD.encode(format!(r#"{{"alg":"HS256","typ":"JWT","kid":"{kid}"}}"#));
        format!("{hs_header}.{payload}.c2lnbmF0dXJl")
    };
    let tampered_payload = {
        let mut claims: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).expect("b64")).expect("json");
        claims["role"] = serde_json::json!("auditor");
        URL_SAFE_NO_PAD.encode(claims.to_string())
    };
    let tampered = format!(
        "{header}.{tampered_payload}.{}",
        rest.split_once('.').expect("jwt").1
    );
    for (token, expected) in [
        (none.as_str(), "TOKEN_MALFORMED"),
        (keys_x.as_str(), "TOKEN_ALGORITHM_NOT_ALLOWED"),
        (tampered.as_str(), "TOKEN_BAD_SIGNATURE"),
        ("garbage", "TOKEN_MALFORMED"),
    ] {
        let (code, reason) = refusal_reason(verify_ledger(&mut gateway, token).await);
        assert_eq!(
            (code, reason.as_deref()),
            (Code::Unauthenticated, Some(expected)),
            "{expected}"
        );
    }
    assert_eq!(
        ledger_count(&mesh, "true").await,
        entries_before,
        "a refused token leaves no trace"
    );
    verify_ledger(&mut gateway, &admin)
        .await
        .expect("the real token still works");
    mesh.stop().await;
}

#[tokio::test]
async fn logout_revokes_the_token_and_its_refresh_family() {
    let mesh = identity_mesh().await;
    let mut gateway = mesh.gateway().await;
    let grant = login(&mut gateway, "admin", ADMIN_PASSWORD)
        .await
        .expect("login");
    verify_ledger(&mut gateway, &grant.access_token)
        .await
        .expect("valid before logout");
    gateway
        .logout(authorised(
            gw::LogoutRequest {
                refresh_token: grant.refresh_token.clone(),
            },
            &grant.access_token,
        ))
        .await
        .expect("logout");
    assert_eq!(
        refusal_reason(verify_ledger(&mut gateway, &grant.access_token).await),
        (Code::Unauthenticated, Some("TOKEN_REVOKED".to_owned()))
    );
    let refreshed = gateway
        .refresh(gw::RefreshRequest {
            refresh_token: grant.refresh_token,
        })
        .await
        .expect_err("family revoked");
    assert_eq!(
        reason_of(&refreshed).as_deref(),
        Some("REFRESH_TOKEN_INVALID")
    );
    assert_eq!(ledger_count(&mesh, "action = 'LOGOUT'").await, 1);
    mesh.stop().await;
}

#[tokio::test]
async fn refresh_tokens_rotate_and_a_reused_one_kills_its_family() {
    let mesh = identity_mesh().await;
    let mut gateway = mesh.gateway().await;
    let first = login(&mut gateway, "admin", ADMIN_PASSWORD)
        .await
        .expect("login");
    let second = gateway
        .refresh(gw::RefreshRequest {
            refresh_token: first.refresh_token.clone(),
        })
        .await
        .expect("refresh")
        .into_inner()
        .grant
        .expect("tokens");
    assert_ne!(second.refresh_token, first.refresh_token, "rotated");
    verify_ledger(&mut gateway, &second.access_token)
        .await
        .expect("the new access token works");

    let reuse = gateway
        .refresh(gw::RefreshRequest {
            refresh_token: first.refresh_token.clone(),
        })
        .await
        .expect_err("reuse");
    assert_eq!(
        (reuse.code(), reason_of(&reuse).as_deref()),
        (Code::Unauthenticated, Some("REFRESH_TOKEN_REUSED"))
    );
    let after = gateway
        .refresh(gw::RefreshRequest {
            refresh_token: second.refresh_token,
        })
        .await
        .expect_err("family dead");
    assert_eq!(reason_of(&after).as_deref(), Some("REFRESH_TOKEN_INVALID"));
    assert_eq!(
        refusal_reason(verify_ledger(&mut gateway, &second.access_token).await)
            .1
            .as_deref(),
        Some("TOKEN_REVOKED")
    );
    assert_eq!(
        refusal_reason(verify_ledger(&mut gateway, &first.access_token).await)
            .1
            .as_deref(),
        Some("TOKEN_REVOKED")
    );
    assert_eq!(
        ledger_count(&mesh, "action = 'REFRESH_TOKEN_REUSE'").await,
        1
    );
    let garbage = gateway
        .refresh(gw::RefreshRequest {
            refresh_token: "not-a-token".to_owned(),
        })
        .await
        .expect_err("garbage");
    assert_eq!(
        reason_of(&garbage).as_deref(),
        Some("REFRESH_TOKEN_INVALID")
    );
    mesh.stop().await;
}

#[tokio::test]
async fn repeated_failures_lock_the_account_and_the_lockout_is_recorded() {
    let mesh = identity_mesh().await;
    let mut gateway = mesh.gateway().await;
    let admin = mesh.admin_token().await;
    create_user(&mut gateway, &admin, "carol", "clinician").await;
    for _ in 0..LOCKOUT_AFTER {
        let status = login(&mut gateway, "carol", "a wrong password")
            .await
            .expect_err("wrong");
        assert_eq!(reason_of(&status).as_deref(), Some("INVALID_CREDENTIALS"));
    }
    let status = login(&mut gateway, "carol", "carol password 123")
        .await
        .expect_err("locked");
    assert_eq!(
        (status.code(), reason_of(&status).as_deref()),
        (Code::Unauthenticated, Some("ACCOUNT_LOCKED"))
    );
    assert_eq!(ledger_count(&mesh, "action = 'ACCOUNT_LOCKOUT'").await, 1);
    assert!(
        ledger_count(&mesh, "action = 'LOGIN' AND outcome = 'FAILURE'").await
            > i64::from(LOCKOUT_AFTER)
    );
    // An admin's password reset unlocks.
    let reset = gw::ResetUserPasswordRequest {
        username: "carol".to_owned(),
        new_password: "carol's new password".to_owned(),
    };
    gateway
        .reset_user_password(authorised(reset, &admin))
        .await
        .expect("reset");
    login(&mut gateway, "carol", "carol's new password")
        .await
        .expect("unlocked with the new password");
    mesh.stop().await;
}

#[tokio::test]
async fn disabled_and_deleted_users_lose_their_tokens_at_once() {
    let mesh = identity_mesh().await;
    let mut gateway = mesh.gateway().await;
    let admin = mesh.admin_token().await;
    let image = Assets::locate().dicom("MR_small.dcm");
    create_user(&mut gateway, &admin, "dave", "clinician").await;
    create_user(&mut gateway, &admin, "erin", "clinician").await;
    let dave = login(&mut gateway, "dave", "dave password 123")
        .await
        .expect("login");
    let erin = login(&mut gateway, "erin", "erin password 123")
        .await
        .expect("login");
    gateway
        .infer(authorised(infer(image.clone()), &dave.access_token))
        .await
        .expect("dave may infer");

    gateway
        .disable_user(authorised(
            gw::DisableUserRequest {
                username: "dave".to_owned(),
            },
            &admin,
        ))
        .await
        .expect("disable");
    let status = gateway
        .infer(authorised(infer(image.clone()), &dave.access_token))
        .await
        .expect_err("revoked");
    assert_eq!(reason_of(&status).as_deref(), Some("TOKEN_REVOKED"));
    let status = login(&mut gateway, "dave", "dave password 123")
        .await
        .expect_err("disabled");
    assert_eq!(reason_of(&status).as_deref(), Some("ACCOUNT_DISABLED"));
    let status = gateway
        .refresh(gw::RefreshRequest {
            refresh_token: dave.refresh_token,
        })
        .await
        .expect_err("refresh refused");
    assert!(matches!(
        reason_of(&status).as_deref(),
        Some("REFRESH_TOKEN_INVALID" | "ACCOUNT_DISABLED")
    ));

    gateway
        .delete_user(authorised(
            gw::DeleteUserRequest {
                username: "erin".to_owned(),
            },
            &admin,
        ))
        .await
        .expect("delete");
    let status = gateway
        .infer(authorised(infer(image), &erin.access_token))
        .await
        .expect_err("deleted");
    assert_eq!(reason_of(&status).as_deref(), Some("TOKEN_REVOKED"));
    let status = login(&mut gateway, "erin", "erin password 123")
        .await
        .expect_err("gone");
    assert_eq!(reason_of(&status).as_deref(), Some("INVALID_CREDENTIALS"));
    mesh.stop().await;
}

#[tokio::test]
async fn roles_are_enforced_in_one_layer_and_denials_are_recorded() {
    let mesh = identity_mesh().await;
    let mut gateway = mesh.gateway().await;
    let admin = mesh.admin_token().await;
    let image = Assets::locate().dicom("MR_small.dcm");
    create_user(&mut gateway, &admin, "victor", "viewer").await;
    create_user(&mut gateway, &admin, "audrey", "auditor").await;
    create_user(&mut gateway, &admin, "clara", "clinician").await;
    let viewer = login(&mut gateway, "victor", "victor password 123")
        .await
        .expect("login")
        .access_token;
    let auditor = login(&mut gateway, "audrey", "audrey password 123")
        .await
        .expect("login")
        .access_token;
    let clinician = login(&mut gateway, "clara", "clara password 123")
        .await
        .expect("login")
        .access_token;

    let status = gateway
        .infer(authorised(infer(image.clone()), &viewer))
        .await
        .expect_err("viewer");
    assert_eq!(
        (status.code(), reason_of(&status).as_deref()),
        (Code::PermissionDenied, Some("ROLE_NOT_ALLOWED"))
    );
    let status = gateway
        .infer(authorised(infer(image.clone()), &auditor))
        .await
        .expect_err("auditor");
    assert_eq!(status.code(), Code::PermissionDenied);
    verify_ledger(&mut gateway, &auditor)
        .await
        .expect("auditors verify the ledger");
    let (code, _) = refusal_reason(verify_ledger(&mut gateway, &clinician).await);
    assert_eq!(code, Code::PermissionDenied);
    let request = gw::CreateUserRequest {
        username: "mallory".to_owned(),
        password: "mallory password 1".to_owned(),
        role: "admin".to_owned(),
    };
    let status = gateway
        .create_user(authorised(request, &clinician))
        .await
        .expect_err("not an admin");
    assert_eq!(status.code(), Code::PermissionDenied);
    gateway
        .infer(authorised(infer(image), &clinician))
        .await
        .expect("clinicians infer");
    assert_eq!(ledger_count(&mesh, "action = 'ACCESS_DENIED'").await, 4);
    assert_eq!(ledger_count(&mesh, "context LIKE '%password 123%' OR actor LIKE '%password 123%' OR resource LIKE '%password 123%'").await, 0, "no password reaches the ledger");

    // A role change takes effect at once: the clinician's old token stops working.
    let demote = gw::SetUserRoleRequest {
        username: "clara".to_owned(),
        role: "viewer".to_owned(),
    };
    gateway
        .set_user_role(authorised(demote, &admin))
        .await
        .expect("set role");
    let status = verify_ledger(&mut gateway, &clinician)
        .await
        .expect_err("old token");
    assert_eq!(reason_of(&status).as_deref(), Some("TOKEN_REVOKED"));
    mesh.stop().await;
}

#[tokio::test]
async fn key_rotation_keeps_old_tokens_valid_and_new_ones_valid_at_once() {
    let mesh = identity_mesh().await;
    let mut gateway = mesh.gateway().await;
    let old = mesh.admin_token().await;
    let rotated = gateway
        .rotate_signing_key(authorised(gw::RotateSigningKeyRequest {}, &old))
        .await
        .expect("rotate")
        .into_inner();
    // The new key is published at once and signs after the publication lead (2 s here).
    let wait_until = std::time::UNIX_EPOCH
        + Duration::from_secs(rotated.signs_from)
        + Duration::from_millis(100);
    while std::time::SystemTime::now() < wait_until {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let new = mesh.admin_token().await;
    let kid = |token: &str| {
        jsonwebtoken::decode_header(token)
            .expect("header")
            .kid
            .expect("kid")
    };
    assert_eq!(
        kid(&new),
        rotated.kid,
        "new tokens are signed with the new key"
    );
    assert_ne!(kid(&old), kid(&new));
    verify_ledger(&mut gateway, &new)
        .await
        .expect("a token of the new key is valid at once");
    verify_ledger(&mut gateway, &old)
        .await
        .expect("a token of the old key stays valid until it expires");
    assert_eq!(
        ledger_count(&mesh, "action = 'SIGNING_KEY_ROTATE'").await,
        1
    );
    mesh.stop().await;
}

#[tokio::test]
async fn two_gateways_sharing_redis_see_a_logout_made_through_either() {
    let mut mesh = identity_mesh().await;
    let settings = mesh.settings.clone();
    let second = mesh
        .mesh
        .start_another("gateway", "gateway-2", &settings, Vec::new())
        .await
        .expect("second gateway");
    let mut first_gateway = mesh.gateway().await;
    let mut second_gateway = mesh.gateway_at(second).await;

    let grant = login(&mut first_gateway, "admin", ADMIN_PASSWORD)
        .await
        .expect("login at the first");
    verify_ledger(&mut second_gateway, &grant.access_token)
        .await
        .expect("valid at the second");
    verify_ledger(&mut first_gateway, &grant.access_token)
        .await
        .expect("valid at the first");
    second_gateway
        .logout(authorised(
            gw::LogoutRequest {
                refresh_token: String::new(),
            },
            &grant.access_token,
        ))
        .await
        .expect("logout at the second");
    // The first gateway may reuse a "not revoked" answer for its 250 ms cache window, no longer.
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match verify_ledger(&mut first_gateway, &grant.access_token).await {
            Err(status) => {
                assert_eq!(reason_of(&status).as_deref(), Some("TOKEN_REVOKED"));
                break;
            }
            Ok(()) => assert!(
                Instant::now() < deadline,
                "the first gateway never saw the logout"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    mesh.stop().await;
}

#[tokio::test]
async fn a_gateway_in_production_mode_fails_closed_without_redis() {
    let mut mesh = identity_mesh().await;
    let settings = mesh.settings.clone();
    let dead = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        format!("redis://{}", listener.local_addr().expect("address"))
    };
    let blind = mesh
        .mesh
        .start_another(
            "gateway",
            "gateway-blind",
            &settings,
            production_revocation("gateway", &dead),
        )
        .await
        .expect("gateway without Redis");
    let token = mesh.admin_token().await;
    let mut blind_gateway = mesh.gateway_at(blind).await;
    let status = verify_ledger(&mut blind_gateway, &token)
        .await
        .expect_err("fail closed");
    assert_eq!(
        (status.code(), reason_of(&status).as_deref()),
        (Code::Unavailable, Some("REVOCATION_UNAVAILABLE"))
    );

    let mut development = production_revocation("gateway", &dead);
    development[0].1 = "development".to_owned();
    let lenient = mesh
        .mesh
        .start_another("gateway", "gateway-dev", &settings, development)
        .await
        .expect("dev gateway");
    let mut lenient_gateway = mesh.gateway_at(lenient).await;
    verify_ledger(&mut lenient_gateway, &token)
        .await
        .expect("development mode falls back to its own store");
    let metrics = medai_e2e::http_get(
        {
            let text = std::fs::read_to_string(settings.state_dir.join("gateway-dev.address.json"))
                .expect("address file");
            let addresses: serde_json::Value = serde_json::from_str(&text).expect("json");
            addresses["admin"]
                .as_str()
                .expect("admin")
                .parse()
                .expect("address")
        },
        "/metrics",
    )
    .await;
    // Registered at zero from the start: the fallback must have moved it.
    assert!(
        metrics.lines().any(|line| {
            line.starts_with("medai_revocation_store_fallbacks_total")
                && line
                    .rsplit(' ')
                    .next()
                    .and_then(|value| value.trim().parse::<f64>().ok())
                    .is_some_and(|value| value > 0.0)
        }),
        "the fallback is counted: {metrics}"
    );
    mesh.stop().await;
}

#[tokio::test]
async fn the_embedded_mesh_without_redis_still_honours_a_logout() {
    // No Redis anywhere: auth keeps revocations in its own store and the gateway asks it.
    let mesh = MeshUnderTest::start(Storage::Sqlite).await;
    let mut gateway = mesh.gateway().await;
    let grant = login(&mut gateway, "admin", ADMIN_PASSWORD)
        .await
        .expect("login");
    verify_ledger(&mut gateway, &grant.access_token)
        .await
        .expect("valid");
    gateway
        .logout(authorised(
            gw::LogoutRequest {
                refresh_token: grant.refresh_token,
            },
            &grant.access_token,
        ))
        .await
        .expect("logout");
    assert_eq!(
        refusal_reason(verify_ledger(&mut gateway, &grant.access_token).await)
            .1
            .as_deref(),
        Some("TOKEN_REVOKED")
    );
    mesh.stop().await;
}

fn list_results() -> gw::ListResultsRequest {
    gw::ListResultsRequest { filter: None }
}

/// Logs out one user, disables another and demotes a third, kills auth with SIGKILL, starts it
/// again on the same database, and asks through a gateway that reaches only the new auth.
/// Without Redis (the embedded mesh) the gateway asks auth, so every answer comes from what
/// the new auth reloaded from its database.
async fn revocations_survive_a_kill_9_of_auth(storage: Storage) {
    let mut mesh = MeshUnderTest::start(storage).await;
    let settings = mesh.settings.clone();
    let mut gateway = mesh.gateway().await;
    let admin = mesh.admin_token().await;
    let image = Assets::locate().dicom("MR_small.dcm");
    for username in ["lena", "dora", "demi"] {
        create_user(&mut gateway, &admin, username, "clinician").await;
    }
    let lena = login(&mut gateway, "lena", "lena password 123")
        .await
        .expect("login");
    let dora = login(&mut gateway, "dora", "dora password 123")
        .await
        .expect("login");
    let demi = login(&mut gateway, "demi", "demi password 123")
        .await
        .expect("login");
    gateway
        .infer(authorised(infer(image.clone()), &dora.access_token))
        .await
        .expect("dora may infer");
    for token in [&lena.access_token, &demi.access_token] {
        gateway
            .list_results(authorised(list_results(), token))
            .await
            .expect("valid before");
    }

    gateway
        .logout(authorised(
            gw::LogoutRequest {
                refresh_token: lena.refresh_token.clone(),
            },
            &lena.access_token,
        ))
        .await
        .expect("logout");
    gateway
        .disable_user(authorised(
            gw::DisableUserRequest {
                username: "dora".to_owned(),
            },
            &admin,
        ))
        .await
        .expect("disable");
    gateway
        .set_user_role(authorised(
            gw::SetUserRoleRequest {
                username: "demi".to_owned(),
                role: "viewer".to_owned(),
            },
            &admin,
        ))
        .await
        .expect("demote");

    let pid = mesh.mesh.pid("auth").expect("auth runs");
    let killed = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(killed.success(), "kill -9 {pid}");
    mesh.mesh.kill("auth").await; // reaps the killed process
    let restarted_auth = mesh
        .mesh
        .start_another("auth", "auth-restarted", &settings, Vec::new())
        .await
        .expect("auth restarts on the same database");
    let gateway_address = mesh
        .mesh
        .start_another(
            "gateway",
            "gateway-after-restart",
            &settings,
            vec![(
                "MEDAI_GATEWAY_AUTH_ENDPOINT".to_owned(),
                format!("https://{restarted_auth}"),
            )],
        )
        .await
        .expect("a gateway of the restarted auth");
    let mut gateway = mesh.gateway_at(gateway_address).await;

    let revoked = |status: tonic::Status| (status.code(), reason_of(&status));
    let expected = (Code::Unauthenticated, Some("TOKEN_REVOKED".to_owned()));
    let status = gateway
        .list_results(authorised(list_results(), &lena.access_token))
        .await
        .expect_err("the logged-out token");
    assert_eq!(revoked(status), expected, "the logged-out token");
    let status = gateway
        .infer(authorised(infer(image.clone()), &dora.access_token))
        .await
        .expect_err("the disabled user's token");
    assert_eq!(revoked(status), expected, "the disabled user may not infer");
    let status = gateway
        .list_results(authorised(list_results(), &demi.access_token))
        .await
        .expect_err("the demoted user's old-role token");
    assert_eq!(revoked(status), expected, "the old-role token");
    let status = gateway
        .refresh(gw::RefreshRequest {
            refresh_token: lena.refresh_token,
        })
        .await
        .expect_err("the logged-out refresh token");
    assert_eq!(reason_of(&status).as_deref(), Some("REFRESH_TOKEN_INVALID"));

    // The restarted auth refuses only what was revoked.
    verify_ledger(&mut gateway, &admin)
        .await
        .expect("the admin's token was never revoked");
    let demi = login(&mut gateway, "demi", "demi password 123")
        .await
        .expect("demi logs in again");
    assert_eq!(demi.role, "viewer");
    gateway
        .list_results(authorised(list_results(), &demi.access_token))
        .await
        .expect("with the new role");
    mesh.stop().await;
}

#[tokio::test]
async fn revocations_survive_a_kill_9_of_auth_in_the_embedded_mesh_on_sqlite() {
    revocations_survive_a_kill_9_of_auth(Storage::Sqlite).await;
}

#[tokio::test]
async fn revocations_survive_a_kill_9_of_auth_on_postgres() {
    revocations_survive_a_kill_9_of_auth(Storage::Postgres).await;
}
