//! The auth service on port 0 with real mTLS, a real audit service and the suite's PostgreSQL.

use std::collections::{BTreeMap, BTreeSet};

use medai_audit::AuditConfig;
use medai_auth::AuthConfig;
use medai_auth::config::{BootstrapAdmin, TokenSettings};
use medai_proto::auth::v1::auth_service_client::AuthServiceClient;
use medai_proto::auth::v1::{
    ConsumeSigningTicketRequest, CreateUserRequest, DisableUserRequest, GetSigningKeysRequest,
    LoginRequest, LogoutRequest, ReauthenticateRequest, SetUserRoleRequest, TokenGrant,
};
use medai_runtime::config::Secret;
use medai_runtime::errors::reason_of;
use medai_testkit::{
    TestPki, TestServer, fresh_postgres_database, test_process_config, wait_until_serving,
};
use medai_tokens::{AccessClaims, PublishedKey, Role, TokenVerifier};
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
        database_max_connections: medai_auth::config::default_database_max_connections(),
        audit_endpoint,
        tokens: TokenSettings::default(),
        bootstrap_admin: Some(BootstrapAdmin {
            username: "admin".to_owned(),
            password: Secret::new(PASSWORD),
        }),
        lockout: Default::default(),
        revocation: Default::default(),
        passwords: Default::default(),
    }
}

impl AuthUnderTest {
    async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    async fn start_with(configure: impl FnOnce(&mut AuthConfig)) -> Self {
        let pki = TestPki::new();
        let (audit, audit_database) = start_ledger(&pki).await;
        let auth_database = fresh_postgres_database().await;
        let mut config = auth_config(
            &pki,
            auth_database.clone(),
            format!("https://{}", audit.address),
        );
        configure(&mut config);
        let auth = start_auth(&pki, config).await;
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
        first_number(
            &self.auth_database,
            sea_orm::Statement::from_string(sea_orm::DatabaseBackend::Postgres, sql.to_owned()),
        )
        .await
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
        first_number(
            &self.audit_database,
            sea_orm::Statement::from_sql_and_values(
                sea_orm::DatabaseBackend::Postgres,
                "SELECT count(*) AS n FROM ledger_entries WHERE action = $1 AND outcome = $2",
                [action.into(), outcome.into()],
            ),
        )
        .await
    }

    fn client_as(&self, identity: &str) -> AuthServiceClient<tonic::transport::Channel> {
        AuthServiceClient::new(self.pki.channel_as(identity, self.auth.address, "auth"))
    }

    /// How many LOGIN entries with `outcome` the ledger holds.
    async fn ledger_count(&self, outcome: &str) -> i64 {
        self.recorded("LOGIN", outcome).await
    }
}

/// A real audit service (the ledger auth records into) with its own database.
async fn start_ledger(pki: &TestPki) -> (TestServer, String) {
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
    wait_until_serving(pki, audit.address, "audit").await;
    (audit, audit_database)
}

/// The first column of the one row `statement` answers in the database at `url`, as a number.
async fn first_number(url: &str, statement: sea_orm::Statement) -> i64 {
    let database = Database::connect(url).await.expect("connect");
    let row = database
        .query_one_raw(statement)
        .await
        .expect("query")
        .expect("row");
    row.try_get_by_index::<i64>(0).expect("number")
}

/// Starts auth with `config` and waits until it answers SERVING.
async fn start_auth(pki: &TestPki, config: AuthConfig) -> TestServer {
    let auth =
        TestServer::start(|listener, shutdown| medai_auth::serve(config, listener, shutdown)).await;
    wait_until_serving(pki, auth.address, "auth").await;
    auth
}

type AuthClient = AuthServiceClient<tonic::transport::Channel>;

/// The signing keys auth publishes, as a verifier takes them.
async fn published_keys(gateway: &mut AuthClient) -> Vec<PublishedKey> {
    gateway
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
        .collect()
}

/// The claims of an access token, verified against the keys auth publishes.
async fn claims_of(gateway: &mut AuthClient, access_token: &str) -> AccessClaims {
    TokenVerifier::new("medai-auth", "medai", &published_keys(gateway).await)
        .verify(access_token)
        .expect("claims")
}

/// The subject of an access token, verified against the keys auth publishes.
async fn subject_of(gateway: &mut AuthClient, access_token: &str) -> String {
    claims_of(gateway, access_token).await.sub
}

fn login(username: &str, password: &str) -> LoginRequest {
    LoginRequest {
        username: username.to_owned(),
        password: password.to_owned(),
        correlation_id: String::new(),
    }
}

/// The tokens of a successful login.
async fn grant_of(gateway: &mut AuthClient, username: &str, password: &str) -> TokenGrant {
    gateway
        .login(login(username, password))
        .await
        .expect("login")
        .into_inner()
        .grant
        .expect("grant")
}

fn create_user(actor: &str, username: &str, password: &str, role: &str) -> CreateUserRequest {
    CreateUserRequest {
        actor: actor.to_owned(),
        username: username.to_owned(),
        password: password.to_owned(),
        role: role.to_owned(),
        correlation_id: String::new(),
    }
}

fn set_user_role(actor: &str, username: &str, role: &str) -> SetUserRoleRequest {
    SetUserRoleRequest {
        actor: actor.to_owned(),
        username: username.to_owned(),
        role: role.to_owned(),
        correlation_id: String::new(),
    }
}

fn disable_user(actor: &str, username: &str) -> DisableUserRequest {
    DisableUserRequest {
        actor: actor.to_owned(),
        username: username.to_owned(),
        correlation_id: String::new(),
    }
}

fn reauthenticate(actor: &str, password: &str) -> ReauthenticateRequest {
    ReauthenticateRequest {
        actor: actor.to_owned(),
        password: password.to_owned(),
        correlation_id: String::new(),
    }
}

fn consume_ticket(actor: &str, signing_ticket: &str) -> ConsumeSigningTicketRequest {
    ConsumeSigningTicketRequest {
        actor: actor.to_owned(),
        signing_ticket: signing_ticket.to_owned(),
        correlation_id: String::new(),
    }
}

/// The logout of the session whose access token has `claims`, by its own user.
fn logout(claims: &AccessClaims, refresh_token: &str) -> LogoutRequest {
    LogoutRequest {
        actor: claims.sub.clone(),
        access_token_id: claims.jti.clone(),
        access_token_expires_at: claims.exp,
        refresh_token: refresh_token.to_owned(),
        correlation_id: String::new(),
    }
}

/// The bootstrap admin logged in: its tokens and the verified claims of its access token.
async fn admin_session(gateway: &mut AuthClient) -> (TokenGrant, AccessClaims) {
    let grant = grant_of(gateway, "admin", PASSWORD).await;
    let claims = claims_of(gateway, &grant.access_token).await;
    (grant, claims)
}

#[tokio::test]
async fn the_bootstrap_admin_gets_a_token_that_verifies_against_the_published_keys() {
    let service = AuthUnderTest::start().await;
    let mut gateway = service.client_as("gateway");
    let response = grant_of(&mut gateway, "admin", PASSWORD).await;
    assert_eq!(response.role, "admin");
    assert_eq!(response.expires_in_seconds, 600);

    let published = published_keys(&mut gateway).await;
    assert_eq!(published.len(), 1);
    assert_eq!(
        (
            published[0].kty.as_str(),
            published[0].crv.as_str(),
            published[0].alg.as_str()
        ),
        ("OKP", "Ed25519", "EdDSA")
    );
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
    let auth = start_auth(&pki, config).await;
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

/// Why auth refuses to start with the test settings changed by `configure`.
async fn refused_settings(pki: &TestPki, configure: impl FnOnce(&mut AuthConfig)) -> String {
    let mut config = auth_config(
        pki,
        "sqlite::memory:".to_owned(),
        "https://127.0.0.1:1".to_owned(),
    );
    configure(&mut config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    medai_auth::serve(config, listener, std::future::pending())
        .await
        .expect_err("refused")
        .to_string()
}

#[tokio::test]
async fn invalid_settings_stop_the_service_with_a_clear_message() {
    let pki = TestPki::new();
    let error = refused_settings(&pki, |config| {
        config.tokens.access_token_ttl_seconds = 3600;
    })
    .await;
    assert!(error.contains("access_token_ttl_seconds"), "{error}");

    let error = refused_settings(&pki, |config| {
        config.database_max_connections = 0;
    })
    .await;
    assert!(error.contains("database_max_connections"), "{error}");

    let error = refused_settings(&pki, |config| {
        config.bootstrap_admin = Some(BootstrapAdmin {
            username: "admin".to_owned(),
            password: Secret::new("short"),
        });
    })
    .await;
    assert!(error.contains("at least 12"), "{error}");
    assert!(!error.contains("short"), "the password is not echoed");
}

#[tokio::test]
async fn a_signing_ticket_is_single_use_short_lived_and_bound_to_its_user() {
    let service = AuthUnderTest::start().await;
    let mut gateway = service.client_as("gateway");
    let subject = admin_session(&mut gateway).await.1.sub;

    let status = gateway
        .reauthenticate(reauthenticate(&subject, "wrong password"))
        .await
        .expect_err("refused");
    assert_eq!(reason_of(&status).as_deref(), Some("INVALID_CREDENTIALS"));
    let ticket = gateway
        .reauthenticate(reauthenticate(&subject, PASSWORD))
        .await
        .expect("ticket")
        .into_inner();
    assert_eq!(ticket.expires_in_seconds, 300);

    let status = gateway
        .consume_signing_ticket(consume_ticket("someone-else", &ticket.signing_ticket))
        .await
        .expect_err("not theirs");
    assert_eq!(
        reason_of(&status).as_deref(),
        Some("SIGNING_TICKET_INVALID")
    );
    let signer = gateway
        .consume_signing_ticket(consume_ticket(&subject, &ticket.signing_ticket))
        .await
        .expect("first use")
        .into_inner();
    assert_eq!(
        (signer.username.as_str(), signer.role.as_str()),
        ("admin", "admin")
    );
    let status = gateway
        .consume_signing_ticket(consume_ticket(&subject, &ticket.signing_ticket))
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
    let service = AuthUnderTest::start_with(|config| {
        config.tokens.signing_ticket_ttl_seconds = 1;
    })
    .await;
    let mut gateway = service.client_as("gateway");
    let subject = admin_session(&mut gateway).await.1.sub;
    let ticket = gateway
        .reauthenticate(reauthenticate(&subject, PASSWORD))
        .await
        .expect("ticket")
        .into_inner()
        .signing_ticket;
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    let status = gateway
        .consume_signing_ticket(consume_ticket(&subject, &ticket))
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

async fn published_kids(gateway: &mut AuthClient) -> BTreeSet<String> {
    published_keys(gateway)
        .await
        .into_iter()
        .map(|key| key.kid)
        .collect()
}

#[tokio::test]
async fn a_key_rotated_while_the_ledger_is_unreachable_is_not_published() {
    use medai_proto::auth::v1::RotateSigningKeyRequest;
    let mut service = AuthUnderTest::start().await;
    let mut gateway = service.client_as("gateway");
    let subject = admin_session(&mut gateway).await.1.sub;
    let before = published_kids(&mut gateway).await;
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
    let after = published_kids(&mut gateway).await;
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

/// Every state-changing RPC (the list is compliance/state-changes.md's, checked at the end)
/// writes exactly its ledger record. Auth runs here on a pool of ONE database connection: a
/// request that, inside its transaction, took a second pooled connection (as a login's key read
/// once did, a deadlock once logins of one user fill the pool) would wait for the pool's only
/// connection, which its own transaction holds, until the 30 s acquire timeout and fail
/// INTERNAL, so every transaction of auth is checked to do all its work through itself.
#[tokio::test]
async fn every_state_changing_rpc_writes_the_ledger_record_listed_in_compliance() {
    use medai_proto::auth::v1::{
        ChangePasswordRequest, DeleteUserRequest, RefreshRequest, ResetUserPasswordRequest,
        RotateSigningKeyRequest,
    };
    const LIMIT: u32 = 3;
    let service = AuthUnderTest::start_with(|config| {
        config.lockout.max_failed_attempts = LIMIT;
        config.database_max_connections = 1;
    })
    .await;
    // A refusal must be the stable one the step expects, not an INTERNAL from a stalled pool.
    let refused_with = |status: tonic::Status, code: Code, reason: &str| {
        assert_eq!(
            (status.code(), reason_of(&status).unwrap_or_default()),
            (code, reason.to_owned()),
            "{status:?}"
        );
    };
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

    refused_with(
        gateway
            .login(wrong_password("admin"))
            .await
            .expect_err("wrong password"),
        Code::Unauthenticated,
        "INVALID_CREDENTIALS",
    );
    step!("Login, wrong password", [("LOGIN", "FAILURE", 1)]);
    let admin = grant_of(&mut gateway, "admin", PASSWORD).await;
    step!("Login", [("LOGIN", "SUCCESS", 1)]);
    let actor = subject_of(&mut gateway, &admin.access_token).await;

    gateway
        .create_user(create_user(
            &actor,
            "carol",
            "carol password 123",
            "clinician",
        ))
        .await
        .expect("create");
    step!("CreateUser", [("USER_CREATE", "SUCCESS", 1)]);

    let carol = grant_of(&mut gateway, "carol", "carol password 123").await;
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
    refused_with(
        gateway
            .refresh(refresh(&carol.refresh_token))
            .await
            .expect_err("reuse"),
        Code::Unauthenticated,
        "REFRESH_TOKEN_REUSED",
    );
    step!("Refresh, reused", [("REFRESH_TOKEN_REUSE", "DENIED", 1)]);

    gateway
        .set_user_role(set_user_role(&actor, "carol", "viewer"))
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
    let carol = grant_of(&mut gateway, "carol", "carol's new password").await;
    step!("Login carol again", [("LOGIN", "SUCCESS", 1)]);
    let carol_subject = subject_of(&mut gateway, &carol.access_token).await;
    let change = |current: &str| ChangePasswordRequest {
        actor: carol_subject.clone(),
        current_password: current.to_owned(),
        new_password: "carol's third password".to_owned(),
        correlation_id: String::new(),
    };
    refused_with(
        gateway
            .change_password(change("not carol's password"))
            .await
            .expect_err("wrong current password"),
        Code::Unauthenticated,
        "INVALID_CREDENTIALS",
    );
    step!("ChangePassword, wrong", [("PASSWORD_CHANGE", "FAILURE", 1)]);
    gateway
        .change_password(change("carol's new password"))
        .await
        .expect("change");
    step!("ChangePassword", [("PASSWORD_CHANGE", "SUCCESS", 1)]);

    let ticket = gateway
        .reauthenticate(reauthenticate(&actor, PASSWORD))
        .await
        .expect("reauthenticate")
        .into_inner()
        .signing_ticket;
    step!("Reauthenticate", [("REAUTHENTICATION", "SUCCESS", 1)]);
    gateway
        .consume_signing_ticket(consume_ticket(&actor, &ticket))
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
        .disable_user(disable_user(&actor, "carol"))
        .await
        .expect("disable");
    step!("DisableUser", [("USER_DISABLE", "SUCCESS", 1)]);

    gateway
        .create_user(create_user(&actor, "dan", "dan password 1234", "viewer"))
        .await
        .expect("create");
    step!("CreateUser dan", [("USER_CREATE", "SUCCESS", 1)]);
    for _ in 0..LIMIT {
        refused_with(
            gateway
                .login(wrong_password("dan"))
                .await
                .expect_err("wrong password"),
            Code::Unauthenticated,
            "INVALID_CREDENTIALS",
        );
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

    let claims = claims_of(&mut gateway, &admin.access_token).await;
    gateway
        .logout(logout(&claims, &admin.refresh_token))
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
    use medai_proto::auth::v1::CheckRevocationRequest;
    let mut service = AuthUnderTest::start().await;
    let mut gateway = service.client_as("gateway");
    let (admin, claims) = admin_session(&mut gateway).await;
    let actor = claims.sub.clone();
    gateway
        .create_user(create_user(
            &actor,
            "carol",
            "carol password 123",
            "clinician",
        ))
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
            .create_user(create_user(&actor, "eve", "eve password 1234", "admin"))
            .await
            .map(|_| ()),
    );
    refused(
        gateway
            .set_user_role(set_user_role(&actor, "carol", "admin"))
            .await
            .map(|_| ()),
    );
    refused(
        gateway
            .disable_user(disable_user(&actor, "carol"))
            .await
            .map(|_| ()),
    );
    refused(
        gateway
            .logout(logout(&claims, &admin.refresh_token))
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
    const CHANGES: usize = 8;
    let service = AuthUnderTest::start().await;
    let mut gateway = service.client_as("gateway");
    let actor = admin_session(&mut gateway).await.1.sub;
    gateway
        .create_user(create_user(
            &actor,
            "dave",
            "dave password 123",
            "clinician",
        ))
        .await
        .expect("create");
    let changes: Vec<_> = (0..CHANGES)
        .map(|index| {
            let mut gateway = gateway.clone();
            let role = if index % 2 == 0 {
                "viewer"
            } else {
                "clinician"
            };
            let request = set_user_role(&actor, "dave", role);
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

/// The real `medai-auth` binary as a separate process (its RSS is what issue #14 measures),
/// on port 0 (it writes its bound addresses to a file), killed when dropped.
struct AuthProcess {
    child: std::process::Child,
    grpc: std::net::SocketAddr,
    admin: std::net::SocketAddr,
    database_url: String,
    _directory: tempfile::TempDir,
}

impl AuthProcess {
    async fn start(pki: &TestPki, audit: &TestServer, extra: &[(&str, String)]) -> Self {
        let directory = tempfile::tempdir().expect("tempdir");
        let address_file = directory.path().join("addresses.json");
        let tls = pki.files("auth");
        let database_url = fresh_postgres_database().await;
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_medai-auth"));
        command
            .env_clear()
            .env("MEDAI_AUTH_PROCESS__LISTEN_ADDR", "127.0.0.1:0")
            .env("MEDAI_AUTH_PROCESS__ADMIN_ADDR", "127.0.0.1:0")
            .env("MEDAI_AUTH_PROCESS__ADDRESS_FILE", &address_file)
            .env("MEDAI_AUTH_PROCESS__LOG_FILTER", "warn")
            .env("MEDAI_AUTH_PROCESS__DEPENDENCY_PROBE_SECONDS", "1")
            .env("MEDAI_AUTH_TLS__CA_CERT", &tls.ca_cert)
            .env("MEDAI_AUTH_TLS__CERT", &tls.cert)
            .env("MEDAI_AUTH_TLS__KEY", &tls.key)
            .env("MEDAI_AUTH_DATABASE_URL", &database_url)
            .env(
                "MEDAI_AUTH_AUDIT_ENDPOINT",
                format!("https://{}", audit.address),
            )
            .env("MEDAI_AUTH_BOOTSTRAP_ADMIN__USERNAME", "admin")
            .env("MEDAI_AUTH_BOOTSTRAP_ADMIN__PASSWORD", PASSWORD)
            .stdout(std::process::Stdio::null());
        for (variable, value) in extra {
            command.env(variable, value);
        }
        let mut child = command.spawn().expect("start medai-auth");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let addresses = loop {
            if let Some(addresses) = std::fs::read_to_string(&address_file)
                .ok()
                .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
            {
                break addresses;
            }
            assert!(
                child.try_wait().expect("auth status").is_none(),
                "medai-auth exited at start"
            );
            assert!(
                std::time::Instant::now() < deadline,
                "medai-auth never bound"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        };
        let address = |key: &str| -> std::net::SocketAddr {
            addresses[key]
                .as_str()
                .and_then(|text| text.parse().ok())
                .unwrap_or_else(|| panic!("no {key} address in {addresses}"))
        };
        let process = Self {
            grpc: address("grpc"),
            admin: address("admin"),
            database_url,
            child,
            _directory: directory,
        };
        wait_until_serving(pki, process.grpc, "auth").await;
        process
    }

    /// The process's resident set (VmRSS), in KiB.
    fn rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).expect("status");
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS")
    }

    /// One sample's value from the process's `/metrics`.
    async fn metric(&self, name: &str) -> f64 {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(self.admin)
            .await
            .expect("admin port");
        stream
            .write_all(b"GET /metrics HTTP/1.0\r\nHost: auth\r\n\r\n")
            .await
            .expect("ask for metrics");
        let mut answer = String::new();
        stream
            .read_to_string(&mut answer)
            .await
            .expect("metrics answer");
        answer
            .lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|value| value.trim().parse().ok())
            .unwrap_or_else(|| panic!("no sample {name} in /metrics"))
    }
}

impl Drop for AuthProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Issue #14: 32 concurrent logins to the real auth process. Each answer is a grant or the
/// stable refusal `RESOURCE_EXHAUSTED`/`AUTH_BUSY`; never more than `max_concurrent_hashes`
/// argon2 hashes ran at once (the process's own peak gauge); and afterwards its RSS is back
/// within a few MiB of its idle RSS (before, every concurrent hash left 19 MiB in glibc's
/// arenas: hundreds of MiB after such a storm).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_32_logins_is_bounded_and_gives_its_memory_back() {
    const LOGINS: usize = 32;
    const MAX_CONCURRENT: usize = 2;
    const MAX_WAITING: usize = 16;
    const ALLOWED_GROWTH_KIB: u64 = 8 * 1024;
    let pki = TestPki::new();
    let (audit, _audit_database) = start_ledger(&pki).await;
    let auth = AuthProcess::start(
        &pki,
        &audit,
        &[
            (
                "MEDAI_AUTH_PASSWORDS__MAX_CONCURRENT_HASHES",
                MAX_CONCURRENT.to_string(),
            ),
            (
                "MEDAI_AUTH_PASSWORDS__MAX_WAITING_HASHES",
                MAX_WAITING.to_string(),
            ),
        ],
    )
    .await;
    let gateway = AuthServiceClient::new(pki.channel_as("gateway", auth.grpc, "auth"));
    // One login first, so connection pools and TLS sessions exist before "idle" is measured.
    grant_of(&mut gateway.clone(), "admin", PASSWORD).await;
    let idle_kib = auth.rss_kib();

    let logins: Vec<_> = (0..LOGINS)
        .map(|index| {
            let mut gateway = gateway.clone();
            // Half unknown users: the decoy hash goes through the same bound.
            let username = if index % 2 == 0 { "admin" } else { "nobody" };
            tokio::spawn(async move { gateway.login(login(username, PASSWORD)).await })
        })
        .collect();
    let mut answers = BTreeMap::<String, usize>::new();
    for pending in logins {
        let answer = match pending.await.expect("task") {
            Ok(_) => "granted".to_owned(),
            Err(status) => format!(
                "{:?}/{}",
                status.code(),
                reason_of(&status).unwrap_or_default()
            ),
        };
        *answers.entry(answer).or_default() += 1;
    }
    let storm_kib = auth.rss_kib();
    let busy = answers
        .get("ResourceExhausted/AUTH_BUSY")
        .copied()
        .unwrap_or(0);
    let granted = answers.get("granted").copied().unwrap_or(0);
    let unknown = answers
        .get("Unauthenticated/INVALID_CREDENTIALS")
        .copied()
        .unwrap_or(0);
    eprintln!(
        "auth RSS idle {idle_kib} KiB, after {LOGINS} concurrent logins {storm_kib} KiB; answers {answers:?}"
    );
    assert_eq!(
        busy + granted + unknown,
        LOGINS,
        "only grants, unknown users and AUTH_BUSY: {answers:?}"
    );
    assert!(granted >= 1 && unknown >= 1, "hashes ran: {answers:?}");
    let peak = auth.metric("medai_auth_password_hashes_peak").await;
    assert!(
        (1.0..=MAX_CONCURRENT as f64).contains(&peak),
        "at most {MAX_CONCURRENT} hashes at once, saw {peak}"
    );
    assert_eq!(
        auth.metric("medai_auth_password_hashes_refused_total")
            .await,
        busy as f64,
        "each AUTH_BUSY answer is counted"
    );
    assert_eq!(
        auth.metric("medai_auth_password_hashes_in_progress").await,
        0.0
    );
    assert!(
        storm_kib <= idle_kib + ALLOWED_GROWTH_KIB,
        "auth's RSS grew from {idle_kib} KiB to {storm_kib} KiB over {LOGINS} logins"
    );
}

/// Concurrent logins of one user, more than auth's connection pool holds (3 here), each of whose
/// transactions waits for the user's row lock while holding a pooled connection: the login that
/// gets the lock must finish without a second pooled connection (it reads the signing keys
/// through its own transaction), so every login is granted once the lock is free. Before, the
/// lock holder waited for the full pool until its 30 s acquire timeout and failed INTERNAL (seen
/// in a login storm).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_of_one_user_queued_on_its_row_lock_past_the_pool_size_are_all_granted() {
    const LOGINS: usize = 5;
    const POOL: i64 = 3;
    let pki = TestPki::new();
    let (audit, _audit_database) = start_ledger(&pki).await;
    let auth = AuthProcess::start(
        &pki,
        &audit,
        &[("MEDAI_AUTH_DATABASE_MAX_CONNECTIONS", POOL.to_string())],
    )
    .await;
    let gateway = AuthServiceClient::new(pki.channel_as("gateway", auth.grpc, "auth"));
    grant_of(&mut gateway.clone(), "admin", PASSWORD).await;

    // Hold the admin's row from outside, so every login's transaction queues behind it.
    let database = Database::connect(auth.database_url.as_str())
        .await
        .expect("database");
    let row_lock = sea_orm::TransactionTrait::begin(&database)
        .await
        .expect("begin");
    row_lock
        .execute_unprepared("SELECT id FROM users WHERE username = 'admin' FOR UPDATE")
        .await
        .expect("lock the admin's row");
    let logins: Vec<_> = (0..LOGINS)
        .map(|_| {
            let mut gateway = gateway.clone();
            tokio::spawn(async move { gateway.login(login("admin", PASSWORD)).await })
        })
        .collect();
    // Wait until the pool is full of transactions waiting for the lock.
    let waiting_sql = "SELECT count(*)::bigint AS waiting FROM pg_stat_activity \
         WHERE wait_event_type = 'Lock' AND datname = current_database()";
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let row = database
            .query_one_raw(sea_orm::Statement::from_string(
                database.get_database_backend(),
                waiting_sql,
            ))
            .await
            .expect("count waiters")
            .expect("a row");
        let waiting: i64 = row.try_get("", "waiting").expect("waiting");
        if waiting >= POOL {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "only {waiting} logins ever waited for the row lock"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    row_lock.commit().await.expect("release the row");

    let mut answers = BTreeMap::<String, usize>::new();
    for pending in logins {
        let answer = match tokio::time::timeout(std::time::Duration::from_secs(25), pending).await {
            Err(_) => "no answer within 25 s".to_owned(),
            Ok(joined) => match joined.expect("task") {
                Ok(_) => "granted".to_owned(),
                Err(status) => format!(
                    "{:?}/{}",
                    status.code(),
                    reason_of(&status).unwrap_or_default()
                ),
            },
        };
        *answers.entry(answer).or_default() += 1;
    }
    assert_eq!(
        answers,
        BTreeMap::from([("granted".to_owned(), LOGINS)]),
        "every queued login is granted"
    );
}
