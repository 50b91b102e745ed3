//! Revocations against the suite's real Redis and PostgreSQL, when Redis loses its data.
//!
//! This file holds the only test that runs FLUSHALL on the suite's Redis; cargo runs test
//! binaries one after another, so no other test's keys are flushed under it.

use fred::prelude::{Builder, ClientLike, Config};
use medai_audit::AuditConfig;
use medai_auth::AuthConfig;
use medai_auth::config::{BootstrapAdmin, TokenSettings};
use medai_proto::auth::v1::auth_service_client::AuthServiceClient;
use medai_proto::auth::v1::{
    CheckRevocationRequest, CreateUserRequest, DisableUserRequest, GetSigningKeysRequest,
    LoginRequest, LogoutRequest, SetUserRoleRequest, TokenGrant,
};
use medai_revocation::{Mode, RevocationError, RevocationSettings, RevocationStore, TokenFacts};
use medai_runtime::config::Secret;
use medai_testkit::{
    TestPki, TestServer, fresh_postgres_database, test_process_config, wait_until_serving,
};
use medai_tokens::{AccessClaims, PublishedKey, TokenVerifier};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

const PASSWORD: &str = "a long enough bootstrap password";

fn suite_redis_url() -> String {
    std::env::var("MEDAI_TEST_REDIS_URL").unwrap_or_else(|_| {
        panic!("MEDAI_TEST_REDIS_URL is not set: run the suite with scripts/test.sh")
    })
}

fn production_revocation() -> RevocationSettings {
    RevocationSettings {
        mode: Mode::Production,
        redis_url: Some(suite_redis_url()),
        not_revoked_cache_ms: 0,
    }
}

async fn start_auth(pki: &TestPki, database_url: &str, audit: &TestServer) -> TestServer {
    let config = AuthConfig {
        process: test_process_config(),
        tls: pki.files("auth"),
        database_url: database_url.to_owned(),
        database_max_connections: medai_auth::config::default_database_max_connections(),
        audit_endpoint: format!("https://{}", audit.address),
        tokens: TokenSettings::default(),
        bootstrap_admin: Some(BootstrapAdmin {
            username: "admin".to_owned(),
            password: Secret::new(PASSWORD),
        }),
        lockout: Default::default(),
        revocation: production_revocation(),
        passwords: Default::default(),
    };
    let auth =
        TestServer::start(|listener, shutdown| medai_auth::serve(config, listener, shutdown)).await;
    wait_until_serving(pki, auth.address, "auth").await;
    auth
}

async fn login(
    gateway: &mut AuthServiceClient<Channel>,
    username: &str,
    password: &str,
) -> TokenGrant {
    gateway
        .login(LoginRequest {
            username: username.to_owned(),
            password: password.to_owned(),
            correlation_id: String::new(),
        })
        .await
        .expect("login")
        .into_inner()
        .grant
        .expect("grant")
}

async fn claims_of(gateway: &mut AuthServiceClient<Channel>, token: &str) -> AccessClaims {
    let keys: Vec<PublishedKey> = gateway
        .get_signing_keys(GetSigningKeysRequest {})
        .await
        .expect("keys")
        .into_inner()
        .keys
        .into_iter()
        .map(|key| PublishedKey {
            kid: key.kid,
            kty: key.kty,
            crv: key.crv,
            alg: key.alg,
            x: key.x,
        })
        .collect();
    TokenVerifier::new("medai-auth", "medai", &keys)
        .verify(token)
        .expect("claims")
}

fn facts(claims: &AccessClaims) -> TokenFacts<'_> {
    TokenFacts {
        jti: &claims.jti,
        subject: &claims.sub,
        generation: claims.generation,
    }
}

/// Asks `verifier` (a gateway's view of Redis) about every token until each is refused as
/// revoked. Meanwhile an answer may be "cannot check" (fail closed), never "not revoked".
async fn until_all_refused_as_revoked(
    verifier: &RevocationStore,
    tokens: &[(&str, &AccessClaims)],
) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut all_revoked = true;
        for (name, claims) in tokens {
            match verifier.is_revoked(facts(claims)).await {
                Ok(true) => {}
                Ok(false) => panic!("the {name} token was accepted after Redis lost its data"),
                Err(RevocationError::Unavailable) => all_revoked = false,
                Err(other) => panic!("unexpected: {other}"),
            }
        }
        if all_revoked {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "auth never re-seeded Redis from its database"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn flushall() {
    let redis = Builder::from_config(Config::from_url(&suite_redis_url()).expect("url"))
        .build()
        .expect("client");
    redis.init().await.expect("connect");
    let () = redis.flushall(false).await.expect("FLUSHALL");
    redis.quit().await.expect("quit");
}

#[tokio::test]
async fn revocations_survive_a_flushall_of_redis_and_a_restart_of_auth() {
    let pki = TestPki::new();
    let audit_config = AuditConfig {
        process: test_process_config(),
        tls: pki.files("audit"),
        database_url: fresh_postgres_database().await,
        checkpoint_key_file: medai_testkit::scratch_file("audit-checkpoint.key"),
        checkpoint_key_mode: medai_audit::config::CheckpointKeyMode::Generate,
        checkpoint_log_file: None,
        checkpoint_interval_seconds: 0,
        migration_database_url: None,
    };
    let audit = TestServer::start(|listener, shutdown| {
        medai_audit::serve(audit_config, listener, shutdown)
    })
    .await;
    wait_until_serving(&pki, audit.address, "audit").await;
    let auth_database = fresh_postgres_database().await;
    let auth = start_auth(&pki, &auth_database, &audit).await;
    let mut gateway = AuthServiceClient::new(pki.channel_as("gateway", auth.address, "auth"));

    let admin = login(&mut gateway, "admin", PASSWORD).await;
    let admin_claims = claims_of(&mut gateway, &admin.access_token).await;
    for username in ["dora", "demi"] {
        gateway
            .create_user(CreateUserRequest {
                actor: admin_claims.sub.clone(),
                username: username.to_owned(),
                password: format!("{username} password 123"),
                role: "clinician".to_owned(),
                correlation_id: String::new(),
            })
            .await
            .expect("create");
    }
    let logged_out = login(&mut gateway, "admin", PASSWORD).await;
    let logged_out = claims_of(&mut gateway, &logged_out.access_token).await;
    let disabled = login(&mut gateway, "dora", "dora password 123").await;
    let disabled = claims_of(&mut gateway, &disabled.access_token).await;
    let demoted = login(&mut gateway, "demi", "demi password 123").await;
    let demoted = claims_of(&mut gateway, &demoted.access_token).await;

    let verifier = RevocationStore::connect(&production_revocation()).expect("verifier");
    for claims in [&logged_out, &disabled, &demoted, &admin_claims] {
        assert_eq!(verifier.is_revoked(facts(claims)).await, Ok(false));
    }
    gateway
        .logout(LogoutRequest {
            actor: logged_out.sub.clone(),
            access_token_id: logged_out.jti.clone(),
            access_token_expires_at: logged_out.exp,
            refresh_token: String::new(),
            correlation_id: String::new(),
        })
        .await
        .expect("logout");
    gateway
        .disable_user(DisableUserRequest {
            actor: admin_claims.sub.clone(),
            username: "dora".to_owned(),
            correlation_id: String::new(),
        })
        .await
        .expect("disable");
    gateway
        .set_user_role(SetUserRoleRequest {
            actor: admin_claims.sub.clone(),
            username: "demi".to_owned(),
            role: "viewer".to_owned(),
            correlation_id: String::new(),
        })
        .await
        .expect("demote");
    let revoked = [
        ("logged-out", &logged_out),
        ("disabled user's", &disabled),
        ("demoted user's old-role", &demoted),
    ];
    for (name, claims) in revoked {
        assert_eq!(
            verifier.is_revoked(facts(claims)).await,
            Ok(true),
            "{name} token before the flush"
        );
    }

    // Redis restarts without persistence: every key is gone.
    flushall().await;
    until_all_refused_as_revoked(&verifier, &revoked).await;
    assert_eq!(
        verifier.is_revoked(facts(&admin_claims)).await,
        Ok(false),
        "once re-seeded, Redis vouches for a token that was never revoked"
    );
    for (name, claims) in revoked {
        let answer = gateway
            .check_revocation(CheckRevocationRequest {
                token_id: claims.jti.clone(),
                subject: claims.sub.clone(),
                generation: claims.generation,
            })
            .await
            .expect("check")
            .into_inner();
        assert!(answer.revoked, "auth itself refuses the {name} token");
    }

    // Both lose their memory: auth restarts on the same database and Redis is empty again.
    auth.stop().await;
    flushall().await;
    let auth = start_auth(&pki, &auth_database, &audit).await;
    until_all_refused_as_revoked(&verifier, &revoked).await;
    assert_eq!(verifier.is_revoked(facts(&admin_claims)).await, Ok(false));
    auth.stop().await;
}
