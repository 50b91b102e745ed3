//! The auth service on port 0 with real mTLS, a real audit service and the suite's PostgreSQL.

use medai_audit::AuditConfig;
use medai_auth::AuthConfig;
use medai_auth::config::{BootstrapAdmin, TokenSettings};
use medai_proto::auth::v1::auth_service_client::AuthServiceClient;
use medai_proto::auth::v1::{GetSigningKeysRequest, LoginRequest};
use medai_runtime::config::Secret;
use medai_runtime::errors::reason_of;
use medai_testkit::{
    TestPki, TestServer, fresh_postgres_database, test_process_config, wait_until_serving,
};
use medai_tokens::{PublishedKey, Role, TokenVerifier};
use sea_orm::{ConnectionTrait, Database};
use tonic::Code;

const PASSWORD: &str = "a long enough bootstrap password";

struct AuthUnderTest {
    pki: TestPki,
    auth: TestServer,
    _audit: Option<TestServer>,
    audit_database: String,
}

fn auth_config(pki: &TestPki, database_url: String, audit_endpoint: String) -> AuthConfig {
    AuthConfig {
        process: test_process_config(),
        tls: pki.files("auth"),
        database_url,
        audit_endpoint,
        tokens: TokenSettings::default(),
        bootstrap_admin: Some(BootstrapAdmin {
            username: "admin".to_owned(),
            password: Secret::new(PASSWORD),
        }),
        lockout: Default::default(),
        revocation: Default::default(),
    }
}

impl AuthUnderTest {
    async fn start() -> Self {
        let pki = TestPki::new();
        let audit_database = fresh_postgres_database().await;
        let audit_config = AuditConfig {
            process: test_process_config(),
            tls: pki.files("audit"),
            database_url: audit_database.clone(),
            checkpoint_key_file: medai_testkit::scratch_file("audit-checkpoint.key"),
            checkpoint_key_mode: medai_audit::config::CheckpointKeyMode::Generate,
            checkpoint_interval_seconds: 0,
            migration_database_url: None,
        };
        let audit = TestServer::start(|listener, shutdown| {
            medai_audit::serve(audit_config, listener, shutdown)
        })
        .await;
        wait_until_serving(&pki, audit.address, "audit").await;
        let config = auth_config(
            &pki,
            fresh_postgres_database().await,
            format!("https://{}", audit.address),
        );
        let auth =
            TestServer::start(|listener, shutdown| medai_auth::serve(config, listener, shutdown))
                .await;
        wait_until_serving(&pki, auth.address, "auth").await;
        Self {
            pki,
            auth,
            _audit: Some(audit),
            audit_database,
        }
    }

    fn client_as(&self, identity: &str) -> AuthServiceClient<tonic::transport::Channel> {
        AuthServiceClient::new(self.pki.channel_as(identity, self.auth.address, "auth"))
    }

    async fn ledger_count(&self, outcome: &str) -> i64 {
        let database = Database::connect(self.audit_database.as_str())
            .await
            .expect("connect");
        let row = database
            .query_one_raw(sea_orm::Statement::from_string(
                sea_orm::DatabaseBackend::Postgres,
                format!("SELECT count(*) AS n FROM ledger_entries WHERE action = 'LOGIN' AND outcome = '{outcome}'"),
            ))
            .await
            .expect("query")
            .expect("row");
        row.try_get("", "n").expect("count")
    }
}

/// The subject of an access token, verified against the keys auth publishes.
async fn subject_of(
    gateway: &mut AuthServiceClient<tonic::transport::Channel>,
    access_token: &str,
) -> String {
    let keys = gateway
        .get_signing_keys(GetSigningKeysRequest {})
        .await
        .expect("keys")
        .into_inner()
        .keys;
    let published: Vec<PublishedKey> = keys
        .into_iter()
        .map(|key| PublishedKey {
            kid: key.kid,
            kty: key.kty,
            crv: key.crv,
            alg: key.alg,
            x: key.x,
        })
        .collect();
    TokenVerifier::new("medai-auth", "medai", &published)
        .verify(access_token)
        .expect("claims")
        .sub
}

fn login(username: &str, password: &str) -> LoginRequest {
    LoginRequest {
        username: username.to_owned(),
        password: password.to_owned(),
        correlation_id: String::new(),
    }
}

#[tokio::test]
async fn the_bootstrap_admin_gets_a_token_that_verifies_against_the_published_keys() {
    let service = AuthUnderTest::start().await;
    let mut gateway = service.client_as("gateway");
    let response = gateway
        .login(login("admin", PASSWORD))
        .await
        .expect("login")
        .into_inner()
        .grant
        .expect("grant");
    assert_eq!(response.role, "admin");
    assert_eq!(response.expires_in_seconds, 600);

    let keys = gateway
        .get_signing_keys(GetSigningKeysRequest {})
        .await
        .expect("keys")
        .into_inner()
        .keys;
    assert_eq!(keys.len(), 1);
    assert_eq!(
        (
            keys[0].kty.as_str(),
            keys[0].crv.as_str(),
            keys[0].alg.as_str()
        ),
        ("OKP", "Ed25519", "EdDSA")
    );
    let published: Vec<PublishedKey> = keys
        .into_iter()
        .map(|key| PublishedKey {
            kid: key.kid,
            kty: key.kty,
            crv: key.crv,
            alg: key.alg,
            x: key.x,
        })
        .collect();
    let claims = TokenVerifier::new("medai-auth", "medai", &published)
        .verify(&response.access_token)
        .expect("verifies");
    assert_eq!(claims.role, Role::Admin);
    assert_eq!(claims.exp - claims.iat, 600);
    assert!(!claims.jti.is_empty() && !claims.sub.is_empty());
    assert_ne!(
        claims.sub, "admin",
        "the subject is a stable id, not the username"
    );
    assert_eq!(
        service.ledger_count("SUCCESS").await,
        1,
        "the login is in the ledger"
    );
}

#[tokio::test]
async fn wrong_passwords_and_unknown_users_are_refused_alike_and_recorded() {
    let service = AuthUnderTest::start().await;
    let mut gateway = service.client_as("gateway");
    for (username, password) in [("admin", "not the password"), ("nobody", PASSWORD)] {
        let status = gateway
            .login(login(username, password))
            .await
            .expect_err("refused");
        assert_eq!(status.code(), Code::Unauthenticated);
        assert_eq!(reason_of(&status).as_deref(), Some("INVALID_CREDENTIALS"));
        assert_eq!(status.message(), "invalid username or password");
    }
    let status = gateway.login(login("", "")).await.expect_err("refused");
    assert_eq!(reason_of(&status).as_deref(), Some("CREDENTIALS_MISSING"));
    assert_eq!(service.ledger_count("FAILURE").await, 2);
    assert_eq!(service.ledger_count("SUCCESS").await, 0);
}

#[tokio::test]
async fn no_token_is_issued_when_the_login_cannot_be_recorded() {
    let pki = TestPki::new();
    // An audit endpoint where nothing listens.
    let unused = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let dead_endpoint = format!("https://{}", unused.local_addr().expect("address"));
    drop(unused);
    let config = auth_config(&pki, fresh_postgres_database().await, dead_endpoint);
    let auth =
        TestServer::start(|listener, shutdown| medai_auth::serve(config, listener, shutdown)).await;
    wait_until_serving(&pki, auth.address, "auth").await;
    let mut gateway = AuthServiceClient::new(pki.channel_as("gateway", auth.address, "auth"));
    let status = gateway
        .login(login("admin", PASSWORD))
        .await
        .expect_err("fail closed");
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(reason_of(&status).as_deref(), Some("LEDGER_UNAVAILABLE"));
}

#[tokio::test]
async fn only_the_gateway_may_call_auth() {
    let service = AuthUnderTest::start().await;
    for identity in ["validation", "inference", "stranger"] {
        let status = service
            .client_as(identity)
            .login(login("admin", PASSWORD))
            .await
            .expect_err("refused");
        assert_eq!(status.code(), Code::PermissionDenied, "{identity}");
    }
    assert_eq!(
        service.ledger_count("SUCCESS").await,
        0,
        "a refused peer caused no login"
    );
}

#[tokio::test]
async fn invalid_settings_stop_the_service_with_a_clear_message() {
    let pki = TestPki::new();
    let mut config = auth_config(
        &pki,
        "sqlite::memory:".to_owned(),
        "https://127.0.0.1:1".to_owned(),
    );
    config.tokens.access_token_ttl_seconds = 3600;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let error = medai_auth::serve(config, listener, std::future::pending())
        .await
        .expect_err("refused");
    assert!(
        error.to_string().contains("access_token_ttl_seconds"),
        "{error}"
    );

    let mut config = auth_config(
        &pki,
        "sqlite::memory:".to_owned(),
        "https://127.0.0.1:1".to_owned(),
    );
    config.bootstrap_admin = Some(BootstrapAdmin {
        username: "admin".to_owned(),
        password: Secret::new("short"),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let error = medai_auth::serve(config, listener, std::future::pending())
        .await
        .expect_err("refused");
    assert!(error.to_string().contains("at least 12"), "{error}");
    assert!(
        !error.to_string().contains("short"),
        "the password is not echoed"
    );
}

#[tokio::test]
async fn a_signing_ticket_is_single_use_short_lived_and_bound_to_its_user() {
    use medai_proto::auth::v1::{ConsumeSigningTicketRequest, ReauthenticateRequest};
    let service = AuthUnderTest::start().await;
    let mut gateway = service.client_as("gateway");
    let grant = gateway
        .login(login("admin", PASSWORD))
        .await
        .expect("login")
        .into_inner()
        .grant
        .expect("grant");
    let subject = subject_of(&mut gateway, &grant.access_token).await;

    let reauthenticate = |password: &str| ReauthenticateRequest {
        actor: subject.clone(),
        password: password.to_owned(),
        correlation_id: String::new(),
    };
    let status = gateway
        .reauthenticate(reauthenticate("wrong password"))
        .await
        .expect_err("refused");
    assert_eq!(reason_of(&status).as_deref(), Some("INVALID_CREDENTIALS"));
    let ticket = gateway
        .reauthenticate(reauthenticate(PASSWORD))
        .await
        .expect("ticket")
        .into_inner();
    assert_eq!(ticket.expires_in_seconds, 300);

    let consume = |actor: &str, ticket: &str| ConsumeSigningTicketRequest {
        actor: actor.to_owned(),
        signing_ticket: ticket.to_owned(),
        correlation_id: String::new(),
    };
    let status = gateway
        .consume_signing_ticket(consume("someone-else", &ticket.signing_ticket))
        .await
        .expect_err("not theirs");
    assert_eq!(
        reason_of(&status).as_deref(),
        Some("SIGNING_TICKET_INVALID")
    );
    let signer = gateway
        .consume_signing_ticket(consume(&subject, &ticket.signing_ticket))
        .await
        .expect("first use")
        .into_inner();
    assert_eq!(
        (signer.username.as_str(), signer.role.as_str()),
        ("admin", "admin")
    );
    let status = gateway
        .consume_signing_ticket(consume(&subject, &ticket.signing_ticket))
        .await
        .expect_err("second use");
    assert_eq!(
        (status.code(), reason_of(&status).as_deref()),
        (Code::Unauthenticated, Some("SIGNING_TICKET_INVALID"))
    );
    assert_eq!(
        service.ledger_count("SUCCESS").await,
        1,
        "the login (the count is of LOGIN events)"
    );
}

#[tokio::test]
async fn an_expired_signing_ticket_is_refused() {
    use medai_proto::auth::v1::{ConsumeSigningTicketRequest, ReauthenticateRequest};
    let pki = TestPki::new();
    let audit_config = AuditConfig {
        process: test_process_config(),
        tls: pki.files("audit"),
        database_url: fresh_postgres_database().await,
        checkpoint_key_file: medai_testkit::scratch_file("audit-checkpoint.key"),
        checkpoint_key_mode: medai_audit::config::CheckpointKeyMode::Generate,
        checkpoint_interval_seconds: 0,
        migration_database_url: None,
    };
    let audit = TestServer::start(|listener, shutdown| {
        medai_audit::serve(audit_config, listener, shutdown)
    })
    .await;
    wait_until_serving(&pki, audit.address, "audit").await;
    let mut config = auth_config(
        &pki,
        fresh_postgres_database().await,
        format!("https://{}", audit.address),
    );
    config.tokens.signing_ticket_ttl_seconds = 1;
    let auth =
        TestServer::start(|listener, shutdown| medai_auth::serve(config, listener, shutdown)).await;
    wait_until_serving(&pki, auth.address, "auth").await;
    let mut gateway = AuthServiceClient::new(pki.channel_as("gateway", auth.address, "auth"));

    let grant = gateway
        .login(login("admin", PASSWORD))
        .await
        .expect("login")
        .into_inner()
        .grant
        .expect("grant");
    let subject = subject_of(&mut gateway, &grant.access_token).await;
    let ticket = gateway
        .reauthenticate(ReauthenticateRequest {
            actor: subject.clone(),
            password: PASSWORD.to_owned(),
            correlation_id: String::new(),
        })
        .await
        .expect("ticket")
        .into_inner()
        .signing_ticket;
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    let status = gateway
        .consume_signing_ticket(ConsumeSigningTicketRequest {
            actor: subject,
            signing_ticket: ticket,
            correlation_id: String::new(),
        })
        .await
        .expect_err("expired");
    assert_eq!(
        reason_of(&status).as_deref(),
        Some("SIGNING_TICKET_INVALID")
    );
}
