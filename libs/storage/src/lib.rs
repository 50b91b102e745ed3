//! One way to open a service's database, whichever backend the URL names. Each service still
//! owns its schema and runs its own migrations on the connection this returns.

use sea_orm::{
    ConnectOptions, ConnectionTrait, Database, DatabaseBackend, DatabaseConnection, DbErr,
    Statement,
};

/// The stable code that opens the error of a service started with migrations off against a
/// schema that lacks some of them (see [`prepare_schema`]).
pub const SCHEMA_NOT_MIGRATED: &str = "schema_not_migrated";

pub mod failover;
mod kept;

pub use kept::{KEEP_AT_MOST, KeptConnection, statement_error};

/// Opens `database_url` (`postgres://…`, or `sqlite://…?mode=rwc` for the embedded default).
/// SQLite runs in WAL mode with full sync, so an acknowledged write survives a crash. A
/// PostgreSQL URL may name several servers (`postgres://u@h1:p1,h2:p2/db?target_session_attrs=
/// read-write`): the pool then follows the read-write one across a failover ([`failover`]).
pub async fn connect(database_url: &str) -> Result<DatabaseConnection, DbErr> {
    connect_with_max_connections(database_url, DEFAULT_MAX_CONNECTIONS).await
}

/// The pool size a service's database connection has unless its configuration says otherwise.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 8;

/// A pooled connection idle for at least this long is pinged before it is handed out; one used
/// more recently is handed out as it is. sqlx already pings each connection when it is returned
/// to the pool (the writers that run one statement after another keep theirs instead:
/// [`KeptConnection`]), and its default of pinging it again on every acquire cost every statement and
/// transaction one more round trip to the server on the request's path (issue 14: two of the
/// inference service's seven per prediction). A server that drops a connection within this
/// long of its last use costs that connection's next statement an error (the connection is
/// then closed and the next statement gets a new one), as a restart costs statements in flight.
pub const PING_IF_IDLE_FOR: std::time::Duration = std::time::Duration::from_secs(1);

/// `database_url` with PostgreSQL settings for every session its connections open: sqlx passes
/// each `options[name]=value` query parameter to the server at connect, after any the URL
/// names already (a setting named twice takes the last value).
pub fn with_session_settings(database_url: &str, settings: &[(&str, &str)]) -> String {
    let mut url = database_url.to_owned();
    for (name, value) in settings {
        url.push(if url.contains('?') { '&' } else { '?' });
        url.push_str(&format!("options%5B{name}%5D={value}"));
    }
    url
}

/// [`connect`] with a pool of at most `max_connections` (at least one).
pub async fn connect_with_max_connections(
    database_url: &str,
    max_connections: u32,
) -> Result<DatabaseConnection, DbErr> {
    let max_connections = max_connections.max(1);
    if let Some(hosts) = failover::HostList::parse(database_url)? {
        return failover::connect_to_one_of(hosts, max_connections).await;
    }
    let mut options = ConnectOptions::new(database_url.to_owned());
    // Statement logging could carry request values into logs; the services log what they mean.
    options
        .sqlx_logging(false)
        .max_connections(max_connections)
        .test_before_acquire_if_idle_for(PING_IF_IDLE_FOR);
    let connection = Database::connect(options).await?;
    if connection.get_database_backend() == DatabaseBackend::Sqlite {
        connection
            .execute_unprepared("PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;")
            .await?;
    }
    Ok(connection)
}

/// Brings a service's schema up to date. Several replicas (or several services on one
/// PostgreSQL cluster, which share its roles) may migrate at the same moment; PostgreSQL then
/// refuses the loser's DDL with a catalogue conflict (`pg_type_typname_nsp_index`,
/// `pg_authid_rolname_index`, "tuple concurrently updated"). Each migration runs in a
/// transaction on PostgreSQL, so the loser changed nothing: it tries again and finds the work
/// done. Any other error is returned at once.
pub async fn migrate<M: sea_orm_migration::MigratorTrait>(
    connection: &DatabaseConnection,
) -> Result<(), DbErr> {
    const ATTEMPTS: u32 = 5;
    let mut attempt = 1;
    loop {
        match M::up(connection, None).await {
            Ok(()) => return Ok(()),
            Err(error) if attempt < ATTEMPTS && is_concurrent_migration_conflict(&error) => {
                tokio::time::sleep(std::time::Duration::from_millis(100 * u64::from(attempt)))
                    .await;
                attempt += 1;
            }
            Err(error) => return Err(error),
        }
    }
}

/// Readies a service's schema at start. With `run_migrations` (the default outside the chart:
/// `medai up`, the tests) the migrations run here, as [`migrate`]. Without (the chart, where a
/// pre-install/pre-upgrade Job ran them with the schema owner's role and the service connects
/// with a narrower one) nothing is created or changed: every migration must already be recorded,
/// otherwise the service refuses to start with a [`SCHEMA_NOT_MIGRATED`] error naming what is
/// missing.
pub async fn prepare_schema<M: sea_orm_migration::MigratorTrait>(
    connection: &DatabaseConnection,
    run_migrations: bool,
) -> Result<(), DbErr> {
    if run_migrations {
        return migrate::<M>(connection).await;
    }
    let pending = pending_migrations::<M>(connection).await?;
    match pending.first() {
        None => Ok(()),
        Some(first) => Err(DbErr::Migration(format!(
            "{SCHEMA_NOT_MIGRATED}: {} of {} migrations are not applied (first: {first}); \
             migrations are off for this service, so run its migration Job (`<binary> --migrate` \
             with the schema owner's database URL) first",
            pending.len(),
            M::migrations().len(),
        ))),
    }
}

/// The names of `M`'s migrations not recorded in its migration table, read without creating
/// anything (sea-orm-migration's own status query would create the table).
pub async fn pending_migrations<M: sea_orm_migration::MigratorTrait>(
    connection: &DatabaseConnection,
) -> Result<Vec<String>, DbErr> {
    let backend = connection.get_database_backend();
    let table = M::migration_table_name().to_string();
    let exists_query = match backend {
        DatabaseBackend::Postgres => Statement::from_sql_and_values(
            backend,
            "SELECT 1 FROM pg_catalog.pg_tables WHERE schemaname = current_schema() AND tablename = $1",
            [table.clone().into()],
        ),
        DatabaseBackend::Sqlite => Statement::from_sql_and_values(
            backend,
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
            [table.clone().into()],
        ),
        other => {
            return Err(DbErr::Custom(format!(
                "unsupported database backend {other:?}"
            )));
        }
    };
    let applied: Vec<String> = if connection.query_one_raw(exists_query).await?.is_some() {
        connection
            .query_all_raw(Statement::from_string(
                backend,
                format!("SELECT version FROM \"{table}\""),
            ))
            .await?
            .iter()
            .map(|row| row.try_get::<String>("", "version"))
            .collect::<Result<_, _>>()?
    } else {
        Vec::new()
    };
    Ok(M::migrations()
        .iter()
        .map(|migration| migration.name().to_owned())
        .filter(|name| !applied.contains(name))
        .collect())
}

/// Whether `error` is PostgreSQL refusing DDL because another session did the same at once.
fn is_concurrent_migration_conflict(error: &DbErr) -> bool {
    let text = error.to_string();
    text.contains("duplicate key value violates unique constraint \"pg_")
        || text.contains("tuple concurrently updated")
        || text.contains("tuple concurrently deleted")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_catalogue_conflicts_count_as_concurrent_migrations() {
        let conflict = DbErr::Custom(
            "duplicate key value violates unique constraint \"pg_type_typname_nsp_index\"".into(),
        );
        assert!(is_concurrent_migration_conflict(&conflict));
        let role = DbErr::Custom("ERROR: tuple concurrently updated".into());
        assert!(is_concurrent_migration_conflict(&role));
        let own_table =
            DbErr::Custom("duplicate key value violates unique constraint \"results_pkey\"".into());
        assert!(!is_concurrent_migration_conflict(&own_table));
        assert!(!is_concurrent_migration_conflict(&DbErr::Custom(
            "syntax error".into()
        )));
    }

    #[test]
    fn session_settings_reach_the_server_options_sqlx_reads_from_the_url() {
        use sea_orm::sqlx::postgres::PgConnectOptions;
        use std::str::FromStr;
        let settings = [("enable_seqscan", "off"), ("synchronous_commit", "off")];
        let bare = with_session_settings("postgres://u@db:5432/results", &settings);
        let options = PgConnectOptions::from_str(&bare).expect("parses");
        assert_eq!(
            options.get_options(),
            Some("-c enable_seqscan=off -c synchronous_commit=off")
        );
        assert_eq!(options.get_database(), Some("results"));
        // Beside the URL's own parameters, which keep their meaning.
        let with_query = with_session_settings(
            "postgres://u@db:5432/results?sslmode=disable&options=-c%20search_path%3Dmedai",
            &settings,
        );
        let options = PgConnectOptions::from_str(&with_query).expect("parses");
        assert_eq!(
            options.get_options(),
            Some("-c search_path=medai -c enable_seqscan=off -c synchronous_commit=off")
        );
        // A list of servers keeps its settings on each server's own URL.
        let hosts = failover::HostList::parse(&with_session_settings(
            "postgres://u@a:5432,b:5433/results?target_session_attrs=read-write",
            &settings,
        ))
        .expect("parses")
        .expect("a list");
        for url in &hosts.single_host_urls {
            let options = PgConnectOptions::from_str(url).expect("parses");
            assert_eq!(
                options.get_options(),
                Some("-c enable_seqscan=off -c synchronous_commit=off"),
                "{url}"
            );
        }
    }
}
