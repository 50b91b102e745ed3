//! The record of revocations in auth's own database: revoked access tokens until they expire,
//! and per-subject generation floors. Each is written in the transaction of the change that
//! causes it, so a revocation is durable once that change is committed. The revocation store
//! (Redis, or the in-process store of the embedded mesh) is a cache of this record: it is
//! seeded from it when auth starts, and again whenever Redis comes back without its seeded
//! marker (a restart without persistence, a flush).

use std::sync::Arc;
use std::time::Duration;

use medai_revocation::{RevocationStore, RevokedToken, SUBJECT_REVOCATION_TTL, SubjectFloor};
use sea_orm::sea_query::OnConflict;
use sea_orm::{ColumnTrait, ConnectionTrait, DatabaseConnection, EntityTrait, QueryFilter, Set};

use crate::error::AuthError;
use crate::store::{revoked_token, subject_token_floor};

/// How often auth asks Redis whether it still holds the seeded marker.
pub const SEED_CHECK_INTERVAL: Duration = Duration::from_millis(500);

/// Records that the access token `jti` of `subject` is revoked until `expires_at`.
pub async fn record_revoked_token(
    connection: &impl ConnectionTrait,
    jti: &str,
    subject: &str,
    expires_at: u64,
) -> Result<(), AuthError> {
    let row = revoked_token::ActiveModel {
        jti: Set(jti.to_owned()),
        subject: Set(subject.to_owned()),
        expires_at: Set(i64::try_from(expires_at).unwrap_or(i64::MAX)),
        revoked_at: Set(crate::unix_now() as i64),
    };
    // Revoked twice (a logout, then its family): the first row stands.
    revoked_token::Entity::insert(row)
        .on_conflict_do_nothing()
        .exec(connection)
        .await?;
    Ok(())
}

/// Records that every token of `subject` below `lowest_valid_generation` is refused.
pub async fn record_subject_floor(
    connection: &impl ConnectionTrait,
    subject: &str,
    lowest_valid_generation: i64,
) -> Result<(), AuthError> {
    let now = crate::unix_now() as i64;
    let row = subject_token_floor::ActiveModel {
        subject: Set(subject.to_owned()),
        lowest_valid_generation: Set(lowest_valid_generation),
        kept_until: Set(now + SUBJECT_REVOCATION_TTL.as_secs() as i64),
        raised_at: Set(now),
    };
    subject_token_floor::Entity::insert(row)
        .on_conflict(
            OnConflict::column(subject_token_floor::Column::Subject)
                .update_columns([
                    subject_token_floor::Column::LowestValidGeneration,
                    subject_token_floor::Column::KeptUntil,
                    subject_token_floor::Column::RaisedAt,
                ])
                .to_owned(),
        )
        .exec(connection)
        .await?;
    Ok(())
}

/// Every revocation still in force; expired ones are deleted on the way.
pub async fn load_in_force(
    connection: &DatabaseConnection,
) -> Result<(Vec<RevokedToken>, Vec<SubjectFloor>), AuthError> {
    let now = crate::unix_now() as i64;
    revoked_token::Entity::delete_many()
        .filter(revoked_token::Column::ExpiresAt.lte(now))
        .exec(connection)
        .await?;
    let tokens = revoked_token::Entity::find()
        .filter(revoked_token::Column::ExpiresAt.gt(now))
        .all(connection)
        .await?
        .into_iter()
        .map(|row| RevokedToken {
            jti: row.jti,
            expires_at: u64::try_from(row.expires_at).unwrap_or(0),
        })
        .collect();
    let floors = subject_token_floor::Entity::find()
        .filter(subject_token_floor::Column::KeptUntil.gt(now))
        .all(connection)
        .await?
        .into_iter()
        .map(|row| SubjectFloor {
            subject: row.subject,
            lowest_valid_generation: u64::try_from(row.lowest_valid_generation).unwrap_or(0),
        })
        .collect();
    Ok((tokens, floors))
}

/// Writes the record into the revocation store (and Redis, when there is one).
pub async fn seed(
    connection: &DatabaseConnection,
    store: &RevocationStore,
) -> Result<(), AuthError> {
    store.start_seed();
    let (tokens, floors) = load_in_force(connection).await?;
    store.seed(&tokens, &floors).await?;
    Ok(())
}

/// Runs for the life of the service: re-seeds Redis whenever it lost its seeded marker (and
/// retries a seed that failed), so verifiers are not left failing closed.
pub async fn keep_seeded(connection: DatabaseConnection, store: Arc<RevocationStore>) {
    let mut ticks = tokio::time::interval(SEED_CHECK_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        match store.is_seeded().await {
            Ok(true) => continue,
            Ok(false) => {
                tracing::warn!("the revocation store lost its data; seeding it from the database");
            }
            // Unreachable: try again at the next tick; the seed below would fail as well.
            Err(_) => continue,
        }
        if let Err(error) = seed(&connection, &store).await {
            tracing::error!(error = %error, "revocations could not be seeded; retrying");
        }
    }
}
