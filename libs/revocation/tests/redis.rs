//! The revocation store against the suite's real Redis, and against a Redis that is gone.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fred::prelude::{ClientLike, KeysInterface};
use medai_revocation::{
    Mode, RevocationError, RevocationSettings, RevocationStore, RevokedToken, SEEDED_MARKER_KEY,
    SubjectFloor, TokenFacts,
};

fn suite_redis_url() -> String {
    std::env::var("MEDAI_TEST_REDIS_URL").unwrap_or_else(|_| {
        panic!("MEDAI_TEST_REDIS_URL is not set: run the suite with scripts/test.sh")
    })
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

fn settings(mode: Mode, redis_url: String) -> RevocationSettings {
    RevocationSettings {
        mode,
        redis_url: Some(redis_url),
        not_revoked_cache_ms: 0,
    }
}

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_nanos()
    )
}

#[tokio::test]
async fn a_revocation_written_by_one_process_is_seen_by_another() {
    let writer =
        RevocationStore::connect(&settings(Mode::Production, suite_redis_url())).expect("writer");
    let reader =
        RevocationStore::connect(&settings(Mode::Production, suite_redis_url())).expect("reader");
    // Auth seeds Redis at start; without the marker a miss is not trusted.
    writer.seed(&[], &[]).await.expect("seed");
    let jti = unique("jti");
    let subject = unique("subject");
    let token = TokenFacts {
        jti: &jti,
        subject: &subject,
        generation: 1,
    };
    assert!(!reader.is_revoked(token).await.expect("check"));
    writer
        .revoke_token(&jti, unix_now() + 600)
        .await
        .expect("revoke");
    assert!(
        reader.is_revoked(token).await.expect("check"),
        "the other store sees the revocation through Redis"
    );

    let other = unique("jti");
    let sibling = TokenFacts {
        jti: &other,
        subject: &subject,
        generation: 1,
    };
    assert!(!reader.is_revoked(sibling).await.expect("check"));
    writer
        .revoke_subject_below(&subject, 2)
        .await
        .expect("revoke subject");
    assert!(reader.is_revoked(sibling).await.expect("check"));
    assert!(
        !reader
            .is_revoked(TokenFacts {
                generation: 2,
                ..sibling
            })
            .await
            .expect("check")
    );
}

#[tokio::test]
async fn revocations_expire_with_the_token() {
    let store =
        RevocationStore::connect(&settings(Mode::Production, suite_redis_url())).expect("store");
    let reader =
        RevocationStore::connect(&settings(Mode::Production, suite_redis_url())).expect("reader");
    store.seed(&[], &[]).await.expect("seed");
    let jti = unique("short");
    store
        .revoke_token(&jti, unix_now() + 1)
        .await
        .expect("revoke");
    let token = TokenFacts {
        jti: &jti,
        subject: "s",
        generation: 0,
    };
    assert!(reader.is_revoked(token).await.expect("check"));
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert!(
        !reader.is_revoked(token).await.expect("check"),
        "the key expired with the token"
    );
}

/// A loopback port where nothing listens.
fn dead_redis_url() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("address").port();
    drop(listener);
    format!("redis://127.0.0.1:{port}")
}

#[tokio::test]
async fn production_fails_closed_when_redis_is_unreachable() {
    let store =
        RevocationStore::connect(&settings(Mode::Production, dead_redis_url())).expect("store");
    let token = TokenFacts {
        jti: "j",
        subject: "s",
        generation: 0,
    };
    assert_eq!(
        store.is_revoked(token).await,
        Err(RevocationError::Unavailable)
    );
    assert_eq!(
        store.revoke_token("j", unix_now() + 60).await,
        Err(RevocationError::Unavailable)
    );
}

#[tokio::test]
async fn development_falls_back_to_its_own_store() {
    let store =
        RevocationStore::connect(&settings(Mode::Development, dead_redis_url())).expect("store");
    let token = TokenFacts {
        jti: "j",
        subject: "s",
        generation: 0,
    };
    assert_eq!(store.is_revoked(token).await, Ok(false));
    store
        .revoke_token("j", unix_now() + 60)
        .await
        .expect("revocation kept locally");
    assert_eq!(store.is_revoked(token).await, Ok(true));
}

/// The suite's Redis, logical database `index`: a test that must see Redis without its seeded
/// marker uses a database of its own, so the other tests' marker is untouched.
fn redis_database_url(index: u8) -> String {
    format!("{}/{index}", suite_redis_url().trim_end_matches('/'))
}

#[tokio::test]
async fn a_redis_that_lost_its_data_is_not_trusted_until_it_is_seeded_again() {
    let url = redis_database_url(9);
    let raw = fred::prelude::Builder::from_config(
        fred::prelude::Config::from_url(&url).expect("redis url"),
    )
    .build()
    .expect("client");
    raw.init().await.expect("connect");
    let () = raw.del(SEEDED_MARKER_KEY).await.expect("forget the marker");

    let reader =
        RevocationStore::connect(&settings(Mode::Production, url.clone())).expect("reader");
    let writer = RevocationStore::connect(&settings(Mode::Production, url)).expect("writer");
    let (revoked_jti, subject, other_jti) = (unique("gone"), unique("subject"), unique("fine"));
    let revoked = TokenFacts {
        jti: &revoked_jti,
        subject: "someone",
        generation: 0,
    };
    let demoted = TokenFacts {
        jti: &other_jti,
        subject: &subject,
        generation: 3,
    };
    assert_eq!(
        reader.is_revoked(demoted).await,
        Err(RevocationError::Unavailable),
        "an unseeded Redis cannot vouch that a token is not revoked"
    );
    writer
        .seed(
            &[RevokedToken {
                jti: revoked_jti.clone(),
                expires_at: unix_now() + 600,
            }],
            &[SubjectFloor {
                subject: subject.clone(),
                lowest_valid_generation: 4,
            }],
        )
        .await
        .expect("seed");
    assert_eq!(reader.is_revoked(revoked).await, Ok(true));
    assert_eq!(reader.is_revoked(demoted).await, Ok(true));
    assert_eq!(
        reader
            .is_revoked(TokenFacts {
                generation: 4,
                ..demoted
            })
            .await,
        Ok(false),
        "a seeded Redis answers again"
    );
    let () = raw.del(SEEDED_MARKER_KEY).await.expect("lose the marker");
    assert_eq!(
        reader
            .is_revoked(TokenFacts {
                generation: 4,
                ..demoted
            })
            .await,
        Err(RevocationError::Unavailable)
    );
    assert_eq!(
        reader.is_revoked(revoked).await,
        Ok(true),
        "a revocation still present is honoured without the marker"
    );
}
