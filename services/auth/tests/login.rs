//! The auth service on port 0 with real mTLS, a real audit service and the suite's PostgreSQL.

use std::collections::{BTreeMap, BTreeSet};

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
    audit: Option<TestServer>,
    audit_database: String,
    auth_database: String,
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
        Self::start_with(|_| {}).await
    }

    async fn start_with(configure: impl FnOnce(&mut AuthConfig)) -> Self {
        let pki = TestPki::new();
        let audit_database = fresh_postgres_database().await;
        let audit_config = AuditConfig {
            process: test_process_config(),
            tls: pki.files("audit"),
            database_url: audit_database.clone(),
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
        let mut config = auth_config(
            &pki,
            auth_database.clone(),
            format!("https://{}", audit.address),
        );
        configure(&mut config);
        let auth =
            TestServer::start(|listener, shutdown| medai_auth::serve(config, listener, shutdown))
                .await;
        wait_until_serving(&pki, auth.address, "auth").await;
        Self {
            pki,
            auth,
            audit: Some(audit),
            audit_database,
            auth_database,
        }
    }

    /// Stops the audit service: from now on the ledger is unreachable.
    async fn stop_the_ledger(&mut self) {
        if let Some(audit) = self.audit.take() {
            audit.stop().await;
        }
    }

    /// One number from auth's own database.
    async fn auth_number(&self, sql: &str) -> i64 {
        let database = Database::connect(self.auth_database.as_str())
            .await
            .expect("connect");
        let row = database
            .query_one_raw(sea_orm::Statement::from_string(
                sea_orm::DatabaseBackend::Postgres,
                sql.to_owned(),
            ))
            .await
            .expect("query")
            .expect("row");
        row.try_get_by_index::<i64>(0).expect("number")
    }

    /// How many ledger entries there are of each (action, outcome).
    async fn recorded_all(&self) -> BTreeMap<(String, String), i64> {
        let database = Database::connect(self.audit_database.as_str())
            .await
            .expect("connect");
        database
            .query_all_raw(sea_orm::Statement::from_string(
                sea_orm::DatabaseBackend::Postgres,
                "SELECT action, outcome, count(*) AS n FROM ledger_entries GROUP BY action, outcome",
            ))
            .await
            .expect("query")
            .into_iter()
            .map(|row| {
                (
                    (
                        row.try_get::<String>("", "action").expect("action"),
                        row.try_get::<String>("", "outcome").expect("outcome"),
                    ),
                    row.try_get::<i64>("", "n").expect("count"),
                )
            })
            .collect()
    }

    /// How many ledger entries have `action` and `outcome`.
    async fn recorded(&self, action: &str, outcome: &str) -> i64 {
        let database = Database::connect(self.audit_database.as_str())
            .await
            .expect("connect");
        let row = database
            .query_one_raw(sea_orm::Statement::from_sql_and_values(
                sea_orm::DatabaseBackend::Postgres,
                "SELECT count(*) AS n FROM ledger_entries WHERE action = $1 AND outcome = $2",
                [action.into(), outcome.into()],
            ))
            .await
            .expect("query")
            .expect("row");
        row.try_get("", "n").expect("count")
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
        checkpoint_log_file: None,
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

fn wrong_password(username: &str) -> LoginRequest {
    login(username, "certainly not the password")
}

#[tokio::test]
async fn twenty_concurrent_wrong_passwords_lock_the_account_after_exactly_the_limit() {
    const LIMIT: u32 = 5;
    const GUESSES: usize = 20;
    let service = AuthUnderTest::start_with(|config| {
        config.lockout.max_failed_attempts = LIMIT;
    })
    .await;
    let gateway = service.client_as("gateway");
    let guesses: Vec<_> = (0..GUESSES)
        .map(|_| {
            let mut gateway = gateway.clone();
            tokio::spawn(async move { gateway.login(wrong_password("admin")).await })
        })
        .collect();
    let mut answers = BTreeMap::<String, usize>::new();
    for guess in guesses {
        let status = guess.await.expect("task").expect_err("refused");
        let reason = reason_of(&status).unwrap_or_else(|| format!("{status:?}"));
        *answers.entry(reason).or_default() += 1;
    }
    assert_eq!(
        answers,
        BTreeMap::from([
            ("ACCOUNT_LOCKED".to_owned(), GUESSES - LIMIT as usize),
            ("INVALID_CREDENTIALS".to_owned(), LIMIT as usize),
        ]),
        "exactly the limit is answered \"wrong password\", the rest \"locked\""
    );
    assert_eq!(
        service
            .auth_number("SELECT failed_attempts::bigint FROM users WHERE username = 'admin'")
            .await,
        i64::from(LIMIT),
        "the stored counter equals the limit"
    );
    assert!(
        service
            .auth_number("SELECT locked_until FROM users WHERE username = 'admin'")
            .await
            > 0
    );
    assert_eq!(service.recorded("ACCOUNT_LOCKOUT", "SUCCESS").await, 1);
    assert_eq!(
        service.recorded("LOGIN", "FAILURE").await,
        GUESSES as i64,
        "every guess is recorded"
    );
    let status = service
        .client_as("gateway")
        .login(login("admin", PASSWORD))
        .await
        .expect_err("locked");
    assert_eq!(reason_of(&status).as_deref(), Some("ACCOUNT_LOCKED"));
}

fn published_kids(keys: Vec<medai_proto::auth::v1::JsonWebKey>) -> BTreeSet<String> {
    keys.into_iter().map(|key| key.kid).collect()
}

#[tokio::test]
async fn a_key_rotated_while_the_ledger_is_unreachable_is_not_published() {
    use medai_proto::auth::v1::RotateSigningKeyRequest;
    let mut service = AuthUnderTest::start().await;
    let mut gateway = service.client_as("gateway");
    let grant = gateway
        .login(login("admin", PASSWORD))
        .await
        .expect("login")
        .into_inner()
        .grant
        .expect("grant");
    let subject = subject_of(&mut gateway, &grant.access_token).await;
    let before = published_kids(
        gateway
            .get_signing_keys(GetSigningKeysRequest {})
            .await
            .expect("keys")
            .into_inner()
            .keys,
    );
    let rotate = || RotateSigningKeyRequest {
        actor: subject.clone(),
        correlation_id: String::new(),
    };

    service.stop_the_ledger().await;
    let status = gateway
        .rotate_signing_key(rotate())
        .await
        .expect_err("fail closed");
    assert_eq!(
        (status.code(), reason_of(&status).as_deref()),
        (Code::Unavailable, Some("LEDGER_UNAVAILABLE"))
    );
    let after = published_kids(
        gateway
            .get_signing_keys(GetSigningKeysRequest {})
            .await
            .expect("keys")
            .into_inner()
            .keys,
    );
    assert_eq!(after, before, "an unrecorded key is not published");
    assert_eq!(
        service
            .auth_number("SELECT count(*) FROM signing_keys")
            .await,
        before.len() as i64,
        "nor stored"
    );
}

/// The (ledger action, outcome) pairs that compliance/state-changes.md lists for auth.
fn documented_auth_records() -> BTreeSet<(String, String)> {
    let document = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../compliance/state-changes.md"
    ))
    .expect("compliance/state-changes.md");
    let section = document
        .split("\n## ")
        .find(|section| section.starts_with("auth"))
        .expect("an `## auth` section");
    section
        .lines()
        .filter(|line| line.starts_with('|'))
        .filter_map(|line| {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let code = |cell: &str| {
                let inner = cell.strip_prefix('`')?.strip_suffix('`')?;
                Some(inner.to_owned())
            };
            Some((code(cells.get(2)?)?, code(cells.get(3)?)?))
        })
        .collect()
}

#[tokio::test]
async fn every_state_changing_rpc_writes_the_ledger_record_listed_in_compliance() {
    use medai_proto::auth::v1::{
        ChangePasswordRequest, ConsumeSigningTicketRequest, CreateUserRequest, DeleteUserRequest,
        DisableUserRequest, LogoutRequest, ReauthenticateRequest, RefreshRequest,
        ResetUserPasswordRequest, RotateSigningKeyRequest, SetUserRoleRequest,
    };
    const LIMIT: u32 = 3;
    let service = AuthUnderTest::start_with(|config| {
        config.lockout.max_failed_attempts = LIMIT;
    })
    .await;
    let mut gateway = service.client_as("gateway");
    let mut expected = service.recorded_all().await;
    let mut checked = BTreeSet::new();
    // Each step must add exactly these records and nothing else.
    macro_rules! step {
        ($name:expr, [$(($action:expr, $outcome:expr, $count:expr)),+]) => {{
            $(
                *expected.entry(($action.to_owned(), $outcome.to_owned())).or_default() += $count;
                checked.insert(($action.to_owned(), $outcome.to_owned()));
            )+
            assert_eq!(service.recorded_all().await, expected, "after {}", $name);
        }};
    }

    gateway
        .login(wrong_password("admin"))
        .await
        .expect_err("wrong password");
    step!("Login, wrong password", [("LOGIN", "FAILURE", 1)]);
    let admin = gateway
        .login(login("admin", PASSWORD))
        .await
        .expect("login")
        .into_inner()
        .grant
        .expect("grant");
    step!("Login", [("LOGIN", "SUCCESS", 1)]);
    let admin_subject = subject_of(&mut gateway, &admin.access_token).await;
    let actor = admin_subject.clone();

    gateway
        .create_user(CreateUserRequest {
            actor: actor.clone(),
            username: "carol".to_owned(),
            password: "carol password 123".to_owned(),
            role: "clinician".to_owned(),
            correlation_id: String::new(),
        })
        .await
        .expect("create");
    step!("CreateUser", [("USER_CREATE", "SUCCESS", 1)]);

    let carol = gateway
        .login(login("carol", "carol password 123"))
        .await
        .expect("login")
        .into_inner()
        .grant
        .expect("grant");
    step!("Login carol", [("LOGIN", "SUCCESS", 1)]);
    let refresh = |token: &str| RefreshRequest {
        refresh_token: token.to_owned(),
        correlation_id: String::new(),
    };
    gateway
        .refresh(refresh(&carol.refresh_token))
        .await
        .expect("refresh");
    step!("Refresh", [("TOKEN_REFRESH", "SUCCESS", 1)]);
    gateway
        .refresh(refresh(&carol.refresh_token))
        .await
        .expect_err("reuse");
    step!("Refresh, reused", [("REFRESH_TOKEN_REUSE", "DENIED", 1)]);

    gateway
        .set_user_role(SetUserRoleRequest {
            actor: actor.clone(),
            username: "carol".to_owned(),
            role: "viewer".to_owned(),
            correlation_id: String::new(),
        })
        .await
        .expect("role");
    step!("SetUserRole", [("USER_ROLE_SET", "SUCCESS", 1)]);
    gateway
        .reset_user_password(ResetUserPasswordRequest {
            actor: actor.clone(),
            username: "carol".to_owned(),
            new_password: "carol's new password".to_owned(),
            correlation_id: String::new(),
        })
        .await
        .expect("reset");
    step!("ResetUserPassword", [("USER_PASSWORD_RESET", "SUCCESS", 1)]);
    let carol = gateway
        .login(login("carol", "carol's new password"))
        .await
        .expect("login")
        .into_inner()
        .grant
        .expect("grant");
    step!("Login carol again", [("LOGIN", "SUCCESS", 1)]);
    let carol_subject = subject_of(&mut gateway, &carol.access_token).await;
    let change = |current: &str| ChangePasswordRequest {
        actor: carol_subject.clone(),
        current_password: current.to_owned(),
        new_password: "carol's third password".to_owned(),
        correlation_id: String::new(),
    };
    gateway
        .change_password(change("not carol's password"))
        .await
        .expect_err("wrong current password");
    step!("ChangePassword, wrong", [("PASSWORD_CHANGE", "FAILURE", 1)]);
    gateway
        .change_password(change("carol's new password"))
        .await
        .expect("change");
    step!("ChangePassword", [("PASSWORD_CHANGE", "SUCCESS", 1)]);

    let ticket = gateway
        .reauthenticate(ReauthenticateRequest {
            actor: actor.clone(),
            password: PASSWORD.to_owned(),
            correlation_id: String::new(),
        })
        .await
        .expect("reauthenticate")
        .into_inner()
        .signing_ticket;
    step!("Reauthenticate", [("REAUTHENTICATION", "SUCCESS", 1)]);
    gateway
        .consume_signing_ticket(ConsumeSigningTicketRequest {
            actor: actor.clone(),
            signing_ticket: ticket,
            correlation_id: String::new(),
        })
        .await
        .expect("consume");
    step!(
        "ConsumeSigningTicket",
        [("SIGNING_TICKET_CONSUME", "SUCCESS", 1)]
    );
    gateway
        .rotate_signing_key(RotateSigningKeyRequest {
            actor: actor.clone(),
            correlation_id: String::new(),
        })
        .await
        .expect("rotate");
    step!("RotateSigningKey", [("SIGNING_KEY_ROTATE", "SUCCESS", 1)]);

    gateway
        .disable_user(DisableUserRequest {
            actor: actor.clone(),
            username: "carol".to_owned(),
            correlation_id: String::new(),
        })
        .await
        .expect("disable");
    step!("DisableUser", [("USER_DISABLE", "SUCCESS", 1)]);

    gateway
        .create_user(CreateUserRequest {
            actor: actor.clone(),
            username: "dan".to_owned(),
            password: "dan password 1234".to_owned(),
            role: "viewer".to_owned(),
            correlation_id: String::new(),
        })
        .await
        .expect("create");
    step!("CreateUser dan", [("USER_CREATE", "SUCCESS", 1)]);
    for _ in 0..LIMIT {
        gateway
            .login(wrong_password("dan"))
            .await
            .expect_err("wrong password");
    }
    step!(
        "Login, wrong password up to the limit",
        [
            ("LOGIN", "FAILURE", i64::from(LIMIT)),
            ("ACCOUNT_LOCKOUT", "SUCCESS", 1)
        ]
    );
    gateway
        .delete_user(DeleteUserRequest {
            actor: actor.clone(),
            username: "dan".to_owned(),
            correlation_id: String::new(),
        })
        .await
        .expect("delete");
    step!("DeleteUser", [("USER_DELETE", "SUCCESS", 1)]);

    let claims = {
        let keys = gateway
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
            .collect::<Vec<_>>();
        TokenVerifier::new("medai-auth", "medai", &keys)
            .verify(&admin.access_token)
            .expect("claims")
    };
    gateway
        .logout(LogoutRequest {
            actor: admin_subject,
            access_token_id: claims.jti,
            access_token_expires_at: claims.exp,
            refresh_token: admin.refresh_token,
            correlation_id: String::new(),
        })
        .await
        .expect("logout");
    step!("Logout", [("LOGOUT", "SUCCESS", 1)]);

    assert_eq!(
        checked,
        documented_auth_records(),
        "compliance/state-changes.md lists exactly the records this test checks"
    );
}

#[tokio::test]
async fn with_the_ledger_unreachable_no_recorded_change_of_auth_takes_effect() {
    use medai_proto::auth::v1::{
        CheckRevocationRequest, CreateUserRequest, DisableUserRequest, LogoutRequest,
        SetUserRoleRequest,
    };
    let mut service = AuthUnderTest::start().await;
    let mut gateway = service.client_as("gateway");
    let admin = gateway
        .login(login("admin", PASSWORD))
        .await
        .expect("login")
        .into_inner()
        .grant
        .expect("grant");
    let keys = gateway
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
        .collect::<Vec<_>>();
    let claims = TokenVerifier::new("medai-auth", "medai", &keys)
        .verify(&admin.access_token)
        .expect("claims");
    let actor = claims.sub.clone();
    gateway
        .create_user(CreateUserRequest {
            actor: actor.clone(),
            username: "carol".to_owned(),
            password: "carol password 123".to_owned(),
            role: "clinician".to_owned(),
            correlation_id: String::new(),
        })
        .await
        .expect("create");
    service.stop_the_ledger().await;

    let refused = |result: Result<(), tonic::Status>| {
        let status = result.expect_err("fail closed");
        assert_eq!(
            (status.code(), reason_of(&status).as_deref()),
            (Code::Unavailable, Some("LEDGER_UNAVAILABLE"))
        );
    };
    refused(
        gateway
            .create_user(CreateUserRequest {
                actor: actor.clone(),
                username: "eve".to_owned(),
                password: "eve password 1234".to_owned(),
                role: "admin".to_owned(),
                correlation_id: String::new(),
            })
            .await
            .map(|_| ()),
    );
    refused(
        gateway
            .set_user_role(SetUserRoleRequest {
                actor: actor.clone(),
                username: "carol".to_owned(),
                role: "admin".to_owned(),
                correlation_id: String::new(),
            })
            .await
            .map(|_| ()),
    );
    refused(
        gateway
            .disable_user(DisableUserRequest {
                actor: actor.clone(),
                username: "carol".to_owned(),
                correlation_id: String::new(),
            })
            .await
            .map(|_| ()),
    );
    refused(
        gateway
            .logout(LogoutRequest {
                actor: actor.clone(),
                access_token_id: claims.jti.clone(),
                access_token_expires_at: claims.exp,
                refresh_token: admin.refresh_token.clone(),
                correlation_id: String::new(),
            })
            .await
            .map(|_| ()),
    );
    assert_eq!(
        service
            .auth_number("SELECT count(*) FROM users WHERE username = 'eve'")
            .await,
        0,
        "no unrecorded user"
    );
    assert_eq!(
        service
            .auth_number(
                "SELECT count(*) FROM users WHERE username = 'carol' AND role = 'clinician' \
                 AND status = 'active' AND token_generation = 0"
            )
            .await,
        1,
        "carol is unchanged"
    );
    assert_eq!(
        service
            .auth_number("SELECT count(*) FROM revoked_tokens")
            .await
            + service
                .auth_number("SELECT count(*) FROM subject_token_floors")
                .await,
        0,
        "no unrecorded revocation"
    );
    let revoked = gateway
        .check_revocation(CheckRevocationRequest {
            token_id: claims.jti,
            subject: claims.sub,
            generation: claims.generation,
        })
        .await
        .expect("check")
        .into_inner()
        .revoked;
    assert!(!revoked, "the unrecorded logout did not take effect");
}

#[tokio::test]
async fn concurrent_changes_to_one_user_each_raise_the_token_generation() {
    use medai_proto::auth::v1::{CreateUserRequest, SetUserRoleRequest};
    const CHANGES: usize = 8;
    let service = AuthUnderTest::start().await;
    let mut gateway = service.client_as("gateway");
    let admin = gateway
        .login(login("admin", PASSWORD))
        .await
        .expect("login")
        .into_inner()
        .grant
        .expect("grant");
    let actor = subject_of(&mut gateway, &admin.access_token).await;
    gateway
        .create_user(CreateUserRequest {
            actor: actor.clone(),
            username: "dave".to_owned(),
            password: "dave password 123".to_owned(),
            role: "clinician".to_owned(),
            correlation_id: String::new(),
        })
        .await
        .expect("create");
    let changes: Vec<_> = (0..CHANGES)
        .map(|index| {
            let mut gateway = gateway.clone();
            let request = SetUserRoleRequest {
                actor: actor.clone(),
                username: "dave".to_owned(),
                role: if index % 2 == 0 {
                    "viewer"
                } else {
                    "clinician"
                }
                .to_owned(),
                correlation_id: String::new(),
            };
            tokio::spawn(async move { gateway.set_user_role(request).await })
        })
        .collect();
    for change in changes {
        change.await.expect("task").expect("role change");
    }
    // Two changes computing the same generation would leave tokens issued between them valid.
    assert_eq!(
        service
            .auth_number("SELECT token_generation FROM users WHERE username = 'dave'")
            .await,
        CHANGES as i64
    );
    assert_eq!(
        service
            .auth_number(
                "SELECT f.lowest_valid_generation FROM subject_token_floors f \
                 JOIN users u ON u.id = f.subject WHERE u.username = 'dave'"
            )
            .await,
        CHANGES as i64
    );
}
