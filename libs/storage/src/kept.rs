//! A pooled PostgreSQL connection that one writer task keeps between its statements.
//!
//! sqlx pings every connection it takes back into a pool (`PoolConnection::return_to_pool`,
//! unconditional in sqlx 0.9): a Sync message and a wait for the server's ReadyForQuery, so a
//! statement run on the pool costs the server a second wake-up and the service a second
//! round trip. A writer that runs one statement at a time (the ledger's group commit, the
//! results' and the delivery notes' writers) keeps its connection instead, and gives it back
//! only when that is what a pooled acquire would have checked:
//! - after a statement failed (the pool's ping then closes it if it is broken, and the next
//!   acquire finds a sound one);
//! - once it has been idle for [`crate::PING_IF_IDLE_FOR`] (the pool pings a connection that
//!   idle before handing it out, so a server restart costs no statement an error);
//! - once the writer has waited that long for work ([`KeptConnection::await_work`]), so an idle
//!   writer holds no connection, and as soon as the pool is closed (a closing pool waits for
//!   every connection to come back);
//! - once it has been kept for [`KEEP_AT_MOST`] (the pool's own rules on a connection's age
//!   apply again: its maximum lifetime, and a failover's closing of connections opened before
//!   the switch, see [`crate::failover`]).

use std::time::{Duration, Instant};

use sea_orm::sqlx::pool::PoolConnection;
use sea_orm::sqlx::postgres::PgRow;
use sea_orm::sqlx::{self, PgConnection, PgPool, Postgres};

/// A statement's sqlx error as sea-orm's, for writers that return sea-orm's errors.
pub fn statement_error(error: sqlx::Error) -> sea_orm::DbErr {
    sea_orm::DbErr::Exec(sea_orm::RuntimeErr::SqlxError(error.into()))
}

/// The longest a writer keeps one connection without giving it back to its pool.
pub const KEEP_AT_MOST: Duration = Duration::from_secs(30);

/// One writer's connection, taken from `pool` when first needed (see the module documentation).
pub struct KeptConnection {
    pool: PgPool,
    kept: Option<Kept>,
}

struct Kept {
    connection: PoolConnection<Postgres>,
    taken_at: Instant,
    last_used: Instant,
}

impl KeptConnection {
    pub fn new(pool: PgPool) -> Self {
        Self { pool, kept: None }
    }

    /// The connection a writer on `connection` keeps: on PostgreSQL's pool; `None` on SQLite,
    /// whose writers use the pool as it is.
    pub fn for_writer_on(connection: &sea_orm::DatabaseConnection) -> Option<Self> {
        match &connection.inner {
            sea_orm::DatabaseConnectionType::SqlxPostgresPoolConnection(_) => {
                Some(Self::new(connection.get_postgres_connection_pool().clone()))
            }
            _ => None,
        }
    }

    /// The kept connection, first given back and taken afresh if it idled or aged past the
    /// pool's checks, or taken from the pool if none is kept.
    pub async fn connection(&mut self) -> Result<&mut PgConnection, sqlx::Error> {
        let now = Instant::now();
        if self.kept.as_ref().is_some_and(|kept| {
            now.duration_since(kept.last_used) >= crate::PING_IF_IDLE_FOR
                || now.duration_since(kept.taken_at) >= KEEP_AT_MOST
        }) {
            self.kept = None;
        }
        let kept = match self.kept.take() {
            Some(kept) => kept,
            None => Kept {
                connection: self.pool.acquire().await?,
                taken_at: now,
                last_used: now,
            },
        };
        let kept = self.kept.insert(Kept {
            last_used: now,
            ..kept
        });
        Ok(&mut kept.connection)
    }

    /// Passes on `outcome`, giving the connection back to the pool if it is an error (the
    /// statement may have left it broken or mid-protocol; the pool's ping sorts that out).
    pub fn outcome<T>(&mut self, outcome: Result<T, sqlx::Error>) -> Result<T, sqlx::Error> {
        if outcome.is_err() {
            self.give_back();
        }
        outcome
    }

    /// Gives the connection back to the pool now (the next statement takes one afresh), e.g.
    /// before using the pool directly when it holds a single connection.
    pub fn give_back(&mut self) {
        self.kept = None;
    }

    /// Runs a sea-orm statement on the kept connection and returns its rows.
    pub async fn fetch_all<S: sea_orm::StatementBuilder>(
        &mut self,
        statement: &S,
    ) -> Result<Vec<PgRow>, sqlx::Error> {
        let built = sea_orm::DatabaseBackend::Postgres.build(statement);
        let values =
            sea_query_sqlx::SqlxValues(built.values.unwrap_or(sea_orm::Values(Vec::new())));
        let connection = self.connection().await?;
        let outcome = sqlx::query_with(sqlx::AssertSqlSafe(built.sql), values)
            .fetch_all(connection)
            .await;
        self.outcome(outcome)
    }

    /// Awaits `work` (a writer's next batch), giving the kept connection of `kept` back to the
    /// pool once idle for [`crate::PING_IF_IDLE_FOR`] or as soon as the pool is closed.
    pub async fn await_work<F: Future>(kept: Option<&mut Self>, work: F) -> F::Output {
        let Some(kept) = kept.filter(|kept| kept.is_kept()) else {
            return work.await;
        };
        let mut work = std::pin::pin!(work);
        tokio::select! {
            biased;
            output = &mut work => return output,
            () = tokio::time::sleep(crate::PING_IF_IDLE_FOR) => {}
            () = kept.pool.close_event() => {}
        }
        kept.give_back();
        work.await
    }

    /// Whether a connection is kept now.
    pub fn is_kept(&self) -> bool {
        self.kept.is_some()
    }
}
